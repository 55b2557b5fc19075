"""The committed leaderboards are exactly what their committed result files render to."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_committed_leaderboards_are_generated():
    if not any((REPO / "leaderboards" / "results").glob("*/*.json")):
        pytest.skip("no published results in this checkout")
    done = subprocess.run([sys.executable, "-m", "kdbench", "leaderboard", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for gpu_suite in ("glue", "amazon-metakd", "cifar100"):  # plan pages: planned cells + reference rows
        page = (REPO / "leaderboards" / f"{gpu_suite}.md").read_text(encoding="utf-8")
        assert "No kdbench results yet" in page and ("## Reference numbers" in page or "No reference rows" in page)


def test_committed_plan_files_match_their_shipped_suites(tmp_path):
    """Pages render from plan files only; a plan file must be what the shipped suite plans to with
    the built-in plugins (after editing a suite: `python -m kdbench.publish SUITE DIR`, then
    `kdbench leaderboard`)."""
    from kdbench.config import load_suite
    from kdbench.manager import Host
    from kdbench.plan import expand
    from kdbench.results import PLAN_FILE, read_plan, write_plan

    host = Host.create(autoload=False)
    plans = sorted((REPO / "leaderboards").glob(f"*/*/{PLAN_FILE}"))
    assert {p.parent.name for p in plans} >= {"glue", "amazon-metakd", "cifar100"}
    for path in plans:
        plan = read_plan(path.parent)
        assert plan is not None
        suite = load_suite(plan["suite"]["suite_arg"])
        fresh = write_plan(tmp_path / path.parent.name, suite, expand(suite, host))
        assert fresh.read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), (
            f"{path} is stale. Hint: KDBENCH_DISABLE_PLUGIN_AUTOLOAD=1 python -m kdbench.publish "
            f"{suite.name} {path.parent.relative_to(REPO)}")
