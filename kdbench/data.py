"""The shared data pipeline: raw task splits -> validated, carved, tokenised tensors.

``prepare_data`` turns what :meth:`kdbench.types.Task.load` returns (``datasets.Dataset`` splits)
into :class:`TaskData`: every split as a :class:`TensorSplit` of whole tensors that can live on the
GPU, batched without a DataLoader. The same quiz examples are removed from train for every method.

Shapes: ``N`` examples in a split, ``T`` tokens (the split's longest, <= ``max_seq_length``),
``B`` batch size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from kdbench.errors import DataError
from kdbench.taskopts import TextDataOptions, data_options
from kdbench.types import Batch, Task

if TYPE_CHECKING:
    import pyarrow as pa

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
_CHUNK = 2048  # examples per tokenizer call


@dataclass
class TensorSplit:
    """One split as whole tensors (see the module docstring for shapes).

    ``tensors``: text ``input_ids``/``attention_mask``/``token_type_ids`` (N, T) int64, right-padded;
    vision ``pixel_values`` (N, 3, H, W) uint8; always ``labels`` (N,) (int64, float32 for
    regression, -1 = no label) and ``index`` (N,) = arange(N); ``domain`` (N,) int64 for
    multi-domain tasks.
    """

    name: str
    tensors: dict[str, Tensor]
    input_keys: tuple[str, ...]
    _lengths: Tensor | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        mask = self.tensors.get("attention_mask")
        # real token counts on the host, so dynamic padding needs no device sync per batch
        self._lengths = mask.sum(1).cpu() if mask is not None else None

    def __len__(self) -> int:
        return int(self.tensors["labels"].shape[0])

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.tensors["labels"].device

    def to(self, device: torch.device | str) -> TensorSplit:
        """The whole split on ``device`` (GPU-resident data)."""
        return TensorSplit(self.name, {k: v.to(device) for k, v in self.tensors.items()},
                           self.input_keys)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """Batches per pass over the split."""
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    def batches(self, batch_size: int, *, order: Tensor | None = None, start: int = 0,
                drop_last: bool = False) -> Iterator[Batch]:
        """Yield batches on the split's device.

        Args:
            batch_size: examples per batch (the last one may be smaller unless ``drop_last``).
            order: a permutation of range(N); None = sequential.
            start: skip the first ``start`` batches (resume inside an epoch).
            drop_last: drop a final incomplete batch.

        Text batches are trimmed to their longest real sequence (dynamic padding).
        """
        n = len(self)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if order is not None and order.numel() != n:
            raise ValueError(f"order has {order.numel()} entries, split {self.name!r} has {n}")
        order_cpu = order.cpu() if order is not None else None  # one sync per pass
        order_dev = order.to(self.device) if order is not None else None
        for b in range(start, self.num_batches(batch_size, drop_last)):
            lo, hi = b * batch_size, min((b + 1) * batch_size, n)
            sel = order_dev[lo:hi] if order_dev is not None else None
            width = None
            if self._lengths is not None:
                lens = self._lengths[order_cpu[lo:hi]] if order_cpu is not None else self._lengths[lo:hi]
                width = max(int(lens.max()), 1)

            inputs = {k: _take(self.tensors[k], lo, hi, sel, width if k in TEXT_KEYS else None)
                      for k in self.input_keys}
            dom = self.tensors.get("domain")
            yield Batch(inputs, _take(self.tensors["labels"], lo, hi, sel),
                        _take(self.tensors["index"], lo, hi, sel),
                        _take(dom, lo, hi, sel) if dom is not None else None)

    def bucketed(self, order: Tensor, batch_size: int, window: int, gen: torch.Generator) -> Tensor:
        """``order`` rearranged so that batches hold sequences of similar length.

        Each run of ``window`` batches of ``order`` is sorted by real length and cut into batches;
        the full batches of the whole pass are then shuffled with ``gen`` (a final incomplete batch
        stays last). A pure function of its arguments, so a resumed epoch sees the same batches.
        Splits without an attention mask (images) keep ``order``.
        """
        if self._lengths is None or window < 1:
            return order
        span = window * batch_size
        order = order.cpu()
        lens = self._lengths[order]
        chunks = [order[lo:lo + span][torch.argsort(lens[lo:lo + span], stable=True)]
                  for lo in range(0, order.numel(), span)]
        flat = torch.cat(chunks)
        full = flat.numel() // batch_size * batch_size
        rows = flat[:full].view(-1, batch_size)  # (num_full_batches, batch_size)
        rows = rows[torch.randperm(rows.shape[0], generator=gen)]
        return torch.cat([rows.reshape(-1), flat[full:]])

    def subset(self, idx: Tensor, name: str) -> TensorSplit:
        """Rows ``idx`` as a new split; ``index`` becomes arange and padding is re-trimmed."""
        idx = idx.to(self.device)
        out = {k: v.index_select(0, idx) for k, v in self.tensors.items()}
        out["index"] = torch.arange(idx.numel(), device=self.device)
        if "attention_mask" in out and idx.numel():
            width = max(int(out["attention_mask"].sum(1).max()), 1)
            for k in TEXT_KEYS:
                if k in out:
                    out[k] = out[k][:, :width].contiguous()  # (N', T')
        return TensorSplit(name, out, self.input_keys)

    def labels_known(self) -> bool:
        """True when every example has a label (GLUE test splits have none)."""
        return bool((self.tensors["labels"] != -1).all())


def _take(t: Tensor, lo: int, hi: int, sel: Tensor | None, width: int | None = None) -> Tensor:
    """Rows lo:hi (or rows ``sel``) of ``t``, columns trimmed to ``width`` when given."""
    t = t[:, :width] if width is not None else t
    return t[lo:hi] if sel is None else t.index_select(0, sel)


@dataclass
class TaskData:
    """A task's prepared splits plus a JSON-able record of every choice made."""

    task: Task
    splits: dict[str, TensorSplit]
    info: dict[str, Any]
    fingerprint: str

    @property
    def train(self) -> TensorSplit:
        """The training split (quiz examples removed)."""
        return self.splits["train"]

    @property
    def quiz(self) -> TensorSplit | None:
        """The held-out quiz split carved from train, or None."""
        return self.splits.get("quiz")


