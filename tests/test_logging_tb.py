"""The built-in TensorBoard observer writes every logged metric of a cell under its run id."""

from __future__ import annotations

import sys
import types

from kdbench.engine import logging_tb


class FakeWriter:
    instances: list[FakeWriter] = []

    def __init__(self, logdir: str) -> None:
        self.logdir, self.scalars, self.flushed = logdir, [], 0
        FakeWriter.instances.append(self)

    def add_scalar(self, key, value, step):
        self.scalars.append((key, value, step))

    def flush(self):
        self.flushed += 1


def test_metrics_reach_tensorboard(make_host, run_tiny, tmp_path, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setenv("KDBENCH_TENSORBOARD", str(tmp_path / "tb"))
    monkeypatch.setattr(logging_tb, "_writers", {})
    result = run_tiny(make_host(), "kd", steps=6)
    assert result["status"] == "ok"
    writer = next(w for w in FakeWriter.instances if w.logdir.endswith(result["run_id"]))
    keys = {k for k, _, _ in writer.scalars}
    assert {"loss/kd", "loss/ce", "lr", "eval/dev/accuracy"} <= keys and writer.flushed


def test_off_without_directory(monkeypatch):
    monkeypatch.delenv("KDBENCH_TENSORBOARD", raising=False)
    monkeypatch.setattr(logging_tb, "_writers", {})
    assert logging_tb._writer("any") is None
