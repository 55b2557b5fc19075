"""kdbench Pearson correlation (STS-B; evaluate module)."""

from __future__ import annotations

from kdbench.contract.metrics.module import KdbenchMetric, pearson


class Pearsonr(KdbenchMetric):
    """Pearson correlation."""

    description = "Pearson r = cov(x, y) / (std(x) * std(y))."
    inputs = """
Args:
    predictions (list of float): predicted scores, shape (N,).
    references (list of float): true scores, shape (N,).
Returns:
    pearsonr (float): in [-1, 1]; nan when either input is constant.
"""
    dtype = "float64"

    def _compute(self, predictions: list[float], references: list[float]) -> dict[str, float]:
        return {"pearsonr": pearson(predictions, references)}
