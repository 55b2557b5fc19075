"""kdbench accuracy: fraction of predictions equal to the references (evaluate module)."""

from __future__ import annotations

import numpy as np

from kdbench.contract.metrics.module import KdbenchMetric


class Accuracy(KdbenchMetric):
    """Classification accuracy."""

    description = "Accuracy = (number of correct predictions) / (number of examples)."
    inputs = """
Args:
    predictions (list of int): predicted class ids, shape (N,).
    references (list of int): true class ids, shape (N,).
Returns:
    accuracy (float): in [0, 1].
"""

    def _compute(self, predictions: list[int], references: list[int]) -> dict[str, float]:
        p = np.asarray(predictions)
        r = np.asarray(references)
        return {"accuracy": float((p == r).mean()) if len(r) else 0.0}
