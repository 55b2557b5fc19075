"""CIFAR backbones: published sizes and MACs, functional_call, buffers, channels_last, seeding."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from kdbench.contract.types import KDModel
from kdbench_builtins import models_vision
from kdbench_builtins.models_vision import VISION_KINDS, WrnConfig

torch.set_num_threads(1)


def build(name: str, num_labels: int = 100, seed: int = 0) -> KDModel:
    cls = VISION_KINDS[name]
    return cls(cls.Config()).build(num_labels, torch.Generator().manual_seed(seed))


def images(b: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


def test_registers_every_architecture() -> None:
    got: list[str] = []
    models_vision.kdbench_register_models(register=lambda cls: got.append(cls.name))
    expected = {f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)} | {"resnet8x4", "resnet32x4"}
    expected |= {"wrn-16-1", "wrn-16-2", "wrn-40-1", "wrn-40-2", "vgg8", "vgg11", "vgg13"}
    assert set(got) == expected
    assert all(VISION_KINDS[n].modality == "vision" for n in got)


# Published parameter counts. CIFAR-100 heads: the CRD/DKD tables; CIFAR-10 heads: the
# "CIFAR-pretrained-models" zoo and Zagoruyko's WRN-40-2 (2.2M).
@pytest.mark.parametrize(("name", "labels", "published"), [
    ("resnet56", 100, "0.86"), ("resnet56", 10, "0.86"), ("resnet20", 10, "0.27"),
    ("resnet20", 100, "0.28"), ("wrn-40-2", 10, "2.2"), ("wrn-40-2", 100, "2.26"),
    ("wrn-16-2", 100, "0.70"), ("resnet32x4", 100, "7.43"), ("resnet8x4", 100, "1.23"),
    ("resnet110", 100, "1.7"), ("vgg13", 100, "9.46"), ("vgg8", 100, "4.0"),  # 3,965,028: tables print 3.96
])
def test_parameter_counts_match_published(name: str, labels: int, published: str) -> None:
    decimals = len(published.split(".")[1])
    n = build(name, labels).num_parameters()
    assert f"{n / 1e6:.{decimals}f}" == published, n


@pytest.mark.parametrize(("name", "macs"), [("resnet20", 40.81e6), ("resnet56", 125.75e6),
                                            ("resnet110", 253e6)])
def test_flops_match_published_macs(name: str, macs: float) -> None:
    model = build(name, 10)
    assert model.flops_per_example() / 2 == pytest.approx(macs, rel=0.02)
    model.train()
    model._flops = None
    model.flops_per_example()
    assert model.training


def test_flop_count_leaves_bn_statistics_alone() -> None:
    model = build("resnet8").train()
    before = {k: v.clone() for k, v in model.named_buffers()}
    model._flops = None
    model.flops_per_example()
    assert all(torch.equal(before[k], v) for k, v in model.named_buffers())


@pytest.mark.parametrize("name", sorted(VISION_KINDS))
def test_functional_call_matches_and_spares_buffers(name: str) -> None:
    model = build(name)
    x = images()
    params = {k: v.clone() for k, v in model.named_parameters()}
    bufs = {k: v.clone() for k, v in model.named_buffers()}
    own = {k: v.clone() for k, v in model.named_buffers()}
    # train mode: BN updates the *substituted* running stats in place, not the module's own
    model.train()
    out_f = functional_call(model, {**params, **bufs}, (x,), {"want": frozenset({"hidden"})})
    assert all(torch.equal(own[k], v) for k, v in model.named_buffers())
    changed = [k for k in bufs if k.endswith("running_var") and not torch.equal(bufs[k], own[k])]
    assert changed, "train-mode functional_call did not update the substituted BN buffers"
    out = model(x, want=frozenset({"hidden"}))
    assert torch.equal(out_f.logits, out.logits)
    assert all(torch.equal(a, b) for a, b in zip(out_f.hidden, out.hidden, strict=True))
    # eval mode with the module's (now updated) tensors: bit-identical to a normal call
    model.eval()
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert torch.equal(functional_call(model, state, (x,)).logits, model(x).logits)
    # shapes of the output interface
    assert out.logits.shape == (2, 100)
    assert len(out.hidden) == model.num_layers + 1
    assert out.hidden[-1].shape[1] == model.hidden_size
    assert model(x).hidden == ()


def test_gradients_flow_through_substituted_parameters() -> None:
    model = build("resnet8").train()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    bufs = {k: v.clone() for k, v in model.named_buffers()}
    logits = functional_call(model, {**params, **bufs}, (images(),)).logits
    grads = torch.autograd.grad(logits.square().mean(), list(params.values()), create_graph=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    second = torch.autograd.grad(sum(g.square().sum() for g in grads), params["fc.weight"])[0]
    assert second.abs().sum() > 0  # double backward works (MetaDistil pilot step)


@pytest.mark.parametrize("name", ["resnet20", "wrn-16-2", "vgg8"])
def test_channels_last(name: str) -> None:
    model = build(name).eval()
    x = images()
    ref = model(x, want=frozenset({"hidden"}))
    model = model.to(memory_format=torch.channels_last)
    out = model({"pixel_values": x["pixel_values"].to(memory_format=torch.channels_last)},
                want=frozenset({"hidden"}))
    assert out.logits.shape == ref.logits.shape
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert out.hidden[1].is_contiguous(memory_format=torch.channels_last)


def test_build_is_seeded_by_the_generator_only() -> None:
    state = torch.get_rng_state()
    a, b, c = build("resnet8", seed=3), build("resnet8", seed=3), build("resnet8", seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.fc.weight, c.fc.weight)


def test_wrn_dropout_option() -> None:
    cls = VISION_KINDS["wrn-16-1"]
    model = cls(WrnConfig(dropout=0.3)).build(10, torch.Generator().manual_seed(0)).train()
    x = images()
    assert not torch.equal(model(x).logits, model(x).logits)  # dropout active in train mode
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)
