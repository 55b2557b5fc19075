"""CIFAR-100: restricted unpickling of the python-pickle files, shapes, GPU-style augmentation."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdbench.contract.errors import DataError
from kdbench.engine.data import prepare_data
from kdbench_builtins import tasks_cifar100 as tc
from kdbench_builtins.tasks_cifar100 import Cifar100, Cifar100Config

torch.set_num_threads(1)


def _key(k: str, str_keys: bool) -> Any:
    return k if str_keys else k.encode()


def make_folder(root: Path, n: int = 20, data: Any = None, *, protocol: int = pickle.DEFAULT_PROTOCOL,
                str_keys: bool = False, dumps: Any = None) -> Path:
    """A tiny cifar-100-python folder in the real layout: pickled dicts with bytes (or str) keys,
    written by this Python with ``protocol`` (or by ``dumps(obj) -> bytes``)."""
    rng = np.random.default_rng(0)
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    dumps = dumps or (lambda obj: pickle.dumps(obj, protocol=protocol))
    for split in ("train", "test"):
        obj = {"filenames": [f"img{i}.png".encode() for i in range(n)], "batch_label": b"",
               "fine_labels": [int(x) for x in rng.integers(0, 100, n)],
               "coarse_labels": rng.integers(0, 20, n),  # a numpy array value
               "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8) if data is None else data}
        (d / split).write_bytes(dumps({_key(k, str_keys): v for k, v in obj.items()}))
    meta = {"fine_label_names": [f"c{i}".encode() for i in range(100)],
            "coarse_label_names": [f"s{i}".encode() for i in range(20)]}
    (d / "meta").write_bytes(dumps({_key(k, str_keys): v for k, v in meta.items()}))
    return d


_PurePickler: Any = pickle._Pickler  # type: ignore[attr-defined]  # the pure-Python pickler


class Py2Pickler(_PurePickler):
    """Writes bytes as Python 2 ``str`` (SHORT_BINSTRING / BINSTRING), as cPickle did."""

    dispatch = _PurePickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_dumps(obj: Any) -> bytes:
    """Protocol-2 bytes shaped like the original files: Python 2 str and numpy 1.x global names."""
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def py2_pickle(arr: np.ndarray, labels: list[int]) -> bytes:
    """Protocol-2 bytes as Python 2 + numpy 1.x wrote the original files (str -> BINSTRING,
    globals numpy.core.multiarray._reconstruct / numpy.ndarray / numpy.dtype)."""
    def s(b: bytes) -> bytes:
        return b"T" + struct.pack("<i", len(b)) + b

    def i(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    out = b"\x80\x02}q\x00(" + s(b"fine_labels") + b"](" + b"".join(i(v) for v in labels) + b"e"
    out += s(b"data") + b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n"
    out += b"K\x00\x85" + s(b"b") + b"\x87R"
    out += b"(K\x01" + i(arr.shape[0]) + i(arr.shape[1]) + b"\x86"
    out += b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
    out += b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    out += b"\x89" + s(arr.tobytes()) + b"tb" + b"u."
    return out


def test_loads_real_format(tmp_path: Path) -> None:
    d = make_folder(tmp_path)
    task = Cifar100(Cifar100Config(data_dir=str(tmp_path)))
    out = task.load()
    assert {k: len(v) for k, v in out.items()} == {"train": 20, "test": 20}
    raw = pickle.loads((d / "train").read_bytes())
    img = np.asarray(out["train"][3]["image"], dtype=np.uint8)
    assert img.shape == (3, 32, 32) and np.array_equal(img.reshape(-1), raw[b"data"][3])
    assert out["train"]["label"] == raw[b"fine_labels"]
    assert task.label_names[:2] == ("c0", "c1") and task.load_info["files"]["test"]["rows"] == 20
    assert Cifar100(Cifar100Config(data_dir=str(d))).load()["test"]["label"] == out["test"]["label"]


def test_python2_numpy1_pickle_loads(tmp_path: Path) -> None:
    arr = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    blob = py2_pickle(arr, [7, 99])
    f = tmp_path / "train"
    f.write_bytes(blob)
    images, labels = tc.read_split(f)
    assert np.array_equal(images.reshape(2, -1), arr) and labels.tolist() == [7, 99]
    assert b"numpy.core.multiarray" in blob and b"_codecs" not in blob


@pytest.mark.parametrize("how", ["p2-bytes", "p2-str", "p4-bytes", "p4-str", "p5-bytes", "py2"])
def test_python3_and_python2_pickles_load(tmp_path: Path, how: str) -> None:
    dumps = py2_dumps if how == "py2" else None
    d = make_folder(tmp_path, protocol=int(how[1]) if how != "py2" else 2, str_keys=how.endswith("str"),
                    dumps=dumps)
    blob = (d / "train").read_bytes()
    if how.startswith("p2"):
        assert b"_codecs\nencode" in blob and b"numpy._core.multiarray" in blob
    if how == "py2":
        assert b"_codecs" not in blob and b"numpy.core.multiarray" in blob
    task = Cifar100(Cifar100Config(data_dir=str(tmp_path)))
    out = task.load()
    ref = make_folder(tmp_path / "ref", protocol=4)  # same content, default protocol
    raw = pickle.loads((ref / "train").read_bytes())
    img = np.asarray(out["train"][5]["image"], dtype=np.uint8)
    assert np.array_equal(img.reshape(-1), raw[b"data"][5]) and out["train"]["label"] == raw[b"fine_labels"]
    assert task.label_names[:2] == ("c0", "c1") and len(out["test"]) == 20


class Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_forbidden_global_is_refused_and_not_run(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Evil(marker), protocol=protocol)
    pickle.loads(payload)  # the payload is live: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    d = make_folder(tmp_path)
    (d / "train").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0],
                                            b"x": Evil(marker)}, protocol=protocol))
    with pytest.raises(DataError, match=r"cifar-100-python/train: refusing to unpickle global (posix|os|nt)\.system"):
        Cifar100(Cifar100Config(data_dir=str(tmp_path))).load()
    assert not marker.exists()


def test_allowed_globals_refuse_misuse(tmp_path: Path) -> None:
    f = tmp_path / "train"
    blob = pickle.dumps({b"data": b"x"}, protocol=2)
    f.write_bytes(blob.replace(b"latin1", b"rot_13"))  # _codecs.encode with another codec
    with pytest.raises(DataError, match="train: not a readable pickle .*latin1 of a str, got 'rot_13'"):
        tc.read_split(f)
    f.write_bytes(b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R.")  # bytes(2**30)
    with pytest.raises(DataError, match="train: not a readable pickle .*bytes"):
        tc.read_split(f)


def test_bad_files(tmp_path: Path) -> None:
    d = make_folder(tmp_path, data=np.zeros((20, 100), np.uint8))
    (d / "meta").write_bytes(pickle.dumps({b"x": 1}))  # train's shape is reported first
    with pytest.raises(DataError, match=r"train: 'data' must be uint8 of shape \(N, 3072\), got uint8 \(20, 100\)"):
        Cifar100(Cifar100Config(data_dir=str(tmp_path))).load()
    d = make_folder(tmp_path)
    (d / "meta").write_bytes(pickle.dumps({b"x": 1}))
    with pytest.raises(DataError, match=r"meta: no 'fine_label_names' entry \(has \['x'\]\)"):
        Cifar100(Cifar100Config(data_dir=str(tmp_path))).load()
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"a"] * 99}))
    with pytest.raises(DataError, match=r"meta: 'fine_label_names' must list 100 names, got 99 entries"):
        Cifar100(Cifar100Config(data_dir=str(tmp_path))).load()
    (d / "test").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(DataError, match=r"test: no 'fine_labels' entry"):
        Cifar100(Cifar100Config(data_dir=str(tmp_path))).load()
    make_folder(tmp_path)
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="train: not a readable pickle"):
        Cifar100(Cifar100Config(data_dir=str(tmp_path))).load()
    make_folder(tmp_path)
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DataError, match=r"missing file .*meta; data_dir must hold cifar-100-python"):
        Cifar100(Cifar100Config(data_dir=str(tmp_path))).load()
    with pytest.raises(DataError, match=r"set task.cifar100.data_dir=.*source=\"hub\""):
        Cifar100().load()
    f = tmp_path / "labels"
    with f.open("wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}, fh)
    with pytest.raises(DataError, match="fine labels outside 0..99"):
        tc.read_split(f)


def test_hub_source_uses_uoft_cs(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    from PIL import Image

    calls: list[tuple[Any, ...]] = []

    def fake(*args: Any, **kw: Any) -> datasets.DatasetDict:
        calls.append(args)
        img = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (10, 200)]
        feats = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=[f"n{i}" for i in range(100)])})
        ds = datasets.Dataset.from_dict({"img": img, "fine_label": [3, 4]}, features=feats)
        return datasets.DatasetDict({"train": ds, "test": ds})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    out = Cifar100(Cifar100Config(source="hub")).load()
    assert calls == [("uoft-cs/cifar100",)]
    assert out["train"]["label"] == [3, 4] and np.asarray(out["train"][1]["image"]).max() == 200


def test_transform_normalises_and_augments_from_the_generator() -> None:
    task = Cifar100()
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    ev = task.transform({"pixel_values": x}, train=False, generator=None)["pixel_values"]
    ref = (x.float() / 255 - torch.tensor(tc.MEAN).view(1, 3, 1, 1)) / torch.tensor(tc.STD).view(1, 3, 1, 1)
    assert torch.allclose(ev, ref, atol=1e-6)
    a = task.transform({"pixel_values": x}, train=True, generator=torch.Generator().manual_seed(1))["pixel_values"]
    b = task.transform({"pixel_values": x}, train=True, generator=torch.Generator().manual_seed(1))["pixel_values"]
    c = task.transform({"pixel_values": x}, train=True, generator=torch.Generator().manual_seed(2))["pixel_values"]
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    # every output is a 32x32 window of the zero-padded image, maybe mirrored
    padded = torch.nn.functional.pad(x.float() / 255, (4, 4, 4, 4))
    mean, std = torch.tensor(tc.MEAN).view(3, 1, 1), torch.tensor(tc.STD).view(3, 1, 1)
    for k in range(6):
        cands = [padded[k, :, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
        cands += [w.flip(-1) for w in cands]
        assert any(torch.allclose((w - mean) / std, a[k], atol=1e-5) for w in cands)


def test_prepare_data_and_task_metadata(tmp_path: Path) -> None:
    make_folder(tmp_path)
    td = prepare_data(Cifar100(Cifar100Config(data_dir=str(tmp_path))), tokenizer=None)
    px = td.splits["test"].tensors["pixel_values"]
    assert px.dtype == torch.uint8 and px.shape == (20, 3, 32, 32)
    assert len(td.train) + len(td.quiz) == 20 and td.info["source"] == "local"
    assert Cifar100.eval_splits == ("test",) and Cifar100.augments and Cifar100.modality == "vision"
    assert "test" in (tc.__doc__ or "") and Cifar100.num_labels == 100 and Cifar100.sources
