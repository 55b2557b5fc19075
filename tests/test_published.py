"""The committed leaderboards are exactly what their committed result files render to."""

from __future__ import annotations

import re
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
    the built-in plugins (after editing a suite: delete DIR/plan.json, `python -m kdbench.cli.planfile
    SUITE DIR`, then `kdbench leaderboard`)."""
    from kdbench.engine.config import load_suite
    from kdbench.engine.manager import Host
    from kdbench.engine.plan import expand, plan_facts
    from kdbench.report.results import PLAN_FILE, read_plan, write_plan

    host = Host.create(autoload=False)
    plans = sorted((REPO / "leaderboards").glob(f"*/*/{PLAN_FILE}"))
    assert {p.parent.name for p in plans} >= {"glue", "amazon-metakd", "cifar100"}
    for path in plans:
        plan = read_plan(path.parent)
        assert plan is not None
        suite = load_suite(plan["suite"]["suite_arg"])
        fresh = write_plan(tmp_path / path.parent.name, plan_facts(suite, host), expand(suite, host))
        assert fresh.read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), (
            f"{path} is stale. Hint: rm {path.relative_to(REPO)} && KDBENCH_DISABLE_PLUGIN_AUTOLOAD=1 "
            f"python -m kdbench.cli.planfile {suite.name} {path.parent.relative_to(REPO)}")


def test_planfile_tool_writes_the_committed_plan(tmp_path, capsys):
    """``python -m kdbench.cli.planfile SUITE DIR`` (the tool that wrote the committed plan files)
    writes DIR/plan.json; a bad suite is one error line and a non-zero exit."""
    from kdbench.cli.planfile import main
    from kdbench.report.results import PLAN_FILE

    committed = REPO / "leaderboards" / "results" / "quickstart" / PLAN_FILE
    if not committed.is_file():
        pytest.skip("no published quickstart plan in this checkout")
    assert main(["quickstart", str(tmp_path / "q")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "q" / PLAN_FILE)
    assert (tmp_path / "q" / PLAN_FILE).read_text(encoding="utf-8") == committed.read_text(encoding="utf-8")
    assert main(["no-such-suite", str(tmp_path / "x")]) != 0
    assert capsys.readouterr().err.startswith("kdbench: error: ") and not (tmp_path / "x").exists()


DECIMAL = re.compile(r"[-+]?\d+\.\d+")


def unsourced_numbers(readme: str, pages: dict[str, str]) -> list[str]:
    """Decimal numbers of ``readme`` that no generated page holds: each paragraph or bullet is
    checked against the pages it names (`` `glue-small.md` ``), else against all of them."""
    bad = []
    for block in re.split(r"\n\s*\n|\n(?=\s*[*-] )", readme):
        named = [name for name in pages if name in block] or list(pages)
        text = "\n".join(pages[name] for name in named)
        for num in DECIMAL.findall(block):
            pattern = re.escape(num) if num[0] in "+-" else r"[+-]?" + re.escape(num)  # a sign must match
            if not re.search(r"(?<![\d.])" + pattern + r"(?![\d])", text):
                bad.append(f"{num} ({', '.join(named)}): {block.strip()[:80]!r}")
    return bad


def test_every_number_in_the_leaderboards_readme_is_on_a_generated_page():
    pages = {p.name: p.read_text(encoding="utf-8") for p in (REPO / "leaderboards").glob("*.md")
             if p.name != "README.md"}
    readme = (REPO / "leaderboards" / "README.md").read_text(encoding="utf-8")
    assert unsourced_numbers(readme, pages) == []
    # the check itself: a number the named page lacks is reported, one it holds is not
    fake = {"a.md": "| kd | 80.6 (1) | +0.46 |", "b.md": "| kd | 71.3 (1) |"}
    assert unsourced_numbers("* kd scores 80.6 on `a.md`, +0.46 over no-KD.\n* and 71.3 on `a.md`.", fake) == [
        "71.3 (a.md): '* and 71.3 on `a.md`.'"]
    assert unsourced_numbers("kd: 71.3 somewhere.", fake) == []
    assert unsourced_numbers("* -0.46 on `a.md`.", fake) == ["-0.46 (a.md): '* -0.46 on `a.md`.'"]
