"""A new user's `kdbench run`: local results by default, worker processes, progress, unreadable
result files set aside (issues 24 and 26)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kdbench.cli.commands import run_paths
from kdbench.cli.main import main
from kdbench.contract.errors import ExitCode
from kdbench.engine.config import load_suite
from kdbench.engine.executors import MatrixContext
from kdbench.engine.local import LocalConfig, LocalExecutor
from kdbench.engine.plan import expand
from kdbench.engine.workers import teacher_key
from kdbench.report.runview import RunView, headline
from kdbench.testing import tiny_suite

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.max_steps=2", "teacher_train.max_steps=2"]
COMPARED = ("run_id", "status", "metrics", "protocol", "history", "seeds", "config")


def _env(root: Path, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDBENCH_")}
    env.update(PYTHONPATH=os.pathsep.join([str(root), str(root / "plugins")]), OMP_NUM_THREADS="1",
               KDBENCH_DISABLE_PLUGIN_AUTOLOAD="1", KDBENCH_CACHE=str(tmp / "home-cache"))
    return env


def _fresh_clone(tmp: Path) -> Path:
    """A clone of this repository with the working tree's uncommitted changes on top (committed
    there), so the test sees exactly what a user cloning this state gets."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    clone = tmp / "clone"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C"]
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone)], check=True, timeout=120)
    changed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-m", "-o", "--exclude-standard", "-z"],
                             capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, changed):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    deleted = subprocess.run(["git", "-C", str(REPO), "ls-files", "-d", "-z"], capture_output=True,
                             text=True, check=True).stdout.split("\0")
    for name in filter(None, deleted):
        (clone / name).unlink(missing_ok=True)
    subprocess.run([*git, str(clone), "add", "-A"], check=True)
    subprocess.run([*git, str(clone), "commit", "-q", "--allow-empty", "-m", "working tree"], check=True)
    return clone


def test_main_job_in_a_fresh_clone_leaves_git_clean(tmp_path: Path) -> None:
    clone = _fresh_clone(tmp_path)
    cmd = [sys.executable, "-m", "kdbench", "run", "--methods", "kd", "--seeds", "0", *TINY,
           "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(cmd, cwd=clone, env=_env(clone, tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    status = subprocess.run(["git", "-C", str(clone), "status", "--porcelain", "--untracked-files=all"],
                            capture_output=True, text=True, check=True).stdout
    assert status == "", status
    results = sorted(p.name.split("__")[0] for p in (clone / "runs" / "quickstart").glob("*__*.json"))
    assert results == ["kd", "kd", "no-kd", "no-kd", "teacher", "teacher"]  # trained, not "already done"
    assert "6 cells, 0 already done, 6 to run -> runs/quickstart" in done.stderr
    assert (clone / "runs" / "quickstart.md").read_text().startswith("<!-- generated")
    # stdout: the headline tables; stderr ends with the one-line summary
    assert "Student bert-l2 (best epoch)" in done.stdout and "\nkd " in done.stdout
    summary = done.stderr.strip().splitlines()[-1]
    assert summary.startswith("kdbench: quickstart: 6 ok, 0 n-a, 0 failed, 0 skipped")
    assert "results runs/quickstart/, page runs/quickstart.md" in summary
    # not a terminal: one line per finished cell
    assert sum(line.startswith("[") and "/6] ok " in line for line in done.stderr.splitlines()) == 6


def _args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"out_dir": None, "publish": False, "results_dir": None, **kw})


def test_run_paths() -> None:
    assert run_paths(_args(), "quickstart") == (Path("runs/quickstart"), Path("runs/quickstart.md"))
    assert run_paths(_args(publish=True), "quickstart") == (
        Path("leaderboards/results/quickstart"), Path("leaderboards/quickstart.md"))
    assert run_paths(_args(out_dir="lb"), "s") == (Path("lb/results/s"), Path("lb/s.md"))
    assert run_paths(_args(results_dir="/x/res"), "s") == (Path("/x/res"), Path("/x/s.md"))
    assert run_paths(_args(results_dir="/x/res", publish=True), "s") == (Path("/x/res"), Path("leaderboards/s.md"))


