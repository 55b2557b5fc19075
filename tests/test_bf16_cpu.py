"""bf16 autocast on a CPU without bf16 kernels: products as fp32 GEMMs on the bf16 operands.

``Bf16GemmInFp32`` must compute what a bf16 kernel computes (fp32 accumulation of exact products,
one rounding to bf16) and cover every product of a cell, the backward pass's included; the result
file must say which way its products ran.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
from torch import nn

from kdbench.engine.training import Bf16GemmInFp32, cpu_bf16_kernels
from kdbench.report import results as machine

aten = torch.ops.aten


def _operands(g: torch.Generator) -> dict[str, tuple[torch.Tensor, ...]]:
    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).bfloat16()

    a, b, bias = r(96, 200), r(200, 72), r(72)
    return {"mm": (a, b), "mm^T": (r(200, 96).t(), b), "addmm": (bias, a, b),
            "bmm": (r(3, 40, 200), r(3, 200, 24)), "baddbmm": (r(3, 40, 24), r(3, 40, 200), r(3, 200, 24))}


OPS = {"mm": torch.mm, "mm^T": torch.mm, "addmm": torch.addmm, "bmm": torch.bmm, "baddbmm": torch.baddbmm}


@pytest.mark.parametrize("name", sorted(OPS))
def test_products_match_the_bf16_kernel(name: str) -> None:
    """Same dtype, (nearly always) the same bits as torch's own bf16 kernel, and the same error
    against the float64 product: only the fp32 summation order may differ."""
    args = _operands(torch.Generator().manual_seed(0))[name]
    native = OPS[name](*args)
    with Bf16GemmInFp32():
        ours = OPS[name](*args)
    exact = OPS[name](*(a.double() for a in args))
    assert ours.dtype == native.dtype == torch.bfloat16 and ours.shape == native.shape
    assert (ours == native).float().mean() > 0.99
    err_ours, err_native = ((x.double() - exact).abs().mean().item() for x in (ours, native))
    assert err_ours == pytest.approx(err_native, rel=0.02)
    rounded = OPS[name](*(a.float() for a in args)).bfloat16()  # one rounding of the fp32 product
    assert torch.equal(ours, rounded)


def test_other_dtypes_and_ops_pass_through_untouched() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(30, 40, generator=g), torch.randn(40, 20, generator=g)
    x = torch.randn(5, 7, generator=g).bfloat16()
    with Bf16GemmInFp32():
        fp32, act = a @ b, torch.nn.functional.gelu(x)
    assert torch.equal(fp32, a @ b) and fp32.dtype == torch.float32
    assert torch.equal(act, torch.nn.functional.gelu(x)) and act.dtype == torch.bfloat16


class _Counting(Bf16GemmInFp32):
    """Records the products it re-routes (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func in self.GEMMS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            self.seen.append(func.__name__)
        return super().__torch_dispatch__(func, types, args, kwargs)


def _mlp_grads(mode: contextlib.AbstractContextManager[Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 3))
    x = torch.randn(16, 10, 64)
    with mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        out.float().logsumexp(-1).mean().backward()  # outside autocast, as the loop's backward
    return out, [p.grad for p in net.parameters()]  # type: ignore[misc]


def test_the_backward_products_are_covered_and_agree() -> None:
    counting = _Counting()
    out, grads = _mlp_grads(counting)
    ref_out, ref_grads = _mlp_grads(contextlib.nullcontext())
    assert out.dtype == ref_out.dtype == torch.bfloat16
    # 2 forward products; backward: layer 2's input and weight gradients, layer 1's weight gradient
    assert counting.seen == ["addmm.default"] * 2 + ["mm.default"] * 3
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == r.dtype == torch.float32
        assert ((g - r).norm() / r.norm()).item() < 1e-2


def test_the_mode_is_used_only_for_bf16_on_a_cpu_without_bf16_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(machine, "cpu_runs_bf16_natively", lambda: False)
    assert isinstance(cpu_bf16_kernels(cpu, "bf16"), Bf16GemmInFp32)
    assert machine.cpu_bf16_gemm() == machine.FP32_GEMMS
    for device, precision in ((cpu, "fp32"), (cpu, "auto"), (torch.device("cuda"), "bf16")):
        assert isinstance(cpu_bf16_kernels(device, precision), contextlib.nullcontext)
    monkeypatch.setattr(machine, "cpu_runs_bf16_natively", lambda: True)
    assert isinstance(cpu_bf16_kernels(cpu, "bf16"), contextlib.nullcontext)
    assert machine.cpu_bf16_gemm() == "bf16 kernels"


def test_a_bf16_cell_trains_under_the_mode_and_records_it(make_host: Any, run_tiny: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole cell (teacher fine-tuning, training steps, evaluation) goes through the mode, and
    ``provenance.cpu_bf16_gemm`` names it; the scores stay those of bf16 training."""
    calls: list[str] = []
    real = Bf16GemmInFp32.__torch_dispatch__

    def spy(self: Bf16GemmInFp32, func: Any, types: Any, args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None) -> Any:
        if func in self.GEMMS:
            calls.append(func.__name__)
        return real(self, func, types, args, kwargs)

    monkeypatch.setattr(machine, "cpu_runs_bf16_natively", lambda: False)
    monkeypatch.setattr(Bf16GemmInFp32, "__torch_dispatch__", spy)
    bf16 = ["train.precision=bf16", "teacher_train.precision=bf16"]
    res = run_tiny(make_host(), "kd", steps=4, overrides=bf16)
    assert res["status"] == "ok" and len(calls) > 20
    assert res["provenance"]["cpu_bf16_gemm"].startswith("fp32 GEMM")
    calls.clear()
    fp32 = run_tiny(make_host(), "no-kd", steps=4, overrides=["train.precision=fp32", "teacher_train.precision=fp32"])
    assert fp32["status"] == "ok" and calls == []  # fp32 cells never enter the mode
