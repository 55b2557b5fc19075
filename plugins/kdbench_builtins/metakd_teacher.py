"""Meta-KD's meta-teacher (Pan et al., ACL 2021; alibaba/EasyNLP@a4ee956, ``MetaTeacherTrainer``).

The machinery behind the ``meta-kd`` rule's ``prepare`` (:mod:`kdbench_builtins.metakd`): prototype
scores, corrupted domain labels, the meta-teacher's training epochs, and sharing one trained
meta-teacher across cells through ``StepContext.artifacts``. ``cfg`` arguments are the rule's
:class:`~kdbench_builtins.metakd.MetaKDConfig`.

Shapes: ``N`` examples of a split, ``H`` hidden size, ``D`` domains, ``B`` batch size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench import KDModel, NotApplicable, StepContext, TensorSplit, tensor_digest
from kdbench_builtins.metakd_loss import DomainHead, mean_pool


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


def autocast(ctx: StepContext) -> contextlib.AbstractContextManager[Any]:
    """The loop's autocast context (bf16 on CUDA), or none."""
    return ctx.autocast() if ctx.autocast is not None else contextlib.nullcontext()


def _architecture(model: KDModel) -> str:
    """What besides the weights shapes training: module tree (dropout rates) and HF config."""
    config: Any = getattr(getattr(model, "model", None), "config", None)
    if not hasattr(config, "to_json_string"):
        return repr(model)
    return repr(model) + config.to_json_string(use_diff=False) + str(getattr(config, "_attn_implementation", ""))


@contextlib.contextmanager
def seeded(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Fork the global RNG (dropout, inits) and seed it from ``generator``."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def encode(model: KDModel, split: TensorSplit, ctx: StepContext, pooling: str) -> tuple[Tensor, Tensor]:
    """Pooled (N, H) representations and (N,) domains of a split, no grad, by Batch.index."""
    n, h_all, d_all = len(split), None, None
    model.eval()
    with torch.no_grad():
        for batch in split.batches(int(ctx.train.eval_batch_size), order=torch.arange(n), start=0):
            batch = batch.to(ctx.device)
            if batch.domain is None:
                raise NotApplicable("meta-kd needs Batch.domain on every split it scores")
            with autocast(ctx):
                out = model(batch.inputs, want=frozenset({"hidden"}))
            pooled = mean_pool(out.hidden[-1], batch.inputs.get("attention_mask"), pooling)
            if h_all is None:
                h_all = pooled.new_zeros(n, pooled.shape[1])
                d_all = torch.zeros(n, dtype=torch.long, device=pooled.device)
            h_all[batch.index] = pooled
            d_all[batch.index] = batch.domain  # type: ignore[index]
    if h_all is None or d_all is None:
        raise NotApplicable("meta-kd: a split it scores is empty")
    return h_all, d_all


def meta_teacher_key(ctx: StepContext, meta: TensorSplit, cfg: Any, version: str) -> str:
    """Content key of the meta-teacher: everything :func:`train` reads, not the target domain.

    One meta-teacher per seed then serves every domain's cell (same start weights, meta split,
    options and rule-generator state), bit-identical to training it in each cell.
    """
    return "meta-kd-" + tensor_digest({
        **{f"start.{k}": v for k, v in ctx.teacher.state_dict().items()},
        **{f"meta.{k}": v for k, v in meta.tensors.items()},
        "generator": ctx.generator.get_state()},
        prefix=repr((version, sorted(asdict(cfg).items()), ctx.device.type,
                     getattr(ctx.train, "precision", ""), _architecture(ctx.teacher))))[:24]


def train_shared(ctx: StepContext, head: DomainHead, meta: TensorSplit, scores: Tensor, cfg: Any,
                 key: str) -> dict[str, float]:
    """:func:`train` through ``ctx.artifacts``: trained by the first cell, loaded by the rest."""
    assert ctx.artifacts is not None

    def build() -> tuple[dict[str, Tensor], dict[str, Any]]:
        metrics = train(ctx, head, meta, scores, cfg)
        return {**{f"teacher.{k}": v for k, v in ctx.teacher.state_dict().items()},
                **{f"head.{k}": v for k, v in head.state_dict().items()},
                "generator": ctx.generator.get_state()}, metrics

    tensors, metrics, cached = ctx.artifacts.get_or_build(key, build)
    if cached:
        ctx.teacher.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("teacher.")})
        head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        ctx.generator.set_state(tensors["generator"])
    return {**metrics, "meta/cached": float(cached)}


def teacher_metrics(ctx: StepContext) -> dict[str, float]:
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
                with autocast(ctx):
                    preds.append(ctx.teacher(batch.inputs).logits.argmax(-1).cpu())
        scores = ctx.task.compute_metrics(torch.cat(preds), split.tensors["labels"].cpu(), name)
        out.update({f"meta/teacher_{name}/{k}": float(v) for k, v in scores.items()})
    return out


def _optimizer(named: list[tuple[str, torch.nn.Parameter]], cfg: Any) -> torch.optim.AdamW:
    """AdamW with weight decay on everything but biases and norms."""
    nd = [p for n, p in named if n.endswith("bias") or "norm" in n.lower()]
    dec = [p for n, p in named if not (n.endswith("bias") or "norm" in n.lower())]
    return torch.optim.AdamW([{"params": dec, "weight_decay": cfg.weight_decay},
                              {"params": nd, "weight_decay": 0.0}], lr=cfg.lr)


def train(ctx: StepContext, head: DomainHead, meta: TensorSplit, scores: Tensor, cfg: Any) -> dict[str, float]:
    """Meta-teacher epochs on the meta split (prototype-weighted CE + corrupted-domain CE), into
    ``ctx.teacher`` and ``head``; ``scores`` (N_meta,) are the meta split's prototype scores."""
    teacher = ctx.teacher
    named = list(teacher.named_parameters()) + [(f"head.{n}", p) for n, p in head.named_parameters()]
    opt = _optimizer(named, cfg)
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
            with autocast(ctx):
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
    return {"meta/steps": float(len(losses)), **({"meta/loss": float(torch.stack(losses).mean())} if losses else {})}
