"""MetaDistil: meta-gradient correctness (finite differences, both implementations, SGD and Adam
pilots), student untouched, gating, state round trip, the SDPA double-backward pitfall, run ids.
Rules are driven by a hand-built StepContext (no runner)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from kdbench import (
    Batch,
    ConfigError,
    KDModel,
    ModelOutput,
    NoConfig,
    NotApplicable,
    QuizStream,
    StepContext,
    Task,
)
from kdbench.engine.training import Bf16GemmInFp32
from kdbench_builtins import metadistil
from kdbench_builtins.losses import CrossEntropy, HintonKD, KDConfig, PatientKD, PKDConfig
from kdbench_builtins.metadistil import MetaDistil, MetaDistilConfig
from kdbench_builtins.models_text import TinyBert, TinyBertConfig
from kdbench_builtins.models_vision import VISION_KINDS

torch.set_num_threads(1)


class Text3(Task):
    name = "toy/text3"
    num_labels = 3


class TextReg(Task):
    name = "toy/textreg"
    num_labels = 1


class Vision3(Task):
    name = "toy/vision3"
    modality = "vision"
    num_labels = 3


class FixedQuiz(QuizStream):
    """Cycles through fixed batches."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches, self.i = batches, 0

    def next(self) -> Batch:
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b


class TinyCNN(KDModel):
    """conv-BN-SiLU, conv-SiLU, mean pool, linear: smooth, with BatchNorm buffers."""

    modality = "vision"

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.fc = nn.Linear(width, classes)

    def forward(self, inputs: Mapping[str, Tensor], want: frozenset[str] = frozenset()) -> ModelOutput:  # type: ignore[override]
        h1 = F.silu(self.bn(self.conv1(inputs["pixel_values"])))  # (B, W, 8, 8)
        h2 = F.silu(self.conv2(h1))  # (B, W, 4, 4)
        return ModelOutput(self.fc(h2.mean((2, 3))), hidden=(h1, h2) if "hidden" in want else ())

    @property
    def num_layers(self) -> int:
        return 2

    @property
    def hidden_size(self) -> int:
        return self.fc.in_features


def _no_dropout(*models: nn.Module) -> None:
    for model in models:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0


def _text_batch(g: torch.Generator, labels: int = 3, b: int = 4, t: int = 8) -> Batch:
    ids = torch.randint(1, 1000, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, t - 2:] = 0  # some padding
    y = torch.randint(0, labels, (b,), generator=g) if labels > 1 else torch.randn(b, generator=g, dtype=torch.float64)
    return Batch({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}, y, torch.arange(b))


def _image_batch(g: torch.Generator, b: int = 4) -> Batch:
    x = torch.randn(b, 3, 8, 8, generator=g, dtype=torch.float64)
    return Batch({"pixel_values": x}, torch.randint(0, 3, (b,), generator=g), torch.arange(b))


def _bert(layers: int, g: torch.Generator, labels: int = 3, attn: str = "eager") -> KDModel:
    return TinyBert(TinyBertConfig(layers=layers, hidden=32, heads=2, intermediate=64,
                                   attn_implementation=attn)).build(labels, g)


def _ctx(teacher: KDModel, student: KDModel, task: Task, loss: nn.Module, batch: Batch,
         quiz: list[Batch], seed: int = 7) -> StepContext:
    return StepContext(teacher=teacher, student=student, loss=loss, student_opt=torch.optim.AdamW(student.parameters(), lr=1e-3),  # type: ignore[arg-type]
                       task=task, data=None, quiz=FixedQuiz(quiz), generator=torch.Generator().manual_seed(seed),  # type: ignore[arg-type]
                       device=torch.device("cpu"), train=None, batch=batch, want=frozenset(loss.needs))  # type: ignore[attr-defined]


