"""One fine-tuned teacher per (task, teacher model, seed), cached and shared by every method.

The cache key hashes everything that determines the teacher: the model kind and options, the
task, its version, options and data fingerprint, the fine-tuning recipe and the seed. Entries live
in an :class:`ArtifactStore`, which rules also use for work shared across cells (Meta-KD's
meta-teacher, one per seed for all four Amazon domains).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kdbench.contract.options import as_dict, identity
from kdbench.contract.rules import TeacherUpdate
from kdbench.engine.artifacts import ArtifactStore
from kdbench.engine.checkpoints import save_path
from kdbench.engine.loop import Loop
from kdbench.engine.manager import ROLE_NO_KD
from kdbench.engine.plan import config_hash
from kdbench.engine.training import seed_for

if TYPE_CHECKING:
    from kdbench.contract.spec import CellSpec, RunContext
    from kdbench.contract.tensors import TaskData
    from kdbench.contract.types import KDModel, Task


def cache_key(spec: CellSpec, data: TaskData) -> str:
    """Content key of the fine-tuned teacher for ``spec``."""
    return config_hash({
        "teacher": {"kind": spec.teacher_kind, **as_dict(spec.teacher_cfg)},
        "task": spec.task, "task_version": spec.versions.get("task", ""),
        "task_options": identity(spec.task_cfg), "data": data.fingerprint,
        "recipe": identity(spec.teacher_train), "seed": spec.seed,
    }, n=16)


def get_or_train(spec: CellSpec, teacher: KDModel, task: Task, data: TaskData, device: torch.device,
                 ctx: RunContext, log: Callable[[int, dict[str, float]], None]) -> dict[str, Any]:
    """Load the cached fine-tuned weights into ``teacher`` or fine-tune and cache them.

    Returns the teacher record: ``key``, ``metrics`` (best/last), ``cached`` and, when trained
    now, ``throughput``.
    """
    key = cache_key(spec, data)

    def build() -> tuple[dict[str, Tensor], dict[str, Any]]:
        record = {**_fine_tune(spec, key, teacher, task, data, device, ctx, log), "key": key}
        return dict(teacher.state_dict()), record

    tensors, record, cached = ArtifactStore(ctx.cache_dir / "teachers").get_or_build(key, build)
    if cached:
        teacher.load_state_dict(tensors)
    return {**record, "cached": cached}


def _fine_tune(spec: CellSpec, key: str, teacher: KDModel, task: Task, data: TaskData, device: torch.device,
               ctx: RunContext, log: Callable[[int, dict[str, float]], None]) -> dict[str, Any]:
    from dataclasses import replace

    from kdbench.engine.checkpoints import load_checkpoint, save_checkpoint

    teacher.to(device)
    torch.manual_seed(seed_for(spec.seed, "teacher-global"))  # dropout draws from the global RNG
    no_kd = ctx.host.role_method(ROLE_NO_KD)  # fine-tuned as the student-without-KD row is trained
    loss_cls = ctx.host.losses.get(no_kd.loss)
    loss = loss_cls(loss_cls.Config(), task=task, teacher=None, student=teacher).to(device)
    on_device = replace(data, splits={k: v.to(device) for k, v in data.splits.items()})
    ckpt = save_path(ctx.cache_dir, f"teacher-{key}")  # a killed fine-tuning resumes from here
    loop = Loop(task, on_device, teacher, None, loss, TeacherUpdate(None), spec.teacher_train,
                spec.seed, device, lambda step, m: log(step, {f"teacher/{k}": v for k, v in m.items()}),
                checkpoint=lambda lp: save_checkpoint(lp, ckpt), keep_best=True,
                desc=f"teacher {spec.task} s{spec.seed}")
    resumed = load_checkpoint(loop, ckpt)
    state = loop.run()
    if loop.best_weights is not None:
        teacher.load_state_dict(loop.best_weights)
    metrics, protocol = loop.summary()
    sps = state.samples / state.train_seconds if state.train_seconds else 0.0
    ckpt.unlink(missing_ok=True)
    return {"metrics": metrics, "resumed_from_step": resumed, "protocol": protocol,
            "throughput": {"samples_per_s": sps, "train_s": state.train_seconds},
            "params": teacher.num_parameters(), "origin": teacher.origin,
            "pooling": getattr(teacher, "pooling", None)}
