"""Minimal fake components for host tests (config, plan, registry, CLI)."""

from __future__ import annotations

from dataclasses import dataclass

import kdbench


@dataclass(frozen=True, slots=True)
class FakeTaskConfig(kdbench.TextDataOptions):
    max_seq_length: int = 16


class FakeText(kdbench.Task):
    name = "fake/text"
    Config = FakeTaskConfig


class FakeVision(kdbench.Task):
    name = "fake/vision"
    modality = "vision"
    Config = FakeTaskConfig


class FakeMulti(kdbench.Task):
    name = "fake/multi"
    domains = ("a", "b")
    Config = FakeTaskConfig


@dataclass(frozen=True, slots=True)
class FakeModelConfig:
    layers: int = 2


class FakeBert(kdbench.ModelKind):
    name = "fake-bert"
    Config = FakeModelConfig


class FakeCnn(kdbench.ModelKind):
    name = "fake-cnn"
    modality = "vision"


class SameKind(kdbench.StudentKind):
    name = "same"
    Config = FakeModelConfig


@dataclass(frozen=True, slots=True)
class FakeLossConfig:
    temperature: float = 4.0
    alpha: float = 0.5


class FakeKD(kdbench.DistillLoss):
    name = "fake-kd"
    Config = FakeLossConfig


class FakeCE(kdbench.DistillLoss):
    name = "ce"
    uses_teacher = False


class TextOnly(kdbench.DistillLoss):
    name = "text-only"

    @classmethod
    def check(cls, task):
        return "text-only needs text" if task.modality != "text" else None


@dataclass(frozen=True, slots=True)
class QuizConfig:
    lr: float = 0.1


class QuizRule(kdbench.TeacherUpdate):
    name = "quizzy"
    Config = QuizConfig
    needs_quiz = True
    changes_teacher = True


class Frozen(kdbench.TeacherUpdate):
    name = "frozen"


@kdbench.hookimpl
def kdbench_register_tasks(register):
    for cls in (FakeText, FakeVision, FakeMulti):
        register(cls)


@kdbench.hookimpl
def kdbench_register_models(register):
    register(FakeBert)
    register(FakeCnn)


@kdbench.hookimpl
def kdbench_register_students(register):
    register(SameKind)


@kdbench.hookimpl
def kdbench_register_losses(register):
    for cls in (FakeKD, FakeCE, TextOnly):
        register(cls)


@kdbench.hookimpl
def kdbench_register_teacher_updates(register):
    register(QuizRule)
    register(Frozen)


@kdbench.hookimpl
def kdbench_register_methods(register):
    register(kdbench.Method("fkd", "frozen", "fake-kd", defaults={"loss": {"temperature": 2.0}}))
    register(kdbench.Method("quiz-kd", "quizzy", "fake-kd"))
    register(kdbench.Method("text-kd", "frozen", "text-only"))
    register(kdbench.Method("no-kd", "frozen", "ce", role="student-only"))