def _text_setup(loss_name: str = "kd", task_cls: type[Task] = Text3, student_layers: int = 1,
                dropout: bool = False) -> StepContext:
    g = torch.Generator().manual_seed(0)
    task = task_cls(NoConfig())
    teacher = _bert(2, g, task.num_labels).double()
    student = _bert(student_layers, g, task.num_labels).double()
    if not dropout:
        _no_dropout(teacher, student)
    if loss_name == "pkd":
        loss: nn.Module = PatientKD(PKDConfig(temperature=2.0, alpha=0.6, beta=3.0), task=task, teacher=teacher, student=student)
    else:
        loss = HintonKD(KDConfig(temperature=2.0, alpha=0.7), task=task, teacher=teacher, student=student)
    labels = task.num_labels
    return _ctx(teacher, student, task, loss, _text_batch(g, labels), [_text_batch(g, labels), _text_batch(g, labels)])


def _cnn_setup() -> StepContext:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    teacher, student = TinyCNN(6).double(), TinyCNN(4).double()
    task = Vision3(NoConfig())
    loss = HintonKD(KDConfig(temperature=3.0, alpha=0.8), task=task, teacher=teacher, student=student)
    return _ctx(teacher, student, task, loss, _image_batch(g), [_image_batch(g), _image_batch(g)])


def _rule(ctx: StepContext, **kw: object) -> MetaDistil:
    rule = MetaDistil(MetaDistilConfig(**{"pilot_lr": 0.5, "quiz_batches": 2, **kw}))  # type: ignore[arg-type]
    rule.prepare(ctx)
    return rule


def _meta_grad(ctx: StepContext, **kw: object) -> Tensor:
    ctx.generator.manual_seed(11)  # same dropout seed for every implementation
    assert isinstance(ctx.quiz, FixedQuiz)
    ctx.quiz.i = 0
    grads, _ = _rule(ctx, **kw).meta_gradient(ctx)
    return torch.cat([x.reshape(-1) for x in grads])


def _quiz_after_pilot(ctx: StepContext, t_params: dict[str, Tensor], lam: float) -> Tensor:
    """Written out independently: quiz loss after one SGD pilot step, as a function of θ_T."""
    s_params = {n: p.detach().requires_grad_() for n, p in ctx.student.named_parameters()}
    bufs = {n: b.clone() for n, b in ctx.student.named_buffers()}
    t_bufs = dict(ctx.teacher.named_buffers())
    ctx.student.train()
    ctx.teacher.eval()
    s = functional_call(ctx.student, (s_params, bufs), (ctx.batch.inputs,), {"want": ctx.want})  # type: ignore[union-attr]
    with torch.no_grad():
        t = functional_call(ctx.teacher, (t_params, t_bufs), (ctx.batch.inputs,), {"want": ctx.want})  # type: ignore[union-attr]
    pilot = sum(ctx.loss(s, t, ctx.batch).values())
    grads = torch.autograd.grad(pilot, list(s_params.values()), allow_unused=True)
    fast = {n: p if g is None else p - lam * g for (n, p), g in zip(s_params.items(), grads)}
    ctx.student.eval()
    total = torch.zeros((), dtype=torch.float64)
    for q in ctx.quiz.batches:  # type: ignore[union-attr]
        logits = functional_call(ctx.student, (fast, bufs), (q.inputs,)).logits
        total = total + (F.mse_loss(logits.squeeze(-1), q.labels) if ctx.task.is_regression
                         else F.cross_entropy(logits, q.labels))
    return (total / len(ctx.quiz.batches)).detach()  # type: ignore[union-attr]


def _quiz_after_real_step(ctx: StepContext, t_params: dict[str, Tensor]) -> Tensor:
    """Written out independently: quiz loss after the student optimizer's own step (on copies of the
    student and of the optimizer with its state; no clipping), as a function of θ_T."""
    student = copy.deepcopy(ctx.student)
    pos = {id(p): i for i, p in enumerate(ctx.student.parameters())}
    params = list(student.parameters())
    groups = [{"params": [params[pos[id(p)]] for p in g["params"]]} for g in ctx.student_opt.param_groups]
    opt = type(ctx.student_opt)(groups)
    opt.load_state_dict(copy.deepcopy(ctx.student_opt.state_dict()))  # hyperparameters and moments
    student.train()
    ctx.teacher.eval()
    with torch.no_grad():
        t = functional_call(ctx.teacher, (t_params, dict(ctx.teacher.named_buffers())), (ctx.batch.inputs,),  # type: ignore[union-attr]
                            {"want": ctx.want})
    sum(ctx.loss(student(ctx.batch.inputs, want=ctx.want), t, ctx.batch).values()).backward()  # type: ignore[union-attr]
    opt.step()
    student.eval()
    with torch.no_grad():
        logits = [(student(q.inputs).logits, q.labels) for q in ctx.quiz.batches]  # type: ignore[union-attr]
    return torch.stack([F.mse_loss(z.squeeze(-1), y) if ctx.task.is_regression else F.cross_entropy(z, y)
                        for z, y in logits]).mean()


