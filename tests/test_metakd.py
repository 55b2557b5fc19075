"""Meta-KD: prototype scores, corrupted domains, expertise weights, meta-teacher prepare, loss."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

import kdbench
from kdbench import Batch, ModelOutput, NotApplicable, StepContext, Task
from kdbench.contract.spec import TrainConfig
from kdbench.contract.tensors import TensorSplit
from kdbench_builtins import metakd
from kdbench_builtins.models_text import TinyBert, TinyBertConfig

torch.set_num_threads(1)


class _Multi(Task):
    name = "test/multi"
    domains: ClassVar[tuple[str, ...]] = ("books", "dvd", "kitchen")


class _Single(Task):
    name = "test/single"


class _Reg(_Multi):
    name = "test/reg"
    num_labels = 1


def _model(layers: int, seed: int = 0) -> Any:
    return TinyBert(TinyBertConfig(layers=layers, hidden=32, vocab_size=150)).build(
        2, torch.Generator().manual_seed(seed))


def _split(name: str, n: int, seed: int, domains: int = 3, t: int = 10) -> TensorSplit:
    """Domain d uses tokens [10 + 40d, 50 + 40d); the label is whether token 5 appears; padded."""
    g = torch.Generator().manual_seed(seed)
    dom = torch.arange(n) % domains
    ids = 10 + 40 * dom[:, None] + torch.randint(0, 40, (n, t), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[:, 1] = torch.where(labels == 1, 5, 6)
    ids[:, 0] = 2  # [CLS]-like
    lens = torch.randint(4, t + 1, (n,), generator=g)
    lens[0] = t
    mask = (torch.arange(t)[None] < lens[:, None]).long()
    ids = ids * mask
    return TensorSplit(name, {"input_ids": ids, "attention_mask": mask, "labels": labels,
                              "index": torch.arange(n), "domain": dom}, ("input_ids", "attention_mask"))


def _ctx(loss_cfg: Any = None, *, resuming: bool = False, seed: int = 0) -> StepContext:
    teacher, student = _model(2, seed=1), _model(1, seed=2)
    task = _Multi(None)
    meta, train = _split("meta_train", 48, 0), _split("train", 12, 1, domains=1)
    loss = metakd.MetaKDLoss(loss_cfg or metakd.MetaKDLossConfig(), task=task, teacher=teacher, student=student)
    pretrained = _model(2, seed=3)
    return StepContext(
        teacher=teacher, student=student, loss=loss, student_opt=torch.optim.SGD(student.parameters(), 0.1),
        task=task, data=SimpleNamespace(splits={"train": train, "meta_train": meta}), quiz=None,
        generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"),
        train=TrainConfig(eval_batch_size=16),
        pretrained_teacher=lambda: copy.deepcopy(pretrained), resuming=resuming)


def _rule(**kw: Any) -> metakd.MetaKD:
    return metakd.MetaKD(metakd.MetaKDConfig(batch_size=8, lr=1e-3, **kw))


def test_expertise_weight_range() -> None:
    logits = torch.cat([torch.randn(64, 3) * 5, torch.tensor([[50.0, 0, 0], [-50.0, 0, 0]])])
    labels = torch.cat([torch.randint(0, 3, (64,)), torch.tensor([0, 0])])
    w = metakd.expertise_weight(logits, labels)
    assert w.shape == (66,)
    assert bool((w >= 1 / (1 + math.e) - 1e-6).all() and (w <= 0.5 + 1e-6).all())
    assert w[-2].item() == pytest.approx(0.5, abs=1e-5)  # p = 1
    assert w[-1].item() == pytest.approx(1 / (1 + math.e), abs=1e-5)  # p = 0


def test_prototype_scores_range_and_formula() -> None:
    h = torch.randn(30, 8)
    dom = torch.arange(30) % 3
    t = metakd.prototype_scores(h, dom, 3)
    assert t.shape == (30,) and bool((t >= -1).all() and (t <= 1).all())
    protos = torch.stack([h[dom == m].mean(0) for m in range(3)])
    i = 4  # domain 1
    cos = torch.nn.functional.cosine_similarity
    want = 0.5 * cos(h[i], protos[1], dim=0) + 0.5 * cos(h[i], (protos[0] + protos[2]) / 2, dim=0)
    assert t[i].item() == pytest.approx(want.item(), abs=1e-5)
    q = torch.randn(5, 8)  # scored against the same prototypes
    tq = metakd.prototype_scores(h, dom, 3, q, torch.full((5,), 2))
    assert tq[0].item() == pytest.approx((0.5 * cos(q[0], protos[2], dim=0)
                                          + 0.5 * cos(q[0], protos[:2].mean(0), dim=0)).item(), abs=1e-5)
    unknown = torch.cat([dom, torch.tensor([-1, -1])])  # e.g. an MNLI genre outside training
    tu = metakd.prototype_scores(torch.cat([h, torch.randn(2, 8) * 100]), unknown, 3)
    torch.testing.assert_close(tu[:30], t)  # -1 rows define no prototype
    assert tu[30:].abs().max().item() == 0.0  # and score 0
    with pytest.raises(NotApplicable, match="two domains"):
        metakd.prototype_scores(h, torch.zeros(30, dtype=torch.long), 3)


def test_corrupted_domains_are_a_permutation() -> None:
    dom = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 3, 3])
    g = torch.Generator().manual_seed(0)
    outs = [metakd.corrupt_domains(dom, g) for _ in range(5)]
    for out in outs:
        assert torch.equal(out.sort().values, dom.sort().values)
    assert any(not torch.equal(o, dom) for o in outs)
    again = metakd.corrupt_domains(dom, torch.Generator().manual_seed(0))
    assert torch.equal(again, outs[0])


def test_check_single_domain_and_regression() -> None:
    reason = metakd.MetaKD.check(_Single(None))
    assert reason == "meta-kd needs a multi-domain task; 'test/single' has one domain"
    assert metakd.MetaKDLoss.check(_Single(None)) == reason
    assert metakd.MetaKD.check(_Multi(None)) is None
    assert "classification" in (metakd.MetaKD.check(_Reg(None)) or "")


def test_masked_and_unmasked_pooling() -> None:
    h = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    masked = metakd.mean_pool(h, mask, "masked")
    unmasked = metakd.mean_pool(h, mask, "unmasked")
    torch.testing.assert_close(masked[0], h[0, 1:3].mean(0))  # [CLS] and padding excluded
    torch.testing.assert_close(unmasked[0], h[0, 1:].mean(0))  # padding included
    torch.testing.assert_close(masked[1], unmasked[1])  # no padding: identical
    assert not torch.allclose(masked[0], unmasked[0])
    # through the rule: the scores differ when the data is padded
    s = [_prepared(pooling=p, meta_epochs=0)[1].prototype_scores for p in ("masked", "unmasked")]
    assert s[0] is not None and s[1] is not None and not torch.allclose(s[0], s[1])


def _prepared(**kw: Any) -> tuple[StepContext, metakd.MetaKDLoss, dict[str, float]]:
    ctx = _ctx()
    metrics = _rule(**kw).prepare(ctx)
    assert isinstance(ctx.loss, metakd.MetaKDLoss)
    return ctx, ctx.loss, metrics


def test_prepare_trains_teacher_deterministically() -> None:
    ctx = _ctx()
    before = copy.deepcopy(ctx.teacher.state_dict())
    pre = ctx.pretrained_teacher().state_dict()
    rule = _rule(meta_epochs=2)
    metrics = rule.prepare(ctx)
    assert metrics["meta/steps"] == 12.0 and math.isfinite(metrics["meta/loss"])
    after = ctx.teacher.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in after)
    changed = [k for k in after if not torch.equal(after[k], pre[k])]
    assert any("encoder.layer" in k for k in changed)  # trained from the pre-trained weights
    assert not ctx.teacher.training
    loss = ctx.loss
    assert isinstance(loss, metakd.MetaKDLoss) and loss.prototype_scores is not None
    assert loss.prototype_scores.shape == (12,)  # indexed by Batch.index of the train split
    assert bool((loss.prototype_scores.abs() <= 1).all())
    ctx2 = _ctx()
    _rule(meta_epochs=2).prepare(ctx2)
    for k, v in ctx2.teacher.state_dict().items():
        torch.testing.assert_close(v, after[k], rtol=0, atol=0)
    # resume: the checkpointed teacher stays, the head comes from the rule's state
    ctx3 = _ctx(resuming=True)
    kept = copy.deepcopy(ctx3.teacher.state_dict())
    rule3 = _rule(meta_epochs=2)
    assert "meta/steps" not in rule3.prepare(ctx3)
    assert all(torch.equal(v, kept[k]) for k, v in ctx3.teacher.state_dict().items())
    rule3.load_state_dict(rule.state_dict())
    assert rule3.head is not None and rule.head is not None
    torch.testing.assert_close(rule3.head.content.weight, rule.head.content.weight)


def test_meta_teacher_is_shared_across_domain_cells(tmp_path: Any) -> None:
    """One meta-teacher per (start weights, meta split, options, seed): the second domain's cell
    loads what the first trained, bit-identical to training it again; another seed trains anew."""
    from kdbench.engine.artifacts import ArtifactStore

    store = ArtifactStore(tmp_path)
    alone = _ctx()
    want = _rule(meta_epochs=2).prepare(alone)
    cells = []
    for train_seed in (1, 7):  # two target domains: different train splits, one meta split
        ctx = _ctx()
        ctx.data.splits["train"] = _split("train", 12, train_seed, domains=1)
        ctx.artifacts = store
        rule = _rule(meta_epochs=2)
        cells.append((ctx, rule, rule.prepare(ctx)))
    assert [m["meta/cached"] for *_, m in cells] == [0.0, 1.0]
    assert cells[1][2]["meta/loss"] == want["meta/loss"] and len(list(tmp_path.glob("*.safetensors"))) == 1
    for ctx, rule, _ in cells:
        for k, v in ctx.teacher.state_dict().items():
            assert torch.equal(v, alone.teacher.state_dict()[k]), k
        assert torch.equal(ctx.generator.get_state(), alone.generator.get_state())
        assert rule.head is not None and torch.equal(rule.head.out.weight, cells[0][1].head.out.weight)  # type: ignore[union-attr]
    other = _ctx(seed=1)
    other.artifacts = store
    assert _rule(meta_epochs=2).prepare(other)["meta/cached"] == 0.0  # another seed: its own


def test_prepare_rejects_single_domain_task() -> None:
    ctx = _ctx()
    ctx.task = _Single(None)
    with pytest.raises(NotApplicable, match="one domain"):
        _rule().prepare(ctx)


def _outputs(ctx: StepContext, batch: Batch) -> tuple[ModelOutput, ModelOutput]:
    want = frozenset({"hidden", "attentions"})
    return ctx.student(batch.inputs, want=want), ctx.teacher(batch.inputs, want=want)


def _slice(out: ModelOutput, i: int) -> ModelOutput:
    return ModelOutput(out.logits[i:i + 1], tuple(h[i:i + 1] for h in out.hidden),
                       tuple(a[i:i + 1] for a in out.attentions))


def _one(batch: Batch, i: int) -> Batch:
    return Batch({k: v[i:i + 1] for k, v in batch.inputs.items()}, batch.labels[i:i + 1],
                 batch.index[i:i + 1], batch.domain[i:i + 1] if batch.domain is not None else None)


@pytest.mark.parametrize("mode", ["per_instance", "batch_scalar"])
def test_stage1_instance_weighting(mode: str) -> None:
    ctx, loss, _ = _prepared(meta_epochs=0)
    loss = metakd.MetaKDLoss(metakd.MetaKDLossConfig(instance_weights=mode), task=ctx.task,
                             teacher=ctx.teacher, student=ctx.student)
    assert ctx.loss.prototype_scores is not None
    loss.attach(ctx.loss.prototype_scores, ctx.loss._teacher_head[0])
    loss.begin_epoch(0, 4)
    assert loss.stage == 1
    ctx.student.eval()
    ctx.teacher.eval()
    batch = next(ctx.data.splits["train"].batches(6, order=torch.arange(12)))
    s_out, t_out = _outputs(ctx, batch)
    terms = loss(s_out, t_out, batch)
    assert set(terms) == {"hidden", "attention", "domain"}
    lam = loss.instance_weights(t_out, batch)
    want_lam = (1 + loss.prototype_scores[batch.index]) * metakd.expertise_weight(t_out.logits, batch.labels)
    torch.testing.assert_close(lam, want_lam)
    loss.prototype_scores = None  # unweighted per-example values
    ones = [loss(_slice(s_out, i), _slice(t_out, i), _one(batch, i)) for i in range(len(batch))]
    w = torch.stack([metakd.expertise_weight(t_out.logits[i:i + 1], batch.labels[i:i + 1])[0]
                     for i in range(len(batch))])
    for k in terms:
        x = torch.stack([o[k] for o in ones]) / w  # per-example term without its weight
        want = (x * lam).mean() if mode == "per_instance" else x.mean() * lam.mean()
        torch.testing.assert_close(terms[k], want, rtol=1e-4, atol=1e-7)
    sum(terms.values()).backward()
    assert loss.tinybert.proj.weight.grad is not None and loss.s_domain.content.weight.grad is not None


def test_stage2_soft_cross_entropy() -> None:
    ctx = _ctx()
    loss = ctx.loss
    assert isinstance(loss, metakd.MetaKDLoss)
    loss.begin_epoch(1, 2)
    assert loss.stage == 2
    logits_s, logits_t = torch.randn(4, 2), torch.randn(4, 2)
    batch = Batch({}, torch.tensor([0, 1, 1, 0]), torch.arange(4))
    terms = loss(ModelOutput(logits_s), ModelOutput(logits_t), batch)
    p_t = (logits_t / 2).softmax(-1)
    want = -(p_t * (logits_s / 2).log_softmax(-1)).sum(-1).mean()  # no T², no labels
    assert set(terms) == {"kd"}
    torch.testing.assert_close(terms["kd"], want)
    ce = metakd.MetaKDLoss(metakd.MetaKDLossConfig(stage2_ce=True), task=ctx.task, teacher=ctx.teacher,
                           student=ctx.student)
    ce.begin_epoch(0, 1)  # one epoch: stage 1 is empty
    assert set(ce(ModelOutput(logits_s), ModelOutput(logits_t), batch)) == {"kd", "ce"}


def test_loss_needs_divisible_depths() -> None:
    with pytest.raises(NotApplicable, match="multiple"):
        metakd.MetaKDLoss(metakd.MetaKDLossConfig(), task=_Multi(None), teacher=_model(3), student=_model(2))


def test_registers_rule_loss_and_method() -> None:
    got: list[Any] = []
    metakd.kdbench_register_teacher_updates(register=got.append)
    metakd.kdbench_register_losses(register=got.append)
    metakd.kdbench_register_methods(register=got.append)
    assert got[0] is metakd.MetaKD and got[0].changes_teacher
    assert got[1] is metakd.MetaKDLoss and got[1].needs == frozenset({"hidden", "attentions"})
    assert (got[2].name, got[2].teacher_update, got[2].loss) == ("meta-kd", "meta-kd", "meta-kd")


def test_meta_kd_runs_end_to_end(make_host: Any, run_tiny: Any) -> None:
    result = run_tiny(make_host(), "meta-kd", steps=6,
                      overrides=["teacher_update.meta-kd.batch_size=64", "train.epochs=2"])
    assert result["status"] == "ok", result.get("reason")
    assert result["extra"]["last_metrics"]["prepare/meta/steps"] > 0 and math.isfinite(result["extra"]["last_metrics"]["prepare/meta/loss"])
    teacher_scores = {k: v for k, v in result["extra"]["last_metrics"].items() if k.startswith("prepare/meta/teacher_")}
    assert teacher_scores and all(0.0 <= v <= 1.0 for v in teacher_scores.values())  # the meta-teacher's own dev score
    # 2 epochs, capped at 6 steps: all in stage 1 (weighted hidden/attention/domain terms)
    assert {"loss/hidden", "loss/attention", "loss/domain"} <= set(result["extra"]["last_metrics"]) and "loss/kd" not in result["extra"]["last_metrics"]
    assert result["extra"]["last_metrics"]["prepare/meta/cached"] == 0.0
    # another target domain: same meta split, start weights and seed -> the meta-teacher is loaded
    other = run_tiny(make_host(), "meta-kd", steps=6, overrides=[
        "teacher_update.meta-kd.batch_size=64", "train.epochs=2", "task.toy/reviews.domain=electronics"])
    assert other["run_id"] != result["run_id"] and other["extra"]["last_metrics"]["prepare/meta/cached"] == 1.0
    assert other["extra"]["last_metrics"]["prepare/meta/loss"] == result["extra"]["last_metrics"]["prepare/meta/loss"]


def test_stage_schedule_restarts_lr_and_is_unchanged_without_stages() -> None:
    from kdbench.engine.training import make_scheduler

    cfg = TrainConfig(warmup=0.1, lr=1.0)

    def curve(stages: tuple[int, ...]) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_scheduler(opt, cfg, steps_per_epoch=10, total=40, stages=stages)
        return [sched.lr_lambdas[0](i) for i in range(40)]

    one = curve(())
    warm = int(0.1 * 40)  # the pre-stages formula: warmup over 4 steps, then linear decay to 0
    assert one == [(i + 1) / warm if i < warm else (40 - i) / (40 - warm) for i in range(40)]
    two = curve((2,))
    assert two[:20] == [(i + 1) / 2 if i < 2 else (20 - i) / 18 for i in range(20)]
    assert two[20:] == two[:20]  # stage 2 (epochs 2-3) repeats stage 1's warmup and decay
    assert curve((0, 4, 9)) == one  # boundaries at the start or past the end change nothing


@pytest.mark.parametrize("schedule,want", [("restart", (2,)), ("continuous", ())])
def test_meta_kd_stage2_is_a_fresh_run(schedule: str, want: tuple[int, ...]) -> None:
    def loss(**kw: Any) -> metakd.MetaKDLoss:
        return metakd.MetaKDLoss(metakd.MetaKDLossConfig(**kw), task=_Multi(None), teacher=_model(2),
                                 student=_model(1))

    assert loss(stage1_epochs=2, stage_schedule=schedule).stages(4) == want
    assert loss(stage1_epochs=4).stages(4) == ()  # no stage 2: nothing to restart
    assert loss().stages(3) == (1,)  # default: half the epochs (rounded down) in stage 1
    problems: list[str] = []  # a typo is a plan-time error (kdbench run never builds the loss)
    kdbench.build_config(metakd.MetaKDLossConfig, [{"stage_schedule": "cosine"}], "[loss.meta-kd]", problems)
    assert problems == ["[loss.meta-kd]: stage_schedule = 'cosine' is not allowed; use one of 'restart', "
                        "'continuous'."]
