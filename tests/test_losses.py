"""Golden tests of the built-in losses: expected values are computed by hand (or with plain torch
formulas written out here), never by calling the loss under test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.contract.errors import ConfigError, NotApplicable
from kdbench.contract.types import Batch, KDModel, ModelOutput, NoConfig, Task
from kdbench_builtins import losses
from kdbench_builtins.losses import (
    CrossEntropy,
    HintonKD,
    KDConfig,
    PatientKD,
    PKDConfig,
    TinyBertLoss,
    TinyBertLossConfig,
    pkd_layer_map,
    soft_loss,
)

torch.set_num_threads(1)


class Cls3(Task):
    name = "toy/cls3"
    num_labels = 3


class Cls2(Task):
    name = "toy/cls2"
    num_labels = 2


class Reg(Task):
    name = "toy/reg"
    num_labels = 1


class Vision(Task):
    name = "toy/vision"
    modality = "vision"
    num_labels = 10


class Stub(KDModel):
    """Only the shape facts a loss reads at construction."""

    def __init__(self, layers: int, hidden: int) -> None:
        super().__init__()
        self._layers, self._hidden = layers, hidden

    @property
    def num_layers(self) -> int:
        return self._layers

    @property
    def hidden_size(self) -> int:
        return self._hidden


def _batch(labels: torch.Tensor) -> Batch:
    return Batch(inputs={}, labels=labels, index=torch.arange(labels.shape[0]))


def _kd(task: Task, **kw: object) -> HintonKD:
    return HintonKD(KDConfig(**kw), task=task(NoConfig()), teacher=Stub(2, 8), student=Stub(1, 8))  # type: ignore[arg-type,operator]


# ---- Hinton KD, hand-computed ----------------------------------------------------------------
# z_s = [0, 0] -> p_s = [1/2, 1/2]; z_t = [2 ln 3, 0] at T = 2 -> p_t = [3/4, 1/4]; label 0.
ZS = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
ZT = torch.tensor([[2 * math.log(3.0), 0.0]], dtype=torch.float64)
KL = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(p_t || p_s) = 0.1308...


def test_kd_canonical_golden() -> None:
    loss = _kd(Cls2, temperature=2.0, alpha=0.3)
    out = loss(ModelOutput(ZS), ModelOutput(ZT), _batch(torch.tensor([0])))
    assert set(out) == {"ce", "kd"}
    assert out["kd"].item() == pytest.approx(0.3 * 4.0 * KL, rel=1e-12)
    assert out["ce"].item() == pytest.approx(0.7 * math.log(2.0), rel=1e-12)
    assert KL == pytest.approx(0.1308120, abs=1e-7)


@pytest.mark.parametrize(("kind", "reduction", "expected"), [
    ("kl", "batchmean", 4.0 * KL),
    ("kl", "elementwise_mean", 4.0 * KL / 2),
    ("prob_mse", "batchmean", 4.0 * (0.25**2 + 0.25**2)),  # T² Σ_c (p_t − p_s)²
    ("prob_mse", "elementwise_mean", 4.0 * 0.25**2),  # MetaDistil NLP: mean over B×C
    ("logit_mse", "elementwise_mean", (2 * math.log(3.0)) ** 2 / 2),  # no T²
    ("soft_ce", "batchmean", math.log(2.0)),  # −Σ p_t log p_s, no T²
])
def test_soft_loss_variants_golden(kind: str, reduction: str, expected: float) -> None:
    got = soft_loss(ZS, ZT, 2.0, kind, reduction)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_kl_batchmean_equals_elementwise_mean_times_c() -> None:
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    labels = torch.randint(0, 7, (5,), generator=g)
    t = 3.0
    ps, pt = torch.softmax(zs / t, -1), torch.softmax(zt / t, -1)
    by_hand = t * t * (pt * (pt.log() - ps.log())).sum(-1).mean()  # T² · (1/B) Σ_b KL_b
    task = type("Cls7", (Task,), {"name": "toy/c7", "num_labels": 7})(NoConfig())
    cfg = dict(temperature=t, alpha=1.0)
    bm = HintonKD(KDConfig(**cfg), task=task, teacher=Stub(2, 8), student=Stub(1, 8))
    em = HintonKD(KDConfig(**cfg, reduction="elementwise_mean"), task=task, teacher=Stub(2, 8), student=Stub(1, 8))
    kd_bm = bm(ModelOutput(zs), ModelOutput(zt), _batch(labels))["kd"]
    kd_em = em(ModelOutput(zs), ModelOutput(zt), _batch(labels))["kd"]
    torch.testing.assert_close(kd_bm, by_hand, rtol=1e-5, atol=0)
    torch.testing.assert_close(kd_bm, kd_em * 7, rtol=1e-5, atol=0)


def test_regression_kd_golden() -> None:
    zs = torch.tensor([[1.0], [2.0]])
    zt = torch.tensor([[1.5], [1.0]])
    y = torch.tensor([0.0, 2.5])
    out = _kd(Reg, temperature=4.0, alpha=0.3)(ModelOutput(zs), ModelOutput(zt), _batch(y))
    assert out["kd"].item() == pytest.approx(0.3 * (0.25 + 1.0) / 2, rel=1e-6)
    assert out["ce"].item() == pytest.approx(0.7 * (1.0 + 0.25) / 2, rel=1e-6)
    # why: a softmax KD over one output is identically zero
    assert soft_loss(zs, zt, 4.0, "kl").item() == 0.0


def test_ce_loss_ignores_teacher_and_handles_regression() -> None:
    assert CrossEntropy.uses_teacher is False
    zs = torch.tensor([[0.0, math.log(3.0)]])
    ce = CrossEntropy(NoConfig(), task=Cls2(NoConfig()), teacher=None, student=Stub(1, 8))
    out = ce(ModelOutput(zs), None, _batch(torch.tensor([1])))
    assert set(out) == {"ce"} and out["ce"].item() == pytest.approx(-math.log(0.75), rel=1e-6)
    reg = CrossEntropy(NoConfig(), task=Reg(NoConfig()), teacher=None, student=Stub(1, 8))
    out = reg(ModelOutput(torch.tensor([[1.0], [3.0]])), None, _batch(torch.tensor([0.0, 1.0])))
    assert out["ce"].item() == pytest.approx((1.0 + 4.0) / 2, rel=1e-6)


def test_kd_bfloat16_logits_are_computed_in_float32() -> None:
    out = _kd(Cls2, temperature=2.0, alpha=1.0)(ModelOutput(ZS.bfloat16()), ModelOutput(ZT.bfloat16()),
                                                 _batch(torch.tensor([0])))
    assert out["kd"].dtype == torch.float32
    assert out["kd"].item() == pytest.approx(4.0 * KL, rel=2e-2)


@pytest.mark.parametrize(("key", "value"), [("reduction", "sum"), ("soft_loss", "js"), ("alpha", 1.5),
                                            ("temperature", 0.0)])
def test_kd_config_errors_name_the_key(key: str, value: object) -> None:
    from kdbench.engine.config import build_config

    problems: list[str] = []
    build_config(KDConfig, [{key: value}], "[loss.kd]", problems)
    assert len(problems) == 1 and problems[0].startswith(f"[loss.kd]: {key} = ")


# ---- PKD ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "m", "spec", "teacher_layers"), [
    (12, 6, "skip", [2, 4, 6, 8, 10]),
    (12, 6, "last", [7, 8, 9, 10, 11]),
    (6, 3, "skip", [2, 4]),
    (6, 3, "last", [4, 5]),
    (6, 2, "skip", [3]),
    (6, 2, "last", [5]),
    (12, 4, "skip", [3, 6, 9]),
    (4, 4, "skip", [1, 2, 3]),
    (12, 6, [1, 3, 5], [1, 3, 5]),
])
def test_pkd_layer_maps(n: int, m: int, spec: object, teacher_layers: list[int]) -> None:
    pairs = pkd_layer_map(n, m, spec)
    assert pairs == list(zip(range(1, len(teacher_layers) + 1), teacher_layers))


def test_pkd_layer_map_errors() -> None:
    with pytest.raises(NotApplicable, match="at least 2 layers"):
        pkd_layer_map(12, 1, "skip")
    with pytest.raises(NotApplicable, match="as deep"):
        pkd_layer_map(2, 4, "last")
    with pytest.raises(ConfigError, match="layer_map"):
        pkd_layer_map(12, 6, "middle")
    with pytest.raises(ConfigError, match="layer_map"):
        pkd_layer_map(12, 6, [2, 13])
    with pytest.raises(ConfigError, match="layer_map"):
        pkd_layer_map(12, 3, [1, 2, 3, 4])


def test_pkd_loss_golden() -> None:
    g = torch.Generator().manual_seed(0)
    b, h = 3, 5
    t_cls = torch.randn(b, 7, h, generator=g, dtype=torch.float64)  # 6-layer teacher: L+1 = 7
    s_cls = torch.randn(b, 4, h, generator=g, dtype=torch.float64)  # 3-layer student
    zs, zt = torch.randn(b, 3, generator=g, dtype=torch.float64), torch.randn(b, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1])
    cfg = PKDConfig(temperature=2.0, alpha=0.4, beta=10.0, layer_map="skip")
    loss = PatientKD(cfg, task=Cls3(NoConfig()), teacher=Stub(6, h), student=Stub(3, h))
    out = loss(ModelOutput(zs, cls=s_cls), ModelOutput(zt, cls=t_cls), _batch(labels))
    assert set(out) == {"ce", "kd", "patient"}
    total = 0.0
    for j, i in [(1, 2), (2, 4)]:  # skip map 6 -> 3
        hs = s_cls[:, j] / s_cls[:, j].norm(dim=-1, keepdim=True)
        ht = t_cls[:, i] / t_cls[:, i].norm(dim=-1, keepdim=True)
        total += ((ht - hs) ** 2).sum().item()
    assert out["patient"].item() == pytest.approx(10.0 * total / (b * 2 * h), rel=1e-10)
    ps, pt = torch.softmax(zs / 2, -1), torch.softmax(zt / 2, -1)
    kd = 4.0 * (pt * (pt / ps).log()).sum() / b
    assert out["kd"].item() == pytest.approx(0.4 * kd.item(), rel=1e-10)
    ce = -torch.log_softmax(zs, -1)[torch.arange(b), labels].mean()
    assert out["ce"].item() == pytest.approx(0.6 * ce.item(), rel=1e-10)


def test_pkd_not_applicable_cases() -> None:
    with pytest.raises(NotApplicable, match="equal width"):
        PatientKD(PKDConfig(), task=Cls3(NoConfig()), teacher=Stub(12, 768), student=Stub(4, 312))
    assert "vision" in (PatientKD.check(Vision(NoConfig())) or "")
    assert PatientKD.check(Cls3(NoConfig())) is None
    assert PatientKD.needs == frozenset({"cls"})


# ---- TinyBERT ------------------------------------------------------------------------------------

def test_tinybert_loss_golden_and_trainable_projection() -> None:
    g = torch.Generator().manual_seed(1)
    b, t, hs, ht = 2, 3, 4, 6
    s_hid = tuple(torch.randn(b, t, hs, generator=g) for _ in range(3))  # 2-layer student
    t_hid = tuple(torch.randn(b, t, ht, generator=g) for _ in range(5))  # 4-layer teacher
    s_att = tuple(torch.softmax(torch.randn(b, 2, t, t, generator=g), -1) for _ in range(2))
    t_att = tuple(torch.softmax(torch.randn(b, 2, t, t, generator=g), -1) for _ in range(4))
    state = torch.get_rng_state()
    loss = TinyBertLoss(TinyBertLossConfig(hidden_weight=2.0, attention_weight=0.5), task=Cls3(NoConfig()),
                        teacher=Stub(4, ht), student=Stub(2, hs))
    assert torch.equal(state, torch.get_rng_state())  # the projection init leaves the global RNG alone
    params = list(loss.parameters())
    assert [p.shape for p in params] == [torch.Size([ht, hs]), torch.Size([ht])]
    w, bias = loss.proj.weight.detach(), loss.proj.bias.detach()
    hid = sum(((s_hid[j] @ w.T + bias - t_hid[i]) ** 2).mean() for j, i in [(0, 0), (1, 2), (2, 4)])
    att = sum(((s_att[j - 1] - t_att[i - 1]) ** 2).mean() for j, i in [(1, 2), (2, 4)])
    out = loss(ModelOutput(torch.zeros(b, 3), hidden=s_hid, attentions=s_att),
               ModelOutput(torch.zeros(b, 3), hidden=t_hid, attentions=t_att), _batch(torch.zeros(b, dtype=torch.long)))
    assert out["hidden"].item() == pytest.approx(2.0 * hid.item(), rel=1e-5)
    assert out["attention"].item() == pytest.approx(0.5 * att.item(), rel=1e-5)
    out["hidden"].backward()
    assert loss.proj.weight.grad is not None and loss.proj.weight.grad.abs().sum() > 0
    again = TinyBertLoss(TinyBertLossConfig(), task=Cls3(NoConfig()), teacher=Stub(4, ht), student=Stub(2, hs))
    assert torch.equal(again.proj.weight, loss.proj.weight)  # seeded init


def test_tinybert_not_applicable_cases() -> None:
    with pytest.raises(NotApplicable, match="equal widths"):
        TinyBertLoss(TinyBertLossConfig(project=False), task=Cls3(NoConfig()), teacher=Stub(4, 8), student=Stub(2, 4))
    with pytest.raises(NotApplicable, match="as deep"):
        TinyBertLoss(TinyBertLossConfig(), task=Cls3(NoConfig()), teacher=Stub(2, 8), student=Stub(4, 8))
    assert TinyBertLoss.check(Vision(NoConfig())) is not None


def test_losses_are_registered() -> None:
    got: list[type] = []
    losses.kdbench_register_losses(register=got.append)
    assert sorted(c.name for c in got) == ["ce", "kd", "pkd", "tinybert"]
    assert all(c.version for c in got)


def test_soft_loss_gradient_matches_hand_formula() -> None:
    # d/dz_s of T²·KL(p_t || p_s^T) batchmean = T·(p_s − p_t)/B
    g = torch.Generator().manual_seed(5)
    zs = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(4, 3, generator=g, dtype=torch.float64)
    soft_loss(zs, zt, 3.0, "kl").backward()
    expected = 3.0 * (torch.softmax(zs.detach() / 3, -1) - torch.softmax(zt / 3, -1)) / 4
    torch.testing.assert_close(zs.grad, expected)
    assert F.softmax(zt, -1).shape == (4, 3)
