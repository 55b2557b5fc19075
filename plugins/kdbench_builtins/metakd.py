"""Meta-KD (Pan, Wang, Qiu, Zhang, Li, Huang, ACL 2021): a meta-teacher trained across domains.

Teacher update ``meta-kd`` (shared/docs/methods.md §6), all in ``prepare``:

1. Prototype scores ``t_i = ½cos(h_i, p_m) + ½cos(h_i, mean_{m'≠m} p_m')`` from mean-pooled last
   hidden states of the *pre-trained* teacher (``ctx.stash["pretrained_teacher"]``), one prototype
   per domain, on the ``meta_train`` split (all domains; falls back to ``train``).
2. The meta-teacher starts from the pre-trained weights and trains on all domains with
   ``ℓ_i = CE(z_i, y_i) + γ·CE(domain_logits_i, π(d)_i)``, ``π`` a random permutation of the batch's
   domain labels, batch loss ``mean_i(t_i·ℓ_i)``. The result is written into ``ctx.teacher``.
3. The scores of the student's ``train`` split go to the loss as ``ctx.loss.prototype_scores``
   ((N_train,) tensor indexed by ``Batch.index``), with the rule's domain head.

Loss ``meta-kd``: stage 1 (first half of the epochs) = TinyBERT hidden + attention MSE (+ γ·domain
vector MSE) weighted per instance by ``λ_i = (1 + t_i)·w_i``, ``w_i = 1/(1 + exp((p_T(y_i|x_i) − 1)²))``;
stage 2 = soft cross-entropy at T, no T², no hard labels, no weights (``stage2_ce`` adds CE). As in the
reference's two separate runs, stage 2 restarts the learning-rate schedule with fresh optimizer
moments (``stage_schedule="restart"``; ``"continuous"`` keeps one schedule over both stages).
Classification only: regression tasks are n-a (``w_i`` needs a class probability).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import kdbench
from kdbench import (
    KDModel,
    Method,
    NotApplicable,
    StepContext,
    Task,
    TeacherUpdate,
)
from kdbench_builtins.metakd_loss import (
    DomainHead,
    MetaKDLoss,
    MetaKDLossConfig,
    _choice,
    _reason,
    expertise_weight,
    mean_pool,
)

__all__ = ["DomainHead", "MetaKD", "MetaKDConfig", "MetaKDLoss", "MetaKDLossConfig", "corrupt_domains",
           "expertise_weight", "mean_pool", "prototype_scores"]


def prototype_scores(h: Tensor, domain: Tensor, num_domains: int, query: Tensor | None = None,
                     query_domain: Tensor | None = None) -> Tensor:
    """``t_i = ½cos(h_i, p_{d_i}) + ½cos(h_i, mean of the other domains' prototypes)``.

    Args:
        h: (N, H) representations that define the prototypes; domain: (N,) int64 domain ids.
        query, query_domain: (M, H), (M,) examples to score instead of ``h`` (default: ``h``).

    Returns:
        (N,) or (M,) scores in [-1, 1].
    """
    onehot = F.one_hot(domain.clamp_min(0), num_domains).to(h.dtype) * (domain >= 0).unsqueeze(1)  # (N, D)
    counts = onehot.sum(0)  # (D,); domain -1 (e.g. an unseen MNLI genre) defines no prototype
    present = counts > 0
    if int(present.sum()) < 2:
        raise NotApplicable("meta-kd needs examples of at least two domains in its training split")
    protos = (onehot.T @ h) / counts.clamp_min(1).unsqueeze(1)  # (D, H)
    others = (protos[present].sum(0, keepdim=True) - protos) / (present.sum() - 1)  # (D, H)
    q, qd = (h, domain) if query is None or query_domain is None else (query, query_domain)
    own = F.cosine_similarity(q, protos[qd.clamp_min(0)], dim=-1)
    cross = F.cosine_similarity(q, others[qd.clamp_min(0)], dim=-1)
    return torch.where(qd >= 0, 0.5 * own + 0.5 * cross, 0.0)  # unknown domain: score 0


def corrupt_domains(domain: Tensor, generator: torch.Generator) -> Tensor:
    """A random permutation of the batch's domain labels (same multiset), from ``generator``."""
    perm = torch.randperm(domain.shape[0], generator=generator, device=generator.device)
    return domain[perm.to(domain.device)]


def _autocast(ctx: StepContext) -> contextlib.AbstractContextManager[Any]:
    return ctx.autocast() if ctx.autocast is not None else contextlib.nullcontext()


def _architecture(model: KDModel) -> str:
    """What besides the weights shapes training: module tree (dropout rates) and HF config."""
    config: Any = getattr(getattr(model, "model", None), "config", None)
    if not hasattr(config, "to_json_string"):
        return repr(model)
    return repr(model) + config.to_json_string(use_diff=False) + str(getattr(config, "_attn_implementation", ""))


@contextlib.contextmanager
def _seeded(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Fork the global RNG (dropout, inits) and seed it from ``generator``."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True, slots=True)
class MetaKDConfig:
    """Options of the ``meta-kd`` teacher update (defaults: EasyNLP's example scripts)."""

    meta_epochs: int = 1  # meta-teacher passes over the meta split
    lr: float = 3e-5  # meta-teacher AdamW learning rate
    weight_decay: float = 1e-4  # meta-teacher AdamW weight decay (bias/LayerNorm excluded)
    warmup: float = 0.1  # warmup fraction of the meta-teacher's linear schedule
    max_grad_norm: float = 1.0  # clip; 0 = off
    batch_size: int = 32  # meta-teacher batch (reference: 16 per GPU x 2)
    gamma: float = 0.5  # weight of the corrupted-domain loss
    pooling: str = "masked"  # "masked" | "unmasked" (reference quirk: padding included)
    sample_weights: bool = True  # weight ℓ_i by the prototype score t_i (use_sample_weights)
    meta_split: str = "meta_train"  # split with every domain; "train" when absent
    init: str = "pretrained"  # meta-teacher start: "pretrained" (paper) | "teacher" (fine-tuned)


class MetaKD(TeacherUpdate):
    """``meta-kd``: train a meta-teacher across domains in ``prepare``; frozen afterwards."""

    name = "meta-kd"
    version = "1"
    Config = MetaKDConfig
    changes_teacher = True  # replaced in prepare: must be checkpointed, old caches are invalid
    needs_quiz = False

    def cost_model(self, *, live_teacher: bool = True) -> kdbench.StepCost:
        """Per step like KD (F_T+3F_S); the meta-teacher is trained once, in ``prepare``."""
        return kdbench.StepCost(1.0, 3.0)

    def __init__(self, cfg: MetaKDConfig) -> None:
        super().__init__(cfg)
        _choice("teacher_update 'meta-kd'", "pooling", cfg.pooling, ("masked", "unmasked"))
        _choice("teacher_update 'meta-kd'", "init", cfg.init, ("pretrained", "teacher"))
        self.head: DomainHead | None = None

    @classmethod
    def check(cls, task: Task) -> str | None:
        """Multi-domain text classification only."""
        return _reason(task)

    def _encode(self, model: KDModel, split: Any, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """Pooled (N, H) representations and (N,) domains of a split, no grad, by Batch.index."""
        n, h_all, d_all = len(split), None, None
        model.eval()
        with torch.no_grad():
            for batch in split.batches(int(ctx.train.eval_batch_size), order=torch.arange(n), start=0):
                batch = batch.to(ctx.device)
                if batch.domain is None:
                    raise NotApplicable("meta-kd needs Batch.domain on every split it scores")
                with _autocast(ctx):
                    out = model(batch.inputs, want=frozenset({"hidden"}))
                pooled = mean_pool(out.hidden[-1], batch.inputs.get("attention_mask"), self.cfg.pooling)
                if h_all is None:
                    h_all = pooled.new_zeros(n, pooled.shape[1])
                    d_all = torch.zeros(n, dtype=torch.long, device=pooled.device)
                h_all[batch.index] = pooled
                d_all[batch.index] = batch.domain  # type: ignore[index]
        if h_all is None or d_all is None:
            raise NotApplicable("meta-kd: a split it scores is empty")
        return h_all, d_all

    def prepare(self, ctx: StepContext) -> dict[str, float]:
        """Score examples, train the meta-teacher into ``ctx.teacher``, hand scores to the loss.

        Deterministic given ``ctx.generator`` (the global RNG is forked and seeded from it). With
        ``ctx.artifacts`` the meta-teacher is trained once and shared by every cell with the same
        start weights, meta split, options and seed (e.g. the four Amazon domains). On resume (``ctx.stash["resuming"]``) the checkpointed teacher is kept and not retrained; the
        scores are recomputed (no randomness) and ``load_state_dict`` restores the domain head.

        Raises:
            NotApplicable: single-domain or regression task, or fewer than two domains in the data.
        """
        reason = _reason(ctx.task)
        if reason:
            raise NotApplicable(reason)
        cfg, splits = self.cfg, ctx.data.splits
        meta = splits.get(cfg.meta_split, splits["train"])
        factory: Callable[[], KDModel] | None = ctx.stash.get("pretrained_teacher")
        if factory is None:
            raise RuntimeError("meta-kd needs ctx.stash['pretrained_teacher'] (a zero-arg factory)")
        pre = factory()
        h, dom = self._encode(pre, meta, ctx)
        num_domains = len(ctx.task.domains)
        t_meta = prototype_scores(h, dom, num_domains)
        if splits["train"] is meta:
            t_train = t_meta
        else:  # score the student's split against the meta split's prototypes
            h_tr, d_tr = self._encode(pre, splits["train"], ctx)
            t_train = prototype_scores(h, dom, num_domains, h_tr, d_tr)
        resuming = bool(ctx.stash.get("resuming", False))
        if cfg.init == "pretrained" and not resuming:
            ctx.teacher.load_state_dict(pre.state_dict())
        del pre, h
        key = None if resuming or ctx.artifacts is None else self._key(ctx, meta)
        with _seeded(ctx.generator, ctx.device):
            self.head = DomainHead(ctx.teacher.hidden_size, num_domains).to(ctx.device)
            if resuming:
                metrics: dict[str, float] = {}
            elif key is None:
                metrics = self._train(ctx, meta, t_meta)
            else:
                metrics = self._train_shared(ctx, meta, t_meta, key)
        self.head.eval().requires_grad_(False)
        ctx.teacher.eval()
        if isinstance(ctx.loss, MetaKDLoss):
            ctx.loss.attach(t_train.float(), self.head)
        return {**metrics, **self._teacher_metrics(ctx),
                "meta/score_mean": float(t_meta.mean()), "meta/score_min": float(t_meta.min())}

    def _key(self, ctx: StepContext, meta: Any) -> str:
        """Content key of the meta-teacher: everything ``_train`` reads, not the target domain.

        One meta-teacher per seed then serves every domain's cell (same start weights, meta split,
        options and rule-generator state), bit-identical to training it in each cell.
        """
        from dataclasses import asdict

        from kdbench.checkpoints import tensor_digest

        return "meta-kd-" + tensor_digest({
            **{f"start.{k}": v for k, v in ctx.teacher.state_dict().items()},
            **{f"meta.{k}": v for k, v in meta.tensors.items()},
            "generator": ctx.generator.get_state()},
            prefix=repr((self.version, sorted(asdict(self.cfg).items()), ctx.device.type,
                         getattr(ctx.train, "precision", ""), _architecture(ctx.teacher))))[:24]

    def _train_shared(self, ctx: StepContext, meta: Any, scores: Tensor, key: str) -> dict[str, float]:
        """:meth:`_train` through ``ctx.artifacts``: trained by the first cell, loaded by the rest."""
        assert ctx.artifacts is not None and self.head is not None
        head = self.head

        def build() -> tuple[dict[str, Tensor], dict[str, Any]]:
            metrics = self._train(ctx, meta, scores)
            return {**{f"teacher.{k}": v for k, v in ctx.teacher.state_dict().items()},
                    **{f"head.{k}": v for k, v in head.state_dict().items()},
                    "generator": ctx.generator.get_state()}, metrics

        tensors, metrics, cached = ctx.artifacts.get_or_build(key, build)
        if cached:
            ctx.teacher.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("teacher.")})
            head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
            ctx.generator.set_state(tensors["generator"])
        return {**metrics, "meta/cached": float(cached)}

    @staticmethod
    def _teacher_metrics(ctx: StepContext) -> dict[str, float]:
        """The meta-teacher's own scores on the task's labelled eval splits (is it worth distilling?)."""
        out: dict[str, float] = {}
        for name in ctx.task.eval_splits:
            split = ctx.data.splits.get(name)
            if split is None or not split.labels_known():
                continue
            preds = []
            with torch.no_grad():
                for batch in split.batches(int(ctx.train.eval_batch_size)):
                    batch = batch.to(ctx.device)
                    with _autocast(ctx):
                        preds.append(ctx.teacher(batch.inputs).logits.argmax(-1).cpu())
            scores = ctx.task.compute_metrics(torch.cat(preds), split.tensors["labels"].cpu(), name)
            out.update({f"meta/teacher_{name}/{k}": float(v) for k, v in scores.items()})
        return out

    def _train(self, ctx: StepContext, meta: Any, scores: Tensor) -> dict[str, float]:
        """Meta-teacher epochs on the meta split (prototype-weighted CE + corrupted-domain CE)."""
        cfg, teacher, head = self.cfg, ctx.teacher, self.head
        assert head is not None
        named = list(teacher.named_parameters()) + [(f"head.{n}", p) for n, p in head.named_parameters()]
        nd = [p for n, p in named if n.endswith("bias") or "norm" in n.lower()]
        dec = [p for n, p in named if not (n.endswith("bias") or "norm" in n.lower())]
        opt = torch.optim.AdamW([{"params": dec, "weight_decay": cfg.weight_decay},
                                 {"params": nd, "weight_decay": 0.0}], lr=cfg.lr)
        from transformers import get_linear_schedule_with_warmup  # slow import: not at plugin load

        total = max(1, cfg.meta_epochs * -(-len(meta) // cfg.batch_size))
        sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup * total), total)
        flags = [p.requires_grad for _, p in named]
        teacher.train().requires_grad_(True)
        head.train()
        want, losses = frozenset({"hidden"}), []
        for _ in range(cfg.meta_epochs):
            order = torch.randperm(len(meta), generator=ctx.generator, device=ctx.generator.device).cpu()
            for batch in meta.batches(cfg.batch_size, order=order, start=0):
                batch = batch.to(ctx.device)
                dom = batch.domain
                if dom is None:
                    raise NotApplicable(f"meta-kd: split {cfg.meta_split!r} has no domain labels")
                with _autocast(ctx):
                    out = teacher(batch.inputs, want=want)
                    pooled = mean_pool(out.hidden[-1], batch.inputs.get("attention_mask"), cfg.pooling)
                    dlogits = head(pooled, dom.clamp_min(0))
                fake = corrupt_domains(dom, ctx.generator)  # -1 (unknown domain) -> no domain term
                ell = (F.cross_entropy(out.logits.float(), batch.labels, reduction="none")
                       + cfg.gamma * F.cross_entropy(dlogits.float(), fake, reduction="none",
                                                     ignore_index=-1))  # (B,)
                w = scores[batch.index] if cfg.sample_weights else torch.ones_like(ell)
                loss = (ell * w).mean()
                loss.backward()
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.detach())
                ctx.progress(len(losses), total, "meta-teacher")
        for (_, p), flag in zip(named, flags, strict=True):
            p.requires_grad_(flag)
        out = {"meta/steps": float(len(losses))}
        if losses:
            out["meta/loss"] = float(torch.stack(losses).mean())
        return out

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


@kdbench.hookimpl
def kdbench_register_teacher_updates(register: kdbench.Registrar) -> None:
    """The ``meta-kd`` rule."""
    register(MetaKD)


@kdbench.hookimpl
def kdbench_register_losses(register: kdbench.Registrar) -> None:
    """The ``meta-kd`` loss."""
    register(MetaKDLoss)


@kdbench.hookimpl
def kdbench_register_methods(register: kdbench.Registrar) -> None:
    """The ``meta-kd`` method."""
    for m in _methods():
        register(m)
