"""Meta-KD: a meta-teacher trained across domains, then distilled into a one-domain student.

Pan, Wang, Qiu, Zhang, Li, Huang, "Meta-KD: A Meta Knowledge Distillation Framework for Language
Model Compression across Domains", ACL 2021 (arXiv:2012.01266); checked against the reference code,
alibaba/EasyNLP@a4ee956 (``examples/knowledge_distillation/metakd/``,
``easynlp/distillation/distill_metakd_*.py``).

Teacher update ``meta-kd``, all in ``prepare`` (the machinery is in
:mod:`kdbench_builtins.metakd_teacher`):

1. Prototype scores ``t_i = ½cos(h_i, p_m) + ½cos(h_i, mean_{m'≠m} p_m')`` from mean-pooled last
   hidden states of the *pre-trained* teacher (``ctx.pretrained_teacher``), one prototype
   per domain, on the ``meta_train`` split (all domains; a task without one: its ``train`` split).
2. The meta-teacher starts from the pre-trained weights and trains on all domains with
   ``ℓ_i = CE(z_i, y_i) + γ·CE(domain_logits_i, π(d)_i)``, ``π`` a random permutation of the batch's
   domain labels, batch loss ``mean_i(t_i·ℓ_i)``. The result is written into ``ctx.teacher``.
3. The scores of the student's ``train`` split go to the loss as ``ctx.loss.prototype_scores``
   ((N_train,) tensor indexed by ``Batch.index``), with the rule's domain head.

Loss ``meta-kd`` (:mod:`kdbench_builtins.metakd_loss`): stage 1 (first half of the epochs) = TinyBERT
hidden + attention MSE (+ γ·domain vector MSE) weighted per instance by ``λ_i = (1 + t_i)·w_i``,
``w_i = 1/(1 + exp((p_T(y_i|x_i) − 1)²))``; stage 2 = soft cross-entropy at T, no T², no hard labels,
no weights (``stage2_ce`` adds CE). As in the reference's two separate runs, stage 2 restarts the
learning-rate schedule with fresh optimizer moments (``stage_schedule="restart"``; ``"continuous"``
keeps one schedule over both stages).
Classification only: regression tasks are n-a (``w_i`` needs a class probability).

Deliberate deviations from the reference code (an option restores the first two):

* mean pooling over real tokens only (``pooling="masked"``); the reference averages the padding of
  its 128-token sequences too (``pooling="unmasked"``);
* the stage-1 MSE terms are weighted per instance (``loss.instance_weights="per_instance"``); the
  reference reduces each MSE over the batch first, so ``λ`` acts as ``mean(λ)``
  (``"batch_scalar"``);
* the meta-teacher's label logits come from the teacher model's own classification head (the
  reference's meta-teacher class puts ``Linear(ReLU(pooler))`` on top).

One meta-teacher is trained per seed and shared by every domain's cell (``ctx.artifacts``),
bit-identical to training it in each cell.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import kdbench
from kdbench import (
    DistillLoss,
    Method,
    NotApplicable,
    Registrar,
    StepContext,
    StepCost,
    Task,
    TeacherUpdate,
    hookimpl,
)
from kdbench_builtins import metakd_teacher as mt
from kdbench_builtins.metakd_loss import (
    DomainHead,
    MetaKDLoss,
    MetaKDLossConfig,
    _reason,
    expertise_weight,
    mean_pool,
)
from kdbench_builtins.metakd_teacher import corrupt_domains, prototype_scores

__all__ = ["DomainHead", "MetaKD", "MetaKDConfig", "MetaKDLoss", "MetaKDLossConfig", "corrupt_domains",
           "expertise_weight", "mean_pool", "prototype_scores"]


@dataclass(frozen=True, slots=True)
class MetaKDConfig:
    """Options of the ``meta-kd`` teacher update (defaults: EasyNLP's example scripts)."""

    meta_epochs: int = kdbench.option(1, ge=1)  # meta-teacher passes over the meta split
    lr: float = kdbench.option(3e-5, gt=0)  # meta-teacher AdamW learning rate
    #: meta-teacher AdamW weight decay (bias/LayerNorm excluded)
    weight_decay: float = kdbench.option(1e-4, ge=0)
    warmup: float = kdbench.option(0.1, ge=0, le=1)  # warmup fraction of the meta-teacher's linear schedule
    max_grad_norm: float = kdbench.option(1.0, ge=0)  # clip; 0 = off
    batch_size: int = kdbench.option(32, ge=1)  # meta-teacher batch (reference: 16 per GPU x 2)
    gamma: float = kdbench.option(0.5, ge=0)  # weight of the corrupted-domain loss
    #: "unmasked": the reference's quirk, padding included
    pooling: Literal["masked", "unmasked"] = "masked"
    sample_weights: bool = True  # weight ℓ_i by the prototype score t_i (use_sample_weights)
    #: the split with every domain (a task without "meta_train" uses its train split, which then
    #: holds every domain; prepare/meta/rows records the rows the meta-teacher trained on)
    meta_split: Literal["meta_train", "train"] = "meta_train"
    #: meta-teacher start: "pretrained" (paper) or "teacher" (fine-tuned)
    init: Literal["pretrained", "teacher"] = "pretrained"


class MetaKD(TeacherUpdate):
    """``meta-kd``: train a meta-teacher across domains in ``prepare``; frozen afterwards."""

    name = "meta-kd"
    version = "1"
    Config = MetaKDConfig
    changes_teacher = True  # replaced in prepare: must be checkpointed, old caches are invalid
    needs_quiz = False

    def cost_model(self, *, live_teacher: bool = True) -> StepCost:
        """Per step like KD (F_T+3F_S); the meta-teacher is trained once, in ``prepare``."""
        return StepCost(1.0, 3.0)

    def __init__(self, cfg: MetaKDConfig) -> None:
        super().__init__(cfg)
        self.head: DomainHead | None = None

    @classmethod
    def check(cls, task: Task) -> str | None:
        """Multi-domain text classification only."""
        return _reason(task)

    def prepare(self, ctx: StepContext) -> dict[str, float]:
        """Score examples, train the meta-teacher into ``ctx.teacher``, hand scores to the loss.

        Deterministic given ``ctx.generator`` (the global RNG is forked and seeded from it). With
        ``ctx.artifacts`` the meta-teacher is trained once and shared by every cell with the same
        start weights, meta split, options and seed (e.g. the four Amazon domains). On resume
        (``ctx.resuming``) the checkpointed teacher is kept and not retrained; the scores are
        recomputed (no randomness) and ``load_state_dict`` restores the domain head.

        Raises:
            NotApplicable: single-domain or regression task, or fewer than two domains in the data.
        """
        reason = _reason(ctx.task)
        if reason:
            raise NotApplicable(reason)
        cfg, splits = self.cfg, ctx.data.splits
        meta = splits[cfg.meta_split] if cfg.meta_split in splits else splits["train"]  # see MetaKDConfig
        if ctx.pretrained_teacher is None:
            raise RuntimeError("meta-kd needs ctx.pretrained_teacher (the loop sets it for method cells)")
        pre = ctx.pretrained_teacher()
        h, dom = mt.encode(pre, meta, ctx, cfg.pooling)
        num_domains = len(ctx.task.domains)
        t_meta = prototype_scores(h, dom, num_domains)
        if splits["train"] is meta:
            t_train = t_meta
        else:  # score the student's split against the meta split's prototypes
            h_tr, d_tr = mt.encode(pre, splits["train"], ctx, cfg.pooling)
            t_train = prototype_scores(h, dom, num_domains, h_tr, d_tr)
        resuming = ctx.resuming
        if cfg.init == "pretrained" and not resuming:
            ctx.teacher.load_state_dict(pre.state_dict())
        del pre, h
        key = None if resuming or ctx.artifacts is None else mt.meta_teacher_key(ctx, meta, cfg, self.version)
        with mt.seeded(ctx.generator, ctx.device):
            self.head = head = DomainHead(ctx.teacher.hidden_size, num_domains).to(ctx.device)
            if resuming:
                metrics: dict[str, float] = {}
            elif key is None:
                metrics = mt.train(ctx, head, meta, t_meta, cfg)
            else:
                metrics = mt.train_shared(ctx, head, meta, t_meta, cfg, key)
        head.eval().requires_grad_(False)
        ctx.teacher.eval()
        if isinstance(ctx.loss, MetaKDLoss):
            ctx.loss.attach(t_train.float(), head)
        return {**metrics, **mt.teacher_metrics(ctx),
                "meta/score_mean": float(t_meta.mean()), "meta/score_min": float(t_meta.min()),
                "meta/rows": float(len(meta))}

    def state_dict(self) -> dict[str, Any]:
        """The domain head (the teacher itself is checkpointed by the runner)."""
        return {"head": self.head.state_dict()} if self.head is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the domain head after ``prepare`` on resume."""
        if self.head is not None and "head" in state:
            self.head.load_state_dict(state["head"])


def _methods() -> Iterator[Method]:
    yield Method(
        name="meta-kd", teacher_update="meta-kd", loss="meta-kd",
        defaults={"loss": {"temperature": 2.0}, "teacher_update": {"meta_epochs": 1, "lr": 3e-5}},
        paper="Pan, Wang, Qiu, Zhang, Li, Huang. Meta-KD: A Meta Knowledge Distillation Framework "
              "for Language Model Compression across Domains. ACL 2021",
        description="Meta-teacher trained across domains (prototype weights, corrupted domain "
                    "labels), then two-stage domain-expertise-weighted distillation.",
        # the per-step cost of the second stage; prepare's one-off meta-teacher training is skipped
        bench={"stage 2": {"epoch": 1, "epochs": 2, "prepare": False}},
    )


@hookimpl
def kdbench_register_teacher_updates(register: Registrar[type[TeacherUpdate]]) -> None:
    """The ``meta-kd`` rule."""
    register(MetaKD)


@hookimpl
def kdbench_register_losses(register: Registrar[type[DistillLoss]]) -> None:
    """The ``meta-kd`` loss."""
    register(MetaKDLoss)


@hookimpl
def kdbench_register_methods(register: Registrar[Method]) -> None:
    """The ``meta-kd`` method."""
    for m in _methods():
        register(m)
