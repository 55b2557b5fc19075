"""CIFAR-100 (fine labels) from the Hub or the torchvision-style python pickles.

Splits: "train" (50,000) and "test" (10,000). ``eval_splits = ("test",)``: by CIFAR convention
(RepDistiller, MetaDistil CV) results are reported on the test set and there is no dev set; a
method that selects epochs on it therefore tunes on the reported split, which the leaderboard
should state (or select on the quiz split carved from train).

Local files (``cifar-100-python/{train,test,meta}``) are pickles of dicts (bytes or str keys ->
numpy arrays / lists): Python 2 wrote the originals; Python 3 re-saves (protocol 2 encodes bytes
through ``_codecs.encode``, protocol 5 arrays through ``numpy._core.numeric._frombuffer``). They are
read with a restricted unpickler that resolves only :data:`ALLOWED_GLOBALS` - numpy's array,
dtype and scalar reconstructors under ``numpy.core`` (numpy 1.x) and ``numpy._core`` (numpy >= 2),
a latin-1-only ``_codecs.encode`` and an argument-less ``bytes`` - and refuses anything else (e.g.
``os.system``) with a :class:`DataError`, so a tampered file cannot run code. train and test are
checked (keys, shapes, label range) before meta; every error is one line naming the file.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench import DataError, DataOptions, SourceOptions, Task, hookimpl, lazy_import
from kdbench import metrics as km

if TYPE_CHECKING:
    import datasets
else:
    datasets = lazy_import("datasets")  # imported on first use (keeps `kdbench ls` fast)

MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)
PAD = 4  # RandomCrop(32, padding=4)


def _numpy_global(module: str, name: str) -> Any:
    """``numpy._core.<module>.<name>`` (numpy >= 2), else ``numpy.core.<module>.<name>``."""
    import importlib

    try:
        return getattr(importlib.import_module(f"numpy._core.{module}"), name)
    except ImportError:  # pragma: no cover - numpy 1.x
        return getattr(importlib.import_module(f"numpy.core.{module}"), name)


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3's protocol-2 pickler uses it for bytes: latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode allowed only as latin1 of a str, got {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as Python 3's protocol-2 pickler writes ``b""``; refuses any argument."""
    if args:
        raise pickle.UnpicklingError("bytes(...) with arguments is not part of a CIFAR pickle")
    return b""


#: (module, name) -> object: the only globals a CIFAR pickle may reference
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(f"numpy{core}.{mod}", name): _numpy_global(mod, name)
       for core in ("._core", ".core")
       for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                         ("numeric", "_frombuffer"))},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only :data:`ALLOWED_GLOBALS`; anything else is a DataError."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 str -> latin1, as torchvision does
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        """Resolve an allowed global or refuse."""
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(f"{self.path}: refusing to unpickle global {module}.{name} (a CIFAR file "
                            "holds only numpy arrays and lists); the file is not an original "
                            "cifar-100-python file, re-download it") from None


def load_pickle(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys, via :class:`RestrictedUnpickler`; ``keys`` must be in it."""
    if not path.is_file():
        raise DataError(f"missing file {path}; data_dir must hold cifar-100-python/{{train,test,meta}} "
                        "(the python version from https://www.cs.toronto.edu/~kriz/cifar.html)")
    with path.open("rb") as f:
        try:
            obj = RestrictedUnpickler(f, path).load()
        except DataError:
            raise
        except Exception as e:
            why = " ".join(str(e).split())[:200]  # one line
            raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {why}); re-download it") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    d = {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}
    for key in keys:
        if key not in d:
            raise DataError(f"{path}: no '{key}' entry (has {sorted(d)}); is this cifar-100-python?")
    return d


def read_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and fine labels (N,) int64 from a train/test pickle."""
    d = load_pickle(path, ("data", "fine_labels"))
    data = d["data"]
    try:
        labels = np.asarray(d["fine_labels"])
    except ValueError:  # ragged / mixed lists
        labels = np.zeros(0, object)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: 'data' must be uint8 of shape (N, 3072), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {shape}; wrong or damaged file")
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: 'fine_labels' must be {data.shape[0]} integers, got shape {labels.shape}")
    if ((labels < 0) | (labels > 99)).any():
        raise DataError(f"{path}: fine labels outside 0..99; wrong or damaged file")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)  # (N, 3072) -> (N, C, H, W)


def read_meta(path: Path) -> tuple[str, ...]:
    """The 100 fine label names of the ``meta`` pickle (bytes or str entries)."""
    names = load_pickle(path, ("fine_label_names",))["fine_label_names"]
    if not isinstance(names, list) or len(names) != 100 or not all(isinstance(n, (bytes, str)) for n in names):
        got = f"{len(names)} entries" if isinstance(names, list) else type(names).__name__
        raise DataError(f"{path}: 'fine_label_names' must list 100 names, got {got}; wrong or damaged file")
    return tuple(n.decode("latin1") if isinstance(n, bytes) else n for n in names)


