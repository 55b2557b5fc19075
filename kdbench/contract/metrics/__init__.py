"""Official task metrics as Hugging Face ``evaluate`` modules shipped inside the package.

Each metric is an ``evaluate.Metric`` script in ``kdbench/metrics/<name>/<name>.py``, written for
kdbench with numpy only on the shared base and correlation helpers of
:mod:`kdbench.contract.metrics.module`, and loaded **by path** with ``evaluate.load(<dir>)``. A local path never
touches the Hub, so this works offline (``HF_HUB_OFFLINE=1``), unlike ``evaluate.load("accuracy")``
which must fetch the script. ``evaluate`` copies the script into ``HF_MODULES_CACHE`` on first
load; ``keep_in_memory=True`` keeps results off disk (no Arrow cache files, no file locks).

``compute(name, preds, refs)`` loads each module once per process (memoized) and returns a float.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_HERE = Path(__file__).resolve().parent

#: metric name -> (module folder, key in the module's result dict)
METRICS: dict[str, tuple[str, str]] = {
    "accuracy": ("accuracy", "accuracy"),
    "f1": ("f1", "f1"),
    "matthews_correlation": ("matthews_correlation", "matthews_correlation"),
    "pearson": ("pearsonr", "pearsonr"),
    "pearsonr": ("pearsonr", "pearsonr"),
    "spearmanr": ("spearmanr", "spearmanr"),
}


def module_path(name: str) -> Path:
    """Folder of the evaluate module behind metric ``name``."""
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
    return _HERE / METRICS[name][0]


@functools.cache
def load(name: str) -> Any:
    """The loaded ``evaluate`` module for metric ``name`` (memoized per process)."""
    import evaluate

    return evaluate.load(str(module_path(name)), keep_in_memory=True)


def _as_list(x: Any) -> list[Any]:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1).tolist()


def compute(name: str, preds: Sequence[Any] | Any, refs: Sequence[Any] | Any) -> float:
    """Score ``preds`` against ``refs`` (both (N,): lists, numpy arrays or tensors).

    Returns the metric as a float (nan for a correlation of a constant input).
    """
    p, r = _as_list(preds), _as_list(refs)
    if len(p) != len(r):
        raise ValueError(f"metric {name!r}: {len(p)} predictions vs {len(r)} references")
    value = load(name).compute(predictions=p, references=r)[METRICS[name][1]]
    return float(value) if value is not None else math.nan


def score(names: Sequence[str], preds: Any, labels: Any) -> dict[str, float]:
    """Every metric in ``names`` on the labelled rows (label != -1) of one split.

    Args:
        names: metric names, e.g. ``Task.metrics``.
        preds: (N,) class ids or regression values.
        labels: (N,) references; -1 marks an unlabelled row (GLUE test).

    Returns:
        ``{name: value}``; empty when no row is labelled.
    """
    p = np.asarray(_as_list(preds))
    r = np.asarray(_as_list(labels))
    keep = r != -1
    if not keep.any():
        return {}
    return {n: compute(n, p[keep], r[keep]) for n in names}
