"""Step-cost benchmark: one production training step (``Loop.train_step``) per method.

Default run (``--benchmark-disable`` from pyproject): each step runs once, untimed, on the tiny
pair (B=8, T=16), as a smoke test of the step builders. Timed:

    pytest tests/benchmarks --benchmark-enable          # MiniLM-L6 + 2-layer student, B=32, T=64

``KDBENCH_BENCH_PAIR=tiny|minilm`` forces the pair; ``KDBENCH_BENCH_ROUNDS`` sets timed rounds (3).
Each result's ``extra_info`` holds the FLOP-model ratio to live-teacher KD (performance.md §2.3).
No assertion is made on time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest
import torch

from kdbench.bench import SPECS, Pair, StepSpec, build_pair, build_step, cmd_bench, format_table, step_costs
from kdbench.errors import ConfigError


def _enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_enable")) or not config.getoption("benchmark_disable")


@pytest.fixture(scope="module")
def pair(request: pytest.FixtureRequest) -> Pair:
    """The tiny pair for smoke runs; MiniLM (when ../shared/hf has it) for timed runs."""
    torch.set_num_threads(1)
    enabled = _enabled(request.config)
    which = os.environ.get("KDBENCH_BENCH_PAIR") or ("minilm" if enabled else "tiny")
    if which == "minilm":
        return build_pair("minilm", seq_len=64, batch=32)
    return build_pair("tiny", seq_len=16, batch=8)


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _changed(before: list[torch.Tensor], model: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("spec", SPECS, ids=[s.label for s in SPECS])
def test_step_cost(benchmark, request: pytest.FixtureRequest, pair: Pair, spec: StepSpec) -> None:
    torch.set_num_threads(1)
    f_t, f_s = pair.flops()
    benchmark.group = "step-cost"
    benchmark.extra_info.update(
        method=spec.label, flop_model=spec.model, teacher=pair.teacher.origin, batch=len(pair.batch),
        seq_len=pair.seq_len, flop_model_ratio=spec.flops(f_t, f_s) / (f_t + 3 * f_s))
    step = build_step(pair, spec)
    assert (step.loop.tcache is not None) == spec.cached
    t_before, s_before = _params(pair.teacher), _params(pair.student)
    rounds = int(os.environ.get("KDBENCH_BENCH_ROUNDS", "3"))
    out = benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    assert math.isfinite(float(out["loss/total"]))
    assert _changed(s_before, pair.student), "the student step did not update the student"
    teacher_trains = spec.method in ("metadistil", "reptile-distil")
    assert _changed(t_before, pair.teacher) == teacher_trains


def test_step_costs_table_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = step_costs("tiny", seq_len=8, batch=4, repeats=1, threads=1)
    assert [r["method"] for r in rows] == [s.label for s in SPECS]
    assert all(r["status"] == "ok" and r["median_s"] > 0 and r["peak_alloc_mb"] is not None for r in rows)
    assert rows[0]["ratio_kd"] == 1.0 and rows[0]["model_ratio"] == 1.0
    cached = rows[1]
    assert cached["model_ratio"] == pytest.approx(3 * cached["F_S"] / (cached["F_T"] + 3 * cached["F_S"]))
    table = format_table(rows).splitlines()
    assert len(table) == len(SPECS) + 2 and table[0].startswith("| method |")
    out_json = tmp_path / "bench.json"
    args = argparse.Namespace(teacher="tiny", seq_len=8, batch=4, repeats=1, device="cpu", threads=1,
                              methods="kd", overhead=False, json_path=str(out_json))
    assert cmd_bench(args) == 0
    assert "| kd (live teacher) |" in capsys.readouterr().out
    assert {r["method"] for r in json.loads(out_json.read_text())} == {"kd (live teacher)", "kd (cached teacher)"}


def test_unknown_teacher_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="minilm"):
        build_pair("gpt-7", seq_len=8, batch=2)
