"""MetaDistil: the teacher learns from the student's quiz loss after a pilot step.

Zhou, Xu, McAuley, "BERT Learns to Teach: Knowledge Distillation with Meta Learning", ACL 2022;
checked against the reference code, JetRunner/MetaDistil@80e60c1 (``nlp/`` and ``cv/``).

Per teacher update (``step``, before the runner's real student step on the same batch):

1. Pilot: one step of a *functional* copy of the student (``torch.func.functional_call`` with the
   student's parameters and cloned buffers, so BatchNorm statistics are not touched), on the
   gradient ``g = ∇_{θ_S} L_S(x; θ_S, θ_T)`` of the run's distillation loss ``L_S`` (``ctx.loss``),
   the teacher in eval mode *with* grad. ``pilot = "sgd"`` (the reference): ``θ'_S = θ_S − λ·g``.
   ``pilot = "adam"`` (a kdbench variant, not in the paper or the code): ``θ'_S = θ_S − η·u(g)``,
   the step the student's Adam/AdamW optimizer would take with ``g``: ``u = m̂'/(√v̂' + eps)``
   (+ ``λ_wd·θ_S`` for AdamW) from its current moments ``m' = β1·m + (1−β1)·g``,
   ``v' = β2·v + (1−β2)·g²`` (``m = v = 0`` before its first step), bias-corrected at ``step + 1``,
   and ``η`` = its current lr. Reason: the reference's SGD pilot at λ = 5e-5 models a step about
   1000× smaller than the AdamW step the student then takes. Neither pilot models the runner's
   gradient-norm clip or gradient accumulation.
2. Quiz: ``L_q = mean over k quiz batches of CE(S(q; θ'_S), y_q)`` (MSE for regression), student
   in eval mode.
3. Teacher: ``g_T = ∇_{θ_T} L_q`` through the pilot step; clip to ``grad_clip``; one step of the
   teacher's own optimizer (AdamW or SGD, created once in ``prepare``, kept in ``state_dict``).

The student is never written to (no "time machine" copies); the runner then takes the real step
with the updated teacher. Two meta-gradients (``meta_grad``, :mod:`kdbench_builtins.metadistil_grad`),
equal in exact arithmetic:

* ``second_order`` (reference): ``autograd.grad(create_graph=True)`` through the pilot. Flash and
  memory-efficient SDPA have no double backward (CPU included), so the student's pilot forward runs
  under ``sdpa_kernel(SDPBackend.MATH)`` (eager attention works too).
* ``first_order_exact`` (default; no double backward through the network): ``v = ∇_{θ'} L_q``;
  ``u = J_s(θ_S)·w`` for every student output the loss uses (logits, [CLS] vectors for ``pkd``) on
  the pilot batch; ``g_T = −c·∇_{θ_T} ⟨∂L_S/∂s (s, t(θ_T)), u⟩``: a loss-level second derivative and
  one ordinary backward through the teacher. SGD pilot: ``w = v``, ``c = λ``. Adam pilot: the
  step's Jacobian in ``g`` is diagonal, ``w = η·(∂u/∂g)⊙v``, ``c = 1``. ``jvp="forward"``:
  ``torch.func.jvp`` (exact; math SDPA, as flash has no forward AD). ``jvp="finite_difference"``: two
  no-grad forwards at ``θ ± εw``, ``ε = fd_eps·‖θ‖/‖w‖``; the pilot then runs in fp32 (no autocast)
  with any attention kernel.

Dropout: the pilot student runs in train mode, as in the reference, under a fixed RNG state (seed
drawn from ``ctx.generator``; the global RNG is restored afterwards), so the pilot gradient, the JVP
and the finite differences see the same masks. Both are exact for one pilot step only.

Deliberate deviations from the reference code:

* quiz = a seeded 10% split of train (the paper's 9:1), never dev (the NLP code used dev);
  ``quiz_batches`` (k, default 1) batches per update, an unbiased estimate of the whole-split
  meta-gradient at 1/(size/k) of its quiz cost; ``quiz_batches = 0`` is the reference's whole held
  set every round; ``quiz_probe = N`` measures, every N updates, the cosine between the two; the
  quiz loss is the mean over the update's quiz *examples* (the reference averages batch means, which
  gives the rows of a short last batch more weight: 3 rows weighed like 32 on a 163-row split);
* one pilot batch per round (``num_meta_batches = 1``); ``every`` spaces the teacher updates;
* PKD term off by default: the pilot loss is the run's loss, so ``metadistil`` uses ``kd`` and
  ``metadistil-pkd`` uses ``pkd`` (the NLP code's β = 100 PKD-skip term, pilot and real step);
* canonical KL soft loss (the NLP code's probability MSE is ``loss.soft_loss=prob_mse
  loss.reduction=elementwise_mean``); no always-on attention dropout in the quiz forward;
* before ``start_epoch`` (0-based: the CIFAR code's 1-based epoch 150 is 149) no meta-step runs at
  all, where the CIFAR code runs it with teacher lr 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

import kdbench
from kdbench import (
    Batch,
    ConfigError,
    Method,
    NotApplicable,
    StepContext,
    StepCost,
    TeacherUpdate,
    TrainConfig,
)
from kdbench_builtins.metadistil_grad import MetaSpec, adam_problem, adam_slots, meta_gradient

PAPER = ("Zhou, Xu, McAuley. BERT Learns to Teach: Knowledge Distillation with Meta Learning. "
         "ACL 2022 (code: JetRunner/MetaDistil)")


@dataclass(frozen=True, slots=True)
class MetaDistilConfig:
    """Options of the MetaDistil teacher update (defaults: the reference NLP code, ``nlp/``)."""

    # "sgd": the reference's plain-SGD pilot step of size pilot_lr | "adam" (kdbench variant): the
    # student optimizer's own step (its moments and current lr; Adam/AdamW students only)
    pilot: Literal["sgd", "adam"] = kdbench.option("sgd", id_default="sgd")
    pilot_lr: float = kdbench.option(5e-5, ge=0)  # λ, SGD step of the pilot student (CIFAR code: 0.05); pilot="sgd"
    pilot_lr_schedule: Literal["constant", "student"] = "constant"  # "constant" | "student": λ × student lr / initial lr (CIFAR); pilot="sgd"
    teacher_lr: float = kdbench.option(1e-5, ge=0)  # teacher optimizer lr
    teacher_optimizer: Literal["adamw", "sgd"] = "adamw"  # "adamw" | "sgd"
    teacher_weight_decay: float = kdbench.option(0.0, ge=0)  # on matrices only (biases, LayerNorm excluded)
    teacher_momentum: float = kdbench.option(0.9, ge=0, lt=1)  # SGD momentum
    teacher_schedule: Literal["linear", "constant", "student"] = "linear"  # "linear" warmup+decay over the run | "constant" | "student"
    teacher_warmup: float = kdbench.option(0.0, ge=0, le=1)  # fraction of the run's steps with linear warmup ("linear")
    grad_clip: float = kdbench.option(1.0, ge=0)  # teacher grad-norm clip; 0 = off
    quiz_batches: int = kdbench.option(1, ge=0)  # quiz batches (of train.batch_size) per teacher update; 0 = the whole
    # quiz split every update (the reference NLP code: num_held_batches = 0)
    every: int = kdbench.option(1, ge=1)  # update the teacher every N student steps
    start_epoch: int = kdbench.option(0, ge=0)  # first epoch (0-based) with teacher updates
    meta_grad: Literal["first_order_exact", "second_order"] = "first_order_exact"  # "first_order_exact" | "second_order" (reference)
    jvp: Literal["forward", "finite_difference"] = "forward"  # first_order_exact: "forward" (torch.func.jvp) | "finite_difference"
    fd_eps: float = kdbench.option(1e-3, gt=0)  # finite_difference: ε relative to ‖θ_S‖/‖w‖ (w: the JVP direction)
    quiz_probe: int = kdbench.option(0, ge=0, id_default=0)  # diagnostic: every N teacher updates, also the
    # whole-quiz-split meta-gradient (same pilot batch and dropout masks; the update still uses quiz_batches):
    # logs the running mean of its cosine with the one used and of the time ratio; 0 = off


class MetaDistil(TeacherUpdate):
    """``metadistil``: teacher meta-gradient through a functional pilot step (see module doc)."""

    name = "metadistil"
    version = "1"
    Config = MetaDistilConfig
    changes_teacher = True
    needs_quiz = True
    gauges = frozenset({"teacher/quiz_probe_cos", "teacher/quiz_probe_cost", "teacher/quiz_probe_n"})

    def cost_model(self, *, live_teacher: bool = True) -> StepCost:
        """Forward-pass units (F_T, F_S): the real step (F_T+3F_S) plus, every ``every`` steps, the
        pilot step (F_T+3F_S), ``quiz_batches`` quiz passes (3F_S each), the teacher backward (2F_T)
        and u = J_s·w (2F_S), or the double backward instead (≈4F_S, an estimate) for second_order."""
        second = self.cfg.meta_grad == "second_order"
        extra_s = (7.0 if second else 5.0) + 3.0 * self.cfg.quiz_batches
        return StepCost(1 + 3.0 / self.cfg.every, 3 + extra_s / self.cfg.every, approx=second)

    def __init__(self, cfg: MetaDistilConfig) -> None:
        super().__init__(cfg)
        self.n_quiz = cfg.quiz_batches  # resolved in prepare (0 = the whole quiz split)
        self.opt: torch.optim.Optimizer | None = None
        self.updates = 0
        self.student_lr0 = 0.0  # student lr at prepare (for pilot_lr_schedule="student")
        self.student_lr_start: float | None = None  # student lr at the first teacher update
        self._pending: dict[str, Any] | None = None
        self.probe = {"n": 0.0, "cos": 0.0, "cost": 0.0}  # quiz_probe sums

    @classmethod
    def check_train(cls, cfg: MetaDistilConfig, train: TrainConfig) -> str | None:
        """Plan time: the Adam pilot mirrors an AdamW student step (:func:`adam_problem` checks the
        built optimizer again in ``prepare``)."""
        if cfg.pilot == "adam" and train.optimizer != "adamw":
            return (f"teacher_update.metadistil.pilot = 'adam' mirrors an AdamW student step, but "
                    f"train.optimizer = {train.optimizer!r}; use pilot = 'sgd' or train.optimizer = 'adamw'")
        return None

    def prepare(self, ctx: StepContext) -> dict[str, float]:
        """Check the loss and quiz stream; make the teacher trainable; build its optimizer."""
        if not ctx.loss.uses_teacher:
            raise NotApplicable(f"metadistil needs a loss that uses the teacher; {ctx.loss.name!r} ignores it")
        if any(True for _ in ctx.loss.parameters()):
            raise NotApplicable(f"metadistil's pilot step cannot train loss {ctx.loss.name!r}'s own "
                                "parameters; use loss 'kd' or 'pkd'")
        if ctx.quiz is None:
            raise ConfigError("teacher_update 'metadistil' needs quiz batches; set the task's "
                              "quiz_fraction > 0 (e.g. 0.1)")
        c = self.cfg
        problem = adam_problem(ctx.student_opt, ctx.student) if c.pilot == "adam" else None
        if problem is not None:
            raise ConfigError(f"teacher_update.metadistil.pilot = 'adam' mirrors an Adam/AdamW student step, "
                              f"but {problem}; use pilot = 'sgd' (allowed: 'sgd', 'adam') or train.optimizer "
                              "= 'adamw'")
        quiz_split = ctx.data.splits["quiz"] if ctx.data is not None and "quiz" in ctx.data.splits else None
        size = int(getattr(ctx.train, "batch_size", 1))
        if c.quiz_batches == 0 and quiz_split is None:
            raise ConfigError("teacher_update 'metadistil' quiz_batches = 0 (the whole quiz split) needs a "
                              "quiz split in the task data")
        if c.quiz_probe and quiz_split is None:
            raise ConfigError("teacher_update 'metadistil' quiz_probe > 0 compares with the whole quiz split, "
                              "which the task data lacks; set quiz_probe = 0")
        if c.quiz_batches == 0 and quiz_split is not None:
            self.n_quiz = quiz_split.num_batches(min(size, len(quiz_split)))
        ctx.teacher.requires_grad_(True)
        params = list(ctx.teacher.parameters())
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": c.teacher_weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        if c.teacher_optimizer == "adamw":
            fused = ctx.device.type in ("cpu", "cuda")  # CPU's default for-loop AdamW is ~5x slower
            self.opt = torch.optim.AdamW(groups, lr=c.teacher_lr, fused=fused)
        else:
            self.opt = torch.optim.SGD(groups, lr=c.teacher_lr, momentum=c.teacher_momentum)
        group = ctx.student_opt.param_groups[0]
        self.student_lr0 = float(group.get("initial_lr", group["lr"]))
        if self._pending is not None:
            self.load_state_dict(self._pending)
        return {"teacher/quiz_batches": float(self.n_quiz),
                "teacher/quiz_examples_per_update": float(self.n_quiz * size if quiz_split is None
                                                          else min(self.n_quiz * size, len(quiz_split)))}

    def _student_lr_ratio(self, ctx: StepContext, ref: float) -> float:
        return float(ctx.student_opt.param_groups[0]["lr"]) / ref if ref > 0 else 1.0

    def pilot_lr(self, ctx: StepContext) -> float:
        """λ of the SGD pilot at this step."""
        lam = self.cfg.pilot_lr
        return lam * self._student_lr_ratio(ctx, self.student_lr0) if self.cfg.pilot_lr_schedule == "student" else lam

    def teacher_lr(self, ctx: StepContext) -> float:
        """Teacher lr at this step (set on the optimizer before each teacher step)."""
        c, lr = self.cfg, self.cfg.teacher_lr
        if c.teacher_schedule == "student":
            return lr * self._student_lr_ratio(ctx, self.student_lr_start or 0.0)
        if c.teacher_schedule == "constant" or ctx.total_steps <= 0:
            return lr
        warm = int(c.teacher_warmup * ctx.total_steps)
        if ctx.step < warm:
            return lr * ctx.step / warm
        return lr * max(0.0, (ctx.total_steps - ctx.step) / max(1, ctx.total_steps - warm))

    def step(self, ctx: StepContext) -> dict[str, float]:
        """One teacher meta-step (every ``every`` steps from ``start_epoch``); student untouched."""
        if ctx.epoch < self.cfg.start_epoch or ctx.step % self.cfg.every:
            return {}
        if self.opt is None:
            raise RuntimeError("MetaDistil.step called before prepare()")
        if self.student_lr_start is None:
            self.student_lr_start = float(ctx.student_opt.param_groups[0]["lr"])
        seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator, device=ctx.generator.device))
        quiz = [ctx.quiz.next() for _ in range(self.n_quiz)]  # type: ignore[union-attr]  # prepare checked it
        t0 = time.perf_counter()
        grads, metrics = self.meta_gradient(ctx, quiz, seed)
        if self.cfg.quiz_probe and self.updates % self.cfg.quiz_probe == 0:
            self._probe(ctx, grads, seed, time.perf_counter() - t0)
        if self.probe["n"]:
            n = self.probe["n"]
            metrics |= {"teacher/quiz_probe_cos": self.probe["cos"] / n,
                        "teacher/quiz_probe_cost": self.probe["cost"] / n, "teacher/quiz_probe_n": n}
        params = list(ctx.teacher.parameters())
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        lr = self.teacher_lr(ctx)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.updates += 1
        return {**metrics, "teacher/grad_norm": float(norm), "teacher/lr": lr}

    def meta_gradient(self, ctx: StepContext, quiz: list[Batch] | None = None,
                      seed: int | None = None) -> tuple[list[Tensor], dict[str, float]]:
        """``d L_quiz(θ'_S(θ_T)) / d θ_T`` on the pilot batch ``ctx.batch``, one tensor per teacher
        parameter; nothing is updated. ``quiz`` / ``seed`` (the pilot's dropout masks) default to the
        next ``quiz_batches`` batches of ``ctx.quiz`` and a draw from ``ctx.generator``."""
        if ctx.batch is None or (quiz is None and ctx.quiz is None):
            raise RuntimeError("MetaDistil.meta_gradient needs ctx.batch and ctx.quiz")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator, device=ctx.generator.device))
        if quiz is None:
            quiz = [ctx.quiz.next() for _ in range(self.n_quiz)]  # type: ignore[union-attr]
        c = self.cfg
        adam = adam_slots(ctx.student_opt, ctx.student) if c.pilot == "adam" else None
        spec = MetaSpec(c.meta_grad, c.jvp, c.fd_eps, sum(len(q) for q in quiz), self.pilot_lr(ctx), adam, seed)
        return meta_gradient(ctx, spec, ctx.batch, quiz)

    def _probe(self, ctx: StepContext, grads: list[Tensor], seed: int, seconds: float) -> None:
        """``quiz_probe``: the whole quiz split's meta-gradient at the same θ_T, pilot batch and
        masks (unaugmented, in order; the quiz stream and ``ctx.generator`` are not advanced)."""
        split = ctx.data.splits["quiz"]  # type: ignore[union-attr]
        size = min(int(getattr(ctx.train, "batch_size", 1)), len(split))
        t0 = time.perf_counter()
        whole, _ = self.meta_gradient(ctx, [b.to(ctx.device) for b in split.batches(size)], seed)
        ratio = (time.perf_counter() - t0) / max(seconds, 1e-9)
        a, b = (torch.cat([g.reshape(-1).float() for g in gs]) for gs in (grads, whole))
        self.probe["cos"] += float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        self.probe["cost"] += ratio
        self.probe["n"] += 1

    def state_dict(self) -> dict[str, Any]:
        """Teacher optimizer state, update counter and the student-lr references."""
        return {"updates": self.updates, "student_lr0": self.student_lr0, "probe": dict(self.probe),
                "student_lr_start": self.student_lr_start,
                "opt": self.opt.state_dict() if self.opt is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; before ``prepare`` the optimizer state waits for it."""
        self.updates = int(state["updates"])
        self.student_lr0 = float(state["student_lr0"])
        self.student_lr_start = state["student_lr_start"]
        self.probe = dict(state.get("probe", {"n": 0.0, "cos": 0.0, "cost": 0.0}))  # absent before quiz_probe
        if self.opt is None:
            self._pending = state
        elif state["opt"] is not None:
            self.opt.load_state_dict(state["opt"])
            self._pending = None


#: ``kdbench bench`` rows: each meta-gradient, the teacher updated every step
_BENCH = {"second_order": {"teacher_update": {"meta_grad": "second_order", "every": 1}},
          "first_order_exact": {"teacher_update": {"meta_grad": "first_order_exact", "every": 1}},
          "first_order_exact (fd)": {"teacher_update": {"meta_grad": "first_order_exact", "every": 1,
                                                        "jvp": "finite_difference"}}}

METHODS = (
    Method(name="metadistil", teacher_update="metadistil", loss="kd",
           defaults={"loss": {"temperature": 5.0, "alpha": 0.5}}, paper=PAPER, version="1",
           description="Teacher meta-learns from the student's quiz loss after a pilot KD step.",
           bench=_BENCH),
    Method(name="metadistil-pkd", teacher_update="metadistil", loss="pkd",
           defaults={"loss": {"temperature": 5.0, "alpha": 0.5, "beta": 100.0, "layer_map": "skip"}},
           paper=PAPER, version="1",
           description="MetaDistil with the NLP code's PKD-skip term (β = 100) in the pilot and real steps."),
    Method(name="metadistil-adam", teacher_update="metadistil", loss="kd",
           defaults={"loss": {"temperature": 5.0, "alpha": 0.5}, "teacher_update": {"pilot": "adam"}},
           paper=PAPER, version="1",
           description="kdbench variant (not in the paper): MetaDistil whose pilot step is the student's "
                       "own Adam/AdamW step (its moments and lr) instead of plain SGD at λ."),
)


@kdbench.hookimpl
def kdbench_register_teacher_updates(register: kdbench.Registrar[type[TeacherUpdate]]) -> None:
    """Register the MetaDistil rule."""
    register(MetaDistil)


@kdbench.hookimpl
def kdbench_register_methods(register: kdbench.Registrar[Method]) -> None:
    """Register the MetaDistil methods."""
    for method in METHODS:
        register(method)
