"""Runner-overhead benchmark (``kdbench bench --overhead``): everything a cell costs besides its
training steps, timed in fresh interpreters (cold imports included)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

_OVERHEAD_SCRIPT = """\
import json, sys, tempfile, time
from pathlib import Path
t0 = time.perf_counter()
from kdbench.engine.manager import Host, make_plugin_manager
t1 = time.perf_counter()
host = Host(make_plugin_manager())
t2 = time.perf_counter()
from kdbench.engine.config import load_suite
from kdbench.engine.plan import expand
cells = expand(load_suite("quickstart"), host)
t3 = time.perf_counter()
from kdbench.testing import run_tiny_cell
method = next(c.method for c in cells if not c.is_teacher)  # the plan's first method
with tempfile.TemporaryDirectory() as tmp:
    status = run_tiny_cell(host, Path(tmp), method, steps=1)["status"]
t4 = time.perf_counter()
with tempfile.TemporaryDirectory() as tmp:  # the same two cells again: what later cells pay
    run_tiny_cell(host, Path(tmp), method, steps=1)
t5 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "host": t2 - t1, "plan": t3 - t2, "cell": t4 - t3,
                  "warm_cell": t5 - t4, "cells": len(cells), "status": status, "method": method}))
"""


def overhead_phases() -> dict[str, Any]:
    """Phases of runner overhead, timed inside a fresh interpreter (cold imports included):
    imports, plugin loading + Host, planning the quickstart suite, and a tiny cell of the plan's
    first method with ``max_steps=1`` (its teacher cell and method cell: data, models, one step and evaluation each)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _OVERHEAD_SCRIPT], capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"overhead script failed: {proc.stderr.strip()[-800:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process"] = wall
    return out


def time_ls(env: dict[str, str] | None = None) -> tuple[float, str]:
    """Wall time and stdout of ``python -m kdbench ls`` in a new process (raises if it fails)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kdbench", "ls"], capture_output=True, text=True,
                          check=True, env=env)
    return time.perf_counter() - t0, proc.stdout


def time_ls_cold_warm(repeats: int) -> dict[str, list[float]]:
    """``kdbench ls`` times in new processes: without the listing cache, and with it warm."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "KDBENCH_CACHE": tmp, "KDBENCH_LS_CACHE": "0"}
        cold = [time_ls(env)[0] for _ in range(repeats)]
        env["KDBENCH_LS_CACHE"] = "1"
        time_ls(env)
        warm = [time_ls(env)[0] for _ in range(repeats)]
    return {"cold": cold, "warm": warm}


def overhead_table(runs: list[dict[str, Any]], ls_times: dict[str, list[float]]) -> str:
    """Markdown table of median overhead phases (targets: overhead < 2 s, ``kdbench ls`` < 1 s)."""
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("import", "host", "plan", "cell", "warm_cell", "process")}
    total = med["host"] + med["plan"] + med["cell"]
    rows = [("imports (kdbench, torch, ...)", med["import"], ""),
            ("plugin loading + Host", med["host"], ""), ("plan quickstart suite", med["plan"], ""),
            (f"tiny {runs[0].get('method', '')} cell, max_steps=1 (teacher + method cell)", med["cell"], ""),
            ("overhead = Host + plan + cell", total, "< 2 s"),
            ("the same two cells again in the same process (warm)", med["warm_cell"], ""),
            ("whole process", med["process"], ""),
            ("`kdbench ls`, cold (first listing after a plugin change)", statistics.median(ls_times["cold"]), ""),
            ("`kdbench ls`, warm (listing cache)", statistics.median(ls_times["warm"]), "< 1 s")]
    return "\n".join(["| phase | median (s) | target |", "|---|--:|---|",
                      *(f"| {n} | {v:.2f} | {t} |" for n, v, t in rows)])