def test_shipped_suites_pin_their_methods() -> None:
    from kdbench.engine.config import builtin_suites

    for name, path in builtin_suites().items():
        suite = load_suite(str(path))
        assert "all" not in suite.methods, f"{name} adds every registered method, plugins included"


def test_workers_option_is_validated(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--workers", "0", "--dry-run"]) == ExitCode.CONFIG_ERROR
    assert "--workers must be >= 1" in capsys.readouterr().err
    assert main(["run", "--workers", "2", "--executor", "ray", "--dry-run"]) == ExitCode.CONFIG_ERROR
    assert "--workers: applies to the local executor" in capsys.readouterr().err


def test_worker_processes_match_in_process_and_teachers_come_first(tmp_path: Path, make_host: Any) -> None:
    host = make_host()
    suite = load_suite(str(tiny_suite(tmp_path / "tiny.toml", "kd", steps=4)), ["suite.seeds=[0, 1]"])
    cells = expand(suite, host)
    assert [c.method for c in cells] == ["teacher", "teacher", "kd", "kd"]
    runs: dict[int, list[dict[str, Any]]] = {}
    for workers in (1, 2):
        events: list[tuple[str, str]] = []

        def started(spec: Any, events: list[tuple[str, str]] = events) -> None:
            events.append(("start", spec.run_id))

        ex = LocalExecutor(LocalConfig(workers=workers))
        mctx = MatrixContext(tmp_path / f"res{workers}", tmp_path / f"cache{workers}")
        runs[workers] = []
        for result in ex.map(cells, mctx, host, on_start=started):
            events.append(("done", result["run_id"]))
            runs[workers].append(result)
        for c in cells:  # a method cell starts only after its teacher's cell is done
            if not c.is_teacher:
                t = next(x for x in cells if x.is_teacher and teacher_key(x) == teacher_key(c))
                assert events.index(("done", t.run_id)) < events.index(("start", c.run_id))
        assert not list((mctx.results_dir / ".claims").iterdir())  # every claim released
    one, two = ({r["run_id"]: r for r in runs[w]} for w in (1, 2))
    assert sorted(one) == sorted(two) and len(one) == 4
    for run_id, r in one.items():
        assert r["status"] == "ok", r.get("reason")
        for key in COMPARED:
            assert two[run_id].get(key) == r.get(key), f"{run_id}: {key} differs with 2 workers"
        assert (two[run_id]["teacher"]["metrics"], two[run_id]["teacher"]["key"]) == (
            r["teacher"]["metrics"], r["teacher"]["key"])
        assert json.loads((tmp_path / "res2" / f"{run_id}.json").read_text())["metrics"] == r["metrics"]


DIE = '''
import os
from kdbench.contract.hookspecs import hookimpl

@hookimpl(tryfirst=True)
def kdbench_run_cell(spec, ctx):
    if spec.method == "no-kd":
        os._exit(9)  # the worker process dies mid-cell
'''


def test_a_dead_worker_is_recorded_and_the_rest_run_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugin = tmp_path / "die.py"
    plugin.write_text(DIE)
    suite = tiny_suite(tmp_path / "tiny.toml", "kd", steps=2)
    code = main(["-p", str(plugin), "run", "--suite", str(suite), "--workers", "2", "suite.baselines=true",
                 "--results-dir", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "c"), "--no-leaderboard"])
    assert code == ExitCode.RUNS_FAILED
    got = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in (tmp_path / "res").glob("*__*.json")}
    assert got["no-kd"]["status"] == "failed" and got["no-kd"]["extra"]["error_kind"] == "worker_died"
    assert got["no-kd"]["extra"]["exit_code"] == 9
    assert got["kd"]["status"] == "ok" and got["teacher"]["status"] == "ok"
    assert "2 ok, 0 n-a, 1 failed" in capsys.readouterr().err


