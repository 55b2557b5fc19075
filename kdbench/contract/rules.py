"""Losses, teacher-update rules and methods: the types a distillation method implements, and the
context a rule sees. Base classes carry defaults, not logic.

Shapes: ``B`` batch, ``T`` tokens, ``H`` hidden width, ``C`` classes (1 for regression).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from kdbench.contract.tensors import TaskData
from kdbench.contract.types import (
    Batch,
    KDModel,
    ModelKind,
    ModelOutput,
    NoConfig,
    StudentKind,
    Task,
)

if TYPE_CHECKING:
    from kdbench.contract.spec import TrainConfig


class Artifacts(Protocol):
    """A content-keyed store of tensor files shared by cells (``StepContext.artifacts``).

    Keys must hash everything the tensors depend on (:func:`kdbench.tensor_digest` hashes tensor
    contents). The engine's store (:class:`kdbench.engine.artifacts.ArtifactStore`) checks each
    entry's integrity and rebuilds a corrupt one, and lets one worker build a key at a time.
    """

    def get_or_build(self, key: str, build: Callable[[], tuple[dict[str, Tensor], dict[str, Any]]],
                     ) -> tuple[dict[str, Tensor], dict[str, Any], bool]:
        """``(tensors, record, cached)``: the stored entry, or ``build()``'s (tensors, JSON-able
        record) stored now. Cached tensors are on the CPU."""
        ...


class DistillLoss(nn.Module):
    """A distillation objective (registered via kdbench_register_losses).

    Instantiated once per cell as ``Loss(cfg, task=..., teacher=..., student=...)``; it is an
    ``nn.Module`` so it can own trainable parameters (projections), which the runner adds to the
    student's optimizer. ``forward`` returns *weighted* named terms; the runner sums them and logs
    each one. ``needs`` lists the :data:`FEATURES` both models must return.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = NoConfig
    needs: ClassVar[frozenset[str]] = frozenset()
    #: False for a loss that ignores the teacher entirely (cross-entropy baseline)
    uses_teacher: ClassVar[bool] = True

    def __init__(self, cfg: Any, *, task: Task, teacher: KDModel | None, student: KDModel) -> None:
        super().__init__()
        self.cfg = cfg
        self.task = task

    @classmethod
    def check(cls, task: Task) -> str | None:
        """Return a reason when the loss cannot apply to ``task`` (the cell becomes n-a)."""
        return None

    def begin_epoch(self, epoch: int, num_epochs: int) -> None:
        """Called before every epoch (multi-stage losses switch stage here)."""

    def num_epochs(self, train_epochs: int) -> int:
        """Epochs the cell runs given ``train.epochs``; a multi-stage loss with per-stage budgets
        (Meta-KD) may ask for more. Default: ``train_epochs``."""
        return train_epochs

    def stages(self, num_epochs: int) -> tuple[int, ...]:
        """Epochs (0-based) at which a new training stage starts as if it were a fresh run: the
        learning-rate schedule (warmup + decay) restarts there and the optimizer's moments are
        cleared. Default: none (one schedule over all epochs)."""
        return ()

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, Tensor]:  # type: ignore[override]
        """Return ``{"ce": scalar, "kd": scalar, ...}``; teacher outputs are constants."""
        raise NotImplementedError


