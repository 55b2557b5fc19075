"""CIFAR-100: restricted unpickling of the python-pickle files, shapes, GPU-style augmentation."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdbench.data import prepare_data
from kdbench.errors import DataError
from kdbench_builtins import tasks_cifar100 as tc
from kdbench_builtins.tasks_cifar100 import Cifar100, Cifar100Config

torch.set_num_threads(1)


def make_folder(root: Path, n: int = 20, data: Any = None) -> Path:
    """A tiny cifar-100-python folder in the real format: pickled dicts with bytes keys."""
    rng = np.random.default_rng(0)
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        obj = {b"filenames": [f"img{i}.png".encode() for i in range(n)], b"batch_label": b"x",
               b"fine_labels": [int(x) for x in rng.integers(0, 100, n)],
               b"coarse_labels": [int(x) for x in rng.integers(0, 20, n)],
               b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8) if data is None else data}
        with (d / split).open("wb") as f:
            pickle.dump(obj, f)
    with (d / "meta").open("wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, f)
    return d


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


class Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_forbidden_global_is_refused(tmp_path: Path) -> None:
    d = make_folder(tmp_path)
    with (d / "train").open("wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0], b"x": Evil()}, f)
    with pytest.raises(DataError, match=r"cifar-100-python/train: refusing to unpickle global (posix|os|nt)\.system"):
        Cifar100(Cifar100Config(data_dir=str(tmp_path))).load()


def test_bad_files(tmp_path: Path) -> None:
    make_folder(tmp_path, data=np.zeros((20, 100), np.uint8))
    with pytest.raises(DataError, match=r"train: 'data' must be uint8 of shape \(N, 3072\), got uint8 \(20, 100\)"):
        Cifar100(Cifar100Config(data_dir=str(tmp_path))).load()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="train: not a readable pickle"):
        Cifar100(Cifar100Config(data_dir=str(tmp_path))).load()
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
