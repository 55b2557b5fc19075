"""Result files: one JSON per cell, written atomically, loaded into pandas with one call.

Schema (``SCHEMA_VERSION``): run_id, suite, method, task, student, teacher, seed, status
(ok | failed | diverged | n-a), reason, metrics {best, last} ({"split/metric": value}),
protocol {selection, best_epoch, epochs_run, steps}, config (the resolved configuration),
versions, data (what the data pipeline chose), teacher (the teacher record), wall_s,
peak_memory_mb, throughput {samples_per_s, train_s, model_flops_per_sample, mfu}, seeds,
provenance (library versions, git commit, device, CPU, plugins), extra.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdbench.contract.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

    from kdbench.contract.spec import CellSpec

SCHEMA_VERSION = 1
PLAN_FILE = "plan.json"  # the plan facts a leaderboard page needs; see write_plan
FINAL = ("ok", "n-a", "diverged")  # statuses a rerun skips; "failed" is retried with --retry-failed


def new_result(spec: CellSpec) -> dict[str, Any]:
    """A result skeleton for ``spec`` (status "failed" until the runner says otherwise)."""
    return {
        "schema_version": SCHEMA_VERSION, "run_id": spec.run_id, "suite": spec.suite,
        "method": spec.method, "task": spec.task, "student": spec.student, "teacher_name": spec.teacher,
        "seed": spec.seed, "status": "failed", "reason": "", "metrics": {}, "protocol": {},
        "config": spec.resolved(), "versions": dict(spec.versions), "wall_s": 0.0,
        "peak_memory_mb": 0.0, "throughput": {}, "extra": {"last_metrics": {}},
    }


def provenance(device: str, plugins: dict[str, str]) -> dict[str, Any]:
    """Library versions, git commit, device, CPU (and how it runs bf16 products) and plugin versions."""
    import importlib.metadata as md

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "absent"

    return {
        "kdbench": version("kdbench"), "torch": version("torch"),
        "transformers": version("transformers"), "datasets": version("datasets"),
        "evaluate": version("evaluate"), "python": sys.version.split()[0],
        "platform": platform.platform(), "git_commit": git_commit(), "device": device,
        "cpu": cpu_description(), "cpu_bf16_gemm": cpu_bf16_gemm(), "plugins": plugins,
    }


def cpu_description() -> str:
    """CPU model and torch's kernel level, e.g. ``"AMD EPYC (family 26 model 2), AVX512"``.

    Recorded because CPU results are bit-reproducible only on the same CPU model: MKL may choose
    different kernels per CPU, and the same cell on two hosts differed in the last float bits,
    which training can amplify (measured: leaderboards/README.md).
    """
    import torch

    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info:
        name += f" (family {info['cpu family']} model {info.get('model', '?')})"
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def cpu_runs_bf16_natively() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX512 or newer: AVX512-BF16, AMX).

    Without them (an AVX2-only CPU) torch's bf16 products take a generic loop: a MiniLM kd step ran
    10x slower than in fp32 on an AVX2 AMD EPYC (``kdbench bench --precision bf16`` against ``fp32``,
    one thread: 1.9 against 18.9 sequences/s), where AVX512-BF16 and AMX CPUs run it 1.5-1.9x
    faster; there the loop routes them through :class:`~kdbench.engine.training.Bf16GemmInFp32`
    (19.6 sequences/s).
    """
    import torch

    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # torch's own check (private)
    if probe is not None:
        return bool(probe())
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


#: ``provenance.cpu_bf16_gemm`` of a CPU without bf16 kernels (the pages count it as a machine type)
FP32_GEMMS = "fp32 GEMM on bf16 operands (Bf16GemmInFp32)"


def cpu_bf16_gemm() -> str:
    """How this machine's CPU runs bf16 matrix products (the result files' ``provenance.cpu_bf16_gemm``)."""
    return "bf16 kernels" if cpu_runs_bf16_natively() else FP32_GEMMS


