"""ReptileDistil teacher update: parameter mapping, closed-form update, student untouched."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench import Batch, ConfigError, DistillLoss, ModelOutput, NotApplicable, StepContext, Task
from kdbench.contract.spec import TrainConfig
from kdbench_builtins import reptile
from kdbench_builtins.models_text import TinyBert, TinyBertConfig

torch.set_num_threads(1)
LAYER = "model.bert.encoder.layer."


class _KD(DistillLoss):
    """(1−α)·CE + α·T²·KL_batchmean, the loss ReptileDistil's inner step uses."""

    name = "test-kd"

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, Tensor]:  # type: ignore[override]
        assert teacher is not None
        t = 5.0
        kl = F.kl_div(F.log_softmax(student.logits / t, -1), F.softmax(teacher.logits / t, -1),
                      reduction="batchmean")
        return {"ce": 0.5 * F.cross_entropy(student.logits, batch.labels), "kd": 0.5 * t * t * kl}


def _model(layers: int, hidden: int = 32, seed: int = 0) -> Any:
    return TinyBert(TinyBertConfig(layers=layers, hidden=hidden, vocab_size=150)).build(
        2, torch.Generator().manual_seed(seed))


def _batch(n: int = 4, t: int = 6) -> Batch:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, 4:] = 0
    inputs = {"input_ids": torch.randint(1, 150, (n, t), generator=g), "attention_mask": mask}
    return Batch(inputs, torch.tensor([0, 1, 1, 0])[:n], torch.arange(n))


def _ctx(teacher: Any, student: Any, lr: float = 1e-3) -> StepContext:
    student.eval()  # no dropout, so the reference gradient below is reproducible
    teacher.eval()
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    return StepContext(teacher=teacher, student=student, loss=_KD(None, task=Task(None), teacher=teacher,
                       student=student), student_opt=opt, task=Task(None), data=None, quiz=None,
                       generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                       train=TrainConfig(lr=lr), total_steps=10, batch=_batch())


def _student_grads(ctx: StepContext) -> dict[str, Tensor]:
    """∇L of the real student on ctx.batch, computed independently of the rule."""
    s = copy.deepcopy(ctx.student)
    with torch.no_grad():
        t_out = ctx.teacher(ctx.batch.inputs)
    sum(ctx.loss(s(ctx.batch.inputs), t_out, ctx.batch).values()).backward()
    return {n: p.grad.clone() for n, p in s.named_parameters()}


def _rule(**kw: Any) -> reptile.Reptile:
    kw.setdefault("inner_dropout", False)  # the tests' students run in eval mode
    kw.setdefault("mapping", "skip")  # the tests' students are built whole, not picked
    return reptile.Reptile(reptile.ReptileConfig(**kw))


@pytest.mark.parametrize(("n_s", "n_t", "strategy", "expected"), [
    (2, 4, "first", {0: (0,), 1: (1,)}),
    (2, 4, "last", {0: (2,), 1: (3,)}),
    (2, 4, "skip", {0: (1,), 1: (3,)}),
    (2, 4, "both", {0: (0, 1), 1: (2, 3)}),
    (6, 12, "skip", {i: (2 * i + 1,) for i in range(6)}),
    (6, 12, "last", {i: (i + 6,) for i in range(6)}),
    (6, 12, "both", {i: (2 * i, 2 * i + 1) for i in range(6)}),
    (3, 12, "skip", {0: (3,), 1: (7,), 2: (11,)}),
])
def test_layer_map(n_s: int, n_t: int, strategy: str, expected: dict[int, tuple[int, ...]]) -> None:
    assert reptile.layer_map(strategy, n_s, n_t) == expected


def test_layer_map_rejects_bad_depths() -> None:
    with pytest.raises(NotApplicable, match="twice as deep"):
        reptile.layer_map("both", 2, 3)
    with pytest.raises(NotApplicable, match="4 layers, teacher only 2"):
        reptile.layer_map("first", 4, 2)