def _check_against_finite_differences(ctx: StepContext, g: Tensor, lam: float = 0.5, eps: float = 1e-5,
                                      after: Callable[[dict[str, Tensor]], Tensor] | None = None,
                                      richardson: bool = False) -> float:
    """Central differences of the quiz loss (``after``: a function of θ_T, default the SGD pilot at
    ``lam``) along g and 3 random directions, optionally Richardson-extrapolated from ``eps`` and
    ``eps/2`` (error O(eps⁴)); returns the largest relative difference."""
    quiz = after or (lambda t: _quiz_after_pilot(ctx, t, lam))
    worst = 0.0
    names = [n for n, _ in ctx.teacher.named_parameters()]
    base = [p.detach() for _, p in ctx.teacher.named_parameters()]
    gen = torch.Generator().manual_seed(123)
    dirs = [g / g.norm()] + [torch.randn(g.numel(), generator=gen, dtype=torch.float64) for _ in range(3)]
    for d in dirs:
        d = d / d.norm()
        chunks = torch.split(d, [p.numel() for p in base])
        def central(h: float, chunks: tuple[Tensor, ...] = chunks) -> Tensor:
            shifted = [{n: p + s * h * c.view_as(p) for n, p, c in zip(names, base, chunks)} for s in (1, -1)]
            return (quiz(shifted[0]) - quiz(shifted[1])) / (2 * h)

        fd = (4 * central(eps / 2) - central(eps)) / 3 if richardson else central(eps)
        exact = (g @ d).item()
        assert abs(fd.item() - exact) <= 1e-4 * abs(exact), (fd.item(), exact)
        worst = max(worst, abs(fd.item() - exact) / abs(exact))
    return worst


@pytest.mark.parametrize("setup", ["bert-kd", "bert-pkd", "bert-regression", "cnn"])
def test_meta_gradient_matches_finite_differences(setup: str) -> None:
    ctx = {"bert-kd": lambda: _text_setup("kd"), "bert-pkd": lambda: _text_setup("pkd", student_layers=2),
           "bert-regression": lambda: _text_setup("kd", TextReg), "cnn": _cnn_setup}[setup]()
    g2 = _meta_grad(ctx, meta_grad="second_order")
    g1 = _meta_grad(ctx, meta_grad="first_order_exact", jvp="forward")
    gfd = _meta_grad(ctx, meta_grad="first_order_exact", jvp="finite_difference", fd_eps=1e-4)
    assert g2.norm() > 0
    assert ((g1 - g2).norm() / g2.norm()).item() < 1e-8
    assert ((gfd - g2).norm() / g2.norm()).item() < 1e-4
    _check_against_finite_differences(ctx, g2)
    _check_against_finite_differences(ctx, g1)


def test_meta_gradient_resnet8_both_implementations_agree() -> None:
    kind = VISION_KINDS["resnet8"]
    g = torch.Generator().manual_seed(0)
    teacher = kind(NoConfig()).build(3, g).double()
    student = kind(NoConfig()).build(3, g).double()
    task = Vision3(NoConfig())
    loss = HintonKD(KDConfig(temperature=4.0, alpha=0.9), task=task, teacher=teacher, student=student)

    def img() -> Batch:
        return Batch({"pixel_values": torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)},
                     torch.randint(0, 3, (4,), generator=g), torch.arange(4))

    ctx = _ctx(teacher, student, task, loss, img(), [img()])
    g2 = _meta_grad(ctx, meta_grad="second_order", quiz_batches=1)
    g1 = _meta_grad(ctx, meta_grad="first_order_exact", quiz_batches=1)
    assert g2.norm() > 0 and ((g1 - g2).norm() / g2.norm()).item() < 1e-8
    _check_against_finite_differences(ctx, g2)


