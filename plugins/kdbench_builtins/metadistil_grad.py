"""MetaDistil's meta-gradient ``d L_quiz(θ'_S(θ_T)) / d θ_T``: the functional pilot step (plain SGD,
or Adam-preconditioned with the student optimizer's moments), the quiz loss, and the two
implementations (``second_order``, ``first_order_exact`` with a JVP). The rule, its options and the
references are in :mod:`kdbench_builtins.metadistil`; nothing here writes to the student.

Adam pilot, ``first_order_exact``: ``θ'_S = θ_S − η·u(g)`` with ``u`` elementwise in ``g``, so
``dθ'/dg = −η·D``, ``D = diag(∂u/∂g)``, and ``∇_{θ_T} L_q = −∇_{θ_T} ⟨g(θ_T), η·D·v⟩``: the SGD
derivation with ``λ·v`` replaced by ``η⊙D⊙v``. With ``c1 = (1−β1)/(1−β1^t)``,
``c2 = (1−β2)/(1−β2^t)``, ``s = √v̂ + eps``: ``∂u/∂g = c1/s − m̂·c2·g / (s²·√v̂)`` (the second term
is 0 where ``v̂ = 0``, its limit; L2-style Adam evaluates it at ``g + λ_wd·θ``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from kdbench import Batch, KDModel, ModelOutput, StepContext
from kdbench_builtins.losses import hard_loss

Grads = tuple[list[Tensor], dict[str, float]]


@dataclass(frozen=True, slots=True)
class AdamSlot:
    """One student parameter's Adam/AdamW state and hyperparameters, as its next real step uses them."""

    lr: float  # η: the group's current lr
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool  # AdamW: θ·(1 − η·λ_wd); Adam: λ_wd·θ added to the gradient
    step: float  # real steps taken so far (0 before the first)
    exp_avg: Tensor | None  # m; None before the first step (m = v = 0)
    exp_avg_sq: Tensor | None  # v

    def _moments(self, theta: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor, float, float]:
        """``(g_eff, m̂', v̂', c1, c2)`` after one more step with gradient ``g`` (autograd ops)."""
        t = self.step + 1
        bc1, bc2 = 1 - self.beta1 ** t, 1 - self.beta2 ** t
        ge = g if self.decoupled or not self.weight_decay else g + self.weight_decay * theta.detach()
        m = (1 - self.beta1) * ge if self.exp_avg is None else self.beta1 * self.exp_avg + (1 - self.beta1) * ge
        v = (1 - self.beta2) * ge * ge if self.exp_avg_sq is None else (
            self.beta2 * self.exp_avg_sq + (1 - self.beta2) * ge * ge)
        return ge, m / bc1, v / bc2, (1 - self.beta1) / bc1, (1 - self.beta2) / bc2

    def direction(self, theta: Tensor, g: Tensor) -> Tensor:
        """``u`` with ``θ' = θ − η·u``: ``m̂'/(√v̂' + eps)`` (+ ``λ_wd·θ`` for AdamW); differentiable
        in ``g`` (a safe square root: zero where ``v̂' = 0``, which is ``g = m = v = 0``)."""
        return self.parts(theta, g, derivative=False)[0]

    def parts(self, theta: Tensor, g: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
        """``u`` (:meth:`direction`) and, if ``derivative``, ``∂u/∂g`` elementwise at ``g`` (no
        autograd): ``c1/s − m̂'·c2·g/(s²·√v̂')``, with ``s = √v̂' + eps``; the moments and ``s`` are
        computed once for both."""
        ge, mh, vh, c1, c2 = self._moments(theta, g)
        pos = vh > 0
        root = vh.where(pos, 1.0).sqrt()
        s = torch.where(pos, root, 0.0) + self.eps
        u = mh / s
        if self.decoupled and self.weight_decay:
            u = u + self.weight_decay * theta.detach()
        if not derivative:
            return u, None
        return u, c1 / s - torch.where(pos, mh * c2 * ge / (s * s * root), 0.0)


def adam_problem(opt: torch.optim.Optimizer, student: KDModel) -> str | None:
    """Why ``opt`` cannot be mirrored by the Adam pilot, or None."""
    if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        return f"the student optimizer is {type(opt).__name__}, not Adam/AdamW"
    if any(g.get("amsgrad") or g.get("maximize") for g in opt.param_groups):
        return "the student optimizer uses amsgrad or maximize, which the pilot does not model"
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    missing = [n for n, p in student.named_parameters() if p.requires_grad and id(p) not in held]
    return f"the student optimizer does not hold {missing[:3]}" if missing else None


def adam_slots(opt: torch.optim.Optimizer, student: KDModel) -> dict[str, AdamSlot]:
    """Every trainable student parameter's :class:`AdamSlot` (``opt`` passed :func:`adam_problem`)."""
    group_of = {id(p): group for group in opt.param_groups for p in group["params"]}
    out = {}
    for n, p in student.named_parameters():
        if not p.requires_grad:
            continue
        group, state = group_of[id(p)], opt.state.get(p, {})
        beta1, beta2 = group["betas"]
        decoupled = group.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW))
        out[n] = AdamSlot(float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                          float(group["weight_decay"]), bool(decoupled), float(state.get("step", 0)),
                          state.get("exp_avg"), state.get("exp_avg_sq"))
    return out


