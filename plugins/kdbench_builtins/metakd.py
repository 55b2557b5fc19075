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
from torch import Tensor, nn

import kdbench
from kdbench import (
    Batch,
    ConfigError,
    DistillLoss,
    KDModel,
    Method,
    ModelOutput,
    NotApplicable,
    StepContext,
    Task,
    TeacherUpdate,
)
from kdbench_builtins.losses import TinyBertLoss, TinyBertLossConfig


def _choice(owner: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{owner} key {key!r} must be one of {allowed}, got {value!r}")


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


def expertise_weight(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """``w_i = 1 / (1 + exp((p_T(y_i|x_i) − 1)²))`` in [1/(1+e), 0.5]; (B, C), (B,) -> (B,)."""
    p = teacher_logits.detach().float().softmax(-1).gather(1, labels.view(-1, 1)).squeeze(1)
    return 1.0 / (1.0 + torch.exp((p - 1.0) ** 2))


class DomainHead(nn.Module):
    """Domain branch: ``u = W_c(E_dom[d] + pooled)``; ``logits = W_d·dropout(tanh(u))`` (§6.2)."""

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


def _autocast(ctx: StepContext) -> contextlib.AbstractContextManager[Any]:
    return ctx.autocast() if ctx.autocast is not None else contextlib.nullcontext()


def _architecture(model: KDModel) -> str:
    """What besides the weights shapes training: module tree (dropout rates) and HF config."""
    config = getattr(getattr(model, "model", None), "config", None)
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


@dataclass(frozen=True, slots=True)
class MetaKDLossConfig:
    """Options of the ``meta-kd`` student loss (defaults: EasyNLP's meta_student_distill.sh)."""

    temperature: float = 2.0  # stage-2 softmax temperature (no T² factor)
    stage1_epochs: int = -1  # epochs of stage 1 (intermediate layers); -1 = half the epochs
    instance_weights: str = "per_instance"  # "per_instance" | "batch_scalar" (EasyNLP: mean(λ)·MSE)
    hidden_weight: float = 1.0  # stage 1 hidden-state MSE weight
    attention_weight: float = 1.0  # stage 1 attention MSE weight
    domain_weight: float = 0.5  # stage 1 domain-vector MSE weight γ (needs the meta-kd rule)
    stage2_ce: bool = False  # add hard-label CE in stage 2 (not in the reference)
    # "restart": stage 2 warms up and decays its learning rate anew with fresh AdamW moments, as the
    # reference's second run does; "continuous": one schedule over both stages (kdbench < loss v2)
    stage_schedule: str = "restart"
    init_seed: int = 0  # seed of the projection and student domain branch


class MetaKDLoss(DistillLoss):
    """``meta-kd``: two-stage, domain-expertise-weighted distillation from the meta-teacher.

    Stage 1 reuses the ``tinybert`` layer pairs and its learned projection ``H_s → H_t``, but
    reduces each MSE per instance and weights it by ``λ_i = (1 + t_i)·w_i``. ``t_i`` is read from
    ``self.prototype_scores[batch.index]`` ((N_train,) float tensor, set by the ``meta-kd`` rule in
    ``prepare`` via :meth:`attach`); without it ``t_i = 0``. The domain term needs the rule's
    domain head and ``Batch.domain``; it is skipped otherwise.
    """

    name = "meta-kd"
    version = "2"  # v2: stage 2 restarts the schedule (stage_schedule="restart")
    Config = MetaKDLossConfig
    needs = frozenset({"hidden", "attentions"})

    def __init__(self, cfg: MetaKDLossConfig, *, task: Task, teacher: KDModel | None, student: KDModel) -> None:
        super().__init__(cfg, task=task, teacher=teacher, student=student)
        _choice("loss 'meta-kd'", "instance_weights", cfg.instance_weights, ("per_instance", "batch_scalar"))
        _choice("loss 'meta-kd'", "stage_schedule", cfg.stage_schedule, ("restart", "continuous"))
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

    def _stage1_epochs(self, num_epochs: int) -> int:
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
