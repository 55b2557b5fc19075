"""The shared data pipeline: raw task splits -> validated, carved, tokenised tensors.

``prepare_data`` turns what :meth:`kdbench.contract.types.Task.load` returns (``datasets.Dataset`` splits)
into :class:`TaskData`: every split as a :class:`TensorSplit` of whole tensors that can live on the
GPU, batched without a DataLoader. The same quiz examples are removed from train for every method.

Shapes: ``N`` examples in a split, ``T`` tokens (the split's longest, <= ``max_seq_length``),
``B`` batch size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from kdbench.contract.errors import DataError
from kdbench.contract.taskopts import TextDataOptions, data_options
from kdbench.contract.tensors import TEXT_KEYS, TaskData, TensorSplit, strata_of, stratified_choice
from kdbench.contract.types import Task
from kdbench.engine.tokens import RowPlan, arrow, tokens

if TYPE_CHECKING:
    pass



def _where(load_info: dict[str, Any], split: str) -> str:
    f = load_info.get("files", {}).get(split, {}).get("file")
    return f" ({f})" if f else ""


def _images(ds: Any) -> np.ndarray:
    """The ``image`` column as (N, 3, H, W) uint8, straight from the Arrow buffers."""
    import pyarrow as pa  # here, not at module import: keeps `kdbench ls` light
    col = arrow(ds).column("image")
    flat = []
    for chunk in col.chunks:
        arr = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        while pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
            arr = arr.flatten()
        flat.append(arr.to_numpy(zero_copy_only=False))
    shape = tuple(ds.features["image"].shape) if hasattr(ds.features["image"], "shape") else None
    values = np.concatenate(flat).astype(np.uint8, copy=False)
    return values.reshape((len(ds), *shape)) if shape else values.reshape(len(ds), 3, 32, 32)


def _hash_split(h: Any, name: str, ds: Any) -> None:
    import pyarrow as pa  # here, not at module import: keeps `kdbench ls` light
    table = arrow(ds)
    h.update(f"\x00split:{name}:{len(ds)}".encode())
    for col in sorted(table.column_names):
        h.update(f"\x00col:{col}".encode())
        if col == "image":
            h.update(_images(ds).tobytes())
            continue
        arr = table.column(col)
        if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
            h.update("\x1e".join(arr.to_pylist()).encode("utf-8", "surrogatepass"))
        else:
            h.update(np.ascontiguousarray(arr.to_numpy()).tobytes())


def _validate(task: Task, raw: dict[str, Any], load_info: dict[str, Any]) -> None:
    need = ["train", *task.eval_splits]
    missing = [s for s in need if s not in raw]
    if missing:
        raise DataError(f"task {task.name!r} returned no split {missing[0]!r} (has {sorted(raw)}); "
                        "the task's loader must provide train and every eval split")
    cols = ("image", "label") if task.modality == "vision" else ("text_a", "label")
    for split, ds in raw.items():
        where = _where(load_info, split)
        if len(ds) == 0:
            raise DataError(f"task {task.name!r}: split {split!r} is empty{where}; check the file "
                            "and the task options")
        absent = [c for c in cols + (("domain",) if task.domains else ()) if c not in ds.column_names]
        if absent:
            raise DataError(f"task {task.name!r}: split {split!r}{where} lacks column(s) {absent}; "
                            f"has {ds.column_names}")
        labels = np.asarray(arrow(ds).column("label").to_numpy(), dtype=np.float64)
        unlabelled = labels == -1
        if unlabelled.all() and split != "train":
            continue
        if unlabelled.any():
            raise DataError(f"task {task.name!r}: split {split!r}{where} has {int(unlabelled.sum())} "
                            "rows without a label (-1) among labelled rows; fix or drop them")
        if task.is_regression:
            bad = ~np.isfinite(labels)
        else:
            bad = (labels != np.round(labels)) | (labels < 0) | (labels >= task.num_labels)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"task {task.name!r}: split {split!r}{where} row {i} has label "
                            f"{labels[i]:g} outside 0..{task.num_labels - 1}; fix the file or the "
                            "task's label map")
        if task.domains:
            dom = np.asarray(arrow(ds).column("domain").to_numpy())
            if ((dom < -1) | (dom >= len(task.domains))).any():
                raise DataError(f"task {task.name!r}: split {split!r}{where} has domain ids outside "
                                f"-1..{len(task.domains) - 1}")


PLAN_VERSION = 2  # 2: pooled splits hold out every domain's quiz rows, not only the task's own


def carve(labels: np.ndarray, task: Task, max_train: int, quiz_fraction: float, seed: int,
          ) -> tuple[np.ndarray, np.ndarray]:
    """Train and quiz positions of a train split with ``labels`` (N,): a seeded stratified
    ``max_train`` cap (0 = all), then a seeded stratified ``quiz_fraction`` moved to the quiz."""
    strata = strata_of(labels, task.is_regression)
    train_rows = np.arange(len(labels))
    if 0 < max_train < len(train_rows):
        train_rows = stratified_choice(strata, max_train, np.random.default_rng([seed, 0]))
    quiz_rows = np.zeros(0, np.int64)
    if quiz_fraction > 0:
        k = max(1, round(quiz_fraction * len(train_rows)))
        if k >= len(train_rows):
            raise DataError(f"task {task.name!r}: quiz_fraction={quiz_fraction} leaves no training "
                            f"examples out of {len(train_rows)}; lower task.{task.name}.quiz_fraction")
        pick = stratified_choice(strata[train_rows], k, np.random.default_rng([seed, 1]))
        quiz_rows = train_rows[pick]
        train_rows = np.setdiff1d(train_rows, quiz_rows)
    return train_rows, quiz_rows


def _length_stats(mask: Tensor, max_len: int) -> dict[str, float]:
    """Real token counts of a split: mean, max and how many hit ``max_len`` (truncated)."""
    n_tok = mask.sum(1).double()
    return {"mean": round(float(n_tok.mean()), 2), "max": int(n_tok.max()),
            "truncated": int((n_tok == max_len).sum())}


def carve_heldout(split: TensorSplit, task: Task, fraction: float, seed: int,
                  ) -> tuple[TensorSplit, TensorSplit | None]:
    """(train, heldout): a stratified ``fraction`` of ``split`` moved to a "heldout" split that
    selects the best epoch (so dev stays a report-only split). Seeded by the cell ``seed`` only:
    every method of a task and seed holds out (and never trains on) the same rows."""
    if not 0 <= fraction < 0.5:
        raise DataError(f"task {task.name!r}: heldout_fraction={fraction} must be in [0, 0.5); set "
                        f"task.{task.name}.heldout_fraction")
    if fraction == 0:
        return split, None
    labels = split.tensors["labels"].cpu().numpy()
    k = max(1, round(fraction * len(labels)))
    if k >= len(labels):
        raise DataError(f"task {task.name!r}: heldout_fraction={fraction} leaves no training examples")
    rows = stratified_choice(strata_of(labels, task.is_regression), k, np.random.default_rng([seed, 2]))
    keep = np.setdiff1d(np.arange(len(labels)), rows)
    return (split.subset(torch.from_numpy(keep), "train"),
            split.subset(torch.from_numpy(rows.astype(np.int64)), "heldout"))


def _pooled_rows(raw: dict[str, Any], split: str, column: Any, task: Task, quiz_rows: np.ndarray,
                 max_train: int, quiz_fraction: float, seed: int) -> np.ndarray:
    """Rows of a pooled raw split (one of ``task.pooled_splits``: every domain's training rows)
    kept for training: all but every domain's quiz rows.

    Each domain's rows are carved as that domain's own task carves its train split (same order,
    options and seed), so the pooled split is identical whichever domain is the target (a rule
    can share work across them) and no model trains on any domain's quiz rows. The task's own quiz
    rows are also matched by ``row_id`` when both splits have it.
    """
    names = raw[split].column_names
    keep = np.ones(len(raw[split]), bool)
    if "domain" in names:
        dom, lab = column(split, "domain"), column(split, "label")
        for d in np.unique(dom):
            rows = np.flatnonzero(dom == d)
            if len(rows) > 1:
                keep[rows[carve(lab[rows], task, max_train, quiz_fraction, seed)[1]]] = False
    if "row_id" in names and "row_id" in raw["train"].column_names:
        keep &= ~np.isin(column(split, "row_id"), column("train", "row_id")[quiz_rows])
    return np.flatnonzero(keep)


def check_files(task: Task) -> dict[str, int]:
    """Read and check a task's files as a cell would, without tokenising or building a model.

    Runs ``task.load()``, the split/column/label checks and the train carve (cap and quiz split);
    returns the rows per split. Raises :class:`DataError` naming the first bad file (and line).
    ``kdbench run`` calls it once per planned task before training, ``kdbench validate --data``
    on request.
    """
    opts = data_options(task.cfg, text=task.modality == "text", task=task.name)
    raw = task.load()
    _validate(task, raw, dict(getattr(task, "load_info", {}) or {}))
    labels = np.asarray(arrow(raw["train"]).column("label").to_numpy(), dtype=np.float64)
    carve(labels, task, opts.max_train_examples, opts.quiz_fraction, opts.data_seed)
    return {name: len(ds) for name, ds in raw.items()}


def prepare_data(task: Task, *, tokenizer: Any | None, cache_dir: Path | None = None,
                 seed: int = 0) -> TaskData:
    """Load, validate, carve and tensorise a task's splits.

    Steps: ``task.load()`` -> validation (empty splits, missing columns, labels outside the label
    set raise :class:`DataError` naming split and file) -> optional seeded stratified
    ``max_train_examples`` subsample -> seeded stratified ``quiz_fraction`` of train moved to a
    "quiz" split (for every method, so all methods train on the same rows) -> tokenisation (text;
    cached as safetensors under ``cache_dir``; a corrupt cache file is rebuilt) or uint8 pixels
    (vision) -> optional ``heldout_fraction`` of train moved to a "heldout" selection split
    (:func:`carve_heldout`, seeded by the cell ``seed``). A multi-domain task's pooled splits
    (``task.pooled_splits``) lose every domain's quiz rows (:func:`_pooled_rows`).

    Args:
        task: the task instance; its ``cfg`` extends :class:`kdbench.contract.taskopts.DataOptions`
            (:func:`~kdbench.contract.taskopts.data_options`). A task may set ``load_info`` (dict) in
            ``load()``: source, files read and rows per split; it is copied into ``info``.
        tokenizer: a fast HF tokenizer for text tasks (ignored for vision).
        cache_dir: where token tensors are cached; None disables caching.
        seed: the cell seed (only the held-out carve uses it).
    """
    opts = data_options(task.cfg, text=task.modality == "text", task=task.name)
    max_len = opts.max_seq_length if isinstance(opts, TextDataOptions) else 0  # 0: vision, no tokens
    raw = task.load()
    load_info = dict(getattr(task, "load_info", {}) or {})
    _validate(task, raw, load_info)
    h = hashlib.sha256(f"{task.name}\x00{task.version}".encode())
    for name in sorted(raw):
        _hash_split(h, name, raw[name])
    raw_fp = h.hexdigest()
    choices = {"max_seq_length": max_len, "max_train_examples": opts.max_train_examples,
               "quiz_fraction": opts.quiz_fraction, "data_seed": opts.data_seed}
    fingerprint = hashlib.sha256(f"{raw_fp}\x00{json.dumps(choices, sort_keys=True)}".encode()).hexdigest()

    def column(split: str, col: str) -> np.ndarray:
        return np.array(arrow(raw[split]).column(col).to_numpy(), copy=True)

    plan, quiz_rows = _row_plan(task, raw, column, opts)
    toks, cache_state = tokens(task, raw, plan, tokenizer, cache_dir, fingerprint, max_len)
    splits, lengths = _tensor_splits(task, raw, column, plan, toks, max_len)
    heldout_fraction = opts.heldout_fraction
    splits["train"], heldout = carve_heldout(splits["train"], task, heldout_fraction, seed)
    if heldout is not None:
        splits["heldout"] = heldout
        for name in ("train", "heldout") if "attention_mask" in heldout.tensors else ():
            lengths[name] = _length_stats(splits[name].tensors["attention_mask"], max_len)
        fingerprint = hashlib.sha256(f"{fingerprint}\x00heldout:{heldout_fraction}:{seed}".encode()).hexdigest()

    info = {**_record(task, raw, load_info, splits, quiz_rows, heldout, heldout_fraction, seed, tokenizer),
            **choices, "token_lengths": lengths, "token_cache": cache_state,
            "raw_fingerprint": raw_fp, "fingerprint": fingerprint}
    return TaskData(task=task, splits=splits, info=info, fingerprint=fingerprint)




def _row_plan(task: Task, raw: dict[str, Any], column: Any, opts: Any) -> tuple[RowPlan, np.ndarray]:
    """Which raw rows every split holds: train capped and carved (quiz removed), eval splits
    whole, pooled splits without any domain's quiz rows. Also returns the quiz positions."""
    max_train, quiz_fraction, seed_data = opts.max_train_examples, opts.quiz_fraction, opts.data_seed
    train_rows, quiz_rows = carve(column("train", "label"), task, max_train, quiz_fraction, seed_data)
    plan: RowPlan = {"train": ("train", train_rows)}
    if len(quiz_rows):
        plan["quiz"] = ("train", quiz_rows)
    for name in raw:
        if name != "train":
            plan[name] = (name, np.arange(len(raw[name])))
    for name in task.pooled_splits if len(quiz_rows) else ():
        if name in raw:
            plan[name] = (name, _pooled_rows(raw, name, column, task, quiz_rows, max_train, quiz_fraction,
                                             seed_data))
    return plan, quiz_rows


def _tensor_splits(task: Task, raw: dict[str, Any], column: Any, plan: RowPlan,
                   toks: dict[str, dict[str, Tensor]], max_len: int,
                   ) -> tuple[dict[str, TensorSplit], dict[str, dict[str, float]]]:
    """Every planned split as a :class:`TensorSplit` (tokens or pixels, labels, positions, domains)
    plus the token-length statistics of the text splits."""
    splits: dict[str, TensorSplit] = {}
    lengths: dict[str, dict[str, float]] = {}
    for name, (src, rows) in plan.items():
        ridx = torch.from_numpy(rows.astype(np.int64))
        lab = torch.from_numpy(column(src, "label")).index_select(0, ridx)
        tensors = dict(toks[name]) if task.modality == "text" else {
            "pixel_values": torch.from_numpy(_images(raw[src])).index_select(0, ridx)}
        tensors["labels"] = lab.to(torch.float32 if task.is_regression else torch.int64)
        tensors["index"] = torch.arange(len(rows))
        if task.domains:
            tensors["domain"] = torch.from_numpy(column(src, "domain")).index_select(0, ridx).long()
        keys = tuple(k for k in TEXT_KEYS if k in tensors) if task.modality == "text" else ("pixel_values",)
        splits[name] = TensorSplit(name, tensors, keys)
        if "attention_mask" in tensors:
            lengths[name] = _length_stats(tensors["attention_mask"], max_len)
    return splits, lengths


def _record(task: Task, raw: dict[str, Any], load_info: dict[str, Any], splits: dict[str, TensorSplit],
            quiz_rows: np.ndarray, heldout: TensorSplit | None, heldout_fraction: float, seed: int,
            tokenizer: Any | None) -> dict[str, Any]:
    """The JSON-able record of a task's data choices (``TaskData.info``, copied into results)."""
    cfg = task.cfg
    cfg_dict = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type) else {}
    return {
        "task": task.name, "task_version": task.version, "config": cfg_dict,
        "source": load_info.get("source", cfg_dict.get("source")),
        "data_dir": load_info.get("data_dir", cfg_dict.get("data_dir")),
        "load": load_info, "raw_rows": {s: len(d) for s, d in raw.items()},
        "rows": {s: len(v) for s, v in splits.items()},
        "quiz": {"from": "train", "rows": len(quiz_rows), "stratified": True,
                 "removed_from_train_for_all_methods": True},
        "heldout": {"from": "train", "rows": len(heldout) if heldout is not None else 0,
                    "fraction": heldout_fraction, "seed": seed, "stratified": True,
                    "removed_from_train_for_all_methods": True},
        "tokenizer": (str(getattr(tokenizer, "name_or_path", "")) or None) if task.modality == "text" else None,
    }