@dataclass(frozen=True, slots=True)
class MetaSpec:
    """One teacher update's settings, resolved by the rule."""

    meta_grad: str  # "second_order" | "first_order_exact"
    jvp: str  # "forward" | "finite_difference"
    fd_eps: float
    quiz_rows: int  # examples in the update's quiz batches (the quiz loss is their mean)
    lam: float  # λ of the SGD pilot at this step
    adam: dict[str, AdamSlot] | None  # the Adam pilot's state per parameter name; None: SGD pilot
    seed: int  # dropout seed of the pilot-batch student forwards

    @property
    def fd(self) -> bool:
        return self.meta_grad == "first_order_exact" and self.jvp == "finite_difference"

    def fast(self, name: str, theta: Tensor, g: Tensor) -> Tensor:
        """The pilot step of one parameter: ``θ − λ·g`` or ``θ − η·u(g)``."""
        if self.adam is None:
            return theta - self.lam * g
        slot = self.adam[name]
        return theta - slot.lr * slot.direction(theta, g)

    def fast_and_jacobian(self, name: str, theta: Tensor, g: Tensor) -> tuple[Tensor, Tensor | None]:
        """:meth:`fast` and, for the Adam pilot, the step's diagonal Jacobian in ``g`` up to sign,
        ``η·∂u/∂g`` (None for SGD, whose Jacobian is ``λ·I``)."""
        if self.adam is None:
            return theta - self.lam * g, None
        slot = self.adam[name]
        u, du = slot.parts(theta, g, derivative=True)
        assert du is not None
        return theta - slot.lr * u, slot.lr * du


