"""Data, models and tasks: the types plugins implement and receive. Base classes carry defaults,
not logic. Losses, teacher-update rules and methods are in :mod:`kdbench.contract.rules`.

Shapes: ``B`` batch, ``T`` tokens, ``H`` hidden width, ``C`` classes (1 for regression), ``L``
transformer layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    import datasets



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
    pipeline (``kdbench.engine.data``) reads ``max_seq_length``, ``max_train_examples`` and
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
    #: raw splits that pool every domain's training rows (with a ``domain`` column), e.g. for a
    #: meta-teacher; the data pipeline removes every domain's quiz rows from them, carved as each
    #: domain's own task carves its train split, so no model trains on any quiz row
    pooled_splits: ClassVar[tuple[str, ...]] = ()
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
        ``eval_splits`` and optionally "test". Raise :class:`kdbench.contract.errors.DataError` on bad
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


def config_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """Fields of a component's ``Config`` dataclass, by name."""
    return {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
