"""kdbench F1: binary F1 of the positive class 1 (GLUE MRPC/QQP convention; evaluate module)."""

from __future__ import annotations

import numpy as np

from kdbench.contract.metrics.module import KdbenchMetric


class F1(KdbenchMetric):
    """Binary F1 (positive label 1)."""

    description = "F1 = 2 * precision * recall / (precision + recall) for the positive class 1."
    inputs = """
Args:
    predictions (list of int): predicted class ids in {0, 1}, shape (N,).
    references (list of int): true class ids in {0, 1}, shape (N,).
Returns:
    f1 (float): in [0, 1]; 0.0 when there are no true or predicted positives.
"""

    def _compute(self, predictions: list[int], references: list[int]) -> dict[str, float]:
        p = np.asarray(predictions) == 1
        r = np.asarray(references) == 1
        tp = float((p & r).sum())
        denom = float(p.sum() + r.sum())  # 2TP + FP + FN
        return {"f1": 2.0 * tp / denom if denom else 0.0}
