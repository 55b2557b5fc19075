"""kdbench Spearman rank correlation (STS-B; evaluate module).

Pearson correlation of the ranks; tied values share their average rank (as scipy does).
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Spearman rho = Pearson correlation of average ranks."
_INPUTS = """
Args:
    predictions (list of float): predicted scores, shape (N,).
    references (list of float): true scores, shape (N,).
Returns:
    spearmanr (float): in [-1, 1]; nan when either input is constant.
"""


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of (N,) values; ties get the mean of the ranks they span."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_group = np.concatenate([[True], xs[1:] != xs[:-1]])
    group = np.cumsum(new_group) - 1  # group id of each sorted position
    starts = np.flatnonzero(new_group)
    ends = np.concatenate([starts[1:], [len(x)]])
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), np.float64)
    ranks[order] = mean_rank[group]
    return ranks


class Spearmanr(evaluate.Metric):
    """Spearman correlation, written for kdbench (offline, loaded by path)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}))

    def _compute(self, predictions: list[float], references: list[float]) -> dict[str, float]:
        x = average_ranks(np.asarray(predictions)) - (len(predictions) + 1) / 2.0
        y = average_ranks(np.asarray(references)) - (len(references) + 1) / 2.0
        denom = np.sqrt(float(x @ x) * float(y @ y))
        return {"spearmanr": float(np.clip(float(x @ y) / denom, -1.0, 1.0)) if denom else float("nan")}
