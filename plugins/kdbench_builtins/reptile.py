"""ReptileDistil (Ma, Wang, Yu, Zhang, COLING 2022): a first-order, Reptile-style teacher update.

Checked against the reference code, maxinge8698/ReptileDistil@8f914d9
(``run_glue_with_reptile.py``). Per training batch: (a) copy the student into fast weights and
take ``inner_steps`` KD steps on the batch (a fresh AdamW each time, as the reference code does);
(b) set the teacher's pseudo-gradient ``g_T = θ_T − θ'_S`` on the parameters mapped from the
student, clip it and step the teacher's own persistent AdamW; (c) the runner then takes the real
student step against the updated teacher. No deepcopy: the copy lives in preallocated buffers that
are refreshed with ``torch._foreach_copy_`` and run through ``torch.func.functional_call``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

import kdbench
from kdbench import Batch, Method, ModelOutput, StepContext, TeacherUpdate
from kdbench_builtins.reptile_map import MAPPINGS, layer_map, parameter_pairs

__all__ = ["MAPPINGS", "Reptile", "ReptileConfig", "layer_map", "parameter_pairs"]


@dataclass(frozen=True, slots=True)
class ReptileConfig:
    """Options of the ``reptile`` teacher update (defaults: the reference README commands)."""

    teacher_lr: float = kdbench.option(5e-5, ge=0)  # learning rate of the teacher's own optimizer
    teacher_optimizer: Literal["adamw", "sgd"] = "adamw"  # "adamw" (reference) | "sgd" (plain interpolation, no momentum)
    teacher_weight_decay: float = kdbench.option(0.0, ge=0)  # teacher AdamW weight decay (bias/LayerNorm excluded)
    teacher_warmup: float = kdbench.option(0.0, ge=0, le=1)  # warmup fraction of the teacher's linear schedule
    max_grad_norm: float = kdbench.option(1.0, ge=0)  # clip of the teacher pseudo-gradient; 0 disables
    # student layer i -> teacher layer(s): "auto" ("picked" for pick-layers students, else "skip") |
    # "picked" (the layer it was copied from) | "first" | "last" | "skip" (the reference's) | "both"
    mapping: Literal["auto", "picked", "first", "last", "skip", "both"] = "auto"
    inner_steps: int = kdbench.option(1, ge=1)  # inner updates of the student copy per batch
    inner_optimizer: Literal["fresh_adamw", "sgd"] = "fresh_adamw"  # "fresh_adamw" (lr = train.lr, zero moments) | "sgd"
    inner_lr: float = kdbench.option(5e-5, ge=0)  # step size of the "sgd" inner optimizer
    inner_max_grad_norm: float = kdbench.option(1.0, ge=0)  # clip of the inner gradient; 0 disables
    adam_eps: float = kdbench.option(1e-8, gt=0)  # epsilon of both AdamWs
    inner_dropout: bool = True  # run the copy in train mode (dropout on), as the reference's copy


def _no_decay(name: str) -> bool:
    """Biases and normalisation weights get no weight decay (BERT convention)."""
    return name.endswith("bias") or "norm" in name.lower()


def _depth(model: nn.Module) -> int:
    return int(getattr(model, "num_layers", 0) or 0)


def _autocast(ctx: StepContext) -> contextlib.AbstractContextManager[Any]:
    return ctx.autocast() if ctx.autocast is not None else contextlib.nullcontext()


def _slice(batch: Batch, lo: int, hi: int) -> Batch:
    """Examples ``lo:hi`` of ``batch``."""
    if lo == 0 and hi == len(batch):
        return batch
    dom = batch.domain[lo:hi] if batch.domain is not None else None
    return Batch({k: v[lo:hi] for k, v in batch.inputs.items()}, batch.labels[lo:hi],
                 batch.index[lo:hi], dom)


def _clip_(grads: list[Tensor], max_norm: float) -> Tensor:
    """Scale ``grads`` in place to total norm <= ``max_norm`` (0 = no clip); returns the norm."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_norm > 0:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


