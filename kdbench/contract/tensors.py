"""Prepared task data as whole tensors: what the loop, losses and rules read.

:class:`TensorSplit` holds one split (model inputs, labels, positions, domains) as tensors that can
live on the GPU and be batched without a DataLoader; :class:`TaskData` a task's splits plus the
record of every data choice. :mod:`kdbench.engine.data` builds them from a task's raw files.

Shapes: ``N`` examples in a split, ``T`` tokens (the split's longest), ``B`` batch size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdbench.contract.types import Batch, Task

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


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


# -- stratified sampling (the data carves and tasks share it) ------------------------------


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