def _adam_student(ctx: StepContext, opt: str = "adamw", steps: int = 3, lr: float = 1e-3) -> None:
    """Give the student an Adam/AdamW optimizer (two groups: matrices with weight decay, the rest
    without and at twice the lr) and take ``steps`` real steps on the pilot batch, so m, v ≠ 0."""
    params = list(ctx.student.parameters())
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": 0.01},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": 2 * lr}]
    ctx.student_opt = (torch.optim.AdamW if opt == "adamw" else torch.optim.Adam)(groups, lr=lr)
    ctx.student.train()
    with torch.no_grad():
        t = ctx.teacher(ctx.batch.inputs, want=ctx.want)  # type: ignore[union-attr]
    for _ in range(steps):
        ctx.student_opt.zero_grad()
        sum(ctx.loss(ctx.student(ctx.batch.inputs, want=ctx.want), t, ctx.batch).values()).backward()  # type: ignore[union-attr]
        ctx.student_opt.step()
    ctx.student_opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("setup", ["bert-kd", "bert-pkd-adam-l2", "bert-regression", "cnn", "cnn-first-step"])
def test_adam_pilot_meta_gradient_matches_the_real_optimizer_step(setup: str) -> None:
    """pilot="adam": both implementations agree, and match central differences of the quiz loss
    after the student optimizer's *own* step (torch's AdamW/Adam on a copy, its moments included)."""
    ctx = {"bert-kd": lambda: _text_setup("kd"), "bert-pkd-adam-l2": lambda: _text_setup("pkd", student_layers=2),
           "bert-regression": lambda: _text_setup("kd", TextReg), "cnn": _cnn_setup,
           "cnn-first-step": _cnn_setup}[setup]()
    first = setup.endswith("first-step")  # m = v = 0, step 0: u ≈ sign(g), ∂u/∂g = eps/(|g|+eps)²
    _adam_student(ctx, "adam" if setup.endswith("-l2") else "adamw", steps=0 if first else 3)
    g2 = _meta_grad(ctx, pilot="adam", meta_grad="second_order")
    g1 = _meta_grad(ctx, pilot="adam", meta_grad="first_order_exact", jvp="forward")
    gfd = _meta_grad(ctx, pilot="adam", meta_grad="first_order_exact", jvp="finite_difference", fd_eps=1e-4)
    assert torch.isfinite(g2).all() and g2.norm() > 0
    assert ((g1 - g2).norm() / g2.norm()).item() < (1e-6 if first else 1e-8)
    assert ((gfd - g2).norm() / g2.norm()).item() < (1e-3 if first else 1e-4)
    sgd = _meta_grad(ctx, pilot="sgd", pilot_lr=1e-3)
    assert ((sgd - g2).norm() / g2.norm()).item() > 1e-2  # the preconditioner matters
    if first:  # too kinked for differences of the quiz loss
        return
    quiz = lambda t: _quiz_after_real_step(ctx, t)  # noqa: E731
    # the quiz loss moves by one Adam step (~lr) only: small eps hit roundoff, large ones curvature
    _check_against_finite_differences(ctx, g2, eps=1e-4, after=quiz, richardson=True)
    _check_against_finite_differences(ctx, g1, eps=1e-4, after=quiz, richardson=True)


