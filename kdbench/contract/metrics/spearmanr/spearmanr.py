"""kdbench Spearman rank correlation (STS-B; evaluate module).

Pearson correlation of the ranks; tied values share their average rank (as scipy does).
"""

from __future__ import annotations

from kdbench.contract.metrics.module import KdbenchMetric, spearman


class Spearmanr(KdbenchMetric):
    """Spearman correlation."""

    description = "Spearman rho = Pearson correlation of average ranks."
    inputs = """
Args:
    predictions (list of float): predicted scores, shape (N,).
    references (list of float): true scores, shape (N,).
Returns:
    spearmanr (float): in [-1, 1]; nan when either input is constant.
"""
    dtype = "float64"

    def _compute(self, predictions: list[float], references: list[float]) -> dict[str, float]:
        return {"spearmanr": spearman(predictions, references)}
