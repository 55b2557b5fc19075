"""Anchored teacher: a third-party kdbench teacher-update rule (the README's 5-minute example).

Every ``every`` student steps the teacher takes one SGD step on a held-out quiz batch:
cross-entropy plus ``mu/2 * ||theta_T - theta_T0||^2``, which keeps it close to the fine-tuned
teacher it started from. The rule is an illustration of the plugin API, not a published method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kdbench


@dataclass(frozen=True, slots=True)
class AnchoredConfig:
    """Options (override with teacher_update.anchored.<key>=... on the command line)."""

    lr: float = 1e-3  # teacher SGD learning rate
    mu: float = 1.0  # weight of the anchor to the starting weights
    every: int = 4  # teacher step every N student steps


class AnchoredTeacher(kdbench.TeacherUpdate):
    """Quiz-batch CE steps on the teacher, anchored to its starting weights."""

    name = "anchored"
    version = "1"
    Config = AnchoredConfig
    changes_teacher = True  # the runner stops caching teacher outputs and checkpoints the teacher
    needs_quiz = True  # the runner provides ctx.quiz

    def prepare(self, ctx: kdbench.StepContext) -> dict[str, float]:
        """Remember where the teacher starts; build its optimizer."""
        params = [p for p in ctx.teacher.parameters() if p.requires_grad]
        self.anchor = [p.detach().clone() for p in params]
        self.opt = torch.optim.SGD(params, lr=self.cfg.lr)
        return {}

    def step(self, ctx: kdbench.StepContext) -> dict[str, float]:
        """One anchored CE step on a quiz batch every ``every`` student steps."""
        if ctx.step % self.cfg.every:
            return {}
        batch = ctx.quiz.next()
        logits = ctx.teacher_forward(batch.inputs, grad=True).logits  # (B, C)
        if ctx.task.is_regression:
            ce = F.mse_loss(logits[:, 0].float(), batch.labels.float())
        else:
            ce = F.cross_entropy(logits.float(), batch.labels)
        params = [p for p in ctx.teacher.parameters() if p.requires_grad]
        drift = sum(((p - a) ** 2).sum() for p, a in zip(params, self.anchor, strict=True))
        self.opt.zero_grad(set_to_none=True)
        (ce + 0.5 * self.cfg.mu * drift).backward()
        self.opt.step()
        return {"teacher/quiz_ce": float(ce.detach()), "teacher/drift": float(drift.detach())}

    def state_dict(self) -> dict[str, object]:
        """Optimizer state and anchor, for resumable checkpoints."""
        return {"opt": self.opt.state_dict(), "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore after prepare() on resume."""
        self.opt.load_state_dict(state["opt"])  # type: ignore[arg-type]
        self.anchor = list(state["anchor"])  # type: ignore[call-overload]


@kdbench.hookimpl
def kdbench_register_teacher_updates(register: kdbench.Registrar) -> None:
    """Make the rule selectable by name."""
    register(AnchoredTeacher)


@kdbench.hookimpl
def kdbench_register_methods(register: kdbench.Registrar) -> None:
    """A method = rule + loss (+ defaults); leaderboards rank methods."""
    register(kdbench.Method("anchored-kd", teacher_update="anchored", loss="kd",
                            paper="kdbench example plugin (not published)", version="1"))
