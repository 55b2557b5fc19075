"""Safe weight files: safetensors written atomically, with a content hash verified on load.

A file holds flat named tensors plus a JSON-able ``meta`` dict. The sha256 of the meta and of every
tensor (name, dtype, shape, bytes, in name order) is stored in the safetensors header, so a
truncated, bit-flipped or foreign file raises :class:`CorruptCheckpoint` instead of loading
garbage. Writes go to a temporary file in the same directory, are fsynced and then renamed with
``os.replace``, so a crash leaves either the old file or the new one (performance.md §5.2).
Nothing here unpickles: no ``torch.load``.

:func:`pack` / :func:`unpack` turn nested states (optimizer ``state_dict()``, RNG states) into flat
tensors + a JSON skeleton and back, so they can go through the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from kdbench.contract.errors import DataError

if TYPE_CHECKING:
    from kdbench.engine.loop import Loop

_HASH_KEY = "kdbench_sha256"
_META_KEY = "kdbench_meta"


class CorruptCheckpoint(DataError):
    """A checkpoint file is truncated, corrupt, or was not written by :func:`save_state`."""


def tensor_digest(tensors: Mapping[str, Tensor], prefix: str = "") -> str:
    """SHA-256 of names, dtypes, shapes and raw bytes of ``tensors`` (a content key), after ``prefix``."""
    h = hashlib.sha256()
    h.update(prefix.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # raw bytes, any dtype
    return h.hexdigest()


def save_state(path: str | os.PathLike[str], tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Atomically write ``tensors`` (moved to CPU) and ``meta`` (JSON-able) to ``path``.

    Tensors sharing memory are cloned (safetensors refuses aliases). The directory is created.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage()
        partial = storage.nbytes() != t.numel() * t.element_size()  # a view into a bigger buffer
        flat[name] = t.clone() if t.numel() and (partial or storage.data_ptr() in seen) else t
        seen.add(flat[name].untyped_storage().data_ptr())
    meta_json = json.dumps(meta, sort_keys=True)
    header = {_META_KEY: meta_json, _HASH_KEY: tensor_digest(flat, meta_json)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata=header)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # some filesystems cannot fsync a directory


def load_state(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_state`; verify its hash. Tensors are on CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptCheckpoint: the file is truncated, corrupt, or has no kdbench hash.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types (header, size checks)
        raise CorruptCheckpoint(f"checkpoint {path} is unreadable ({type(exc).__name__}: "
                                f"{exc}); delete it and resume from an older one") from None
    if _HASH_KEY not in header or _META_KEY not in header:
        raise CorruptCheckpoint(f"checkpoint {path} has no kdbench hash; it was not written by "
                                "kdbench.engine.checkpoints.save_state")
    if tensor_digest(tensors, header[_META_KEY]) != header[_HASH_KEY]:
        raise CorruptCheckpoint(f"checkpoint {path} fails its sha256 check (corrupt data); "
                                "delete it and resume from an older one")
    return tensors, json.loads(header[_META_KEY])


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and persistent buffers of ``model``, detached, on CPU."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_model_state(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy ``tensors`` into ``model`` (strict: every key must match)."""
    model.load_state_dict(dict(tensors), strict=True)


def pack(obj: Any, prefix: str = "") -> tuple[dict[str, Tensor], Any]:
    """Split a nested state into flat tensors and a JSON skeleton (see :func:`unpack`).

    Dicts (any scalar keys), lists, tuples, tensors, numpy arrays (e.g. ``np.random.get_state()``),
    numbers, strings, bools and None are supported; tensors become ``{"__tensor__": name}``.
    """
    import numpy as np

    tensors: dict[str, Tensor] = {}

    def put(key: str, t: Tensor) -> str:
        name = key
        while name in tensors:  # keys containing "." could collide with nested paths
            name += "#"
        tensors[name] = t
        return name

    def walk(x: Any, key: str) -> Any:
        if isinstance(x, Tensor):
            return {"__tensor__": put(key, x)}
        if isinstance(x, np.ndarray):  # stored as raw bytes; dtype and shape in the skeleton
            raw = torch.from_numpy(np.ascontiguousarray(x).reshape(-1).view(np.uint8).copy())
            return {"__ndarray__": put(key, raw), "dtype": x.dtype.str, "shape": list(x.shape)}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, Mapping):
            return {"__dict__": [[k, walk(v, f"{key}.{k}")] for k, v in x.items()]}
        if isinstance(x, list | tuple):
            items = [walk(v, f"{key}.{i}") for i, v in enumerate(x)]
            return {"__tuple__": items} if isinstance(x, tuple) else items
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise TypeError(f"cannot pack {type(x).__name__} at {key!r}")

    return tensors, walk(obj, prefix)


def unpack(tensors: Mapping[str, Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`pack`."""
    if isinstance(skeleton, list):
        return [unpack(tensors, v) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__ndarray__" in skeleton:
            import numpy as np

            raw = tensors[skeleton["__ndarray__"]].numpy().tobytes()
            return np.frombuffer(raw, dtype=np.dtype(skeleton["dtype"])).reshape(skeleton["shape"]).copy()
        if "__tuple__" in skeleton:
            return tuple(unpack(tensors, v) for v in skeleton["__tuple__"])
        return {k: unpack(tensors, v) for k, v in skeleton["__dict__"]}
    return skeleton


# -- cell checkpoints (exact resume) -------------------------------------------------------


def save_path(root: Path, run_id: str) -> Path:
    """Where a cell's resumable checkpoint lives."""
    return root / "checkpoints" / f"{run_id}.pt"


def save_checkpoint(loop: Loop, path: Path) -> None:
    """Atomically write everything needed to resume ``loop`` exactly."""
    state = {
        "student": loop.student.state_dict(), "loss": loop.loss.state_dict(),
        "opt": loop.opt.state_dict(), "sched": loop.sched.state_dict(),
        "rule": loop.rule.state_dict(),
        "teacher": loop.teacher.state_dict() if loop.rule.changes_teacher and loop.teacher else None,
        "loop": vars(loop.state), "aug_gen": loop.aug_gen.get_state(),
        "rule_gen": loop.rule_gen.get_state(), "torch_rng": torch.get_rng_state(),
        "quiz": loop.quiz.state_dict() if loop.quiz is not None else None,
        "best_weights": loop.best_weights,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(loop: Loop, path: Path) -> int:
    """Restore ``loop`` from ``path`` if present and readable; return the step resumed from."""
    for torn in path.parent.glob(f"{path.stem}.tmp*"):  # left by a kill during torch.save
        torn.unlink(missing_ok=True)
    if not path.exists():
        return 0
    try:
        state = torch.load(path, map_location=loop.device, weights_only=True)
    except Exception:  # a torn or foreign file: start over rather than trust it
        path.unlink(missing_ok=True)
        return 0
    loop.student.load_state_dict(state["student"])
    loop.loss.load_state_dict(state["loss"])
    loop.opt.load_state_dict(state["opt"])
    loop.sched.load_state_dict(state["sched"])
    loop.pending_rule_state = state["rule"]
    if state["teacher"] is not None and loop.teacher is not None:
        loop.teacher.load_state_dict(state["teacher"])
    from kdbench.engine.loop import LoopState

    loop.state = LoopState(**state["loop"])
    loop.aug_gen.set_state(state["aug_gen"])
    loop.rule_gen.set_state(state["rule_gen"])
    torch.set_rng_state(state["torch_rng"])
    if loop.quiz is not None and state["quiz"] is not None:
        loop.quiz.load_state_dict(state["quiz"])
    loop.best_weights = state.get("best_weights")
    return loop.state.step