@pytest.mark.parametrize("strategy", ["first", "last", "skip", "both"])
@pytest.mark.parametrize(("n_s", "n_t"), [(2, 4), (3, 6)])
def test_parameter_pairs_on_models(strategy: str, n_s: int, n_t: int) -> None:
    student, teacher = _model(n_s), _model(n_t, seed=1)
    pairs = reptile.parameter_pairs(student, teacher, strategy)
    layer_pairs = {(int(s[len(LAYER):].split(".")[0]), int(t[len(LAYER):].split(".")[0]))
                   for s, t in pairs if s.startswith(LAYER)}
    want = {(i, j) for i, js in reptile.layer_map(strategy, n_s, n_t).items() for j in js}
    assert layer_pairs == want
    others = [(s, t) for s, t in pairs if not s.startswith(LAYER)]
    assert others and all(s == t for s, t in others)
    assert {s for s, _ in others} >= {"model.classifier.weight", "model.bert.pooler.dense.weight",
                                      "model.bert.embeddings.word_embeddings.weight"}
    for s, t in pairs:  # same suffix inside the layer
        assert s.split(".", 5)[-1] == t.split(".", 5)[-1]


def test_shape_mismatch_is_not_applicable() -> None:
    with pytest.raises(NotApplicable) as err:
        reptile.parameter_pairs(_model(2, hidden=16), _model(4, seed=1), "skip")
    msg = str(err.value)
    assert "model.bert.embeddings.word_embeddings.weight" in msg  # the first mismatching pair
    assert "(150, 16)" in msg and "(150, 32)" in msg and "Hint" in msg
    ctx = _ctx(_model(4), _model(2, hidden=16))
    with pytest.raises(NotApplicable, match="mismatched shapes"):
        _rule().prepare(ctx)


@pytest.mark.parametrize("strategy", ["skip", "both", "last"])
def test_sgd_closed_form(strategy: str) -> None:
    """θ_T' = θ_T − μ(θ_T − (θ_S − η∇L)) on mapped tensors, the rest unchanged."""
    mu, eta = 0.3, 0.05
    ctx = _ctx(_model(4, seed=1), _model(2))
    rule = _rule(mapping=strategy, inner_optimizer="sgd", inner_lr=eta, teacher_optimizer="sgd",
                 teacher_lr=mu, max_grad_norm=0.0, inner_max_grad_norm=0.0)
    rule.prepare(ctx)
    g = _student_grads(ctx)
    s0 = {n: p.detach().clone() for n, p in ctx.student.named_parameters()}
    t0 = {n: p.detach().clone() for n, p in ctx.teacher.named_parameters()}
    metrics = rule.step(ctx)
    assert float(metrics["teacher/pseudo_grad_norm"]) > 0
    t1 = dict(ctx.teacher.named_parameters())
    pairs = reptile.parameter_pairs(ctx.student, ctx.teacher, strategy)
    mapped = {t for _, t in pairs}
    for s, t in pairs:
        want = t0[t] - mu * (t0[t] - (s0[s] - eta * g[s]))
        torch.testing.assert_close(t1[t].detach(), want, rtol=1e-5, atol=1e-6)
    for n, p in t1.items():
        if n not in mapped:
            torch.testing.assert_close(p.detach(), t0[n], rtol=0, atol=0)
    assert len(mapped) < len(t1) or strategy == "both"


