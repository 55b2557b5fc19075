"""The resolved configuration that hooks receive: suites, training options, cells, run context.

Plain records with no engine logic, so that the hook specifications (:mod:`kdbench.contract.hookspecs`)
and plugins can name them without importing the engine that builds them
(:mod:`kdbench.engine.config` parses suites, :mod:`kdbench.engine.plan` expands them into cells).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from kdbench.contract.options import as_dict, device_problem, option

Optimizer = Literal["adamw", "sgd"]
Schedule = Literal["linear", "constant", "multistep"]
Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """The shared loop's options (one set for distillation, one for teacher fine-tuning)."""

    epochs: int = option(3, ge=1)  # passes over the training split
    batch_size: int = option(32, ge=1)  # examples per optimizer step
    #: 0 = batch_size; smaller = gradient accumulation (set on OOM retry)
    micro_batch_size: int = option(0, ge=0, execution_only=True)
    eval_batch_size: int = option(256, ge=1)  # examples per evaluation forward
    lr: float = option(5e-5, gt=0)  # peak learning rate
    weight_decay: float = option(0.0, ge=0)  # AdamW/SGD weight decay (not on bias/LayerNorm)
    optimizer: Optimizer = "adamw"
    momentum: float = option(0.9, ge=0, lt=1)  # SGD momentum
    schedule: Schedule = "linear"  # linear (warmup then decay) | constant | multistep
    warmup: float = option(0.0, ge=0, le=1)  # warmup fraction of total steps (linear schedule)
    milestones: tuple[int, ...] = option((), ge=1)  # epochs at which multistep multiplies lr by gamma
    gamma: float = option(0.1, gt=0)  # multistep factor
    grad_clip: float = option(1.0, ge=0)  # max grad norm; 0 = off
    #: split that selects the best epoch: "" = "heldout" if the task carves one, else the task's
    #: first eval split; or "quiz" / "heldout" / an eval split (resolved at plan time)
    select: str = ""
    log_every: int = option(50, ge=1, execution_only=True)  # steps between kdbench_log_metrics calls
    max_steps: int = option(0, ge=0)  # stop after this many steps (0 = no cap); for smoke tests
    device: str = option("auto", execution_only=True)  # auto | cpu | cuda | cuda:N
    precision: Precision = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the student (frozen-teacher rules only: no double backward)
    deterministic: bool = False  # torch.use_deterministic_algorithms + cuBLAS workspace
    #: CPU intra-op threads (torch.set_num_threads); 0 = torch's default. Execution-only, but not
    #: bit-neutral: thread counts can move the last float bits (leaderboards/README.md)
    threads: int = option(0, ge=0, execution_only=True)
    #: steps between resumable checkpoints; 0 = end of every epoch
    checkpoint_every: int = option(0, ge=0, execution_only=True)
    #: on OOM, halve the micro-batch (same effective batch) this often
    oom_retries: int = option(1, ge=0, execution_only=True)
    #: text: sort by length within windows of this many batches; 0 = off (added after v1 results)
    length_bucketing: int = option(0, ge=0, id_default=0)
    #: regression: start the output bias at the mean training label (added after v1 results; the
    #: planner resolves it to False for classification, where it does nothing, so only regression
    #: ids change)
    label_mean_bias: bool = option(True, id_default=False)

    def validate(self) -> list[str]:
        """Device names and the milestone order."""
        problems = [p for p in [device_problem("device", self.device)] if p]
        if list(self.milestones) != sorted(set(self.milestones)):
            problems.append(f"milestones = {list(self.milestones)} must be increasing epochs")
        return problems



@dataclass
class Suite:
    """A merged, validated suite. ``file_raw``/``cli_raw`` keep the two layers apart."""

    name: str
    path: str
    file_raw: dict[str, Any]
    cli_raw: dict[str, Any]
    methods: list[str]
    tasks: list[str]
    students: list[str]
    seeds: list[int]
    baselines: bool = True
    description: str = ""
    budget: str = ""
    #: published numbers shown as reference rows: [{row, source, verified, values{"task metric": x}}]
    reference: list[dict[str, Any]] = field(default_factory=list)
    #: published claims the page tests on paired seeds: [{method, over, source}] ("method beats over")
    claims: list[dict[str, str]] = field(default_factory=list)
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)
    student_defs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def layers(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(file, cli) raw dictionaries, lowest precedence first."""
        return self.file_raw, self.cli_raw


TEACHER = "teacher"  # the method name of teacher fine-tuning cells (the leaderboard's teacher row)


@dataclass(frozen=True)
class CellSpec:
    """One cell, fully resolved. ``run_id`` is derived from everything that determines it."""

    suite: str
    method: str
    task: str
    student: str  # student definition name; "" for teacher cells
    seed: int
    teacher: str  # teacher definition name
    teacher_kind: str
    teacher_cfg: Any
    student_kind: str
    student_cfg: Any
    loss: str
    loss_cfg: Any
    teacher_update: str
    teacher_update_cfg: Any
    task_cfg: Any
    train: TrainConfig
    teacher_train: TrainConfig
    versions: dict[str, str] = field(default_factory=dict)
    na_reason: str = ""
    run_id: str = ""

    @property
    def is_teacher(self) -> bool:
        """True for a teacher fine-tuning cell."""
        return self.method == TEACHER

    def resolved(self) -> dict[str, Any]:
        """The JSON-able resolved configuration (what ``run_id`` hashes)."""
        return {
            "method": self.method, "task": self.task, "student": self.student, "seed": self.seed,
            "teacher": {"name": self.teacher, "kind": self.teacher_kind, **as_dict(self.teacher_cfg)},
            "student_model": ({"kind": self.student_kind, **as_dict(self.student_cfg)}
                              if self.student else {}),
            "loss": {"name": self.loss, **as_dict(self.loss_cfg)},
            "teacher_update": {"name": self.teacher_update, **as_dict(self.teacher_update_cfg)},
            "task_options": as_dict(self.task_cfg),
            "train": as_dict(self.train),
            "teacher_train": as_dict(self.teacher_train),
            "versions": dict(self.versions),
        }



@dataclass
class RunContext:
    """Where a cell runs and writes."""

    #: the plugin host (:class:`kdbench.engine.manager.Host`): registries and the hook relay
    host: Any
    results_dir: Path
    cache_dir: Path
    device_name: str = "auto"

    @property
    def device(self) -> torch.device:
        """The resolved torch device."""
        return torch_device(self.device_name)


def torch_device(name: str) -> torch.device:
    """``name`` as a torch device; ``auto`` is CUDA when available, else the CPU."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
