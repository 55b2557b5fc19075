"""Step-cost benchmark: one production training step (``Loop.train_step``) per registered row.

Default run (``--benchmark-disable`` from pyproject): each step runs once, untimed, on the tiny
pair (B=8, T=16), as a smoke test of the step builders. Timed:

    pytest tests/benchmarks --benchmark-enable          # MiniLM-L6 + 2-layer student, B=32, T=64

``KDBENCH_BENCH_PAIR=tiny|minilm|bert-base`` forces the pair; ``KDBENCH_BENCH_ROUNDS`` sets timed
rounds (3). Each result's ``extra_info`` holds the rule's FLOP model and its ratio to live-teacher
KD (performance.md §2.3). No assertion is made on time.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from kdbench.cli.bench import KD_STEP
from kdbench.cli.bench_pair import BenchRow, Pair, bench_rows, build_pair, build_step
from kdbench.engine.manager import Host, make_plugin_manager

ROWS = bench_rows(Host(make_plugin_manager(autoload=False)))


def _enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_enable")) or not config.getoption("benchmark_disable")


@pytest.fixture(scope="module")
def pair(request: pytest.FixtureRequest) -> Pair:
    """The tiny pair for smoke runs; MiniLM (when ../shared/hf has it) for timed runs."""
    torch.set_num_threads(1)
    host = Host(make_plugin_manager(autoload=False))
    which = os.environ.get("KDBENCH_BENCH_PAIR") or ("minilm" if _enabled(request.config) else "tiny")
    if which == "tiny":
        return build_pair("tiny", seq_len=16, batch=8, host=host)
    return build_pair(which, batch=32, host=host)


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _changed(before: list[torch.Tensor], model: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("row", ROWS, ids=[r.label for r in ROWS])
def test_step_cost(benchmark, pair: Pair, row: BenchRow) -> None:
    torch.set_num_threads(1)
    f_t, f_s = pair.flops()
    step = build_step(pair, row)
    assert step.cost is not None, f"built-in rule of {row.label!r} declares no cost model"
    benchmark.group = "step-cost"
    benchmark.extra_info.update(
        method=row.label, flop_model=step.cost.formula, teacher=pair.teacher.origin, batch=len(pair.batch),
        seq_len=pair.seq_len, flop_model_ratio=step.cost.flops(f_t, f_s) / KD_STEP.flops(f_t, f_s))
    assert (step.loop.tcache is not None) == bool(row.options.get("cached_teacher"))
    t_before, s_before = _params(pair.teacher), _params(pair.student)
    rounds = int(os.environ.get("KDBENCH_BENCH_ROUNDS", "3"))
    out = benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    assert math.isfinite(float(out["loss/total"]))
    assert _changed(s_before, pair.student), "the student step did not update the student"
    rule_steps_teacher = step.loop.rule.changes_teacher and row.method != "meta-kd"  # meta-kd: in prepare
    assert _changed(t_before, pair.teacher) == rule_steps_teacher