class Reptile(TeacherUpdate):
    """``reptile``: inner KD update of a student copy, then the teacher steps toward the copy."""

    name = "reptile"
    version = "1"
    Config = ReptileConfig
    changes_teacher = True
    needs_quiz = False

    def cost_model(self, *, live_teacher: bool = True) -> kdbench.StepCost:
        """One teacher forward (F_T), ``inner_steps`` fwd+bwd of the student copy (3F_S each),
        then the real step (F_T+3F_S); the elementwise teacher update is not counted."""
        return kdbench.StepCost(2.0, 3.0 * (self.cfg.inner_steps + 1))

    def __init__(self, cfg: ReptileConfig) -> None:
        super().__init__(cfg)
        self.pairs: list[tuple[str, str]] = []
        self.opt: torch.optim.Optimizer | None = None
        self.sched: torch.optim.lr_scheduler.LRScheduler | None = None
        self._pending: dict[str, Any] | None = None

    @classmethod
    def check_student(cls, cfg: ReptileConfig, kind: str, student_cfg: Any) -> str | None:
        """Plan time: mapping "picked" needs a student that records its picked layers."""
        if cfg.mapping == "picked" and kind != "pick-layers":
            return (f'teacher_update \'reptile\' mapping = "picked" needs a pick-layers student '
                    f'(this one is {kind!r}); set mapping = "skip" (the reference\'s) or "first"')
        return None

    def prepare(self, ctx: StepContext) -> dict[str, float]:
        """Map student to teacher parameters, allocate fast weights, build the teacher optimizer.

        Raises:
            NotApplicable: the pair's parameters cannot be matched (names or shapes).
        """
        cfg = self.cfg
        self.pairs = parameter_pairs(ctx.student, ctx.teacher, cfg.mapping)
        s_params = dict(ctx.student.named_parameters())
        self._s_names = [n for n in s_params if s_params[n].requires_grad]
        self._s_list: list[Tensor] = [s_params[n] for n in self._s_names]
        with torch.no_grad():  # fast weights: leaf tensors refreshed in place every step
            self._fast = [p.detach().clone().requires_grad_(True) for p in self._s_list]
            self._bufs = {n: b.detach().clone() for n, b in ctx.student.named_buffers()}
            zeros = cfg.inner_optimizer == "fresh_adamw"
            self._moments = ([torch.zeros_like(p) for p in self._s_list] if zeros else [],
                             [torch.zeros_like(p) for p in self._s_list] if zeros else [])
        self._s_bufs = dict(ctx.student.named_buffers())
        fast_of = dict(zip(self._s_names, self._fast, strict=True))
        t_params = dict(ctx.teacher.named_parameters())
        self._t_names = list(dict.fromkeys(t for _, t in self.pairs))
        self._t_list = [t_params[t] for t in self._t_names]
        # one (teacher index, fast weight) per pair; fixed student params are not pulled
        self._pair_idx = [(self._t_names.index(t), fast_of[s]) for s, t in self.pairs if s in fast_of]
        self._decay = [not _no_decay(n) for n in self._s_names]
        decay = [p for n, p in t_params.items() if not _no_decay(n)]
        rest = [p for n, p in t_params.items() if _no_decay(n)]
        groups = [{"params": decay, "weight_decay": cfg.teacher_weight_decay},
                  {"params": rest, "weight_decay": 0.0}]
        if cfg.teacher_optimizer == "adamw":
            fused = ctx.device.type in ("cpu", "cuda")  # CPU's default for-loop AdamW is ~5x slower
            self.opt = torch.optim.AdamW(groups, lr=cfg.teacher_lr, eps=cfg.adam_eps, fused=fused)
        else:
            self.opt = torch.optim.SGD(groups, lr=cfg.teacher_lr, momentum=0.0)
        from transformers import get_linear_schedule_with_warmup  # slow import: not at plugin load

        total = max(int(ctx.total_steps), 1)
        self.sched = get_linear_schedule_with_warmup(self.opt, int(cfg.teacher_warmup * total), total)
        if self._pending is not None:
            self.load_state_dict(self._pending)
        n_mapped = len(self._t_names)
        picked = getattr(ctx.student, "picked_layers", None)
        return {"teacher/mapped_tensors": float(n_mapped),
                "teacher/layer_map_picked": float(cfg.mapping == "picked" or (cfg.mapping == "auto" and picked is not None)),
                "teacher/unmapped_tensors": float(len(t_params) - n_mapped),
                **{f"teacher/layer_map/s{i}/{k}": float(j) for i, js in
                   layer_map(cfg.mapping, _depth(ctx.student), _depth(ctx.teacher), picked).items()
                   for k, j in enumerate(js)}}

    def _inner_grads(self, ctx: StepContext, parts: list[tuple[Batch, ModelOutput, float]]) -> list[Tensor]:
        """Gradient of the cell's summed loss terms w.r.t. the fast weights (student order),
        accumulated over micro-batches ``(batch, teacher output, weight)``."""
        params = dict(zip(self._s_names, self._fast, strict=True))
        total: list[Tensor] | None = None
        for part, t_out, weight in parts:
            for n, b in self._bufs.items():
                b.copy_(self._s_bufs[n])  # in-place buffer updates (BatchNorm) must not leak
            with _autocast(ctx):
                out = torch.func.functional_call(ctx.student, {**params, **self._bufs},
                                                 (part.inputs,), {"want": ctx.want})
                terms = ctx.loss(out, t_out, part)
            loss = torch.stack([v.float() for v in terms.values()]).sum() * weight
            grads = torch.autograd.grad(loss, self._fast, allow_unused=True)
            g = [torch.zeros_like(f) if x is None else x for f, x in zip(self._fast, grads, strict=True)]
            if total is None:
                total = g
            else:
                torch._foreach_add_(total, g)
        assert total is not None
        return total

    @torch.no_grad()
    def _adamw_(self, grads: list[Tensor], m: list[Tensor], v: list[Tensor], t: int,
                lr: float, wd: float) -> None:
        """AdamW step ``t`` (1-based) on the fast weights, same arithmetic as torch.optim.AdamW."""
        b1, b2 = 0.9, 0.999
        if wd:
            decayed = [f for f, d in zip(self._fast, self._decay, strict=True) if d]
            if decayed:
                torch._foreach_mul_(decayed, 1 - lr * wd)
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1 - b2**t))
        torch._foreach_add_(denom, self.cfg.adam_eps)
        torch._foreach_addcdiv_(self._fast, m, denom, value=-lr / (1 - b1**t))

    def step(self, ctx: StepContext) -> dict[str, Any]:
        """Inner update of the fast copy, teacher pseudo-gradient step; the student is untouched.

        Returns:
            ``{"teacher/pseudo_grad_norm": 0-d tensor}`` (pre-clip norm; a tensor to avoid a host
            sync, read it with ``float()`` when logging).
        """
        cfg = self.cfg
        if self.opt is None or self.sched is None or ctx.batch is None:
            raise RuntimeError("reptile.step() called before prepare() or without a batch")
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(self._fast, self._s_list)
        batch, n = ctx.batch, len(ctx.batch)
        micro = int(getattr(ctx.train, "micro_batch_size", 0)) or n
        parts = []
        for lo in range(0, n, micro):  # same micro-batching as the real student step
            part = _slice(batch, lo, min(lo + micro, n))
            with _autocast(ctx):
                parts.append((part, ctx.teacher_forward(part.inputs, grad=False), len(part) / n))
        was_training = ctx.student.training
        ctx.student.train(cfg.inner_dropout)
        adam = cfg.inner_optimizer == "fresh_adamw"
        if adam:  # fresh AdamW every outer step: zero moments, step counter from 1
            m, v = self._moments
            torch._foreach_zero_(m)
            torch._foreach_zero_(v)
            lr, wd = float(ctx.train.lr), float(getattr(ctx.train, "weight_decay", 0.0))
        for t in range(1, cfg.inner_steps + 1):
            grads = self._inner_grads(ctx, parts)
            _clip_(grads, cfg.inner_max_grad_norm)
            if adam:
                self._adamw_(grads, m, v, t, lr, wd)
            else:
                with torch.no_grad():
                    torch._foreach_add_(self._fast, grads, alpha=-cfg.inner_lr)
        ctx.student.train(was_training)
        with torch.no_grad():
            for ti, fast in self._pair_idx:  # g_T = Σ over mapped copies of (θ_T − θ'_S)
                p = self._t_list[ti]
                diff = p.detach() - fast.detach()
                p.grad = diff if p.grad is None else p.grad.add_(diff)
            grads_t = [p.grad for p in self._t_list if p.grad is not None]
            norm = _clip_(grads_t, cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return {"teacher/pseudo_grad_norm": norm.detach()}

    def state_dict(self) -> dict[str, Any]:
        """Teacher optimizer and schedule."""
        if self.opt is None or self.sched is None:
            return dict(self._pending or {})
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; before prepare() the state is kept and applied there."""
        if self.opt is None or self.sched is None:
            self._pending = dict(state)
            return
        if state:
            self.opt.load_state_dict(state["opt"])
            self.sched.load_state_dict(state["sched"])
        self._pending = None


def _iter_methods() -> Iterator[Method]:
    yield Method(
        name="reptile-distil", teacher_update="reptile", loss="kd",
        defaults={"loss": {"alpha": 0.5, "temperature": 5.0},
                  "teacher_update": {"mapping": "auto", "teacher_lr": 5e-5}},
        paper="Ma, Wang, Yu, Zhang. Knowledge Distillation with Reptile Meta-Learning for "
              "Pretrained Language Model Compression. COLING 2022",
        description="Teacher moves toward a one-step KD-updated student copy (first-order).",
    )


@kdbench.hookimpl
def kdbench_register_teacher_updates(register: kdbench.Registrar) -> None:
    """The ``reptile`` rule."""
    register(Reptile)


@kdbench.hookimpl
def kdbench_register_methods(register: kdbench.Registrar) -> None:
    """The ``reptile-distil`` method."""
    for m in _iter_methods():
        register(m)
