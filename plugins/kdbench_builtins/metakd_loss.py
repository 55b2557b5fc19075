"""Meta-KD's student loss ``meta-kd`` (Pan et al., ACL 2021; EasyNLP ``meta_student_distill``).

Stage 1 (intermediate layers) = TinyBERT hidden + attention MSE (+ γ·domain-vector MSE) weighted
per instance by ``λ_i = (1 + t_i)·w_i``; stage 2 = soft cross-entropy at T on the logits (no T², no
hard labels, no weights). See :mod:`kdbench_builtins.metakd` for the meta-teacher (the rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdbench
from kdbench import Batch, DistillLoss, KDModel, ModelOutput, NotApplicable, Task
from kdbench_builtins.losses import TinyBertLoss, TinyBertLossConfig


def _reason(task: Task) -> str | None:
    if not task.domains:
        return f"meta-kd needs a multi-domain task; {task.name!r} has one domain"
    if task.is_regression or task.modality != "text":
        return f"meta-kd needs a text classification task; {task.name!r} is not one"
    return None


def mean_pool(hidden: Tensor, mask: Tensor | None, pooling: str = "masked") -> Tensor:
    """Mean of token states at positions >= 1 (all but [CLS]).

    Args:
        hidden: (B, T, H) last-layer states.
        mask: (B, T) attention mask, or None (all tokens valid).
        pooling: "masked" averages real tokens only; "unmasked" averages every position 1..T−1,
            padding included (the reference code's quirk, which depends on the padded length).

    Returns:
        (B, H) float32.
    """
    h = hidden[:, 1:].float()  # (B, T-1, H)
    if pooling == "unmasked" or mask is None:
        return h.mean(1)
    m = mask[:, 1:].to(h.dtype).unsqueeze(-1)  # (B, T-1, 1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def expertise_weight(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """``w_i = 1 / (1 + exp((p_T(y_i|x_i) − 1)²))`` in [1/(1+e), 0.5]; (B, C), (B,) -> (B,)."""
    p = teacher_logits.detach().float().softmax(-1).gather(1, labels.view(-1, 1)).squeeze(1)
    return 1.0 / (1.0 + torch.exp((p - 1.0) ** 2))


class DomainHead(nn.Module):
    """Domain branch: ``u = W_c(E_dom[d] + pooled)``; ``logits = W_d·dropout(tanh(u))`` (EasyNLP ``MetaTeacherForSequenceClassification``)."""

    def __init__(self, hidden: int, num_domains: int, dropout: float = 0.1, classify: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_domains, hidden)
        self.content = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_domains) if classify else nn.Identity()  # student: vector only

    def vector(self, pooled: Tensor, domain: Tensor) -> Tensor:
        """Domain-content vector (B, H) from pooled states (B, H) and domain ids (B,)."""
        return self.content(self.embed(domain) + pooled)

    def forward(self, pooled: Tensor, domain: Tensor) -> Tensor:
        """Domain logits (B, D)."""
        return self.out(self.drop(torch.tanh(self.vector(pooled, domain))))


@dataclass(frozen=True, slots=True)
class MetaKDLossConfig:
    """Options of the ``meta-kd`` student loss (defaults: EasyNLP's meta_student_distill.sh)."""

    temperature: float = kdbench.option(2.0, gt=0)  # stage-2 softmax temperature (no T² factor)
    #: epochs of stage 1 (intermediate layers); -1 = half of train.epochs
    stage1_epochs: int = kdbench.option(-1, ge=-1)
    # epochs of stage 2 (logits), run after stage 1 whatever train.epochs says (the cell then runs
    # stage1 + stage2 epochs). Reference: 10 (EasyNLP meta_student_distill.sh runs each stage as
    # its own 10-epoch job at lr 3e-5). -1 = the rest of train.epochs (kdbench < loss v3, where a
    # 3 + 3 split left stage 2 unconverged on Amazon: ~138 steps)
    stage2_epochs: int = kdbench.option(10, ge=-1)
    #: "batch_scalar": EasyNLP's mean(λ)·MSE
    instance_weights: Literal["per_instance", "batch_scalar"] = "per_instance"
    hidden_weight: float = kdbench.option(1.0, ge=0)  # stage 1 hidden-state MSE weight
    attention_weight: float = kdbench.option(1.0, ge=0)  # stage 1 attention MSE weight
    #: stage 1 domain-vector MSE weight γ (needs the meta-kd rule)
    domain_weight: float = kdbench.option(0.5, ge=0)
    stage2_ce: bool = False  # add hard-label CE in stage 2 (not in the reference)
    # "restart": stage 2 warms up and decays its learning rate anew with fresh AdamW moments, as the
    # reference's second run does; "continuous": one schedule over both stages (kdbench < loss v2)
    stage_schedule: Literal["restart", "continuous"] = "restart"
    init_seed: int = kdbench.option(0, ge=0)  # seed of the projection and student domain branch


class MetaKDLoss(DistillLoss):
    """``meta-kd``: two-stage, domain-expertise-weighted distillation from the meta-teacher.

    Stage 1 reuses the ``tinybert`` layer pairs and its learned projection ``H_s → H_t``, but
    reduces each MSE per instance and weights it by ``λ_i = (1 + t_i)·w_i``. ``t_i`` is read from
    ``self.prototype_scores[batch.index]`` ((N_train,) float tensor, set by the ``meta-kd`` rule in
    ``prepare`` via :meth:`attach`); without it ``t_i = 0``. The domain term needs the rule's
    domain head and ``Batch.domain``; it is skipped otherwise.
    """

    name = "meta-kd"
    version = "3"  # v2: stage 2 restarts the schedule; v3: stage 2 gets stage2_epochs (10)
    Config = MetaKDLossConfig
    needs = frozenset({"hidden", "attentions"})

    def __init__(self, cfg: MetaKDLossConfig, *, task: Task, teacher: KDModel | None, student: KDModel) -> None:
        super().__init__(cfg, task=task, teacher=teacher, student=student)
        if teacher is None:
            raise ValueError("loss 'meta-kd' needs the teacher model")
        n, m = teacher.num_layers, student.num_layers
        if n % m:
            raise NotApplicable(f"meta-kd maps student layers onto teacher layers with k = L_T/L_S; "
                                f"teacher {n} layers is not a multiple of student {m}")
        self.tinybert = TinyBertLoss(TinyBertLossConfig(init_seed=cfg.init_seed), task=task,
                                     teacher=teacher, student=student)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed + 1)
            self.s_domain = DomainHead(student.hidden_size, max(len(task.domains), 1), classify=False)
        self.stage = 1
        self._s1: int | None = None  # stage-1 epochs, fixed by num_epochs()
        self.prototype_scores: Tensor | None = None
        self._teacher_head: list[DomainHead] = []  # a list: not a submodule, not in the optimizer

    @classmethod
    def check(cls, task: Task) -> str | None:
        """Multi-domain text classification only."""
        return _reason(task)

    def attach(self, scores: Tensor, teacher_head: DomainHead | None) -> None:
        """Set the train split's prototype scores (N_train,) and the meta-teacher's domain head."""
        self.prototype_scores = scores
        self._teacher_head = [teacher_head] if teacher_head is not None else []

    def num_epochs(self, train_epochs: int) -> int:
        """Epochs the cell runs: stage 1 (``stage1_epochs``, default half of ``train.epochs``)
        plus ``stage2_epochs``; ``train.epochs`` itself when ``stage2_epochs = -1``."""
        if self.cfg.stage2_epochs < 0:
            return train_epochs
        self._s1 = self.cfg.stage1_epochs if self.cfg.stage1_epochs >= 0 else train_epochs // 2
        return self._s1 + self.cfg.stage2_epochs

    def _stage1_epochs(self, num_epochs: int) -> int:
        if self._s1 is not None:
            return self._s1
        return self.cfg.stage1_epochs if self.cfg.stage1_epochs >= 0 else num_epochs // 2

    def begin_epoch(self, epoch: int, num_epochs: int) -> None:
        """Stage 1 for the first ``stage1_epochs`` (0-based ``epoch``), stage 2 afterwards."""
        self.stage = 1 if epoch < self._stage1_epochs(num_epochs) else 2

    def stages(self, num_epochs: int) -> tuple[int, ...]:
        """Stage 2 is a fresh run (schedule + optimizer moments) unless ``stage_schedule="continuous"``."""
        s1 = self._stage1_epochs(num_epochs)
        return (s1,) if self.cfg.stage_schedule == "restart" and 0 < s1 < num_epochs else ()

    def instance_weights(self, teacher: ModelOutput, batch: Batch) -> Tensor:
        """``λ_i = (1 + t_i)·w_i``, (B,)."""
        w = expertise_weight(teacher.logits, batch.labels)
        if self.prototype_scores is None:
            return w
        return (1.0 + self.prototype_scores.to(w.device)[batch.index]) * w

    def _weighted(self, per_example: Tensor, lam: Tensor) -> Tensor:
        if self.cfg.instance_weights == "batch_scalar":
            return per_example.mean() * lam.mean()
        return (per_example * lam).mean()

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, Tensor]:  # type: ignore[override]
        """Stage 1: {"hidden", "attention", "domain"}; stage 2: {"kd"} (+ {"ce"})."""
        if teacher is None:
            raise ValueError("loss 'meta-kd' needs teacher outputs")
        cfg = self.cfg
        if self.stage == 2:
            t = cfg.temperature
            p_t = (teacher.logits.detach().float() / t).softmax(-1)  # (B, C)
            terms = {"kd": -(p_t * F.log_softmax(student.logits.float() / t, -1)).sum(-1).mean()}
            if cfg.stage2_ce:
                terms["ce"] = F.cross_entropy(student.logits.float(), batch.labels)
            return terms
        if not student.hidden or not teacher.attentions:
            raise ValueError("loss 'meta-kd' stage 1 needs hidden states and attentions of both models")
        lam = self.instance_weights(teacher, batch)
        tb = self.tinybert
        hid = sum((self.tinybert.proj(student.hidden[j]).float() - teacher.hidden[i].float())
                  .pow(2).flatten(1).mean(1) for j, i in [(0, 0), *tb.pairs])  # (B,)
        att = torch.zeros_like(lam)
        for j, i in tb.pairs:
            a_s, a_t = student.attentions[j - 1].float(), teacher.attentions[i - 1].float()  # (B, h, T, T)
            if a_s.shape[1] != a_t.shape[1]:
                a_s, a_t = a_s.mean(1), a_t.mean(1)  # (B, T, T)
            att = att + (a_s - a_t).pow(2).flatten(1).mean(1)
        terms = {"hidden": cfg.hidden_weight * self._weighted(hid, lam),  # type: ignore[arg-type]
                 "attention": cfg.attention_weight * self._weighted(att, lam)}
        if self._teacher_head and batch.domain is not None and cfg.domain_weight:
            mask, d = batch.inputs.get("attention_mask"), batch.domain.clamp_min(0)
            with torch.no_grad():
                v_t = self._teacher_head[0].vector(mean_pool(teacher.hidden[-1], mask), d)  # (B, H_t)
            v_s = tb.proj(self.s_domain.vector(mean_pool(student.hidden[-1], mask), d))  # (B, H_t)
            dom = (v_s.float() - v_t.float()).pow(2).mean(1) * (batch.domain >= 0)  # (B,)
            terms["domain"] = cfg.domain_weight * self._weighted(dom, lam)
        return terms