def git_commit() -> str:
    """The commit of the kdbench source tree, or "" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent, check=False)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def result_path(results_dir: Path, run_id: str) -> Path:
    """``<results_dir>/<run_id>.json``."""
    return results_dir / f"{run_id}.json"


def write_result(results_dir: Path, result: dict[str, Any]) -> Path:
    """Write atomically: temp file in the same directory, fsync, rename."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = result_path(results_dir, result["run_id"])
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1, sort_keys=True, default=str, allow_nan=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_result(path: Path) -> dict[str, Any]:
    """Read one result file; a corrupt file is a DataError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable result file ({exc}). Hint: delete it and rerun the cell") from exc
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{path}: not a kdbench result of schema {SCHEMA_VERSION}. Hint: delete it and rerun")
    return data


def load_results(results_dir: str | Path, unreadable: list[str] | None = None) -> pd.DataFrame:
    """All results below ``results_dir`` as a DataFrame, one row per cell (``plan.json`` is not one).

    Columns: the scalar fields (run_id, method, task, student, seed, status, ...), ``best.<split/metric>``
    and ``last.<split/metric>`` metric columns, ``samples_per_s``, ``mfu`` and ``result`` (the dict).
    An unreadable file raises, unless ``unreadable`` is given: then its error is appended there and
    the file skipped, so one torn file does not hide the rest of a leaderboard.
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    seen: dict[tuple[Any, ...], Path] = {}
    for path in sorted(Path(results_dir).rglob("*.json")):
        if path.name == PLAN_FILE:
            continue
        try:
            r = read_result(path)
        except DataError as exc:
            if unreadable is None:
                raise
            unreadable.append(str(exc).split(". Hint:")[0])
            continue
        cell = (r.get("method"), r.get("task"), r.get("student"), r.get("teacher_name"), r.get("seed"))
        if cell in seen:
            raise DataError(f"{path} and {seen[cell]} are the same cell (method {cell[0]}, task {cell[1]}, "
                            f"seed {cell[4]}) run under two configurations. Hint: move the stale one out "
                            f"of {results_dir} (its run id no longer matches the suite)")
        seen[cell] = path
        row: dict[str, Any] = {k: r.get(k) for k in ("run_id", "suite", "method", "task", "student",
                                                       "teacher_name", "seed", "status", "reason",
                                                       "wall_s", "peak_memory_mb")}
        for which in ("best", "last"):
            for key, value in (r.get("metrics", {}).get(which) or {}).items():
                row[f"{which}.{key}"] = value
        row["samples_per_s"] = r.get("throughput", {}).get("samples_per_s")
        row["mfu"] = r.get("throughput", {}).get("mfu")
        row["train_s"] = r.get("throughput", {}).get("train_s")
        row["result"] = r
        rows.append(row)
    return pd.DataFrame(rows)


PLAN_CELL_KEYS = ("run_id", "method", "task", "student", "teacher", "seed", "na_reason")


def write_plan(results_dir: Path, facts: Mapping[str, Any], cells: Sequence[CellSpec]) -> Path:
    """Write (merge into) ``<results_dir>/plan.json``: the suite's ``facts`` (newest wins; built by
    :func:`kdbench.engine.plan.plan_facts`) and the union of planned cells by run id (a re-planned
    cell replaces its old entry and moves last).

    ``kdbench run`` writes it after planning, so that ``kdbench leaderboard`` renders from the
    results directory alone, whatever plugins are installed when it renders.
    """
    old = read_plan(results_dir) or {}
    new = [{k: getattr(c, k) for k in PLAN_CELL_KEYS} for c in cells]
    fresh = {c["run_id"] for c in new}
    merged = [c for c in old.get("cells", []) if c.get("run_id") not in fresh] + new
    plan = {"schema_version": SCHEMA_VERSION, "suite": dict(facts), "cells": merged}
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / PLAN_FILE
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(_plan_json(plan), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _plan_json(plan: dict[str, Any]) -> str:
    """Indented JSON with one line per cell, so that a re-plan diffs line by line."""
    head = json.dumps({k: v for k, v in plan.items() if k != "cells"}, indent=1, sort_keys=True, default=str)
    cells = ",\n".join("  " + json.dumps(c, sort_keys=True, default=str) for c in plan["cells"])
    return head[:-2] + ',\n "cells": [\n' + cells + "\n ]\n}\n"


def read_plan(results_dir: Path) -> dict[str, Any] | None:
    """``<results_dir>/plan.json``, or None when there is none; a corrupt one is a DataError.

    Its ``suite`` facts are as written: a plan written before the facts named the role methods
    has no ``baseline_method`` / ``no_kd_method`` (the page then says to regenerate it)."""
    path = Path(results_dir) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable plan file ({exc}). Hint: rerun `kdbench run` for this "
                        "directory (it rewrites the plan without running finished cells)") from exc
    if not isinstance(plan, dict) or not isinstance(plan.get("suite"), dict):
        raise DataError(f"{path}: not a kdbench plan file. Hint: delete it and rerun `kdbench run`")
    plan.setdefault("cells", [])
    return plan