def _up(x: Tensor) -> Tensor:
    """Half-precision tensors to float32; float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _flatten(out: ModelOutput) -> tuple[Tensor, ...]:
    """Every tensor of a ModelOutput, in a fixed order (logits, hidden, attentions, cls)."""
    return (out.logits, *out.hidden, *out.attentions, *(() if out.cls is None else (out.cls,)))


def _unflatten(ts: tuple[Tensor, ...] | list[Tensor], like: ModelOutput) -> ModelOutput:
    """Inverse of :func:`_flatten` for the structure of ``like``."""
    nh, na = len(like.hidden), len(like.attentions)
    return ModelOutput(logits=ts[0], hidden=tuple(ts[1:1 + nh]), attentions=tuple(ts[1 + nh:1 + nh + na]),
                       cls=ts[1 + nh + na] if like.cls is not None else None)


@contextlib.contextmanager
def _fixed_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run with the global RNG of ``device`` (and the CPU) seeded; restore both afterwards."""
    cuda = device.type == "cuda"
    idx = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else 0
    with torch.random.fork_rng(devices=[idx] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[idx].manual_seed(seed)
        yield


def _call(model: KDModel, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
          inputs: Mapping[str, Tensor], want: frozenset[str], train: bool) -> ModelOutput:
    """``model`` evaluated with substituted parameters and buffers, in train or eval mode."""
    model.train(train)
    return functional_call(model, (dict(params), dict(buffers)), (inputs,), {"want": want})


def _autocast(ctx: StepContext) -> contextlib.AbstractContextManager[Any]:
    return ctx.autocast() if ctx.autocast is not None else contextlib.nullcontext()


def meta_gradient(ctx: StepContext, spec: MetaSpec, batch: Batch, quiz: list[Batch]) -> Grads:
    """``d L_quiz / d θ_T`` (one tensor per teacher parameter) and metrics; the student's train/eval
    mode is restored, nothing is updated."""
    was_training = ctx.student.training
    try:
        if spec.meta_grad == "second_order":
            return second_order(ctx, spec, batch, quiz)
        return first_order(ctx, spec, batch, quiz)
    finally:
        ctx.student.train(was_training)


def pilot_forward(ctx: StepContext, spec: MetaSpec, batch: Batch, params: Mapping[str, Tensor],
                  buffers: Mapping[str, Tensor]) -> ModelOutput:
    """Student forward on the pilot batch: train mode, fixed dropout masks; math SDPA unless
    finite differences (any kernel; fp32, as differences in bf16 are noise)."""
    kernel = contextlib.nullcontext() if spec.fd else sdpa_kernel(SDPBackend.MATH)
    with _fixed_rng(spec.seed, ctx.device), kernel, contextlib.nullcontext() if spec.fd else _autocast(ctx):
        return _call(ctx.student, params, buffers, batch.inputs, ctx.want, train=True)


def quiz_loss(ctx: StepContext, spec: MetaSpec, fast: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
              q: Batch) -> Tensor:
    """One quiz batch's share of ``L_q``: the student in eval mode with the pilot weights."""
    with _autocast(ctx):
        out = _call(ctx.student, fast, buffers, q.inputs, frozenset(), train=False)
    return hard_loss(out.logits, q.labels, ctx.task.is_regression) * (len(q) / spec.quiz_rows)


def teacher_forward(ctx: StepContext, batch: Batch) -> ModelOutput:
    """Teacher forward on the pilot batch: eval mode, with grad."""
    with _autocast(ctx):
        return ctx.teacher_forward(batch.inputs, grad=True)


def second_order(ctx: StepContext, spec: MetaSpec, batch: Batch, quiz: list[Batch]) -> Grads:
    """The reference: autograd through the pilot step (``create_graph=True``)."""
    params = dict(ctx.student.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    buffers = {n: b.clone() for n, b in ctx.student.named_buffers()}
    s_out = pilot_forward(ctx, spec, batch, params, buffers)
    t_out = teacher_forward(ctx, batch)
    pilot: Tensor = sum(ctx.loss(s_out, t_out, batch).values())  # type: ignore[assignment]
    grads = torch.autograd.grad(pilot, [params[n] for n in names], create_graph=True, allow_unused=True)
    fast = dict(params) | {n: spec.fast(n, params[n], g) for n, g in zip(names, grads) if g is not None}
    t_params = list(ctx.teacher.parameters())
    total = [torch.zeros_like(p) for p in t_params]
    q_sum = 0.0
    for i, q in enumerate(quiz):
        ql = quiz_loss(ctx, spec, fast, buffers, q)
        gq = torch.autograd.grad(ql, t_params, retain_graph=i < len(quiz) - 1, allow_unused=True)
        total = [a if g is None else a + g for a, g in zip(total, gq)]
        q_sum += float(ql.detach())
    return total, {"teacher/quiz_loss": q_sum, "teacher/pilot_loss": float(pilot.detach())}


def first_order(ctx: StepContext, spec: MetaSpec, batch: Batch, quiz: list[Batch]) -> Grads:
    """``first_order_exact``: (1) pilot gradient, (2) ``v = ∇_{θ'} L_q``, (3) ``u = J_s·w`` with
    ``w = v`` (SGD) or ``η⊙D⊙v`` (Adam), (4) ``g_T = −c·∇_{θ_T} ⟨∂L_S/∂s (s, t(θ_T)), u⟩``, ``c = λ``
    (SGD) or 1 (Adam): a loss-level double backward and one ordinary backward through the teacher."""
    params = {n: p.detach() for n, p in ctx.student.named_parameters()}
    names = [n for n, p in ctx.student.named_parameters() if p.requires_grad]
    buffers0 = {n: b.clone() for n, b in ctx.student.named_buffers()}
    buffers = {n: b.clone() for n, b in buffers0.items()}
    # (1) pilot gradient: an ordinary backward, teacher outputs constant
    leaves = {n: params[n].detach().requires_grad_() for n in names}
    s_out = pilot_forward(ctx, spec, batch, params | leaves, buffers)
    t_out = teacher_forward(ctx, batch)
    t_const = _unflatten([t.detach() for t in _flatten(t_out)], t_out)
    pilot: Tensor = sum(ctx.loss(s_out, t_const, batch).values())  # type: ignore[assignment]
    g = torch.autograd.grad(pilot, [leaves[n] for n in names], allow_unused=True)
    fast: dict[str, Tensor] = {}
    jac: dict[str, Tensor | None] = {}  # Adam pilot: η·D, the step's Jacobian in g (diagonal)
    for n, gi in zip(names, g):
        f, jac[n] = spec.fast_and_jacobian(n, params[n], gi) if gi is not None else (params[n].detach(), None)
        fast[n] = f.requires_grad_()
    # (2) v = ∇_{θ'} L_quiz
    v, q_sum = _quiz_gradient(ctx, spec, params, fast, buffers, quiz)
    if spec.adam is not None:  # w = η·D·v
        v = {n: v[n] * d if (d := jac[n]) is not None else torch.zeros_like(v[n]) for n in names}
    # (3) u = J_s(θ_S)·w on the pilot batch, same dropout masks
    u = jvp(ctx, spec, batch, params, names, buffers0, v)
    # (4) the teacher gradient
    out = _teacher_gradient(ctx, batch, s_out, t_out, u, -spec.lam if spec.adam is None else -1.0)
    if out is None:  # the loss's student gradient does not depend on the teacher
        return [torch.zeros_like(p) for p in ctx.teacher.parameters()], {"teacher/quiz_loss": q_sum}
    return out, {"teacher/quiz_loss": q_sum, "teacher/pilot_loss": float(pilot.detach())}


def _quiz_gradient(ctx: StepContext, spec: MetaSpec, params: dict[str, Tensor], fast: dict[str, Tensor],
                   buffers: dict[str, Tensor], quiz: list[Batch]) -> tuple[dict[str, Tensor], float]:
    """``v = ∇_{θ'} L_q`` per trainable parameter (zeros where unused) and ``L_q``."""
    names = list(fast)
    v: dict[str, Tensor] = {}  # summed in place over quiz batches (no zero-filled copy)
    q_sum = 0.0
    for q in quiz:
        ql = quiz_loss(ctx, spec, params | fast, buffers, q)
        gq = torch.autograd.grad(ql, [fast[n] for n in names], allow_unused=True)
        for n, gi in zip(names, gq):
            if gi is not None:
                v[n] = v[n].add_(gi) if n in v else gi
        q_sum += float(ql.detach())
    return {n: v[n] if n in v else torch.zeros_like(params[n]) for n in names}, q_sum


def _teacher_gradient(ctx: StepContext, batch: Batch, s_out: ModelOutput, t_out: ModelOutput,
                      u: tuple[Tensor, ...], scale: float) -> list[Tensor] | None:
    """``scale·∇_{θ_T} ⟨∂L_S/∂s (s, t(θ_T)), u⟩`` with ``s`` fixed: a loss-level double backward and
    one ordinary backward through the teacher (None if ∂L_S/∂s does not depend on the teacher)."""
    s_leaf = [_up(s.detach()).requires_grad_() for s in _flatten(s_out)]  # loss-level in fp32+
    loss = sum(ctx.loss(_unflatten(s_leaf, s_out), t_out, batch).values())
    gs = torch.autograd.grad(loss, s_leaf, create_graph=True, allow_unused=True)
    t_params = list(ctx.teacher.parameters())
    dots = [(a * b.to(a.dtype)).sum() for a, b in zip(gs, u) if a is not None and a.requires_grad]
    if not dots:
        return None
    phi = torch.stack([d.float() if d.dtype != torch.float64 else d for d in dots]).sum()
    gt = torch.autograd.grad(phi, t_params, allow_unused=True)
    return [torch.zeros_like(p) if x is None else scale * x for p, x in zip(t_params, gt)]


def jvp(ctx: StepContext, spec: MetaSpec, batch: Batch, params: dict[str, Tensor], names: list[str],
        buffers0: dict[str, Tensor], v: dict[str, Tensor]) -> tuple[Tensor, ...]:
    """Directional derivative ``J_s·v`` of the pilot-batch student outputs, same masks:
    ``torch.func.jvp`` or central differences at ``θ ± εv``, ``ε = fd_eps·‖θ‖/‖v‖``."""

    def outputs(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
        bufs = {n: b.clone() for n, b in buffers0.items()}
        return _flatten(pilot_forward(ctx, spec, batch, params | p, bufs))

    theta = {n: params[n] for n in names}
    if spec.jvp == "forward":
        return tuple(torch.func.jvp(outputs, (theta,), (v,))[1])
    norm_v = torch.stack([_up(x).norm() for x in v.values()]).norm()
    norm_t = torch.stack([_up(x).norm() for x in theta.values()]).norm()
    eps = float(spec.fd_eps * norm_t / norm_v) if float(norm_v) > 0 else 1.0
    with torch.no_grad():
        plus = outputs({n: _up(theta[n]) + eps * _up(v[n]) for n in names})
        minus = outputs({n: _up(theta[n]) - eps * _up(v[n]) for n in names})
    return tuple((_up(a) - _up(b)) / (2 * eps) for a, b in zip(plus, minus))
