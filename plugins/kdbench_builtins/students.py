"""Ways to make a student: its own model kind, or k layers picked from a checkpoint.

``model`` (:class:`ModelStudentConfig`)
    The student is any model kind with its own options: ``model`` (a model kind name) plus
    ``options`` (that kind's Config fields as a table)::

        [students.r20]
        teacher = "r56"
        kind = "model"
        model = "resnet20"

        [students.tinybert4]
        teacher = "bert-base"
        kind = "model"
        model = "hf"
        options = { checkpoint = "huawei-noah/TinyBERT_General_4L_312D" }

``pick-layers`` (:class:`PickLayersConfig`)
    ``layers`` transformer layers of a pre-trained text checkpoint: by default the teacher kind's
    own checkpoint *before* fine-tuning (what ``teacher.build`` loads; for ``tiny-bert`` that is
    a random init drawn from the build generator), or an explicit ``checkpoint``. PKD
    initialises its students from the first layers of pre-trained ``bert-base-uncased`` and
    MetaDistil from pre-trained BERT ("well-read student"), never from the fine-tuned teacher
    (intersun/PKD-for-BERT-Model-Compression#3, JetRunner/MetaDistil#5). Embeddings and pooler are copied, the picked layers are copied exactly, and
    the classifier head is freshly drawn from the build generator::

        [students.bert6-skip]
        teacher = "bert-base"
        kind = "pick-layers"
        layers = 6
        pick = "skip"          # "first" | "skip" | "last" | [1, 3, 5, 7, 9, 11]
        # checkpoint = "bert-base-uncased"; attn_implementation = "eager"
        # pooling = "auto"     # "auto" | "cls" | "mean" (masked mean of the last layer)

``pooling = "auto"`` (default) reads out what the source checkpoint was trained for: the masked
mean of the last layer for mean-pooling sentence encoders such as all-MiniLM-L6-v2 (their
``1_Pooling/config.json``), BERT's [CLS] pooler otherwise. The built student records the resolved
pooling and, in ``picked_layers``, the source layer of each of its layers (ReptileDistil's default
layer map pairs them).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

import kdbench
from kdbench import ConfigError, KDModel, ModelKind, StudentKind
from kdbench_builtins.models_text import (
    HFAttention,
    HFConfig,
    HFModel,
    HFTextModel,
    Pooling,
    TinyBert,
    check_pooling,
    one_of,
    resolve_pooling,
    seeded,
)
from kdbench_builtins.models_vision import VISION_KINDS


def builtin_model_kinds() -> dict[str, type[ModelKind]]:
    """The model kinds this package ships, by name."""
    return {TinyBert.name: TinyBert, HFModel.name: HFModel, **VISION_KINDS}


def make_config(cls: type[ModelKind], options: dict[str, Any], where: str) -> Any:
    """``cls.Config`` from ``options`` with the checks of a suite section (unknown keys, types,
    bounds, ``validate()``); every problem in one ConfigError."""
    problems: list[str] = []
    cfg = kdbench.build_config(cls.Config, [options], f"{where} (model kind {cls.name!r})", problems)
    if problems:
        raise ConfigError(problems)
    return cfg


@dataclass(frozen=True, slots=True)
class ModelStudentConfig:
    """Options of the ``model`` student: a model kind and that kind's options."""

    model: str = ""  # model kind name, e.g. "resnet20", "hf", "tiny-bert"
    options: dict[str, Any] = field(default_factory=dict)  # the kind's Config fields


class ModelStudent(StudentKind):
    """``model``: the student is its own architecture or checkpoint."""

    name = "model"
    Config = ModelStudentConfig

    def model_kind(self) -> ModelKind:
        """The configured model kind, instantiated with its options."""
        kinds = dict(self.models) or builtin_model_kinds()  # the host registry, else the built-ins
        c: ModelStudentConfig = self.cfg
        if c.model not in kinds:
            hint = kdbench.suggest(c.model, list(kinds))
            raise ConfigError(f"student model = {c.model!r} is not a model kind.{hint} "
                              f"Available: {', '.join(sorted(kinds))}")
        cls = kinds[c.model]
        return cls(make_config(cls, dict(c.options), "student options"))

    def modality(self, teacher: ModelKind) -> str:
        """The student kind's modality, which must be the teacher's (checked at plan time)."""
        kind = self.model_kind()
        if kind.modality != teacher.modality:
            raise ConfigError(f"student {kind.name!r} is a {kind.modality} model but teacher "
                              f"{teacher.name!r} is a {teacher.modality} model; pick a "
                              f"{teacher.modality} student")
        return kind.modality

    def build(self, teacher: ModelKind, num_labels: int, generator: torch.Generator) -> KDModel:
        """Build the configured kind; it must consume the teacher's inputs (same modality)."""
        self.modality(teacher)
        return self.model_kind().build(num_labels, generator)


@dataclass(frozen=True, slots=True)
class PickLayersConfig:
    """Options of the ``pick-layers`` student."""

    layers: int = kdbench.option(6, ge=1)  # student depth k
    #: "first" | "skip" | "last" | 0-based layer list
    pick: str | tuple[int, ...] = kdbench.option("first", ge=0)
    checkpoint: str = ""  # "" = the teacher kind's pre-trained checkpoint; else an hf checkpoint
    #: "" = as the source; "eager" for MetaDistil's double backward
    attn_implementation: Literal["", HFAttention] = ""
    #: "auto": as the source checkpoint | "cls": BERT's [CLS] pooler | "mean": masked mean
    pooling: Pooling = "auto"

    def validate(self) -> list[str]:
        """What is known before the source checkpoint is read (its depth is checked when it is)."""
        problems = []
        if isinstance(self.pick, str):
            problems += [p for p in [one_of("pick", self.pick, PICKS)] if p]
        elif len(self.pick) != self.layers:
            problems.append(f"pick = {list(self.pick)} names {len(self.pick)} layers but "
                            f"layers = {self.layers}; set layers = len(pick)")
        return problems


