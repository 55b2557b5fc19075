"""The types plugins implement and receive. Base classes carry defaults, not logic.

Shapes: ``B`` batch, ``T`` tokens, ``H`` hidden width, ``C`` classes (1 for regression), ``L``
transformer layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    import datasets

    from kdbench.data import TaskData
    from kdbench.teachers import ArtifactStore


@dataclass(frozen=True, slots=True)
class NoConfig:
    """Config of a component that has no options."""


# --------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch of examples.

    ``inputs`` holds the model inputs: ``input_ids``/``attention_mask``/``token_type_ids`` of
    shape (B, T) for text, ``pixel_values`` of shape (B, 3, H, W) for vision. ``labels`` is (B,)
    int64 for classification, float32 for regression. ``index`` is (B,) the position of each
    example in its split (teacher-output caches are keyed by it). ``domain`` is (B,) int64 for
    multi-domain tasks (Amazon, MNLI genres), else None.
    """

    inputs: Mapping[str, Tensor]
    labels: Tensor
    index: Tensor
    domain: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        """Move every tensor to ``device`` (non-blocking)."""
        mv = {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}
        dom = self.domain.to(device, non_blocking=True) if self.domain is not None else None
        return Batch(mv, self.labels.to(device, non_blocking=True),
                     self.index.to(device, non_blocking=True), dom)


@dataclass(frozen=True, slots=True)
class ModelOutput:
    """What every model returns.

    Attributes:
        logits: (B, C); C == 1 for regression.
        hidden: per-layer hidden states, only when requested. Text: (B, T, H) for the embedding
            output followed by each of the L layers (L + 1 tensors, HF order). Vision: one feature
            map per stage.
        attentions: per-layer attention probabilities (B, heads, T, T), only when requested.
        cls: (B, L + 1, H) the [CLS] vector of every entry of ``hidden`` (text only, on request).
    """

    logits: Tensor
    hidden: tuple[Tensor, ...] = ()
    attentions: tuple[Tensor, ...] = ()
    cls: Tensor | None = None


#: Feature names a loss may ask models for (``DistillLoss.needs``).
FEATURES = frozenset({"hidden", "attentions", "cls"})


class KDModel(nn.Module):
    """A teacher or student network with one output interface.

    ``forward(inputs, want=frozenset())`` takes the ``Batch.inputs`` mapping and returns a
    :class:`ModelOutput`; ``want`` is a subset of :data:`FEATURES`. It must work under
    ``torch.func.functional_call`` with substituted parameters and buffers (MetaDistil's pilot
    step), so it may not cache parameters outside the module tree.
    """

    modality: ClassVar[str] = "text"  # "text" | "vision"
    #: name of the origin: checkpoint name, path or architecture; recorded in results
    origin: str = ""

    def forward(self, inputs: Mapping[str, Tensor], want: frozenset[str] = frozenset()) -> ModelOutput:
        """Run the network; see the class docstring."""
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        """Number of transformer layers (text) or stages (vision)."""
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        """Width of the hidden states (text) or of the last stage (vision)."""
        raise NotImplementedError

    def flops_per_example(self, seq_len: int = 128) -> float:
        """Matmul FLOPs of one forward pass for one example (2 per multiply-add)."""
        raise NotImplementedError

    @property
    def tokenizer(self) -> Any:
        """The fast tokenizer of a text model (None for vision)."""
        return None

    def num_parameters(self) -> int:
        """Trainable parameter count."""
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------------------------
# Components (registered through the kdbench_register_* hooks)


class Task:
    """A dataset with splits, labels and official metrics.

    Subclasses set the class attributes and implement :meth:`load`. ``Config`` is a frozen
    dataclass of the task's options (source, data_dir, max_seq_length, ...); the shared text
    pipeline (``kdbench.data``) reads ``max_seq_length``, ``max_train_examples`` and
    ``quiz_fraction`` from it when present.
    """

    name: ClassVar[str]  # "glue/sst2"
    version: ClassVar[str] = "1"
    #: set by load(): source, files and rows read (and skipped) per split; recorded in results
    load_info: dict[str, Any]
    modality: ClassVar[str] = "text"  # "text" | "vision"
    num_labels: ClassVar[int] = 2  # 1 = regression
    label_names: ClassVar[tuple[str, ...]] = ()
    #: metric names returned by compute_metrics; the first is the primary one
    metrics: ClassVar[tuple[str, ...]] = ("accuracy",)
    higher_is_better: ClassVar[bool] = True
    #: domain names for multi-domain tasks; Batch.domain holds indices into this tuple
    domains: ClassVar[tuple[str, ...]] = ()
    #: data sources the task understands, e.g. ("local", "hub")
    sources: ClassVar[tuple[str, ...]] = ("local",)
    #: splits evaluated after every epoch; the first is the selection split unless overridden
    eval_splits: ClassVar[tuple[str, ...]] = ("dev",)
    Config: ClassVar[type] = NoConfig

    def __init__(self, cfg: Any = None) -> None:
        self.cfg = cfg if cfg is not None else self.Config()  # defaults when built without options
        self.load_info = {}

    @property
    def is_regression(self) -> bool:
        """True when the task predicts one real number."""
        return self.num_labels == 1

    def load(self) -> dict[str, datasets.Dataset]:
        """Return the splits as ``datasets.Dataset`` objects with standard columns.

        Text: ``text_a`` (str), optional ``text_b`` (str), ``label`` (int, or float for
        regression; -1 where the split has no labels, e.g. GLUE test), optional ``domain`` (int).
        Vision: ``image`` (uint8, (3, 32, 32)) and ``label``. Splits: "train", the names in
        ``eval_splits`` and optionally "test". Raise :class:`kdbench.errors.DataError` on bad
        input, naming the file (and line).
        """
        raise NotImplementedError

    def compute_metrics(self, preds: Tensor, labels: Tensor, split: str) -> dict[str, float]:
        """Score predictions of one split: class ids (N,) or regression values (N,)."""
        raise NotImplementedError

    #: True if :meth:`transform` randomises training inputs (switches teacher-output caching off)
    augments: ClassVar[bool] = False

    def transform(self, inputs: dict[str, Tensor], *, train: bool,
                  generator: torch.Generator | None) -> dict[str, Tensor]:
        """Batched, on-device input transform applied to every batch before the models see it.

        Vision tasks turn uint8 pixels into normalised floats here and, when ``train`` is True,
        augment them (random crop, flip) drawing only from ``generator``. Identity by default.
        """
        return inputs