class QuizStream:
    """Endless stream of held-out quiz batches (never dev or test), for rules with needs_quiz."""

    def next(self) -> Batch:
        """The next quiz batch, on the run's device."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class StepCost:
    """FLOP model of one training step, per training example: ``teacher``·F_T + ``student``·F_S.

    F_T / F_S is one forward pass of the teacher / student on one example (``flops_per_example``);
    fwd+bwd ≈ 3F (performance.md §2.3). ``approx`` marks an estimate (printed with "≈").
    """

    teacher: float
    student: float
    approx: bool = False

    def flops(self, f_t: float, f_s: float) -> float:
        """FLOPs per training example for forward costs ``f_t`` and ``f_s``."""
        return self.teacher * f_t + self.student * f_s

    @property
    def formula(self) -> str:
        """E.g. ``"4F_T+11F_S"``, ``"3F_S"``, ``"≈F_T+3F_S"``."""
        terms = [("" if c == 1 else f"{c:.3g}") + name
                 for c, name in ((self.teacher, "F_T"), (self.student, "F_S")) if c]
        return ("≈" if self.approx else "") + ("+".join(terms) or "0")


class TeacherUpdate:
    """A teacher-update rule: how (and whether) the teacher learns while it teaches.

    Contract (the shared loop calls these, in this order):

    * ``prepare(ctx)`` once per (re)start, after the teacher and student are built and before the
      first student step (``ctx.batch`` is None). Meta-KD trains its meta-teacher here. Raise
      :class:`kdbench.contract.errors.NotApplicable` when the pair or task cannot be handled. When a cell
      resumes from a checkpoint, ``ctx.resuming`` is True, ``ctx.step`` and ``ctx.epoch``
      hold the step and epoch it resumes at (0 on a fresh start), the teacher's weights are
      already restored (for rules with ``changes_teacher``) and ``load_state_dict`` follows
      ``prepare``: skip expensive work whose result the checkpoint already holds. Work that
      other cells would repeat exactly can go through ``ctx.artifacts`` (when not None):
      ``get_or_build(key, build)`` with a key that hashes everything the result depends on.
    * ``step(ctx)`` before every student optimizer step, with ``ctx.batch`` the batch the student
      is about to train on. MetaDistil runs its pilot update and teacher meta-step here, Reptile
      its inner update and teacher step. The rule must leave the student's parameters,
      buffers and optimizer state as it found them (the runner then takes the real student step
      with the updated teacher). Return metrics to log, e.g. ``{"teacher/grad_norm": ...}``:
      the loop sums them on the device and logs each key's *mean over the steps of the window*
      of ``train.log_every`` steps that returned it (one host sync per window), so log per-step
      quantities; a key in ``gauges`` (a running total) is logged as its latest value instead.
    * ``state_dict()`` / ``load_state_dict()`` persist the rule's own state (teacher optimizer,
      counters) in checkpoints, so a resumed cell continues exactly.

    Class attributes declare what the loop must provide:

    * ``changes_teacher``: True if the teacher's weights change; switches teacher-output caching
      off and makes the runner checkpoint the teacher.
    * ``needs_quiz``: True if the rule draws held-out quiz batches (``ctx.quiz``).
    * ``gauges``: metric keys of ``step`` that are running totals (logged as the latest value).
    * ``Config``: frozen dataclass of the rule's options. Declare types (``Literal[...]`` for a
      choice) and bounds (``kdbench.option(0.1, gt=0)``), and put any other rule in a
      ``validate(self) -> list[str]`` method: the host checks all of it at plan time, before
      anything trains, and reports every problem at once (:mod:`kdbench.contract.options`).

    ``check`` (the task), ``check_train`` (the student's training configuration) and
    ``check_student`` run at plan time: a task the rule cannot handle makes the cell n-a, options
    that cannot work with the others are config errors. ``cost_model`` declares the rule's FLOPs
    per step for ``kdbench bench`` (None: unknown). The frozen rule is this base class plus its
    cost model.
    """

    name: ClassVar[str] = "none"  # the base rule: the teacher never changes
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = NoConfig
    changes_teacher: ClassVar[bool] = False
    needs_quiz: ClassVar[bool] = False
    gauges: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @classmethod
    def check(cls, task: Task) -> str | None:
        """Return a reason when the rule cannot apply to ``task`` (the cell becomes n-a)."""
        return None

    @classmethod
    def check_student(cls, cfg: Any, kind: str, student_cfg: Any) -> str | None:
        """Plan time: why the rule's options ``cfg`` cannot work with a student of ``kind`` built
        from ``student_cfg`` (a config error naming both), or None."""
        return None

    @classmethod
    def check_train(cls, cfg: Any, train: TrainConfig) -> str | None:
        """Plan time: why the rule's options ``cfg`` cannot work with the student's training
        configuration ``train`` (a config error), or None."""
        return None

    def prepare(self, ctx: StepContext) -> dict[str, float]:
        """Once before distillation; see the class docstring."""
        return {}

    def step(self, ctx: StepContext) -> dict[str, float]:
        """Before every student step; see the class docstring."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The rule's own state for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def cost_model(self, *, live_teacher: bool = True) -> StepCost | None:
        """FLOP model of one whole training step under this rule and ``self.cfg``: the loop's
        teacher forward and student step included, rule work amortised over the steps it skips.
        ``live_teacher`` False: the loop takes teacher outputs from its cache (or the loss ignores
        the teacher). None (the default): no model; ``kdbench bench`` prints "—"."""
        return None


def _no_progress(done: int, total: int, what: str) -> None:
    """StepContext.progress outside a Loop: report nothing."""


@dataclass(slots=True)
class StepContext:
    """What a teacher-update rule sees. The runner fills it; rules must not keep references
    beyond the call except to models and optimizers they own."""

    teacher: KDModel
    student: KDModel
    loss: DistillLoss
    student_opt: torch.optim.Optimizer
    task: Task
    data: TaskData
    quiz: QuizStream | None
    generator: torch.Generator  # the cell's RNG for the rule; never use the global RNG
    device: torch.device
    train: Any  # the resolved TrainConfig (lr, batch_size, epochs, ...)
    epoch: int = 0
    step: int = 0  # student optimizer steps taken so far
    total_steps: int = 0
    batch: Batch | None = None
    #: forward features the loss needs; pass as ``want=`` to both models
    want: frozenset[str] = frozenset()
    #: autocast context factory for forward passes (bf16 on CUDA, no-op on CPU)
    autocast: Any = None
    #: True while ``prepare`` runs for a cell resumed from its checkpoint: the checkpointed
    #: teacher and rule state are restored afterwards, so expensive one-off work can be skipped
    resuming: bool = False
    #: ``pretrained_teacher()`` builds a fresh teacher from its pre-trained checkpoint, before any
    #: fine-tuning, on ``device`` (for rules that start from it, e.g. a meta-teacher)
    pretrained_teacher: Callable[[], KDModel] | None = None
    #: content-keyed store shared across cells for work worth reusing (None: nothing is shared);
    #: ``artifacts.get_or_build(key, build)``, see :class:`Artifacts`
    artifacts: Artifacts | None = None
    #: ``progress(done, total, what)``: report a long phase of the rule (e.g. ``prepare``) on the
    #: cell's progress line, e.g. ``ctx.progress(i, n, "meta-teacher")``; the loop wires it up
    progress: Callable[[int, int, str], None] = _no_progress

    def teacher_forward(self, inputs: Mapping[str, Tensor], *, grad: bool = False) -> ModelOutput:
        """Teacher forward in eval mode, with or without grad."""
        self.teacher.eval()
        with torch.set_grad_enabled(grad):
            return self.teacher(inputs, want=self.want)


@dataclass(frozen=True, slots=True)
class Method:
    """A named bundle that leaderboards rank: teacher update + loss + defaults + reference.

    ``defaults`` maps a section ("loss", "teacher_update", "train") to option values that
    override the components' own defaults (and are overridden by suite files and the CLI).

    ``role`` tells the host what the method is for, without the host knowing its name:
    ``"student-only"`` is the student-without-KD row that every suite with ``baselines = true``
    plans (the teachers are fine-tuned with its loss and rule);
    ``"reference"`` is the method the paired tables compare every other method to.
    At most one registered method may hold each role.
    """

    name: str
    teacher_update: str
    loss: str
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    paper: str = ""
    version: str = "1"
    description: str = ""
    role: str = ""  # "" | "student-only" | "reference"
    #: labelled variants ``kdbench bench`` times instead of the plain method (row label = name +
    #: " " + key); options: "teacher_update"/"loss" (overrides of the defaults), "cached_teacher"
    #: (bool), "epoch"/"epochs" (the loss's ``begin_epoch`` arguments, for multi-stage losses),
    #: "prepare" (False skips a one-off ``prepare``). Empty: one row with the defaults.
    bench: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def iter_components() -> Iterator[type]:
    """Base classes whose subclasses are registrable, for docs and ``kdbench ls``."""
    yield from (Task, ModelKind, StudentKind, DistillLoss, TeacherUpdate)
