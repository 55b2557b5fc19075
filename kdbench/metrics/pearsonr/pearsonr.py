"""kdbench Pearson correlation (STS-B; evaluate module)."""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Pearson r = cov(x, y) / (std(x) * std(y))."
_INPUTS = """
Args:
    predictions (list of float): predicted scores, shape (N,).
    references (list of float): true scores, shape (N,).
Returns:
    pearsonr (float): in [-1, 1]; nan when either input is constant.
"""


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two (N,) arrays, computed in float64."""
    x = np.asarray(x, np.float64) - np.mean(x)
    y = np.asarray(y, np.float64) - np.mean(y)
    denom = np.sqrt(float(x @ x) * float(y @ y))
    return float(np.clip(float(x @ y) / denom, -1.0, 1.0)) if denom else float("nan")


class Pearsonr(evaluate.Metric):
    """Pearson correlation, written for kdbench (offline, loaded by path)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}))

    def _compute(self, predictions: list[float], references: list[float]) -> dict[str, float]:
        return {"pearsonr": pearson(np.asarray(predictions), np.asarray(references))}
