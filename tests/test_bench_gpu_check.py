"""``scripts/gpu-check``: its generated data loads through the real task loaders, and the whole
check runs on CPU with ``--cpu --quick`` (tiny shapes) and writes one JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

import pytest

from kdbench_builtins.tasks_cifar100 import Cifar100, Cifar100Config
from kdbench_builtins.tasks_glue import Sst2

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check"


def _module() -> ModuleType:
    return SourceFileLoader("gpu_check", str(SCRIPT)).load_module()


def test_generated_data_loads_through_the_task_loaders(tmp_path: Path) -> None:
    gc = _module()
    root = gc.write_sst2(tmp_path / "glue", 40, 10)
    splits = Sst2(Sst2.Config(data_dir=str(root))).load()
    assert len(splits["train"]) == 40 and len(splits["dev"]) == 10
    assert set(splits["train"]["label"]) == {0, 1}
    folder = gc.write_cifar(tmp_path / "cifar", 12, 6)
    data = Cifar100(Cifar100Config(data_dir=str(folder))).load()
    assert len(data["train"]) == 12 and len(data["test"]) == 6


def test_budget_fits_eight_minutes() -> None:
    assert sum(_module().BUDGET_S.values()) < 8 * 60


@pytest.mark.slow
def test_cpu_quick_run_writes_one_json(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    repo = SCRIPT.parents[1]
    env = {**os.environ, "KDBENCH_PEAK_TFLOPS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "plugins")])}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--quick", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=900, check=False)  # a hang guard, not a timing
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["total_s"] > 0  # its time budget is test_budget_fits_eight_minutes
    assert report["device"]["name"] == "cpu" and report["device"]["torch"]
    rows = report["bench"]["rows"]
    assert [r["method"] for r in rows] == ["kd (live teacher)", "kd (cached teacher)", "metadistil first_order_exact"]
    assert all(r["status"] == "ok" and r["seq_per_s"] > 0 and r["mfu"] > 0 for r in rows)
    assert rows[2]["model"] == "4F_T+11F_S" and rows[0]["shape"] == "tiny"
    for part in ("glue", "cifar"):
        cells = report[part]["cells"]
        assert sorted(c["method"] for c in cells) == ["kd", "teacher"], part
        assert all(c["status"] == "ok" and c["wall_s"] > 0 and c["samples_per_s"] > 0 for c in cells), part
        assert next(c for c in cells if c["method"] == "kd")["mfu"] > 0  # teacher cells record no MFU
    assert report["glue"]["teacher_source"].startswith("tiny-bert")
