"""The leaderboard is a function of its results directory: plan file, no plugins, torn files,
other folders; and its tables measure the methods (headroom, held-out selection, teacher after)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kdbench.cli.main import main
from kdbench.contract.errors import DataError
from kdbench.report.publish import render, render_markdown
from kdbench.report.results import FP32_GEMMS, SCHEMA_VERSION, load_results, read_plan, write_result

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "plugins" / "kdbench-example"
ROLES = {"baseline_method": "kd", "no_kd_method": "no-kd"}  # the built-in role methods, as plan files name them


def result(method, task, seed, value, *, student="s1", selection="dev/accuracy", best=None, **extra):
    """A minimal result file (one task metric, x1 scale)."""
    key = "dev/accuracy"
    return {
        "schema_version": SCHEMA_VERSION, "run_id": f"{method}__{task.replace('/', '-')}__{student}__s{seed}__x",
        "suite": "mine", "method": method, "task": task, "student": "" if method == "teacher" else student,
        "teacher_name": "t1", "seed": seed, "status": "ok", "reason": "",
        "metrics": {"best": best or {key: value}, "last": {key: value - 0.01}},
        "protocol": {"selection": selection, "best_epoch": 1},
        "config": {"teacher": {"name": "t1", "kind": "tiny-bert"}, "student_model": {"kind": "pick-layers"}},
        "wall_s": 10.0, "peak_memory_mb": 100.0, "throughput": {"samples_per_s": 50.0}, "extra": {}, **extra,
    }


def write_plan_file(d: Path, cells, **suite) -> None:
    d.mkdir(parents=True, exist_ok=True)
    facts = {"name": "mine", "suite_arg": "mine.toml", "description": "", "budget": "", "reference": [], **suite}
    (d / "plan.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "suite": facts, "cells": cells}))


def cell(method, task, seed, student="s1"):
    return {"run_id": f"{method}__{task}__{seed}", "method": method, "task": task,
            "student": "" if method == "teacher" else student, "teacher": "t1", "seed": seed, "na_reason": ""}


def board_of(tmp_path, results):
    for r in results:
        write_result(tmp_path / "r", r)
    return load_results(tmp_path / "r")


def matrix(values: dict[str, float], task="toy/a", seeds=(0, 1, 2), **extra):
    return [result(m, task, s, v + 0.001 * s, **extra) for m, v in values.items() for s in seeds]


# -- plan file and plugin independence -------------------------------------------------------------


def test_write_plan_merges_cells_by_run_id_and_newest_suite_facts(tmp_path):
    from kdbench.engine.config import load_suite
    from kdbench.engine.manager import Host
    from kdbench.engine.plan import expand, plan_facts
    from kdbench.report.results import write_plan
    from kdbench.testing import tiny_suite

    host = Host.create(autoload=False)
    path = tiny_suite(tmp_path / "t.toml", "kd")
    first = load_suite(str(path))
    write_plan(tmp_path / "r", plan_facts(first, host), expand(first, host))
    again = load_suite(str(path), ["suite.seeds=[1]", 'suite.description="second"'])
    write_plan(tmp_path / "r", plan_facts(again, host), expand(again, host))
    plan = read_plan(tmp_path / "r")
    assert plan is not None and plan["suite"]["description"] == "second"
    assert {k: plan["suite"][k] for k in ROLES} == ROLES and plan["suite"]["suite_arg"] == str(path)
    assert sorted((c["method"], c["seed"]) for c in plan["cells"]) == [("kd", 0), ("kd", 1), ("teacher", 0), ("teacher", 1)]
    assert len({c["run_id"] for c in plan["cells"]}) == 4
    write_plan(tmp_path / "r", plan_facts(again, host), expand(again, host))  # re-planning the same cells adds none
    assert len(read_plan(tmp_path / "r")["cells"]) == 4
    assert len(load_results(tmp_path / "r")) == 0  # plan.json is not a result file


def test_old_plan_files_name_no_role_method_and_the_page_says_to_regenerate(tmp_path):
    """A plan file written before the facts named the role methods: no default method name; the
    page has no paired table, no no-KD ordering or headroom check, and says how to regenerate."""
    write_plan_file(tmp_path / "r", [])
    assert not set(ROLES) & set(read_plan(tmp_path / "r")["suite"])
    board_of(tmp_path, matrix({"kd": 0.70, "no-kd": 0.795, "pkd": 0.75, "teacher": 0.80}))
    page = render(tmp_path / "r")
    assert "Paired difference" not in page and "Δ vs" not in page and "†" not in page
    assert [m for m in re.findall(r"^\| (\S+) +\| \d", page, re.M)][:4] == ["kd", "no-kd", "pkd", "teacher"]
    hint = f"`python -m kdbench.cli.planfile mine.toml {(tmp_path / 'r').as_posix()}`"
    assert "the plan file does not name the reference and no-KD methods" in page and hint in page
    write_plan_file(tmp_path / "r", [], **ROLES)  # regenerated: both come back
    page = render(tmp_path / "r")
    assert "Δ vs kd" in page and "does not name" not in page and "no-kd (79.6) is within 1 point" in page
    assert [m for m in re.findall(r"^\| (\S+) +\| \d", page, re.M)][:4] == ["kd", "pkd", "no-kd", "teacher"]
    (tmp_path / "plan.json").write_text("{")
    with pytest.raises(DataError, match="unreadable plan file"):
        read_plan(tmp_path)


def test_roles_with_other_names_order_pair_and_flag_by_those_names(tmp_path):
    """A plugin set whose no-KD method is "plain" and reference method "base": the page, rendered
    from the plan file alone, lists "plain" last before the teacher, pairs against "base", and
    checks headroom with "plain"; "kd"/"no-kd" mean nothing to it."""
    rows = (matrix({"alpha": 0.72, "base": 0.70, "plain": 0.60, "zeta": 0.74, "kd": 0.71, "teacher": 0.85})
            + matrix({"alpha": 0.80, "base": 0.80, "plain": 0.796, "zeta": 0.80, "kd": 0.80, "teacher": 0.80},
                     task="toy/b"))
    board_of(tmp_path, rows)
    write_plan_file(tmp_path / "r", [cell(m, t, s) for m in ("alpha", "base", "plain", "zeta", "kd", "teacher")
                                     for t in ("toy/a", "toy/b") for s in (0, 1, 2)],
                    baseline_method="base", no_kd_method="plain")
    page = render(tmp_path / "r")
    headline = page.split("## Student `s1` (best epoch)")[1].split("## ")[0]
    table = headline.split("Paired difference")[0]
    assert re.findall(r"^\| (\S+) +\| \d", table, re.M) == ["alpha", "base", "kd", "zeta", "plain", "teacher"]
    assert "Paired difference to the reference method `base`" in headline and "Δ vs base" in headline
    paired = headline.split("Paired difference")[1]
    assert sorted(set(re.findall(r"^\| (\w+) +\| toy/", paired, re.M))) == ["alpha", "kd", "plain", "zeta"]
    assert re.search(r"\| plain +\| toy/a dev/accuracy +\| -10\.00 \* ", paired)
    assert "toy/b: plain (79.7) is within 1 point of the teacher (80.1)" in headline
    assert "toy/b accuracy ↑ †" in table and "does not name" not in page


def test_leaderboard_builds_no_plugin_manager(monkeypatch, capsys):
    import kdbench.engine.manager

    def refuse(**_):
        raise AssertionError("kdbench leaderboard built a plugin manager")

    monkeypatch.setattr(kdbench.engine.manager, "make_plugin_manager", refuse)
    monkeypatch.chdir(REPO)
    assert main(["leaderboard", "--check"]) == 0


def test_check_is_the_same_with_the_example_plugin_loadable():
    """Installing plugins/kdbench-example (method anchored-kd, planned with --methods all) must
    not change the committed pages: load it by KDBENCH_PLUGINS, -p and entry points at once."""
    env = {**os.environ, "KDBENCH_DISABLE_PLUGIN_AUTOLOAD": "", "KDBENCH_PLUGINS": "kdbench_anchored",
           "PYTHONPATH": os.pathsep.join([str(EXAMPLE), str(REPO), str(REPO / "plugins")])}
    probe = subprocess.run([sys.executable, "-m", "kdbench", "-p", "kdbench_anchored", "validate", "--methods", "all"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "anchored-kd" in probe.stdout, probe.stderr[-2000:]  # the plugin really is loadable and planned
    done = subprocess.run([sys.executable, "-m", "kdbench", "-p", "kdbench_anchored", "leaderboard", "--check"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# -- other folders, torn files ---------------------------------------------------------------------


def test_another_folder_is_named_after_its_suite_and_suggests_a_working_command(tmp_path, capsys):
    d = tmp_path / "some folder"
    for r in matrix({"kd": 0.6, "no-kd": 0.5, "teacher": 0.8}, seeds=(0,)):
        write_result(d, r)
    write_plan_file(d, [cell(m, "toy/a", s) for m in ("kd", "no-kd", "teacher") for s in (0, 1)])
    assert main(["leaderboard", str(d), "--out-dir", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "some folder.md").read_text()
    assert page.splitlines()[1] == "# mine leaderboard"
    run = f"kdbench run --suite mine.toml --results-dir '{d.as_posix()}'"
    assert "Coverage: 3 of 6 planned cells are done" in page and f"`{run}` runs exactly these" in page
    assert "--suite some folder" not in page


def test_a_folder_without_plan_file_takes_the_suite_from_its_results(tmp_path):
    board = board_of(tmp_path, matrix({"kd": 0.6, "teacher": 0.8}))
    assert len(board) == 6
    page = render(tmp_path / "r")
    assert page.splitlines()[1] == "# mine leaderboard" and "Coverage" not in page


def test_unreadable_result_files_are_named_and_the_rest_rendered(tmp_path):
    board_of(tmp_path, matrix({"kd": 0.6, "no-kd": 0.5, "teacher": 0.8}))
    torn = tmp_path / "r" / "kd__toy-a__s1__s2__x.json"
    torn.write_text(torn.read_text()[:50])
    with pytest.raises(DataError, match="unreadable result file"):
        load_results(tmp_path / "r")
    page = render(tmp_path / "r")
    assert "Unreadable result files, left out of every table below" in page
    assert re.search(r"^- .*kd__toy-a__s1__s2__x\.json: unreadable result file", page, re.M)
    assert re.search(r"\| kd +\| 60\.0 ± 0\.1 \(2\)", page)  # the two readable kd seeds
    assert re.search(r"\| teacher +\| 80\.1 ± 0\.1 \(3\)", page)


# -- tables that measure the methods ---------------------------------------------------------------


def test_no_headroom_when_the_teacher_is_no_better_than_the_trivial_baseline(tmp_path):
    from kdbench.report.leaderboard import method_table, no_headroom, primary_columns, student_rows

    signal = matrix({"kd": 0.70, "metadistil": 0.75, "no-kd": 0.60, "teacher": 0.90}, task="toy/a",
                    baseline={"dev/accuracy": 0.5})
    noise = matrix({"kd": 0.50, "metadistil": 0.60, "no-kd": 0.50, "teacher": 0.52}, task="toy/noise",
                   baseline={"dev/accuracy": 0.5})
    board = board_of(tmp_path, signal + noise)
    sub = student_rows(board, "s1")
    cols = primary_columns(sub)
    flagged = no_headroom(sub, cols, "no-kd")
    assert list(flagged) == [("toy/noise", "dev/accuracy")]
    assert "within 5 points of the trivial baseline (50.0)" in flagged[("toy/noise", "dev/accuracy")]
    table = method_table(board, "s1", "best", [], cols, flagged, "no-kd").set_index("Method")
    assert table.loc["metadistil", "Avg ↑"] == "75.1"  # toy/a only: toy/noise is out of the average
    assert table.loc["metadistil", "toy/noise accuracy ↑ †"] == "60.1 ± 0.1 (3)"  # still shown
    assert table.loc["trivial baseline", "toy/a accuracy ↑"] == "50.0 ± 0.0 (3)"
    page = render_markdown(board, "mine", ROLES)
    assert "toy/noise: the teacher (52.1) is within 5 points of the trivial baseline (50.0)" in page
    assert re.search(r"\| metadistil +\| toy/a dev/accuracy +\| \+5\.00 \* ", page)
    assert re.search(r"\| metadistil +\| toy/noise dev/accuracy † +\| \+10\.00 +\|", page)  # no * mark


def test_no_headroom_when_no_kd_reaches_the_teacher(tmp_path):
    from kdbench.report.leaderboard import no_headroom, primary_columns, student_rows

    board = board_of(tmp_path, matrix({"kd": 0.80, "no-kd": 0.795, "teacher": 0.80}))  # old files: no baseline
    sub = student_rows(board, "s1")
    cols = primary_columns(sub)
    assert "no-kd (79.6) is within 1 point of the teacher (80.1)" in no_headroom(sub, cols, "no-kd")[("toy/a", "dev/accuracy")]
    assert no_headroom(sub, cols) == {}  # which method is the no-KD row comes from the plan, not from a name


def test_headline_uses_the_heldout_selection_and_reports_dev(tmp_path):
    rows = [result(m, "toy/a", s, 0, selection="heldout/accuracy",
                   best={"heldout/accuracy": 0.9, "dev/accuracy": v})
            for m, v in {"kd": 0.70, "no-kd": 0.60, "teacher": 0.85}.items() for s in (0, 1)]
    for r in rows:
        r["metrics"]["best_on_dev"] = {"dev/accuracy": r["metrics"]["best"]["dev/accuracy"] + 0.05}
    page = render_markdown(board_of(tmp_path, rows), "mine", ROLES)
    sections = page.split("## Student ")
    headline = next(s for s in sections if s.startswith("`s1` (best epoch)"))
    on_dev = next(s for s in sections if s.startswith("`s1` (best epoch on dev)"))
    assert "heldout" not in headline.split("|", 1)[1].split("\n")[0]  # no held-out column
    assert re.search(r"\| kd +\| 70\.0 ± 0\.0 \(2\)", headline) and re.search(r"\| kd +\| 75\.0 ± 0\.0 \(2\)", on_dev)
    assert "selected on `heldout/accuracy` and reported on the splits shown" in page
    assert "(best epoch)" in page.split("(best epoch on dev)")[0] and "(last epoch)" in page


def test_paired_table_uses_the_plan_baseline_method_and_teacher_after(tmp_path):
    rows = matrix({"kd": 0.70, "metadistil": 0.75, "no-kd": 0.60, "teacher": 0.85})
    rows.append(result("teacher", "toy/a", 3, 0.10))  # a seed metadistil has not run: not its start
    for r in rows:
        if r["method"] == "metadistil":
            r["teacher_after"] = {"teacher/dev/accuracy": 0.80, "teacher/dev/kl": 0.0123,
                                  "teacher/drift": 1.5}
        elif r["method"] == "kd":  # a frozen teacher: recorded, drift exactly 0, not in the table
            r["teacher_after"] = {"teacher/dev/accuracy": 0.85, "teacher/dev/kl": 0.0, "teacher/drift": 0.0}
    board = board_of(tmp_path, rows)
    page = render_markdown(board, "mine", {**ROLES, "baseline_method": "no-kd"})
    assert "Paired difference to the reference method `no-kd`" in page and "Δ vs no-kd" in page and "Δ vs kd" not in page
    assert re.search(r"\| kd +\| toy/a dev/accuracy +\| \+10\.00 \* ", page)
    assert re.search(r"\| metadistil +\| toy/a dev/accuracy +\| 85\.1 ± 0\.1 \(3\) +\| 80\.0 ± 0\.0 \(3\) +\| "
                     r"0\.0123 +\| 1\.5 +\| 3 ", page)
    assert not re.search(r"\| kd +\| toy/a dev/accuracy +\| 85", page)
    write_plan_file(tmp_path / "r", [], **{**ROLES, "baseline_method": "no-kd"})
    assert "Δ vs no-kd" in render(tmp_path / "r")


def test_published_claims_are_judged_on_paired_seeds(tmp_path):
    """A suite's claim "method beats over" holds when its paired 95 % interval lies above 0, is
    reversed below it and not shown across it; fewer than 4 paired seeds leave it open, a
    no-headroom task unjudged, and a method with no cell gives one "not run" row. A side whose last
    epoch still added half a point is named."""
    seeds = (0, 1, 2, 3, 4)
    wiggle = (0.01, -0.01, 0.012, -0.008, 0.0)
    rows = [result(m, task, s, v + 0.001 * s) for task in ("toy/a", "toy/b") for s in seeds
            for m, v in (("kd", 0.70), ("good", 0.72), ("bad", 0.68), ("no-kd", 0.60))]
    rows += [result("mixed", "toy/a", s, 0.70 + 0.001 * s + w) for s, w in zip(seeds, wiggle)]
    rows += [result("few", "toy/a", s, 0.75) for s in seeds[:3]]
    rows += [result("teacher", "toy/a", s, 0.85) for s in seeds] + [result("teacher", "toy/b", s, 0.601) for s in seeds]
    for r in rows:
        if r["method"] in ("good", "bad") and r["task"] == "toy/a":  # good's last epoch adds a point, bad's 0.2
            v = r["metrics"]["best"]["dev/accuracy"]
            r["history"] = [{"dev/accuracy": v - (0.01 if r["method"] == "good" else 0.002)}, {"dev/accuracy": v}]
    claims = [{"method": m, "over": "kd", "source": f"paper {m}"} for m in ("good", "bad", "mixed", "few", "ghost")]
    page = render_markdown(board_of(tmp_path, rows), "mine", {**ROLES, "claims": claims})
    part = page.split("Published claims")[1]
    assert re.search(r"\| good > kd \[a\] +\| toy/a dev/accuracy +\| \+2\.00 +\| \[\+2\.00, \+2\.00\] +\| 5 +\| holds; good still climbing ↗ ", part)
    assert re.search(r"\| bad > kd \[b\] +\| toy/a dev/accuracy +\| -2\.00 +\| \[-2\.00, -2\.00\] +\| 5 +\| reversed +\|", part)
    assert re.search(r"\| mixed > kd \[c\] +\| toy/a dev/accuracy +\| \+0\.08 +\| \[.+\] +\| 5 +\| not shown \(CI includes 0\) ", part)
    assert re.search(r"\| few > kd \[d\] +\| toy/a dev/accuracy +\| .+ +\| 3 +\| open \(3 of 4\+ seeds\) ", part)
    assert re.search(r"\| good > kd \[a\] +\| toy/b dev/accuracy +\| \+2\.00 +\| .+ +\| 5 +\| not judged \(no headroom\) ", part)
    assert re.search(r"\| ghost > kd \[e\] +\| +\| +\| +\| 0 +\| not run ", part)
    assert "[c] paper mixed" in part
    assert "Published claims" not in render_markdown(board_of(tmp_path / "none", rows), "mine", ROLES)


def test_convergence_table_marks_students_still_climbing(tmp_path):
    """First-epoch score and last-epoch change from each cell's per-epoch history (means over seeds,
    x100), the selected epoch 1-based; +0.5 point or more is marked; the teacher row has no such line."""
    rows = matrix({"kd": 0.70, "meta-kd": 0.60, "teacher": 0.85}, seeds=(0, 1))
    for r in rows:
        if r["method"] == "kd":  # flat: 0.700 -> 0.702 / 0.698 -> 0.698
            r["history"] = [{"dev/accuracy": 0.6}, {"dev/accuracy": 0.700}, {"dev/accuracy": 0.702 - 0.004 * r["seed"]}]
        elif r["method"] == "meta-kd":  # still climbing: +2 and +1 points
            r["history"] = [{"dev/accuracy": 0.50}, {"dev/accuracy": 0.58 + 0.01 * r["seed"]}, {"dev/accuracy": 0.60}]
            r["protocol"]["best_epoch"] = 2
    page = render_markdown(board_of(tmp_path, rows), "mine", ROLES)
    assert "Convergence (per-epoch history" in page
    assert re.search(r"\| kd +\| toy/a dev/accuracy +\| 3 +\| 2\.0 +\| 60\.0 +\| \+0\.0 +\| 2 ", page)
    assert re.search(r"\| meta-kd +\| toy/a dev/accuracy +\| 3 +\| 3\.0 +\| 50\.0 +\| \+1\.5 ↗ +\| 2 ", page)
    assert not re.search(r"\| teacher +\| toy/a dev/accuracy +\| \d", page.split("Convergence")[1])


def test_protocol_names_the_machines_the_cells_ran_on(tmp_path):
    """The header counts result files per device and CPU model (provenance; a CPU without bf16 kernels
    by how it ran bf16 products); one machine type is
    named once, several are listed with their counts and the warning that they are not bit-paired."""
    rows = matrix({"kd": 0.70, "teacher": 0.85}, seeds=(0, 1))
    for r in rows:
        r["provenance"] = {"device": "cpu", "cpu": "Xeon X"}
    page = render_markdown(board_of(tmp_path / "one", rows), "mine", ROLES)
    assert "All cells ran on one machine type (cpu: Xeon X)." in page
    rows[-1]["provenance"] = {"device": "cpu", "cpu": "EPYC Y"}
    page = render_markdown(board_of(tmp_path / "two", rows), "mine", ROLES)
    assert ("Cells ran on 2 machine types (3 on cpu: Xeon X; 1 on cpu: EPYC Y); the CPU model changes float "
            "rounding") in page
    rows[0]["provenance"] = {"device": "cpu", "cpu": "EPYC Y", "cpu_bf16_gemm": FP32_GEMMS}
    page = render_markdown(board_of(tmp_path / "three", rows), "mine", ROLES)  # the bf16 path is a machine type
    assert "(2 on cpu: Xeon X; 1 on cpu: EPYC Y; 1 on cpu: EPYC Y, bf16 products as fp32 GEMMs)" in page


def test_cells_whose_retrained_teacher_scored_differently_are_named(tmp_path):
    """A cell records the teacher it learnt from; where that teacher's score differs from the teacher
    row of its task and seed (retrained on another machine), the headline names the cell with both
    scores; equal scores give no footnote."""
    rows = matrix({"kd": 0.70, "metadistil": 0.71, "teacher": 0.85}, seeds=(0, 1))
    for r in rows:
        if r["method"] != "teacher":
            r["teacher"] = {"metrics": {"best": {"dev/accuracy": 0.85 + 0.001 * r["seed"]}}}
    page = render_markdown(board_of(tmp_path / "same", rows), "mine", ROLES)
    assert "Retrained teachers" not in page
    rows[3]["teacher"] = {"metrics": {"best": {"dev/accuracy": 0.8489}}}  # metadistil, seed 1
    page = render_markdown(board_of(tmp_path / "diff", rows), "mine", ROLES)
    assert ("Retrained teachers: 1 cell(s) learnt from a teacher retrained" in page
            and "metadistil toy/a seed 1: 84.89 vs 85.10." in page)


def test_cells_not_run_yet_are_priced_from_the_finished_ones(tmp_path, capsys):
    """Missing cells cost the median wall time of their method's finished cells on the same task,
    else on any task; a method with no finished cell is counted as not priced. The finished cells'
    own cost is their wall times summed."""
    d = tmp_path / "r"
    rows = matrix({"kd": 0.6, "teacher": 0.8}, seeds=(0,)) + [result("kd", "toy/b", 0, 0.6, wall_s=3600.0)]
    for r in rows:
        write_result(d, r)
    plan = [cell(m, t, s) for m in ("kd", "teacher", "metadistil") for t in ("toy/a", "toy/b") for s in (0, 1, 2)]
    write_plan_file(d, plan)
    assert main(["leaderboard", str(d), "--out-dir", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "r.md").read_text()
    # kd toy/a: 2 x 10 s; kd toy/b: 2 x 3600 s; teacher toy/a: 2 x 10 s; teacher toy/b: 3 x 10 s (its other task)
    assert "The finished cells took 1.0 core-hours (their wall times summed)." in page  # 10 + 3600 + 10 s
    assert ("the cells not run yet need about 2.0 core-hours (3 priced from their method's other tasks; "
            "6 not priced (no finished cell of their method)); machine types differ") in page