def test_adam_pilot_rejects_other_optimizers_and_sgd_pilot_ignores_the_optimizer() -> None:
    ctx = _text_setup("kd")
    base = _meta_grad(ctx)
    assert torch.equal(_meta_grad(ctx, pilot="sgd"), base)
    _adam_student(ctx, lr=0.0)  # moments filled, parameters unchanged (lr 0: no step, no decay)
    assert all(ctx.student_opt.state[p]["exp_avg"].abs().sum() > 0 for p in ctx.student.parameters())
    assert torch.equal(_meta_grad(ctx), base)  # the SGD pilot never reads the optimizer
    ctx.student_opt = torch.optim.SGD(ctx.student.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ConfigError, match=r"teacher_update\.metadistil\.pilot = 'adam'.*SGD.*'sgd', 'adam'"):
        MetaDistil(MetaDistilConfig(pilot="adam")).prepare(ctx)
    ctx.student_opt = torch.optim.AdamW(ctx.student.parameters(), amsgrad=True)
    with pytest.raises(ConfigError, match="amsgrad"):
        MetaDistil(MetaDistilConfig(pilot="adam")).prepare(ctx)
    ctx.student_opt = torch.optim.AdamW(list(ctx.student.parameters())[1:])
    with pytest.raises(ConfigError, match="does not hold"):
        MetaDistil(MetaDistilConfig(pilot="adam")).prepare(ctx)
    ctx.student_opt = torch.optim.Adam(ctx.student.parameters())
    MetaDistil(MetaDistilConfig(pilot="adam")).prepare(ctx)  # Adam (L2 decay) is mirrored too


