"""Whole-split inference: logits, predictions, metrics on every eval split, and the teacher-output
cache that frozen-teacher cells train from."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kdbench.contract.spec import TrainConfig
from kdbench.contract.tensors import TaskData, TensorSplit
from kdbench.contract.types import KDModel, Task

if TYPE_CHECKING:
    pass


from kdbench.engine.training import transform


@torch.no_grad()
def split_logits(model: KDModel, task: Task, split: TensorSplit, batch_size: int, device: torch.device,
                 autocast: Callable[[], Any]) -> Tensor:
    """fp32 logits (N, C) of ``model`` (eval mode) for a whole split, in split order, on the CPU."""
    model.eval()
    out = []
    for batch in split.batches(batch_size):
        batch = transform(task, batch, train=False, gen=None, device=device)
        with autocast():
            out.append(model(batch.inputs).logits.float())  # (B, C)
    return torch.cat(out).cpu()


def predict(model: KDModel, task: Task, split: TensorSplit, batch_size: int, device: torch.device,
            autocast: Callable[[], Any]) -> Tensor:
    """Class ids (N,) or regression values (N,) for a whole split, in split order."""
    logits = split_logits(model, task, split, batch_size, device, autocast)
    return logits[:, 0] if task.is_regression else logits.argmax(-1)


def evaluate(model: KDModel, task: Task, data: TaskData, cfg: TrainConfig, device: torch.device,
             autocast: Callable[[], Any]) -> dict[str, float]:
    """Metrics on every labelled eval split (and the selection split, e.g. "quiz"), keyed
    ``split/metric``."""
    scores: dict[str, float] = {}
    names = list(task.eval_splits) + ([cfg.select] if cfg.select and cfg.select not in task.eval_splits else [])
    for name in names:
        split = data.splits[name]
        preds = predict(model, task, split, cfg.eval_batch_size, device, autocast)
        for metric, value in task.compute_metrics(preds, split.tensors["labels"], name).items():
            scores[f"{name}/{metric}"] = float(value)
    return scores


@torch.no_grad()
def teacher_cache(teacher: KDModel, task: Task, split: TensorSplit, want: frozenset[str],
                  cfg: TrainConfig, device: torch.device, autocast: Callable[[], Any]) -> dict[str, Tensor]:
    """Teacher logits (and [CLS] vectors if ``want`` has "cls") for every example, by index."""
    teacher.eval()
    logits, cls = [], []
    for batch in split.batches(cfg.eval_batch_size):
        batch = transform(task, batch, train=False, gen=None, device=device)
        with autocast():
            out = teacher(batch.inputs, want=want & {"cls"})
        logits.append(out.logits.float())
        if out.cls is not None:
            cls.append(out.cls.float())
    cache = {"logits": torch.cat(logits)}  # (N, C)
    if cls:
        cache["cls"] = torch.cat(cls)  # (N, L+1, H)
    return cache