def test_pseudo_grad_sums_when_several_students_map_to_one_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    mu, eta = 0.1, 0.05
    ctx = _ctx(_model(4, seed=1), _model(2))
    base = reptile.parameter_pairs(ctx.student, ctx.teacher, "first")
    # both student layers pull teacher layer 0; everything else one-to-one
    pairs = [(s, t.replace(f"{LAYER}1.", f"{LAYER}0.")) for s, t in base]
    monkeypatch.setattr(reptile, "parameter_pairs", lambda *a: pairs)
    rule = _rule(inner_optimizer="sgd", inner_lr=eta, teacher_optimizer="sgd", teacher_lr=mu,
                 max_grad_norm=0.0, inner_max_grad_norm=0.0)
    rule.prepare(ctx)
    g = _student_grads(ctx)
    s0 = {n: p.detach().clone() for n, p in ctx.student.named_parameters()}
    t0 = {n: p.detach().clone() for n, p in ctx.teacher.named_parameters()}
    rule.step(ctx)
    name = "attention.output.dense.weight"
    t_name, s_names = f"{LAYER}0.{name}", [f"{LAYER}0.{name}", f"{LAYER}1.{name}"]
    pseudo = sum(t0[t_name] - (s0[s] - eta * g[s]) for s in s_names)
    got = dict(ctx.teacher.named_parameters())[t_name].detach()
    torch.testing.assert_close(got, t0[t_name] - mu * pseudo, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dict(ctx.teacher.named_parameters())[f"{LAYER}1.{name}"].detach(),
                               t0[f"{LAYER}1.{name}"], rtol=0, atol=0)


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_fresh_adamw_matches_torch_adamw(inner_steps: int) -> None:
    """The fast update equals k steps of a fresh torch.optim.AdamW (wd grouping, clip 1.0)."""
    mu, lr, wd = 0.5, 1e-3, 0.01
    ctx = _ctx(_model(4, seed=1), _model(2), lr=lr)
    ctx.train = dataclasses.replace(ctx.train, weight_decay=wd)
    rule = _rule(mapping="first", inner_steps=inner_steps, teacher_optimizer="sgd", teacher_lr=mu,
                 max_grad_norm=0.0)
    rule.prepare(ctx)
    copy_ = copy.deepcopy(ctx.student)
    named = list(copy_.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if not reptile._no_decay(n)], "weight_decay": wd},
                             {"params": [p for n, p in named if reptile._no_decay(n)], "weight_decay": 0.0}],
                            lr=lr, eps=1e-8)
    with torch.no_grad():
        t_out = ctx.teacher(ctx.batch.inputs)
    for _ in range(inner_steps):
        opt.zero_grad()
        sum(ctx.loss(copy_(ctx.batch.inputs), t_out, ctx.batch).values()).backward()
        torch.nn.utils.clip_grad_norm_(copy_.parameters(), 1.0)
        opt.step()
    t0 = {n: p.detach().clone() for n, p in ctx.teacher.named_parameters()}
    rule.step(ctx)
    fast = dict(copy_.named_parameters())
    t1 = dict(ctx.teacher.named_parameters())
    for s, t in reptile.parameter_pairs(ctx.student, ctx.teacher, "first"):
        want = t0[t] - mu * (t0[t] - fast[s].detach())
        torch.testing.assert_close(t1[t].detach(), want, rtol=1e-5, atol=1e-6)


def test_micro_batches_give_the_same_update() -> None:
    results = []
    for micro in (0, 1):
        ctx = _ctx(_model(4, seed=1), _model(2))
        ctx.train = dataclasses.replace(ctx.train, micro_batch_size=micro)
        rule = _rule(inner_optimizer="sgd", inner_lr=0.05, teacher_optimizer="sgd", teacher_lr=0.3)
        rule.prepare(ctx)
        rule.step(ctx)
        results.append({k: v.clone() for k, v in ctx.teacher.state_dict().items()})
    for k, v in results[0].items():
        torch.testing.assert_close(results[1][k], v, rtol=1e-5, atol=1e-6)