#: the named ways to pick a student's layers (:func:`pick_indices`)
PICKS = ("first", "skip", "last")


def pick_indices(pick: str | list[int] | tuple[int, ...], layers: int, total: int) -> list[int]:
    """0-based source layers for a ``layers``-deep student of a ``total``-layer checkpoint.

    "first": 0..k-1. "last": total-k..total-1. "skip": every (total/k)-th layer ending at the
    top one, ``(j + 1) * total // k - 1`` (12 -> 6: 1, 3, 5, 7, 9, 11; 6 -> 2: 2, 5).
    """
    if not 1 <= layers <= total:
        raise ConfigError(f"student layers = {layers}, but the source checkpoint has {total} "
                          f"layers; choose 1..{total}")
    if isinstance(pick, str):
        named = {"first": list(range(layers)),
                 "last": list(range(total - layers, total)),
                 "skip": [(j + 1) * total // layers - 1 for j in range(layers)]}
        if pick not in named:
            raise ConfigError(f"student pick = {pick!r}; use \"first\", \"skip\", \"last\" or a "
                              "list of 0-based layer indices")
        return named[pick]
    idx = list(pick)
    if len(idx) != layers or not all(isinstance(i, int) and 0 <= i < total for i in idx):
        raise ConfigError(f"student pick = {idx}: need exactly layers = {layers} integers in "
                          f"0..{total - 1}; set layers = len(pick)")
    return idx


def _layer_list(model: nn.Module, total: int) -> str:
    """Dotted name of the ModuleList holding the ``total`` transformer layers."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == total and name.split(".")[-1] in ("layer", "layers"):
            return name
    raise ConfigError(f"pick-layers: cannot find the transformer layer list of "
                      f"{type(model).__name__}; use the \"model\" student instead")


class PickLayers(StudentKind):
    """``pick-layers``: k layers of a pre-trained text checkpoint (see the module docstring)."""

    name = "pick-layers"
    Config = PickLayersConfig

    def modality(self, teacher: ModelKind) -> str:
        """Always "text"; a vision teacher, an unknown pooling, or layers the source checkpoint does
        not have (when its depth can be read without loading it) is a config error (plan time)."""
        check_pooling(self.cfg.pooling)
        if teacher.modality != "text":
            raise ConfigError(f"student pick-layers needs a text teacher, but {teacher.name!r} is "
                              f"a {teacher.modality} model; use the \"model\" student with a "
                              f"{teacher.modality} kind")
        source = self._source(teacher)
        depth = source.depth() if isinstance(source, HFModel) else \
            source.cfg.layers if isinstance(source, TinyBert) else None
        if depth is not None:
            pick_indices(self.cfg.pick, self.cfg.layers, depth)  # raises the one-line ConfigError
        return "text"

    def _source_kind(self, teacher: ModelKind) -> ModelKind:
        self.modality(teacher)
        return self._source(teacher)

    def _source(self, teacher: ModelKind) -> ModelKind:
        """The model kind the layers are copied from: the teacher's, or ``checkpoint``'s."""
        c: PickLayersConfig = self.cfg
        if not c.checkpoint:
            return teacher
        tc = teacher.cfg if isinstance(teacher.cfg, HFConfig) else HFConfig()
        return HFModel(HFConfig(checkpoint=c.checkpoint, cache_dir=tc.cache_dir,
                                local_files_only=tc.local_files_only))

    def build(self, teacher: ModelKind, num_labels: int, generator: torch.Generator) -> KDModel:
        """Load the source, copy embeddings + picked layers into a k-layer model, fresh head."""
        from transformers import AutoModelForSequenceClassification

        c: PickLayersConfig = self.cfg
        source_kind = self._source_kind(teacher)
        source = source_kind.build(num_labels, generator)
        if not isinstance(source, HFTextModel):
            raise ConfigError(f"pick-layers: source {source.origin!r} is not a Hugging Face text "
                              "model; use the \"model\" student instead")
        total = source.num_layers
        picked = pick_indices(c.pick, c.layers, total)
        prefix = _layer_list(source.model, total) + "."
        config = copy.deepcopy(source.config)
        config.num_hidden_layers = c.layers
        attn = c.attn_implementation or source.config._attn_implementation
        with seeded(generator):
            model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn)
        base = model.base_model_prefix + "."
        src_state = source.model.state_dict()
        state = {}
        for key, fresh in model.state_dict().items():
            if key.startswith(prefix):  # "<prefix>j.rest" <- "<prefix>picked[j].rest"
                j, rest = key[len(prefix):].split(".", 1)
                state[key] = src_state[f"{prefix}{picked[int(j)]}.{rest}"]
            elif key.startswith(base):
                state[key] = src_state[key]
            else:  # task head: keep the seeded fresh init
                state[key] = fresh
        model.load_state_dict(state, strict=True)
        origin = f"{source.origin}[{','.join(map(str, picked))}]"
        pooling = (source_kind.resolved_pooling(c.pooling) if isinstance(source_kind, HFModel)
                   else resolve_pooling(c.pooling, ""))
        student = HFTextModel(model, tokenizer=source.tokenizer, origin=origin, pooling=pooling)
        student.picked_layers = tuple(picked)
        return student


@kdbench.hookimpl
def kdbench_register_students(register: kdbench.Registrar) -> None:
    """Student kinds."""
    register(ModelStudent)
    register(PickLayers)
