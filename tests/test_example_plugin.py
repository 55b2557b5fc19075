"""The third-party path: install plugins/kdbench-example, see it in `kdbench ls`, run it via the CLI."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdbench.testing import tiny_suite

EXAMPLE = Path(__file__).resolve().parents[1] / "plugins" / "kdbench-example"


@pytest.fixture(scope="module")
def installed() -> None:
    try:
        importlib.metadata.distribution("kdbench-anchored")
    except importlib.metadata.PackageNotFoundError:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                               "-e", str(EXAMPLE)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    importlib.invalidate_caches()


def cli(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KDBENCH_DISABLE_PLUGIN_AUTOLOAD": ""}  # entry points on
    return subprocess.run([sys.executable, "-m", "kdbench", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp)


def test_listed_with_origin(installed, tmp_path):
    done = cli("ls", "methods", tmp=tmp_path)
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("anchored-kd "))
    assert " anchored " in line and "kdbench_anchored.py" in line
    assert "kdbench-anchored" not in cli("ls", "plugins", tmp=tmp_path).stderr


def test_runs_end_to_end_and_can_be_blocked(installed, tmp_path):
    suite = tiny_suite(tmp_path / "tiny.toml", "anchored-kd", steps=8)
    done = cli("run", "--suite", str(suite), "--cache-dir", str(tmp_path / "c"), tmp=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    board = (tmp_path / "runs" / "tiny.md").read_text()  # a local run: runs/, not leaderboards/
    assert "| anchored-kd " in board
    blocked = cli("-p", "no:anchored", "run", "--suite", str(suite), "--dry-run", tmp=tmp_path)
    assert blocked.returncode == 6 and "unknown method 'anchored-kd'" in blocked.stderr