def test_student_untouched_and_no_deepcopy(monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _ctx(_model(4, seed=1), _model(2))
    ctx.student.train()
    rule = _rule(inner_dropout=True)
    rule.prepare(ctx)
    # give the student optimizer some state
    sum(ctx.loss(ctx.student(ctx.batch.inputs), ctx.teacher(ctx.batch.inputs), ctx.batch).values()).backward()
    ctx.student_opt.step()
    ctx.student_opt.zero_grad(set_to_none=True)
    before = copy.deepcopy(ctx.student.state_dict())
    opt_before = copy.deepcopy(ctx.student_opt.state_dict())
    t_before = copy.deepcopy(ctx.teacher.state_dict())

    def _no_deepcopy(*a: Any, **k: Any) -> Any:
        raise AssertionError("deepcopy during step")

    monkeypatch.setattr(copy, "deepcopy", _no_deepcopy)
    for _ in range(2):
        rule.step(ctx)
    monkeypatch.undo()
    assert ctx.student.training
    for k, v in ctx.student.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(p.grad is None for p in ctx.student.parameters())
    after = ctx.student_opt.state_dict()
    for k, st in opt_before["state"].items():
        for name, val in st.items():
            torch.testing.assert_close(after["state"][k][name], val, rtol=0, atol=0)
    changed = [k for k, v in ctx.teacher.state_dict().items() if not torch.equal(v, t_before[k])]
    assert changed and any(".layer.1." in k for k in changed)
    assert not any(".layer.0." in k for k in changed)  # skip: teacher layer 0 is never pulled


def test_state_dict_roundtrip() -> None:
    ctx = _ctx(_model(4, seed=1), _model(2))
    rule = _rule()
    rule.prepare(ctx)
    rule.step(ctx)
    state = rule.state_dict()
    other = _rule()
    other.load_state_dict(copy.deepcopy(state))  # before prepare: applied in prepare
    other.prepare(ctx)
    assert other.sched is not None and other.sched.last_epoch == 1
    got = other.state_dict()["opt"]["state"]
    for k, st in state["opt"]["state"].items():
        torch.testing.assert_close(got[k]["exp_avg"], st["exp_avg"])


def test_registers_rule_and_method() -> None:
    names: list[Any] = []
    reptile.kdbench_register_teacher_updates(register=names.append)
    reptile.kdbench_register_methods(register=names.append)
    assert names[0] is reptile.Reptile and names[0].changes_teacher and not names[0].needs_quiz
    method = names[1]
    assert (method.name, method.teacher_update, method.loss) == ("reptile-distil", "reptile", "kd")
    assert method.defaults["loss"] == {"alpha": 0.5, "temperature": 5.0}


def test_reptile_distil_runs_end_to_end(make_host: Any, run_tiny: Any) -> None:
    result = run_tiny(make_host(), "reptile-distil", steps=6)
    assert result["status"] == "ok", result.get("reason")
    assert result["config"]["teacher_update"]["mapping"] == "auto"
    last = result["extra"]["last_metrics"]
    assert last["prepare/teacher/layer_map_picked"] == 1.0  # "auto" on a pick-layers student
    assert last["prepare/teacher/layer_map/s0/0"] == 1.0  # the tiny suite's student: pick = "last" of 2
    assert result["extra"]["last_metrics"].get("teacher/pseudo_grad_norm", 0.0) > 0
    assert result["extra"]["last_metrics"]["prepare/teacher/mapped_tensors"] > 0


def test_picked_map_pairs_each_layer_with_its_source() -> None:
    assert reptile.layer_map("picked", 3, 6, (0, 1, 2)) == {0: (0,), 1: (1,), 2: (2,)}
    assert reptile.layer_map("picked", 2, 6, [2, 5]) == reptile.layer_map("skip", 2, 6)
    assert reptile.layer_map("auto", 2, 6, (0, 1)) == {0: (0,), 1: (1,)}
    assert reptile.layer_map("auto", 2, 6) == reptile.layer_map("skip", 2, 6)  # whole students
    with pytest.raises(ConfigError, match='mapping = "picked" needs a student'):
        reptile.layer_map("picked", 2, 4)
    with pytest.raises(NotApplicable, match="do not fit"):
        reptile.layer_map("picked", 2, 4, (1, 4))


def test_picked_map_follows_a_pick_layers_student() -> None:
    from kdbench_builtins.students import PickLayers, PickLayersConfig

    teacher_kind = TinyBert(TinyBertConfig(layers=4, vocab_size=150))
    student = PickLayers(PickLayersConfig(layers=2, pick="first")).build(
        teacher_kind, 2, torch.Generator().manual_seed(0))
    assert student.picked_layers == (0, 1)
    pairs = reptile.parameter_pairs(student, _model(4, seed=1), "picked")
    layers = {(int(s[len(LAYER)]), int(t[len(LAYER)])) for s, t in pairs if s.startswith(LAYER)}
    assert layers == {(0, 0), (1, 1)}  # "first"-picked students pull the layers they came from


def test_picked_map_is_rejected_at_plan_time_for_whole_students(tmp_path: Any, make_host: Any) -> None:
    from kdbench.engine.config import load_suite
    from kdbench.engine.plan import expand
    from kdbench.testing import tiny_suite

    host = make_host()
    path = tiny_suite(tmp_path / "s.toml", "reptile-distil")
    text = path.read_text().replace('kind = "pick-layers"\nlayers = 1\npick = "last"',
                                    'kind = "model"\nmodel = "tiny-bert"\noptions = { layers = 1, hidden = 32 }')
    path.write_text(text)
    with pytest.raises(ConfigError, match='mapping = "picked" needs a pick-layers student'):
        expand(load_suite(str(path), ["teacher_update.reptile.mapping=picked"]), host)
    assert expand(load_suite(str(path)), host)  # "auto": the reference's skip map