class ModelKind:
    """A family of backbones usable as teacher or student (registered via kdbench_register_models).

    ``build`` returns a :class:`KDModel` with a task head for ``num_labels`` outputs.
    """

    name: ClassVar[str]  # "hf", "resnet56", ...
    version: ClassVar[str] = "1"
    modality: ClassVar[str] = "text"
    Config: ClassVar[type] = NoConfig

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def build(self, num_labels: int, generator: torch.Generator) -> KDModel:
        """Build the model; ``generator`` seeds any freshly initialised weights (heads)."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short origin string, e.g. the checkpoint name."""
        return self.name


class StudentKind:
    """How a student is made from a teacher (registered via kdbench_register_students).

    E.g. its own checkpoint or architecture, or k layers picked from a (pre-trained) checkpoint.
    """

    name: ClassVar[str]  # "model", "pick-layers"
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = NoConfig

    def __init__(self, cfg: Any, models: Mapping[str, type[ModelKind]] | None = None) -> None:
        self.cfg = cfg
        #: the host's model registry (every registered model kind, third-party ones included)
        self.models: Mapping[str, type[ModelKind]] = models or {}

    def build(self, teacher: ModelKind, num_labels: int, generator: torch.Generator) -> KDModel:
        """Build the (untrained) student for ``teacher``'s modality and ``num_labels``."""
        raise NotImplementedError

    def modality(self, teacher: ModelKind) -> str:
        """The student's modality; by default the teacher's."""
        return teacher.modality


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
      :class:`kdbench.errors.NotApplicable` when the pair or task cannot be handled. When a cell
      resumes from a checkpoint, ``ctx.stash["resuming"]`` is True, ``ctx.step`` and ``ctx.epoch``
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
      the loop sums them on the device and logs their *mean over the window* of
      ``train.log_every`` steps (one host sync per window), so log per-step quantities.
    * ``state_dict()`` / ``load_state_dict()`` persist the rule's own state (teacher optimizer,
      counters) in checkpoints, so a resumed cell continues exactly.

    Class attributes declare what the loop must provide:

    * ``changes_teacher``: True if the teacher's weights change; switches teacher-output caching
      off and makes the runner checkpoint the teacher.
    * ``needs_quiz``: True if the rule draws held-out quiz batches (``ctx.quiz``).
    * ``Config``: frozen dataclass of the rule's options. Declare types (``Literal[...]`` for a
      choice) and bounds (``kdbench.option(0.1, gt=0)``), and put any other rule in a
      ``validate(self) -> list[str]`` method: the host checks all of it at plan time, before
      anything trains, and reports every problem at once (:mod:`kdbench.options`).

    ``cost_model`` declares the rule's FLOPs per step for ``kdbench bench`` (None: unknown). The
    frozen rule is this base class plus its cost model.
    """

    name: ClassVar[str] = "frozen"
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = NoConfig
    changes_teacher: ClassVar[bool] = False
    needs_quiz: ClassVar[bool] = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @classmethod
    def check(cls, task: Task) -> str | None:
        """Return a reason when the rule cannot apply to ``task`` (the cell becomes n-a)."""
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
    stash: dict[str, Any] = field(default_factory=dict)
    #: content-keyed store shared across cells for work worth reusing (None: nothing is shared);
    #: ``artifacts.get_or_build(key, build)``, see :class:`kdbench.teachers.ArtifactStore`
    artifacts: ArtifactStore | None = None
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
    ``"no-kd"`` is the student-without-KD row that every suite with ``baselines = true`` plans
    (its loss also fine-tunes the teachers);
    ``"reference"`` is the method the paired tables compare every other method to (unless the
    suite sets ``compare_to``). At most one registered method may hold each role.
    """

    name: str
    teacher_update: str
    loss: str
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    paper: str = ""
    version: str = "1"
    description: str = ""
    role: str = ""  # "" | "no-kd" | "reference"
    #: labelled variants ``kdbench bench`` times instead of the plain method (row label = name +
    #: " " + key); options: "teacher_update"/"loss" (overrides of the defaults), "cached_teacher"
    #: (bool), "epoch"/"epochs" (the loss's ``begin_epoch`` arguments, for multi-stage losses),
    #: "prepare" (False skips a one-off ``prepare``). Empty: one row with the defaults.
    bench: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def config_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """Fields of a component's ``Config`` dataclass, by name."""
    return {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}


def iter_components() -> Iterator[type]:
    """Base classes whose subclasses are registrable, for docs and ``kdbench ls``."""
    yield from (Task, ModelKind, StudentKind, DistillLoss, TeacherUpdate)