@pytest.mark.parametrize("loss_name,pilot", [("kd", "sgd"), ("pkd", "adam")])
def test_meta_gradient_under_bf16_autocast_matches_fp32(loss_name: str, pilot: str) -> None:
    """The v2 suites train in bf16 autocast: the meta-gradient (first_order_exact with a forward JVP,
    and second_order) stays within bf16 rounding of the fp32 second-order one, with torch's bf16
    kernels and with the fp32-GEMM products of a CPU without them (``Bf16GemmInFp32``, whose
    forward-mode JVP and double backward go through the same dispatch)."""
    ctx = _text_setup(loss_name, student_layers=2 if loss_name == "pkd" else 1, dropout=True)
    ctx.teacher.float()
    ctx.student.float()
    ctx.student_opt = torch.optim.AdamW(ctx.student.parameters(), lr=1e-3)
    kw: dict[str, object] = {"pilot": "adam"} if pilot == "adam" else {"pilot_lr": 0.5}
    if pilot == "adam":
        _adam_student(ctx, steps=3)
    ref = _meta_grad(ctx, meta_grad="second_order", **kw)
    bf16 = dataclasses.replace(ctx, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    for meta_grad in ("first_order_exact", "second_order"):
        got = _meta_grad(bf16, meta_grad=meta_grad, **kw)
        rel = ((got - ref).norm() / ref.norm()).item()
        assert 1e-5 < rel < 0.02, (meta_grad, rel)  # > 0: autocast did run in bf16
        with Bf16GemmInFp32():
            emulated = _meta_grad(bf16, meta_grad=meta_grad, **kw)
        assert ((emulated - got).norm() / got.norm()).item() < 0.01, meta_grad


def test_implementations_agree_with_dropout_and_keep_global_rng() -> None:
    ctx = _text_setup("kd", dropout=True)
    state = torch.get_rng_state()
    g2 = _meta_grad(ctx, meta_grad="second_order")
    g1 = _meta_grad(ctx, meta_grad="first_order_exact")
    assert ((g1 - g2).norm() / g2.norm()).item() < 1e-8  # same seeded dropout masks in every pass
    assert torch.equal(state, torch.get_rng_state())
    ctx.generator.manual_seed(12)
    other, _ = _rule(ctx, meta_grad="second_order").meta_gradient(ctx)
    assert not torch.allclose(torch.cat([x.reshape(-1) for x in other]), g2)  # masks follow the rule's generator


def test_second_order_needs_math_sdpa_and_is_routed_to_it() -> None:
    g = torch.Generator().manual_seed(0)
    task = Text3(NoConfig())
    teacher, student = _bert(2, g, attn="sdpa"), _bert(1, g, attn="sdpa")
    _no_dropout(teacher, student)  # dropout_p = 0 lets CPU pick the flash kernel
    loss = HintonKD(KDConfig(temperature=2.0, alpha=0.7), task=task, teacher=teacher, student=student)
    ctx = _ctx(teacher, student, task, loss, _text_batch(g), [_text_batch(g)])
    student.train()
    params = dict(student.named_parameters())
    out = functional_call(student, params, (ctx.batch.inputs,))  # type: ignore[union-attr]
    first = torch.autograd.grad(out.logits.pow(2).sum(), list(params.values()), create_graph=True, allow_unused=True)
    with pytest.raises(RuntimeError, match="not implemented"):  # the pitfall of performance.md §3.3
        torch.autograd.grad(sum(x.sum() for x in first if x is not None), list(params.values()), allow_unused=True)
    g2 = _meta_grad(ctx, meta_grad="second_order", quiz_batches=1)
    g1 = _meta_grad(ctx, meta_grad="first_order_exact", quiz_batches=1)
    assert torch.isfinite(g2).all() and g2.norm() > 0
    assert ((g1 - g2).norm() / g2.norm()).item() < 1e-4  # float32
    # finite differences need no special kernel: the pilot keeps the default (flash) SDPA
    gfd = _meta_grad(ctx, meta_grad="first_order_exact", jvp="finite_difference", quiz_batches=1)
    assert ((gfd - g2).norm() / g2.norm()).item() < 1e-2


def _snapshot(ctx: StepContext) -> tuple[dict[str, Tensor], dict[str, Tensor], dict, list]:
    s = {n: p.detach().clone() for n, p in ctx.student.named_parameters()}
    b = {n: x.clone() for n, x in ctx.student.named_buffers()}
    grads = [None if p.grad is None else p.grad.clone() for p in ctx.student.parameters()]
    return s, b, copy.deepcopy(ctx.student_opt.state_dict()), grads


@pytest.mark.parametrize("meta_grad", ["second_order", "first_order_exact"])
@pytest.mark.parametrize("setup", ["bert", "cnn"])
def test_step_leaves_student_untouched_and_moves_teacher(meta_grad: str, setup: str) -> None:
    ctx = _text_setup("kd", dropout=True) if setup == "bert" else _cnn_setup()
    # a real student step first, so the optimizer has state and the params have grads
    ctx.student.train()
    with torch.no_grad():
        t = ctx.teacher(ctx.batch.inputs)  # type: ignore[union-attr]
    sum(ctx.loss(ctx.student(ctx.batch.inputs), t, ctx.batch).values()).backward()  # type: ignore[union-attr]
    ctx.student_opt.step()
    before = _snapshot(ctx)
    teacher0 = copy.deepcopy(ctx.teacher.state_dict())
    rule = _rule(ctx, meta_grad=meta_grad, teacher_lr=1e-2)
    metrics = rule.step(ctx)
    after = _snapshot(ctx)
    for x, y in zip(before[:2], after[:2]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert str(before[2]) == str(after[2])
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(before[3], after[3]))
    assert ctx.student.training  # mode restored
    assert any(not torch.equal(teacher0[k], v) for k, v in ctx.teacher.state_dict().items())
    assert {"teacher/grad_norm", "teacher/lr", "teacher/quiz_loss"} <= set(metrics)
    assert all(p.grad is None for p in ctx.teacher.parameters())


def test_gating_every_and_start_epoch() -> None:
    ctx = _text_setup("kd")
    rule = _rule(ctx, every=3, start_epoch=1, teacher_lr=1e-2)
    teacher0 = copy.deepcopy(ctx.teacher.state_dict())
    for epoch, step in [(0, 0), (0, 3), (1, 4)]:
        ctx.epoch, ctx.step = epoch, step
        assert rule.step(ctx) == {}
    assert all(torch.equal(teacher0[k], v) for k, v in ctx.teacher.state_dict().items())
    ctx.epoch, ctx.step = 1, 6
    assert "teacher/grad_norm" in rule.step(ctx) and rule.updates == 1


def test_teacher_lr_schedules() -> None:
    ctx = _text_setup("kd")
    ctx.total_steps = 100
    rule = _rule(ctx, teacher_lr=1.0, teacher_warmup=0.1)
    got = []
    for step in (0, 5, 10, 55, 100):
        ctx.step = step
        got.append(rule.teacher_lr(ctx))
    assert got == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    follow = _rule(ctx, teacher_lr=1.0, teacher_schedule="student", pilot_lr=0.1, pilot_lr_schedule="student")
    follow.student_lr_start = 1e-3
    for group in ctx.student_opt.param_groups:
        group["lr"] = 1e-4  # the student schedule decayed by 10
    assert follow.teacher_lr(ctx) == pytest.approx(0.1) and follow.pilot_lr(ctx) == pytest.approx(0.01)


def test_state_dict_round_trip_continues_identically() -> None:
    ctx = _text_setup("kd", dropout=True)
    rule = _rule(ctx, teacher_lr=1e-2)
    for step in range(2):
        ctx.step = step
        rule.step(ctx)
    state = copy.deepcopy(rule.state_dict())
    teacher_state = copy.deepcopy(ctx.teacher.state_dict())
    gen_state = ctx.generator.get_state()
    ctx.step = 2
    rule.step(ctx)
    expected = copy.deepcopy(ctx.teacher.state_dict())
    # resume: a fresh rule restored before (pending) or after prepare gives the same teacher
    for order in ("before", "after"):
        ctx.teacher.load_state_dict(teacher_state)
        ctx.generator.set_state(gen_state)
        fresh = MetaDistil(MetaDistilConfig(pilot_lr=0.5, quiz_batches=2, teacher_lr=1e-2))
        if order == "before":
            fresh.load_state_dict(copy.deepcopy(state))
            fresh.prepare(ctx)
        else:
            fresh.prepare(ctx)
            fresh.load_state_dict(copy.deepcopy(state))
        assert fresh.updates == 2
        assert str(fresh.state_dict()["opt"]) == str(state["opt"])
        ctx.quiz.i = 4  # type: ignore[union-attr]
        fresh.step(ctx)
        got = ctx.teacher.state_dict()
        assert all(torch.equal(expected[k], got[k]) for k in expected), order


def test_not_applicable_and_config_errors() -> None:
    ctx = _text_setup("kd")
    ctx.loss = CrossEntropy(NoConfig(), task=ctx.task, teacher=None, student=ctx.student)
    with pytest.raises(NotApplicable, match="uses the teacher"):
        MetaDistil(MetaDistilConfig()).prepare(ctx)
    ctx = _text_setup("kd")
    ctx.quiz = None
    with pytest.raises(ConfigError, match="quiz"):
        MetaDistil(MetaDistilConfig()).prepare(ctx)
    from kdbench.engine.config import build_config

    problems: list[str] = []  # checked at plan time, before anything trains
    build_config(MetaDistilConfig, [{"meta_grad": "third_order", "every": 0, "pilot": "lion"}],
                 "[teacher_update.metadistil]", problems)
    assert any("meta_grad = 'third_order'" in p for p in problems)
    assert any("pilot = 'lion' is not allowed; use one of 'sgd', 'adam'" in p for p in problems)
    assert any("every = 0 must be >= 1" in p for p in problems)
    assert MetaDistil.needs_quiz and MetaDistil.changes_teacher


def test_registration() -> None:
    rules: list[type] = []
    methods: list = []
    metadistil.kdbench_register_teacher_updates(register=rules.append)
    metadistil.kdbench_register_methods(register=methods.append)
    assert [r.name for r in rules] == ["metadistil"]
    by_name = {m.name: m for m in methods}
    assert by_name["metadistil"].loss == "kd" and by_name["metadistil"].teacher_update == "metadistil"
    assert "ACL 2022" in by_name["metadistil"].paper
    assert by_name["metadistil-pkd"].loss == "pkd"
    KDConfig(**by_name["metadistil"].defaults["loss"])  # defaults are valid loss options
    PKDConfig(**by_name["metadistil-pkd"].defaults["loss"])
    MetaDistilConfig(**by_name["metadistil"].defaults.get("teacher_update", {}))
    adam = by_name["metadistil-adam"]
    assert (adam.loss, adam.teacher_update) == ("kd", "metadistil")
    assert adam.defaults["loss"] == by_name["metadistil"].defaults["loss"]
    assert MetaDistilConfig(**adam.defaults["teacher_update"]).pilot == "adam"
    assert "kdbench variant" in adam.description and "not in the paper" in adam.description


def test_pilot_option_leaves_published_run_ids_unchanged(make_host: Any, tmp_path: Any) -> None:
    """``pilot`` came after published results: at "sgd" a cell's run id is what it was before the
    option existed (the same cell, hashed with the Config without the field); "adam" changes it."""
    from kdbench.engine.config import load_suite
    from kdbench.engine.plan import expand, make_run_id
    from kdbench.testing import tiny_suite

    host = make_host()
    cells = {}
    for method in ("metadistil", "metadistil-adam"):
        suite = load_suite(str(tiny_suite(tmp_path / f"{method}.toml", method)))
        cells[method] = next(c for c in expand(suite, host) if c.method == method)
    cell, cfg = cells["metadistil"], cells["metadistil"].teacher_update_cfg
    assert cfg.pilot == "sgd" and cells["metadistil-adam"].teacher_update_cfg.pilot == "adam"
    before = dataclasses.make_dataclass("MetaDistilConfig", [
        (f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
        for f in dataclasses.fields(MetaDistilConfig) if f.name != "pilot"], frozen=True)
    old = before(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(before)})
    assert make_run_id(dataclasses.replace(cell, teacher_update_cfg=old)) == cell.run_id
    assert make_run_id(dataclasses.replace(cell, teacher_update_cfg=dataclasses.replace(cfg, pilot="adam"))) != cell.run_id


def test_frozen_teacher_metadistil_trains_exactly_like_kd(make_host: Any, run_tiny: Any) -> None:
    """With teacher_lr=0 the pilot and quiz steps must leave no trace: same student as ``kd``
    (a cached-teacher cell) to the last bit, so any gap between the two comes from the teacher moving."""
    host = make_host()
    common = ["train.epochs=2", "train.max_steps=0", "teacher_train.max_steps=30"]
    kd = run_tiny(host, "kd", steps=0, overrides=common)
    frozen = run_tiny(host, "metadistil", steps=0, overrides=[*common, "teacher_update.metadistil.teacher_lr=0.0"])
    moving = run_tiny(host, "metadistil", steps=0, overrides=[*common, "teacher_update.metadistil.teacher_lr=1e-2"])
    assert kd["status"] == frozen["status"] == moving["status"] == "ok"
    assert frozen["history"] == kd["history"]
    assert frozen["extra"]["last_metrics"]["loss/total"] == kd["extra"]["last_metrics"]["loss/total"]
    assert moving["extra"]["last_metrics"]["loss/total"] != kd["extra"]["last_metrics"]["loss/total"]


def test_quiz_probe_measures_the_whole_split_without_changing_training(make_host: Any, run_tiny: Any) -> None:
    """``quiz_probe``: the cells train exactly as without it; the logged cosine is 1 when the update
    already uses the whole quiz split (in another order and partition: the quiz loss is a mean over
    examples, not over batches of unequal size), in (-1, 1) for one batch; the time ratio is positive."""
    host = make_host()
    off = run_tiny(host, "metadistil", steps=8)
    on = run_tiny(host, "metadistil", steps=8, overrides=["teacher_update.metadistil.quiz_probe=2"])
    whole = run_tiny(host, "metadistil", steps=8, overrides=[  # 42 quiz rows: batches of 16, 16 and 10
        "teacher_update.metadistil.quiz_probe=2", "teacher_update.metadistil.quiz_batches=0"])
    assert off["status"] == on["status"] == whole["status"] == "ok"
    assert on["history"] == off["history"] and on["run_id"] != off["run_id"]
    last, last_off = on["extra"]["last_metrics"], off["extra"]["last_metrics"]
    assert last["loss/total"] == last_off["loss/total"] and "teacher/quiz_probe_cos" not in last_off
    assert last["teacher/quiz_probe_n"] == 4 and last["teacher/quiz_probe_cost"] > 0
    assert -1 < last["teacher/quiz_probe_cos"] < 0.9999
    assert whole["extra"]["last_metrics"]["teacher/quiz_probe_cos"] == pytest.approx(1.0, abs=1e-5)
