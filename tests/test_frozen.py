"""The frozen rule and the frozen-teacher methods (kd, pkd-skip, pkd-last, no-kd)."""

from __future__ import annotations

import copy
import dataclasses

import torch

from kdbench.contract.rules import Method, StepContext, TeacherUpdate
from kdbench.contract.types import Batch, NoConfig, Task, config_fields
from kdbench_builtins import frozen
from kdbench_builtins.frozen import Frozen
from kdbench_builtins.losses import CrossEntropy, HintonKD, KDConfig, PatientKD, PKDConfig, pkd_layer_map
from kdbench_builtins.models_text import TinyBert, TinyBertConfig

torch.set_num_threads(1)


class Text3(Task):
    name = "toy/text3"
    num_labels = 3


def _batch(g: torch.Generator) -> Batch:
    ids = torch.randint(1, 1000, (4, 8), generator=g)
    return Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randint(0, 3, (4,), generator=g),
                 torch.arange(4))


def test_frozen_rule_leaves_teacher_bit_identical_while_student_trains() -> None:
    g = torch.Generator().manual_seed(0)
    task = Text3(NoConfig())
    teacher = TinyBert(TinyBertConfig(layers=2)).build(3, g)
    student = TinyBert(TinyBertConfig(layers=2)).build(3, g)
    loss = PatientKD(PKDConfig(layer_map="last"), task=task, teacher=teacher, student=student)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    ctx = StepContext(teacher=teacher, student=student, loss=loss, student_opt=opt, task=task, data=None,  # type: ignore[arg-type]
                      quiz=None, generator=torch.Generator().manual_seed(1), device=torch.device("cpu"),
                      train=None, want=loss.needs)
    rule = Frozen(NoConfig())
    assert rule.prepare(ctx) == {}
    t0 = copy.deepcopy(teacher.state_dict())
    s0 = copy.deepcopy(student.state_dict())
    for step in range(3):
        ctx.batch, ctx.step = _batch(g), step
        assert rule.step(ctx) == {}
        student.train()
        t_out = ctx.teacher_forward(ctx.batch.inputs)
        terms = loss(student(ctx.batch.inputs, want=ctx.want), t_out, ctx.batch)
        assert set(terms) == {"ce", "kd", "patient"}
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
    assert all(torch.equal(t0[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(s0[k], v) for k, v in student.state_dict().items())  # the student did train
    assert all(p.grad is None for p in teacher.parameters())
    assert rule.state_dict() == {}
    rule.load_state_dict({})


def test_frozen_is_the_base_rule_unchanged() -> None:
    assert Frozen.name == "frozen" and not Frozen.changes_teacher and not Frozen.needs_quiz
    for attr in ("prepare", "step", "state_dict", "load_state_dict", "check"):
        assert attr not in vars(Frozen), attr
    assert issubclass(Frozen, TeacherUpdate)


def test_frozen_methods_registered_with_valid_defaults() -> None:
    rules: list[type] = []
    methods: list[Method] = []
    frozen.kdbench_register_teacher_updates(register=rules.append)
    frozen.kdbench_register_methods(register=methods.append)
    assert rules == [Frozen]
    by_name = {m.name: m for m in methods}
    assert set(by_name) == {"kd", "pkd-skip", "pkd-last", "no-kd"}
    assert {m.teacher_update for m in methods} == {"frozen"}
    assert (by_name["kd"].loss, by_name["pkd-skip"].loss, by_name["pkd-last"].loss, by_name["no-kd"].loss) == (
        "kd", "pkd", "pkd", "ce")
    assert "Hinton" in by_name["kd"].paper and "EMNLP 2019" in by_name["pkd-skip"].paper
    loss_cfg = {"kd": KDConfig, "pkd": PKDConfig, "ce": NoConfig}
    for m in methods:
        assert set(m.defaults) <= {"loss", "teacher_update", "train"} and m.version
        cfg_cls = loss_cfg[m.loss]
        assert set(m.defaults.get("loss", {})) <= set(config_fields(cfg_cls))
        cfg_cls(**m.defaults.get("loss", {}))
    skip = PKDConfig(**by_name["pkd-skip"].defaults["loss"])
    last = PKDConfig(**by_name["pkd-last"].defaults["loss"])
    # PKD's predefined PKD-skip run (get_predefine_argv)
    assert (skip.alpha, skip.beta, skip.temperature, skip.normalize) == (0.7, 500.0, 10.0, True)
    assert dataclasses.replace(skip, layer_map="last") == last
    assert [i for _, i in pkd_layer_map(12, 6, skip.layer_map)] == [2, 4, 6, 8, 10]
    assert [i for _, i in pkd_layer_map(12, 6, last.layer_map)] == [7, 8, 9, 10, 11]


def test_no_kd_method_trains_on_labels_only() -> None:
    g = torch.Generator().manual_seed(0)
    task = Text3(NoConfig())
    student = TinyBert(TinyBertConfig(layers=1)).build(3, g)
    loss = CrossEntropy(NoConfig(), task=task, teacher=None, student=student)
    b = _batch(g)
    student.eval()
    out = student(b.inputs)
    terms = loss(out, None, b)
    assert set(terms) == {"ce"} and not CrossEntropy.uses_teacher
    torch.testing.assert_close(terms["ce"], torch.nn.functional.cross_entropy(out.logits, b.labels))
    kd = HintonKD(KDConfig(alpha=0.0), task=task, teacher=student, student=student)
    assert kd(out, out, b)["kd"].item() == 0.0
