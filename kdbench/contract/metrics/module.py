"""What every kdbench ``evaluate`` module shares: one info block and the correlation helpers.

The scripts under ``kdbench/metrics/<name>/`` subclass :class:`KdbenchMetric` and set only their
description, inputs text and feature dtype. ``evaluate`` imports ``kdbench`` as an installed
library when it loads a script by path, so this module is found offline.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import datasets
import evaluate
import numpy as np


class KdbenchMetric(evaluate.Metric, metaclass=abc.ABCMeta):
    """An ``evaluate.Metric`` written for kdbench (numpy only, loaded by path, offline).

    Abstract, so ``evaluate`` (which loads the first concrete Metric class of a script) picks the
    script's own subclass, not this base imported into it.
    """

    description: ClassVar[str] = ""  # the formula, one line
    inputs: ClassVar[str] = ""  # Args / Returns text
    dtype: ClassVar[str] = "int64"  # "int64" (class ids) | "float64" (scores)

    def _info(self) -> evaluate.MetricInfo:
        feats = datasets.Features({"predictions": datasets.Value(self.dtype),
                                   "references": datasets.Value(self.dtype)})
        return evaluate.MetricInfo(description=self.description, citation="",
                                   inputs_description=self.inputs, features=feats)

    @abc.abstractmethod
    def _compute(self, predictions: list[Any], references: list[Any]) -> dict[str, float]:
        """``{metric name: value}`` for (N,) predictions and references."""


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation of two (N,) arrays in float64, clipped to [-1, 1]; nan when one is constant."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    x = x - x.mean()
    y = y - y.mean()
    denom = np.sqrt(float(x @ x) * float(y @ y))
    return float(np.clip(float(x @ y) / denom, -1.0, 1.0)) if denom else float("nan")


def average_ranks(x: Any) -> np.ndarray:
    """1-based ranks of (N,) values; ties get the mean of the ranks they span (as scipy does)."""
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


def spearman(x: Any, y: Any) -> float:
    """Spearman rho: :func:`pearson` of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))
