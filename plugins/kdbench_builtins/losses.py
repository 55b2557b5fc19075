"""Distillation losses: ``ce``, ``kd`` (Hinton et al. 2015), ``pkd`` (Sun et al. 2019), ``tinybert``.

Every loss returns *weighted* named terms; the runner sums them. The canonical soft loss is
Hinton's ``T²·KL_batchmean(p_t^T ‖ p_s^T)``; the code-faithful variants of the reference
repositories (intersun/PKD-for-BERT-Model-Compression@9e9e860, JetRunner/MetaDistil@80e60c1,
alibaba/EasyNLP@a4ee956) are options recorded in the config:

* ``reduction="elementwise_mean"``: mean over B×C elements (PKD's ``'mean'``; the KD term is C×
  smaller than canonical);
* ``soft_loss="prob_mse"``: ``T²·‖p_t^T − p_s^T‖²`` (MetaDistil NLP; its code also uses
  ``reduction="elementwise_mean"``); ``"logit_mse"``: MSE of raw logits, no T² (MetaDistil's
  ``--logits_mse``); ``"soft_ce"``: ``−Σ p_t^T log p_s^T``, no T² (Meta-KD stage 2).

Regression tasks (one output) cannot use a softmax KD: a softmax over one logit is always 1, so
every soft loss above is identically 0 (the STS-B quirk of MetaDistil and ReptileDistil). For
them ``kd`` and ``pkd`` use ``α·MSE(z_s, z_t) + (1−α)·MSE(z_s, y)`` whatever ``soft_loss`` says.
The hard-label term is named ``"ce"`` for every task (MSE for regression).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdbench
from kdbench import Batch, ConfigError, DistillLoss, KDModel, ModelOutput, NoConfig, NotApplicable, Task

SoftLoss = Literal["kl", "prob_mse", "logit_mse", "soft_ce"]
Reduction = Literal["batchmean", "elementwise_mean"]
SOFT_LOSSES: tuple[str, ...] = typing.get_args(SoftLoss)


def _f32(x: Tensor) -> Tensor:
    """Upcast half-precision tensors (autocast outputs) to float32; keep float32/float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def hard_loss(logits: Tensor, labels: Tensor, regression: bool) -> Tensor:
    """Cross-entropy on class ids, or MSE on one real output for regression.

    Args:
        logits: (B, C) scores; C == 1 for regression.
        labels: (B,) int64 class ids, or real targets for regression.
        regression: True for one-output regression tasks.

    Returns:
        Scalar mean loss.
    """
    logits = _f32(logits)
    if regression:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))  # (B,) vs (B,)
    return F.cross_entropy(logits, labels)


def soft_loss(z_s: Tensor, z_t: Tensor, temperature: float, kind: str = "kl",
              reduction: str = "batchmean") -> Tensor:
    """Soft-label loss between student and teacher logits (see the module docstring for the variants).

    Args:
        z_s: (B, C) student logits.
        z_t: (B, C) teacher logits.
        temperature: softmax temperature T.
        kind: one of :data:`SOFT_LOSSES`; ``kl`` and ``prob_mse`` are scaled by T².
        reduction: ``batchmean`` (sum over classes, mean over the batch) or ``elementwise_mean``
            (mean over B×C; batchmean / C).

    Returns:
        Scalar loss (not yet weighted by α).
    """
    z_s, z_t = _f32(z_s), _f32(z_t)
    t = temperature
    if kind == "logit_mse":
        elem = (z_s - z_t) ** 2  # (B, C)
    else:
        logp_s = F.log_softmax(z_s / t, dim=-1)  # (B, C)
        logp_t = F.log_softmax(z_t / t, dim=-1)  # (B, C)
        if kind == "kl":
            elem = F.kl_div(logp_s, logp_t, log_target=True, reduction="none")  # (B, C) KL(t‖s)
        elif kind == "prob_mse":
            elem = (logp_s.exp() - logp_t.exp()) ** 2  # (B, C)
        else:  # soft_ce
            elem = -logp_t.exp() * logp_s  # (B, C)
    red = elem.sum() / elem.shape[0] if reduction == "batchmean" else elem.mean()
    return red * (t * t) if kind in ("kl", "prob_mse") else red