def images_dataset(images: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
    """A Dataset with ``image`` (Array3D uint8 (C, H, W)) built from Arrow buffers, no copies."""
    from datasets.features.features import Array3DExtensionType

    n, c, h, w = images.shape

    def lists(values: pa.Array, size: int, count: int) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(np.arange(0, count * size + 1, size, dtype=np.int32)), values)

    arr = lists(pa.array(np.ascontiguousarray(images, dtype=np.uint8).reshape(-1)), w, n * c * h)
    arr = lists(lists(arr, h, n * c), c, n)
    image = pa.ExtensionArray.from_storage(Array3DExtensionType((c, h, w), "uint8"), arr)
    return datasets.Dataset(pa.table({"image": image, "label": pa.array(labels, pa.int64())}))


@dataclass(frozen=True)
class Cifar100Config(DataOptions, SourceOptions):
    """Options of the CIFAR-100 task: the shared data options; ``source`` "local"
    (``data_dir`` holds cifar-100-python/, or is that folder) or "hub" (uoft-cs/cifar100)."""


class Cifar100(Task):
    """CIFAR-100, 100 fine classes; top-1 accuracy on the test set (see the module docstring)."""

    name = "cifar100"
    version = "1"
    modality = "vision"
    num_labels = 100
    metrics = ("accuracy",)
    sources = ("local", "hub")
    eval_splits = ("test",)
    augments = True
    Config = Cifar100Config

    def load(self) -> dict[str, datasets.Dataset]:
        """train and test as Datasets with ``image`` (3, 32, 32) uint8 and ``label``."""
        cfg = self.cfg
        if cfg.source == "hub":
            return self._load_hub()
        if cfg.source != "local":
            raise DataError(f"task.cifar100.source={cfg.source!r} is not one of {self.sources}")
        if not cfg.data_dir:
            raise DataError("task 'cifar100' needs the data: set task.cifar100.data_dir=<folder holding "
                            "cifar-100-python/> or task.cifar100.source=\"hub\"")
        root = Path(cfg.data_dir).expanduser()
        root = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
        out, files = {}, {}
        for split in ("train", "test"):  # the image files first: their checks say most about a bad folder
            images, labels = read_split(root / split)
            out[split] = images_dataset(images, labels)
            files[split] = {"file": str(root / split), "rows": len(labels)}
        self.label_names = read_meta(root / "meta")  # type: ignore[misc]  # per instance: the file's names
        self.load_info = {"source": "local", "data_dir": str(root), "files": files}
        return out

    def _load_hub(self) -> dict[str, datasets.Dataset]:
        try:
            dd = datasets.load_dataset("uoft-cs/cifar100")
        except Exception as e:
            raise DataError(f"task 'cifar100' source 'hub' could not load uoft-cs/cifar100 ({type(e).__name__}). "
                            "Hint: it needs network access or a populated HF cache; else set "
                            "task.cifar100.source=\"local\" with task.cifar100.data_dir=...") from None
        self.label_names = tuple(dd["train"].features["fine_label"].names)  # type: ignore[misc]
        out, files = {}, {}
        for split in ("train", "test"):
            ds = dd[split]
            imgs = np.stack([np.asarray(im.convert("RGB"), np.uint8) for im in ds["img"]])  # (N, H, W, C)
            out[split] = images_dataset(imgs.transpose(0, 3, 1, 2), np.asarray(ds["fine_label"]))
            files[split] = {"file": f"hub:uoft-cs/cifar100/{split}", "rows": len(ds)}
        self.load_info = {"source": "hub", "dataset": "uoft-cs/cifar100", "files": files}
        return out

    def transform(self, inputs: dict[str, Tensor], *, train: bool,
                  generator: torch.Generator | None) -> dict[str, Tensor]:
        """uint8 (B, 3, 32, 32) -> normalised float; when ``train``, random crop + flip.

        Crop offsets and flips are drawn from ``generator`` only (on its own device, then moved
        to the batch's), padding with black pixels before normalising, as torchvision does.
        """
        x = inputs["pixel_values"]
        dev = x.device
        x = x.float().div_(255.0)
        if train:
            b, _, h, w = x.shape
            gdev = generator.device if generator is not None else torch.device("cpu")
            offs = torch.randint(0, 2 * PAD + 1, (b, 2), generator=generator, device=gdev).to(dev)  # (B, 2)
            flip = (torch.rand(b, generator=generator, device=gdev) < 0.5).to(dev)  # (B,)
            padded = F.pad(x, (PAD, PAD, PAD, PAD))  # (B, 3, H+8, W+8)
            rows = offs[:, :1] + torch.arange(h, device=dev)  # (B, H)
            cols = offs[:, 1:] + torch.arange(w, device=dev)  # (B, W)
            cols = torch.where(flip[:, None], cols.flip(1), cols)
            bi = torch.arange(b, device=dev)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, 3)
            x = x.permute(0, 3, 1, 2)  # (B, 3, H, W)
        mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=dev).view(1, 3, 1, 1)
        return {**inputs, "pixel_values": ((x - mean) / std).contiguous()}

    def compute_metrics(self, preds: Tensor, labels: Tensor, split: str) -> dict[str, float]:
        """Top-1 accuracy."""
        return km.score(self.metrics, preds, labels)


@hookimpl
def kdbench_register_tasks(register: Any) -> None:
    """Register cifar100."""
    register(Cifar100)
