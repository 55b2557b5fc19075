"""``python -m kdbench.cli.planfile SUITE DIR``: plan SUITE and merge it into ``DIR/plan.json``.

A leaderboard page renders from its directory's plan file alone (:mod:`kdbench.report.publish`).
``kdbench run`` writes that file; this tool writes it without running anything: it gave the
published results directories (``leaderboards/results/<suite>/``) and the plan pages
(``leaderboards/plans/<suite>/``) their plan files. Run it with the built-in plugins only, so that
the committed files do not depend on what is installed::

    KDBENCH_DISABLE_PLUGIN_AUTOLOAD=1 python -m kdbench.cli.planfile glue leaderboards/plans/glue

(``KDBENCH_PLUGINS`` still adds the plugins it names, as everywhere.) The file is merged, not
replaced: delete it first to drop cells the suite no longer plans.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdbench.contract.errors import ExitCode, KdbenchError


def main(argv: list[str] | None = None) -> int:
    """Merge SUITE's plan (built-in plugins, no entry-point plugins) into ``DIR/plan.json``."""
    from kdbench.engine.config import load_suite
    from kdbench.engine.manager import Host
    from kdbench.engine.plan import expand, plan_facts
    from kdbench.report.results import write_plan

    parser = argparse.ArgumentParser(prog="python -m kdbench.cli.planfile", description=main.__doc__)
    parser.add_argument("suite", help="built-in suite name or TOML path")
    parser.add_argument("results_dir", help="results (or plan-page) directory to write plan.json into")
    args = parser.parse_args(argv)
    try:
        suite = load_suite(args.suite)
        host = Host.create(autoload=False)
        cells = expand(suite, host)
        print(write_plan(Path(args.results_dir), plan_facts(suite, host), cells))
    except KdbenchError as exc:  # one line, as the kdbench command prints it
        print(f"kdbench: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    return int(ExitCode.OK)


if __name__ == "__main__":
    raise SystemExit(main())