# -- helpers -------------------------------------------------------------------------------


def stratified_choice(strata: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``k`` of ``len(strata)`` positions, per stratum in proportion (largest remainder).

    Returns the sorted positions (N,) -> (k,). ``rng`` is the only randomness used.
    """
    n = len(strata)
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n}")
    _, inv = np.unique(strata, return_inverse=True)
    counts = np.bincount(inv)
    exact = counts * (k / n)
    alloc = np.floor(exact).astype(np.int64)
    # largest remainders get the leftover picks; ties are broken by ``rng``, not by stratum order
    for c in np.lexsort((rng.random(len(counts)), -(exact - alloc)))[: k - int(alloc.sum())]:
        alloc[c] += 1
    picks = [rng.permutation(np.flatnonzero(inv == c))[: alloc[c]] for c in range(len(counts))]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


def strata_of(labels: np.ndarray, regression: bool) -> np.ndarray:
    """Class ids, or 10 quantile bins of a regression target."""
    if not regression:
        return labels
    edges = np.unique(np.quantile(labels, np.linspace(0.1, 0.9, 9)))
    return np.digitize(labels, edges)


def _where(load_info: dict[str, Any], split: str) -> str:
    f = load_info.get("files", {}).get(split, {}).get("file")
    return f" ({f})" if f else ""


def _arrow(ds: Any) -> pa.Table:
    return ds.with_format("arrow")[:]


def _images(ds: Any) -> np.ndarray:
    """The ``image`` column as (N, 3, H, W) uint8, straight from the Arrow buffers."""
    import pyarrow as pa  # here, not at module import: keeps `kdbench ls` light
    col = _arrow(ds).column("image")
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
    table = _arrow(ds)
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
        labels = np.asarray(_arrow(ds).column("label").to_numpy(), dtype=np.float64)
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
            dom = np.asarray(_arrow(ds).column("domain").to_numpy())
            if ((dom < -1) | (dom >= len(task.domains))).any():
                raise DataError(f"task {task.name!r}: split {split!r}{where} has domain ids outside "
                                f"-1..{len(task.domains) - 1}")


def _tokenize(tokenizer: Any, ds: Any, rows: np.ndarray, max_len: int) -> dict[str, Tensor]:
    """Tokenise rows ``rows`` of ``ds`` as ``[CLS] a [SEP] b [SEP]`` -> (N, T) int64 tensors."""
    import pyarrow as pa  # here, not at module import: keeps `kdbench ls` light
    table = _arrow(ds).take(pa.array(rows, pa.int64()))
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
PLAN_VERSION = 2  # 2: meta_train holds out every domain's quiz rows, not only the task's own


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


def _meta_rows(raw: dict[str, Any], column: Any, task: Task, quiz_rows: np.ndarray, max_train: int,
               quiz_fraction: float, seed: int) -> np.ndarray:
    """Rows of the raw "meta_train" kept for training: all but every domain's quiz rows.

    Each domain's rows are carved as that domain's own task carves its train split (same order,
    options and seed), so the meta split is identical whichever domain is the target and one
    Meta-KD meta-teacher serves all of them; no model trains on any domain's quiz rows. The task's
    own quiz rows are also matched by ``row_id`` when both splits have it.
    """
    names = raw["meta_train"].column_names
    keep = np.ones(len(raw["meta_train"]), bool)
    if "domain" in names:
        dom, lab = column("meta_train", "domain"), column("meta_train", "label")
        for d in np.unique(dom):
            rows = np.flatnonzero(dom == d)
            if len(rows) > 1:
                keep[rows[carve(lab[rows], task, max_train, quiz_fraction, seed)[1]]] = False
    if "row_id" in names and "row_id" in raw["train"].column_names:
        keep &= ~np.isin(column("meta_train", "row_id"), column("train", "row_id")[quiz_rows])
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
    labels = np.asarray(_arrow(raw["train"]).column("label").to_numpy(), dtype=np.float64)
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
    (:func:`carve_heldout`, seeded by the cell ``seed``). Multi-domain tasks get a "meta_train"
    split: the task's own minus every domain's quiz rows (:func:`_meta_rows`), else the train split
    itself (held-out rows removed).

    Args:
        task: the task instance; its ``cfg`` extends :class:`kdbench.taskopts.DataOptions`
            (:func:`~kdbench.taskopts.data_options`). A task may set ``load_info`` (dict) in
            ``load()``: source, files read and rows per split; it is copied into ``info``.
        tokenizer: a fast HF tokenizer for text tasks (ignored for vision).
        cache_dir: where token tensors are cached; None disables caching.
        seed: the cell seed (only the held-out carve uses it).
    """
    cfg = task.cfg
    opts = data_options(cfg, text=task.modality == "text", task=task.name)
    max_len = opts.max_seq_length if isinstance(opts, TextDataOptions) else 0  # 0: vision, no tokens
    max_train = opts.max_train_examples
    quiz_fraction = opts.quiz_fraction
    seed_data = opts.data_seed
    heldout_fraction = opts.heldout_fraction
    raw = task.load()
    load_info = dict(getattr(task, "load_info", {}) or {})
    _validate(task, raw, load_info)

    h = hashlib.sha256(f"{task.name}\x00{task.version}".encode())
    for name in sorted(raw):
        _hash_split(h, name, raw[name])
    raw_fp = h.hexdigest()
    choices = {"max_seq_length": max_len, "max_train_examples": max_train,
               "quiz_fraction": quiz_fraction, "data_seed": seed_data}
    fingerprint = hashlib.sha256(f"{raw_fp}\x00{json.dumps(choices, sort_keys=True)}".encode()).hexdigest()

    def column(split: str, col: str) -> np.ndarray:
        return np.array(_arrow(raw[split]).column(col).to_numpy(), copy=True)

    train_rows, quiz_rows = carve(column("train", "label"), task, max_train, quiz_fraction, seed_data)
    plan: dict[str, tuple[str, np.ndarray]] = {"train": ("train", train_rows)}
    if len(quiz_rows):
        plan["quiz"] = ("train", quiz_rows)
    for name in raw:
        if name != "train":
            plan[name] = (name, np.arange(len(raw[name])))
    if "meta_train" in raw and len(quiz_rows):
        plan["meta_train"] = ("meta_train", _meta_rows(raw, column, task, quiz_rows, max_train,
                                                       quiz_fraction, seed_data))

    toks: dict[str, dict[str, Tensor]] = {}
    cache_state = "off"
    if task.modality == "text":
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
            toks, cache_state = cached, "hit"
        else:
            toks = {s: _tokenize(tokenizer, raw[src], rows, max_len) for s, (src, rows) in plan.items()}
            if path is not None:
                cache_state = "rebuilt" if path.exists() else "miss"
                _save_cache(path, key, toks)

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
    splits["train"], heldout = carve_heldout(splits["train"], task, heldout_fraction, seed)
    if heldout is not None:
        splits["heldout"] = heldout
        for name in ("train", "heldout") if "attention_mask" in heldout.tensors else ():
            lengths[name] = _length_stats(splits[name].tensors["attention_mask"], max_len)
        fingerprint = hashlib.sha256(f"{fingerprint}\x00heldout:{heldout_fraction}:{seed}".encode()).hexdigest()
    if task.domains and "meta_train" not in splits:
        splits["meta_train"] = dataclasses.replace(splits["train"], name="meta_train")

    cfg_dict = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type) else {}
    info: dict[str, Any] = {
        "task": task.name, "task_version": task.version, "config": cfg_dict,
        "source": load_info.get("source", cfg_dict.get("source")),
        "data_dir": load_info.get("data_dir", cfg_dict.get("data_dir")),
        "load": load_info, "raw_rows": {s: len(d) for s, d in raw.items()},
        "rows": {s: len(v) for s, v in splits.items()}, **choices,
        "quiz": {"from": "train", "rows": len(quiz_rows), "stratified": True,
                 "removed_from_train_for_all_methods": True},
        "heldout": {"from": "train", "rows": len(heldout) if heldout is not None else 0,
                    "fraction": heldout_fraction, "seed": seed, "stratified": True,
                    "removed_from_train_for_all_methods": True},
        "tokenizer": (str(getattr(tokenizer, "name_or_path", "")) or None) if task.modality == "text" else None,
        "token_lengths": lengths, "token_cache": cache_state,
        "raw_fingerprint": raw_fp, "fingerprint": fingerprint,
    }
    return TaskData(task=task, splits=splits, info=info, fingerprint=fingerprint)