class CrossEntropy(DistillLoss):
    """``ce``: hard labels only (student without KD; teacher fine-tuning). MSE for regression."""

    name = "ce"
    version = "1"
    Config = NoConfig
    uses_teacher = False

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, Tensor]:  # type: ignore[override]
        """Args: student logits (B, C); teacher ignored; batch labels (B,). Returns {"ce"}."""
        return {"ce": hard_loss(student.logits, batch.labels, self.task.is_regression)}


@dataclass(frozen=True, slots=True)
class KDConfig:
    """Options of the Hinton KD loss."""

    temperature: float = kdbench.option(4.0, gt=0)  # softmax temperature T
    #: weight of the soft term; (1 - alpha) weighs the hard-label term
    alpha: float = kdbench.option(0.5, ge=0, le=1)
    reduction: Reduction = "batchmean"  # "batchmean" (canonical) | "elementwise_mean" (PKD code, 1/C)
    soft_loss: SoftLoss = "kl"  # "kl" | "prob_mse" (MetaDistil NLP) | "logit_mse" | "soft_ce" (Meta-KD)


class HintonKD(DistillLoss):
    """``kd``: ``α·soft(z_s, z_t) + (1−α)·CE(z_s, y)`` (Hinton, Vinyals, Dean 2015).

    Regression tasks use ``α·MSE(z_s, z_t) + (1−α)·MSE(z_s, y)`` (see the module docstring).
    """

    name = "kd"
    version = "1"
    Config: ClassVar[type] = KDConfig

    def logit_terms(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, Tensor]:
        """The weighted ``ce`` and ``kd`` terms from the logits (B, C)."""
        if teacher is None:
            raise ValueError(f"loss {self.name!r} needs teacher outputs; the runner passed None")
        a = self.cfg.alpha
        hard = hard_loss(student.logits, batch.labels, self.task.is_regression)
        if self.task.is_regression:
            soft = F.mse_loss(_f32(student.logits), _f32(teacher.logits))  # (B, 1) vs (B, 1)
        else:
            soft = soft_loss(student.logits, teacher.logits, self.cfg.temperature,
                             self.cfg.soft_loss, self.cfg.reduction)
        return {"ce": (1.0 - a) * hard, "kd": a * soft}

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, Tensor]:  # type: ignore[override]
        """Args: student/teacher logits (B, C) (teacher constant); labels (B,).

        Returns:
            {"ce": (1−α)·hard loss, "kd": α·soft loss}.
        """
        return self.logit_terms(student, teacher, batch)


