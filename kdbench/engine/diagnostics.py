"""What a cell's numbers should be read against: the live teacher and the trivial predictor.

* :class:`TeacherProbe` — a teacher that changes while it teaches (MetaDistil, ReptileDistil,
  Meta-KD's meta-teacher) is otherwise never scored. At every evaluation the probe records, keyed
  ``teacher/...``: the live teacher's metrics on every eval split (``teacher/dev/accuracy``), its
  mean divergence from the starting teacher on each eval split (``teacher/dev/kl`` =
  KL(start || live) of the softmax outputs; regression ``teacher/dev/sq_diff`` = mean squared
  difference of the predictions) and its parameter drift ``teacher/drift`` = ‖θ − θ0‖ / ‖θ0‖.
  The starting point is the fine-tuned teacher the cell was built with, captured (as a CPU copy)
  when the loop is constructed, i.e. *before* a resumed cell loads its checkpointed teacher, so a
  resumed cell measures against the same θ0 and starting logits as an uninterrupted one.
* :func:`trivial_baseline` — the majority-class (classification) or mean-label (regression)
  predictor fitted on the training labels and scored with the task's own metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from kdbench.contract.tensors import TaskData
    from kdbench.contract.types import KDModel, Task


class TeacherProbe:
    """The starting teacher's weights and eval-split logits, and the live teacher against them."""

    def __init__(self, teacher: KDModel, task: Task, data: TaskData, batch_size: int,
                 device: torch.device, autocast: Callable[[], Any]) -> None:
        self.task, self.data, self.batch_size = task, data, batch_size
        self.device, self.autocast = device, autocast
        self.splits = [s for s in task.eval_splits if s in data.splits]
        self.state0 = {k: v.detach().to("cpu", copy=True) for k, v in teacher.state_dict().items()}
        self.params = [n for n, _ in teacher.named_parameters()]
        self.norm0 = _norm([self.state0[n] for n in self.params])
        self.logits0 = self._logits(teacher)
        self.scores0 = self._scores(self.logits0)

    def _logits(self, teacher: KDModel) -> dict[str, Tensor]:
        from kdbench.engine.evaluation import split_logits

        return {s: split_logits(teacher, self.task, self.data.splits[s], self.batch_size, self.device,
                                self.autocast) for s in self.splits}

    def _scores(self, logits: dict[str, Tensor]) -> dict[str, float]:
        """The task's metrics of ``logits`` on every labelled eval split, ``teacher/split/metric``."""
        out: dict[str, float] = {}
        for s, z in logits.items():
            split = self.data.splits[s]
            if not split.labels_known():
                continue
            preds = z[:, 0] if self.task.is_regression else z.argmax(-1)
            labels = split.tensors["labels"].cpu()
            out.update({f"teacher/{s}/{m}": float(v)
                        for m, v in self.task.compute_metrics(preds, labels, s).items()})
        return out

    def measure(self, teacher: KDModel) -> dict[str, float]:
        """The live teacher: metrics, divergence from the start, parameter drift (all floats).

        A teacher bit-identical to the start (frozen rules) reuses the starting logits: its
        divergence and drift are exactly 0 on any device."""
        state = teacher.state_dict()
        same = all(torch.equal(state[k].detach().cpu(), v) for k, v in self.state0.items())
        if same:
            return {**self.scores0, **{f"teacher/{s}/{self._div_name}": 0.0 for s in self.splits},
                    "teacher/drift": 0.0}
        logits = self._logits(teacher)
        out = self._scores(logits)
        for s, z in logits.items():
            out[f"teacher/{s}/{self._div_name}"] = divergence(self.logits0[s], z, self.task.is_regression)
        diff = [state[n].detach().float().cpu() - self.state0[n].float() for n in self.params]
        out["teacher/drift"] = _norm(diff) / self.norm0 if self.norm0 > 0 else 0.0
        return out

    @property
    def _div_name(self) -> str:
        return "sq_diff" if self.task.is_regression else "kl"


def divergence(start: Tensor, live: Tensor, regression: bool) -> float:
    """Mean KL(softmax(start) || softmax(live)) over rows, or the mean squared difference of
    one-output regression predictions; (N, C) logits each."""
    if regression:
        return float((start[:, 0].double() - live[:, 0].double()).pow(2).mean())
    log_p, log_q = F.log_softmax(start.double(), -1), F.log_softmax(live.double(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def _norm(tensors: list[Tensor]) -> float:
    return float(torch.sqrt(sum((t.double().pow(2).sum() for t in tensors), torch.zeros((), dtype=torch.float64))))


def trivial_baseline(task: Task, data: TaskData) -> dict[str, float]:
    """``{"split/metric": value}`` of the constant predictor fitted on the train labels (the
    majority class, or the mean label for regression) on every labelled eval split. A constant
    prediction's correlation (Pearson, Spearman, MCC) is undefined; it is recorded as 0 (no
    association), which is what the headroom check compares a teacher against."""
    train = data.splits["train"].tensors["labels"].cpu()
    if task.is_regression:
        const: Tensor = train.float().mean()
    else:
        const = torch.bincount(train.long(), minlength=task.num_labels).argmax()  # lowest id on ties
    out: dict[str, float] = {}
    for s in task.eval_splits:
        split = data.splits.get(s)
        if split is None or not split.labels_known():
            continue
        labels = split.tensors["labels"].cpu()
        preds = torch.full_like(labels, const.item(), dtype=labels.dtype)
        out.update({f"{s}/{m}": float(v) if math.isfinite(float(v)) else 0.0
                    for m, v in task.compute_metrics(preds, labels, s).items()})
    return out
