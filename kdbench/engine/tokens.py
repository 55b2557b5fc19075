"""Tokenised splits, cached as safetensors files keyed by everything the tokens depend on (task,
data fingerprint, tokenizer, length cap, row plan version); a corrupt or stale file is rebuilt."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from kdbench.contract.errors import DataError
from kdbench.contract.types import Task

if TYPE_CHECKING:
    import pyarrow as pa

_CHUNK = 2048  # examples per tokenizer call
#: bumped when the rows a split holds change for the same files and options (token cache key)
PLAN_VERSION = 2  # 2: pooled splits hold out every domain's quiz rows, not only the task's own
RowPlan = dict[str, tuple[str, np.ndarray]]  # split -> (raw split it is taken from, row positions)


def arrow(ds: Any) -> pa.Table:
    """A ``datasets.Dataset`` as one Arrow table (no copy)."""
    return ds.with_format("arrow")[:]


def tokens(task: Task, raw: dict[str, Any], plan: RowPlan, tokenizer: Any | None, cache_dir: Path | None,
            fingerprint: str, max_len: int) -> tuple[dict[str, dict[str, Tensor]], str]:
    """Token tensors of every planned split (text tasks; empty for vision) and the cache state:
    "off", "hit", "miss" or "rebuilt" (a corrupt or stale file)."""
    if task.modality != "text":
        return {}, "off"
    if tokenizer is None:
        raise DataError(f"task {task.name!r} is a text task but no tokenizer was given; "
                        "use a text model (its tokenizer tokenises the data)")
    tok_name = str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    key = hashlib.sha256(json.dumps([task.name, task.version, fingerprint, tok_name,
                                     len(tokenizer), max_len, PLAN_VERSION]).encode()).hexdigest()
    path = Path(cache_dir) / f"tokens-{task.name.replace('/', '_')}-{key[:24]}.safetensors" \
        if cache_dir is not None else None
    cached = _load_cache(path, key, {s: len(r) for s, (_, r) in plan.items()}) \
        if path is not None and path.exists() else None
    if cached is not None:
        return cached, "hit"
    toks = {s: _tokenize(tokenizer, raw[src], rows, max_len) for s, (src, rows) in plan.items()}
    if path is None:
        return toks, "off"
    state = "rebuilt" if path.exists() else "miss"
    _save_cache(path, key, toks)
    return toks, state


def _tokenize(tokenizer: Any, ds: Any, rows: np.ndarray, max_len: int) -> dict[str, Tensor]:
    """Tokenise rows ``rows`` of ``ds`` as ``[CLS] a [SEP] b [SEP]`` -> (N, T) int64 tensors."""
    import pyarrow as pa  # here, not at module import: keeps `kdbench ls` light
    table = arrow(ds).take(pa.array(rows, pa.int64()))
    a = table.column("text_a").to_pylist()
    b = table.column("text_b").to_pylist() if "text_b" in table.column_names else None
    ids: list[list[int]] = []
    types: list[list[int]] | None = []
    for s in range(0, len(a), _CHUNK):
        enc = tokenizer(a[s:s + _CHUNK], b[s:s + _CHUNK] if b is not None else None,
                        truncation="longest_first", max_length=max_len, padding=False,
                        return_attention_mask=False)
        ids.extend(enc["input_ids"])
        if types is not None and "token_type_ids" in enc:
            types.extend(enc["token_type_ids"])
        else:
            types = None  # e.g. RoBERTa/DistilBERT tokenizers have no segment ids
    lens = np.fromiter((len(r) for r in ids), np.int64, len(ids))
    width = int(lens.max()) if len(lens) else 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out_ids = np.full((len(ids), width), pad, np.int64)  # (N, T)
    out_tt = np.zeros((len(ids), width), np.int64)
    for i, r in enumerate(ids):
        out_ids[i, : len(r)] = r
        if types is not None:
            out_tt[i, : len(r)] = types[i]
    mask = (np.arange(width)[None, :] < lens[:, None]).astype(np.int64)  # (N, T)
    res = {"input_ids": torch.from_numpy(out_ids), "attention_mask": torch.from_numpy(mask)}
    if types is not None:
        res["token_type_ids"] = torch.from_numpy(out_tt)
    return res


def _load_cache(path: Path, key: str, sizes: dict[str, int]) -> dict[str, dict[str, Tensor]] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None
    out: dict[str, dict[str, Tensor]] = {}
    for k, v in flat.items():
        split, name = k.split("/", 1)
        out.setdefault(split, {})[name] = v
    ok = set(out) == set(sizes) and all(
        "input_ids" in t and all(v.shape[0] == sizes[s] for v in t.values()) for s, t in out.items())
    return out if ok else None


def _save_cache(path: Path, key: str, toks: dict[str, dict[str, Tensor]]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({f"{s}/{k}": v.contiguous() for s, t in toks.items() for k, v in t.items()},
              str(tmp), metadata={"key": key})
    os.replace(tmp, path)


#: bumped when the rows a split holds change for the same files and options (token cache key)
