"""Offline, tiny, CPU: every test runs without network or GPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["KDBENCH_DISABLE_PLUGIN_AUTOLOAD"] = "1"
os.environ["KDBENCH_LS_CACHE"] = "0"  # tests/test_cli.py turns the listing cache on where tested

pytest_plugins = ["kdbench.testing"]

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _threads():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def shared_dir() -> Path:
    """../shared beside the repo; skip when absent (a user's fresh clone)."""
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared is absent (real data and MiniLM live there)")
    return SHARED


@pytest.fixture
def minilm_env(shared_dir, monkeypatch) -> str:
    """HF cache env for the offline MiniLM checkpoint; returns its hub name."""
    monkeypatch.setenv("HF_HOME", str(shared_dir / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return "sentence-transformers/all-MiniLM-L6-v2"
