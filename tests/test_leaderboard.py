from __future__ import annotations

import re
from pathlib import Path

import pytest

from kdbench.contract.errors import DataError
from kdbench.report.leaderboard import bootstrap_ci
from kdbench.report.publish import render_markdown
from kdbench.report.results import SCHEMA_VERSION, load_results, write_result

GOLDEN = Path(__file__).with_name("golden") / "leaderboard.md"
ROLES = {"baseline_method": "kd", "no_kd_method": "no-kd"}  # as a plan file of the built-ins names them
NUM = re.compile(r"[-+]?\d+\.\d+|[-+]?\d+")


def fake_result(method, task, seed, value, status="ok", reason="", student="s1"):
    metric = {"glue/rte": "dev/accuracy", "glue/cola": "dev/matthews_correlation"}[task]
    return {
        "schema_version": SCHEMA_VERSION, "run_id": f"{method}__{task.replace('/', '-')}__{student}__s{seed}__x",
        "suite": "golden", "method": method, "task": task, "student": "" if method == "teacher" else student,
        "teacher_name": "t1", "seed": seed, "status": status, "reason": reason,
        "metrics": {"best": {metric: value}, "last": {metric: value - 0.01}} if status == "ok" else {},
        "protocol": {"selection": metric, "best_epoch": 1}, "config": {"teacher": {"name": "t1", "kind": "tiny-bert"},
                                                                      "student_model": {"kind": "pick-layers"}},
        "wall_s": 10.0 + seed, "peak_memory_mb": 100.0, "throughput": {"samples_per_s": 50.0 + seed, "train_s": 5.0 * (1 + seed)},
        "extra": {}, "suite_info": {"description": "golden fixture"},
    }


def fixture_results():
    out = []
    base = {"kd": 0.60, "metadistil": 0.62, "no-kd": 0.55, "teacher": 0.70}
    for m, v in base.items():
        for seed in range(3):
            out.append(fake_result(m, "glue/rte", seed, v + 0.01 * seed))
            if m == "metadistil" and seed == 2:
                out.append(fake_result(m, "glue/cola", seed, 0, status="failed", reason="RuntimeError: boom"))
            else:
                out.append(fake_result(m, "glue/cola", seed, v / 2 + 0.02 * seed))
    return out


@pytest.fixture
def board(tmp_path):
    for r in fixture_results():
        write_result(tmp_path / "golden", r)
    return load_results(tmp_path / "golden")


def numbers_match(got: str, want: str, tol: float = 0.051) -> None:
    assert NUM.sub("#", got) == NUM.sub("#", want), "text differs from golden (beyond numbers)"
    for a, b in zip(NUM.findall(got), NUM.findall(want), strict=True):
        assert abs(float(a) - float(b)) <= tol, (a, b)


def test_golden_markdown(board):
    text = render_markdown(board, "golden", {"source": "results/golden", "kdbench_version": "0.1.0",
                                             "description": "golden fixture", **ROLES})
    numbers_match(text, GOLDEN.read_text())


def test_content(board):
    text = render_markdown(board, "golden", {"source": "results/golden", **ROLES})
    assert "do not edit" in text.splitlines()[0]
    assert "61.0 ± 1.0 (3)" in text  # kd on rte: 60, 61, 62
    assert "failed [1]" not in text and "[1] metadistil on glue/cola: failed (1/3 cells): RuntimeError: boom" in text
    assert "| teacher" in text and "| no-kd" in text
    assert "Δ vs kd" in text and "+2.00 *" in text  # metadistil is +2 on every seed: CI excludes 0


def test_bootstrap_interval():
    import numpy as np

    # 3 seeds: P(a resample is all-min) = 1/27 > 2.5 %, so the interval is the range of the differences
    assert bootstrap_ci(np.array([1.0, 2.5, 3.0])) == (1.0, 3.0)
    lo, hi = bootstrap_ci(np.array([-1.0, 1.0, 0.0]))
    assert lo < 0 < hi
    d = np.array([-1.0, 1.0, 2.0, 3.0])  # 4 seeds: 1/256 < 2.5 %, the interval is strictly inside the range
    lo, hi = bootstrap_ci(d)
    assert d.min() < lo < d.mean() < hi < d.max()


def test_three_seed_intervals_are_labelled_as_ranges(board):
    text = render_markdown(board, "golden", {"source": "results/golden", **ROLES})
    assert "With 3 seeds this interval is exactly the range of the per-seed differences" in text


def test_load_results_frame(board):
    assert len(board) == 24 and {"best.dev/accuracy", "status", "seed"} <= set(board.columns)


def test_same_cell_under_two_configurations_is_refused(tmp_path):
    stale = fake_result("kd", "glue/rte", 0, 0.6)
    fresh = {**stale, "run_id": stale["run_id"].replace("__x", "__y")}
    for r in (stale, fresh):
        write_result(tmp_path / "r", r)
    with pytest.raises(DataError, match=r"kd__glue-rte__s1__s0__y.json and .*__x.json are the same cell "
                                        r"\(method kd, task glue/rte, seed 0\).*move the stale one out"):
        load_results(tmp_path / "r")


def test_cost_plot_written_and_embedded(board, tmp_path):
    from kdbench.report.plots import plot_cost

    png = tmp_path / "golden.png"
    assert plot_cost(board, "golden", str(png)) and png.read_bytes()[:4] == b"\x89PNG"
    text = render_markdown(board, "golden", {"source": "x", "plot": png.name})
    assert "![golden: score vs training cost](golden.png)" in text


def test_coverage_lists_the_planned_cells_without_results(tmp_path):
    import pandas as pd

    from kdbench.engine.config import load_suite
    from kdbench.engine.manager import Host
    from kdbench.engine.plan import expand, plan_facts
    from kdbench.report.publish import coverage, coverage_section
    from kdbench.report.results import read_plan, write_plan
    from kdbench.testing import tiny_suite

    path = tiny_suite(tmp_path / "t.toml", "kd")
    path.write_text(path.read_text().replace("seeds = [0]", "seeds = [0, 1]"))
    suite = load_suite(str(path))
    host = Host.create(autoload=False)
    write_plan(tmp_path / "r", plan_facts(suite, host), expand(suite, host))
    board = pd.DataFrame([{"method": "kd", "task": "toy/reviews", "student": "bert-l1", "teacher_name": "bert", "seed": 0},
                          {"method": "teacher", "task": "toy/reviews", "student": "", "teacher_name": "bert", "seed": 0}])
    cov = coverage(read_plan(tmp_path / "r")["cells"], board)
    assert cov == {"planned": 4, "done": 2,
                   "missing": {("", "toy/reviews"): {"teacher": [1]}, ("bert-l1", "toy/reviews"): {"kd": [1]}}}
    run = "kdbench run --suite t.toml --results-dir r"
    text = "\n".join(coverage_section(cov, run))
    assert text.startswith("Coverage: 2 of 4 planned cells are done") and f"`{run}` runs exactly these" in text
    assert re.search(r"\| \(teacher\) +\| toy/reviews +\| teacher \(seeds 1\) +\|", text)
    assert re.search(r"\| bert-l1 +\| toy/reviews +\| kd \(seeds 1\) +\|", text)
    assert coverage_section(dict(cov, done=4, missing={}), run) == ["Coverage: 4 of 4 planned cells are done (a result file, or n-a by plan).", ""]
