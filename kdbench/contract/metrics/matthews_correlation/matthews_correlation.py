"""kdbench Matthews correlation coefficient (multiclass form; CoLA's metric; evaluate module)."""

from __future__ import annotations

import numpy as np

from kdbench.contract.metrics.module import KdbenchMetric


class MatthewsCorrelation(KdbenchMetric):
    """Matthews correlation."""

    description = (
        "MCC = (c*s - sum_k p_k*t_k) / sqrt((s^2 - sum_k p_k^2) * (s^2 - sum_k t_k^2)) from the "
        "confusion matrix C: c = trace, s = N, p_k / t_k = predicted / true counts of class k.")
    inputs = """
Args:
    predictions (list of int): predicted class ids, shape (N,).
    references (list of int): true class ids, shape (N,).
Returns:
    matthews_correlation (float): in [-1, 1]; 0.0 when undefined (a constant row or column).
"""

    def _compute(self, predictions: list[int], references: list[int]) -> dict[str, float]:
        p = np.asarray(predictions, dtype=np.int64)
        r = np.asarray(references, dtype=np.int64)
        classes, inv = np.unique(np.concatenate([r, p]), return_inverse=True)
        k = len(classes)
        cm = np.zeros((k, k), np.float64)  # (true, pred)
        np.add.at(cm, (inv[: len(r)], inv[len(r):]), 1.0)
        t = cm.sum(1)
        pk = cm.sum(0)
        s = cm.sum()
        c = np.trace(cm)
        cov_yy = s * s - float(pk @ pk)
        cov_xx = s * s - float(t @ t)
        denom = np.sqrt(cov_xx * cov_yy)
        return {"matthews_correlation": float((c * s - float(t @ pk)) / denom) if denom else 0.0}