def test_unreadable_result_is_set_aside_and_its_cell_rerun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = tiny_suite(tmp_path / "tiny.toml", "kd", steps=2)
    argv = ["run", "--suite", str(suite), "--workers", "1", "--results-dir", str(tmp_path / "res"),
            "--cache-dir", str(tmp_path / "c"), "--no-leaderboard"]
    assert main(argv) == ExitCode.OK
    kd = next((tmp_path / "res").glob("kd__*.json"))
    broken = kd.read_bytes()[:100]  # truncated
    kd.write_bytes(broken)
    capsys.readouterr()
    assert main(argv) == ExitCode.OK
    err = capsys.readouterr().err
    assert f"kdbench: {kd.stem}: rerunning the cell: its result file was unreadable" in err
    assert "2 cells, 1 already done, 1 to run" in err
    aside = list((tmp_path / "res").glob(f"{kd.name}.unreadable-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == broken and str(aside[0]) in err
    assert json.loads(kd.read_text())["status"] == "ok"
    assert main(["leaderboard", str(tmp_path / "res"), "--out-dir", str(tmp_path / "lb")]) == 0  # *.json only


def test_loop_progress_reaches_the_sink_including_meta_kd_prepare(make_host: Any, run_tiny: Any) -> None:
    from kdbench.engine.training import set_progress_sink

    seen: list[tuple[str, int, int, str]] = []
    previous = set_progress_sink(lambda *a: seen.append(a))
    try:
        result = run_tiny(make_host(), "meta-kd", steps=3,
                          overrides=["teacher_update.meta-kd.batch_size=64", "teacher_update.meta-kd.meta_epochs=1"])
    finally:
        set_progress_sink(previous)
    assert result["status"] == "ok", result.get("reason")
    meta = [s for s in seen if s[3] == "meta-teacher"]
    assert meta and meta[-1][1] == meta[-1][2] == result["extra"]["last_metrics"]["prepare/meta/steps"]
    assert all(s[0] == "meta-kd toy/reviews s0" for s in meta)
    steps = [s for s in seen if s[0] == "meta-kd toy/reviews s0" and s[3] == "step"]
    assert steps[-1][1:3] == (3, 3)
    assert any(s[0] == "teacher toy/reviews s0" and s[1:] == (3, 3, "step") for s in seen)


def test_view_lines_and_headline(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    view = RunView("s", 2, tty=False)
    view.progress(0, "kd t s0", 1, 4, "step")  # not a terminal: no progress output
    view.finished({"run_id": "kd__x", "status": "ok", "wall_s": 75.0})
    view.finished({"run_id": "pkd__x", "status": "n-a", "reason": "no [CLS]"})
    err = capsys.readouterr().err.splitlines()
    assert err == ["[1/2] ok       kd__x  1 min 15 s", "[2/2] n-a      pkd__x  (no [CLS])"]
    line = view.summary("s", 3, tmp_path / "r", tmp_path / "s.md")
    assert "s: 1 ok, 1 n-a, 0 failed, 0 skipped (running elsewhere), 3 already done;" in line
    page = ("# t\n\n## Student `b` (best epoch)\n\ntext\n\n| Method | acc ↑ | Avg ↑ | Wall s/cell |\n"
            "|:--|:--|:--|:--|\n| kd | 96.7 ± 0.0 (2) | 96.7 | 3 |\n| pkd | n-a [1] | | |\n\n## Student `b` (last epoch)\n\n"
            "| Method | x |\n|:--|:--|\n| kd | 1 |\n")
    assert headline(page).splitlines() == ["Student b (best epoch)", "Method  acc ↑           Avg ↑",
                                           "------  --------------  -----", "kd      96.7 ± 0.0 (2)  96.7",
                                           "pkd     n-a"]