def pkd_layer_map(teacher_layers: int, student_layers: int, spec: Any) -> list[tuple[int, int]]:
    """Pairs (student layer j, teacher layer I(j)), 1-based, for PKD's patient loss ``L_PT`` (Sun et al. 2019).

    Student layers 1..M−1 are matched (the last one is supervised by the logits). With N teacher
    layers: ``skip`` maps j → ⌊j·N/M⌋ (12→6: 2,4,6,8,10; 6→3: 2,4; 6→2: 3); ``last`` maps j →
    N−M+j (12→6: 7..11; 6→3: 4,5). An explicit list gives I(1), I(2), ... for student layers
    1..len(list) (at most M).

    Raises:
        NotApplicable: the pair has no layers to match (student of 1 layer, deeper than teacher).
        ConfigError: an unknown map name or an out-of-range explicit list.
    """
    n, m = teacher_layers, student_layers
    if isinstance(spec, str):
        if spec not in ("skip", "last"):
            raise ConfigError(f"loss 'pkd' key 'layer_map' must be 'skip', 'last' or a list of "
                              f"teacher layers; got {spec!r}.")
        if m < 2:
            raise NotApplicable(f"pkd needs a student with at least 2 layers; it has {m}")
        if n < m:
            raise NotApplicable(f"pkd {spec} needs a teacher at least as deep as the student; "
                                f"teacher {n} layers, student {m}")
        if spec == "skip":
            return [(j, (j * n) // m) for j in range(1, m)]
        return [(j, n - m + j) for j in range(1, m)]
    teacher_idx = [int(i) for i in spec]
    if not teacher_idx or len(teacher_idx) > m or any(not 1 <= i <= n for i in teacher_idx):
        raise ConfigError(f"loss 'pkd' key 'layer_map' {list(spec)!r} must list 1..{m} teacher "
                          f"layers, each in 1..{n} (1-based), for student layers 1, 2, ...")
    return [(j + 1, i) for j, i in enumerate(teacher_idx)]


@dataclass(frozen=True, slots=True)
class PKDConfig:
    """Options of PKD (defaults: the predefined PKD-skip run of PKD-for-BERT-Model-Compression@9e9e860)."""

    temperature: float = kdbench.option(10.0, gt=0)  # softmax temperature T
    #: weight of the soft term; (1 - alpha) weighs the hard-label term
    alpha: float = kdbench.option(0.7, ge=0, le=1)
    beta: float = kdbench.option(500.0, ge=0)  # weight of the patient loss
    normalize: bool = True  # L2-normalise the [CLS] vectors before the MSE
    #: "skip" | "last" | 1-based teacher layers
    layer_map: Literal["skip", "last"] | tuple[int, ...] = kdbench.option("skip", ge=1)
    reduction: Reduction = "batchmean"  # soft-loss reduction, as in kd
    soft_loss: SoftLoss = "kl"  # soft loss, as in kd


class PatientKD(HintonKD):
    """``pkd``: KD + ``β·mean((ĥ_t − ĥ_s)²)`` on [CLS] vectors of mapped layers (Sun et al. 2019).

    Needs [CLS] vectors of equal width in teacher and student: a width mismatch makes the cell
    n-a (no learned projection here, to stay the published method; ``tinybert`` has one).
    """

    name = "pkd"
    version = "1"
    Config = PKDConfig
    needs = frozenset({"cls"})

    def __init__(self, cfg: Any, *, task: Task, teacher: KDModel | None, student: KDModel) -> None:
        super().__init__(cfg, task=task, teacher=teacher, student=student)
        if teacher is None:
            raise ValueError("loss 'pkd' needs the teacher model")
        if teacher.hidden_size != student.hidden_size:
            raise NotApplicable(f"pkd compares [CLS] vectors of equal width; teacher has "
                                f"{teacher.hidden_size}, student {student.hidden_size} (use loss "
                                "'tinybert' for a learned projection)")
        pairs = pkd_layer_map(teacher.num_layers, student.num_layers, cfg.layer_map)
        self.pairs = pairs
        self.s_idx = [j for j, _ in pairs]  # indices into ModelOutput.cls (entry 0: embeddings)
        self.t_idx = [i for _, i in pairs]

    @classmethod
    def check(cls, task: Task) -> str | None:
        """PKD needs [CLS] vectors, which only text models have."""
        return "pkd needs [CLS] vectors; vision models have none" if task.modality == "vision" else None

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, Tensor]:  # type: ignore[override]
        """Args: logits (B, C) and ``cls`` (B, L+1, H) of both models; labels (B,).

        Returns:
            {"ce": (1−α)·CE, "kd": α·soft, "patient": β·L_PT}.
        """
        terms = self.logit_terms(student, teacher, batch)
        if teacher is None or student.cls is None or teacher.cls is None:
            raise ValueError("loss 'pkd' needs ModelOutput.cls; pass want={'cls'} to both models")
        h_s = _f32(student.cls[:, self.s_idx])  # (B, L_S+1, H) -> (B, P, H)
        h_t = _f32(teacher.cls[:, self.t_idx])  # (B, L_T+1, H) -> (B, P, H)
        if self.cfg.normalize:
            h_s = F.normalize(h_s, dim=-1)
            h_t = F.normalize(h_t, dim=-1)
        terms["patient"] = self.cfg.beta * F.mse_loss(h_s, h_t)  # mean over B·P·H
        return terms


@dataclass(frozen=True, slots=True)
class TinyBertLossConfig:
    """Options of the TinyBERT intermediate-layer loss."""

    hidden_weight: float = kdbench.option(1.0, ge=0)  # weight of the hidden-state MSE
    attention_weight: float = kdbench.option(1.0, ge=0)  # weight of the attention-probability MSE
    include_embeddings: bool = True  # also match the embedding outputs (layer 0 ↔ 0)
    project: bool = True  # learned Linear student width → teacher width (False: widths must match)
    init_seed: int = kdbench.option(0, ge=0)  # seed of the projection's initialisation


class TinyBertLoss(DistillLoss):
    """``tinybert``: hidden-state and attention MSE (Jiao et al. 2020; Meta-KD's first stage).

    Student layer m (1..M) ↔ teacher layer ⌊m·N/M⌋ (m·N/M when it divides); the embedding output
    0 ↔ 0. Hidden states go through one shared learned ``Linear(H_s, H_t)``, which this module owns
    (the runner puts ``loss.parameters()`` in the student optimizer). Layer terms are summed, as in
    TinyBERT; the attention term compares probabilities (HF returns them after softmax), averaged
    over heads when the head counts differ.
    """

    name = "tinybert"
    version = "1"
    Config = TinyBertLossConfig
    needs = frozenset({"hidden", "attentions"})

    def __init__(self, cfg: Any, *, task: Task, teacher: KDModel | None, student: KDModel) -> None:
        super().__init__(cfg, task=task, teacher=teacher, student=student)
        if teacher is None:
            raise ValueError("loss 'tinybert' needs the teacher model")
        n, m = teacher.num_layers, student.num_layers
        if n < m:
            raise NotApplicable(f"tinybert needs a teacher at least as deep as the student; "
                                f"teacher {n} layers, student {m}")
        self.pairs = [(j, (j * n) // m) for j in range(1, m + 1)]  # 1-based (student, teacher)
        hs, ht = student.hidden_size, teacher.hidden_size
        self.proj: nn.Module
        if cfg.project:
            lin = nn.utils.skip_init(nn.Linear, hs, ht)  # no draw from the global RNG
            gen = torch.Generator().manual_seed(cfg.init_seed)
            bound = 1.0 / hs ** 0.5  # nn.Linear's default range
            with torch.no_grad():
                lin.weight.uniform_(-bound, bound, generator=gen)
                lin.bias.uniform_(-bound, bound, generator=gen)
            self.proj = lin
        elif hs != ht:
            raise NotApplicable(f"tinybert without projection needs equal widths; teacher {ht}, "
                                f"student {hs} (set loss.project=true)")
        else:
            self.proj = nn.Identity()

    @classmethod
    def check(cls, task: Task) -> str | None:
        """Token hidden states and attention maps exist only in text models."""
        return "tinybert needs hidden states and attentions of text models" if task.modality == "vision" else None

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, Tensor]:  # type: ignore[override]
        """Args: ``hidden`` (L+1 tensors (B, T, H)) and ``attentions`` (L tensors (B, h, T, T)).

        Returns:
            {"hidden": w_h·Σ MSE(proj(h_s), h_t), "attention": w_a·Σ MSE(A_s, A_t)}.
        """
        if teacher is None or not student.hidden or not teacher.attentions:
            raise ValueError("loss 'tinybert' needs hidden states and attentions of both models")
        pairs = ([(0, 0)] if self.cfg.include_embeddings else []) + self.pairs
        hid = sum(F.mse_loss(_f32(self.proj(student.hidden[j])), _f32(teacher.hidden[i]))
                  for j, i in pairs)
        att = torch.zeros((), device=student.logits.device, dtype=_f32(student.logits).dtype)
        for j, i in self.pairs:
            a_s, a_t = _f32(student.attentions[j - 1]), _f32(teacher.attentions[i - 1])  # (B, h, T, T)
            if a_s.shape[1] != a_t.shape[1]:
                a_s, a_t = a_s.mean(1), a_t.mean(1)  # (B, T, T)
            att = att + F.mse_loss(a_s, a_t)
        return {"hidden": self.cfg.hidden_weight * hid, "attention": self.cfg.attention_weight * att}


@kdbench.hookimpl
def kdbench_register_losses(register: kdbench.Registrar[type[DistillLoss]]) -> None:
    """Register the built-in losses."""
    for cls in (CrossEntropy, HintonKD, PatientKD, TinyBertLoss):
        register(cls)
