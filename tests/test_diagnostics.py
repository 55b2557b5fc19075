"""Teacher diagnostics (live teacher vs its start) and the trivial baseline, on the tiny toy task."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_fault_tolerance import Interrupt, InterruptAt

from kdbench.engine.config import load_suite
from kdbench.engine.diagnostics import divergence, trivial_baseline
from kdbench.engine.executors import MatrixContext, pending
from kdbench.engine.local import LocalExecutor
from kdbench.engine.manager import Host
from kdbench.engine.plan import expand
from kdbench.testing import tiny_suite

TEACHER_KEYS = {"teacher/dev/accuracy", "teacher/dev/kl", "teacher/drift"}


def test_divergence_is_kl_and_squared_difference() -> None:
    a, b = torch.tensor([[0.0, 1.0], [2.0, -1.0]]), torch.tensor([[1.0, 0.0], [2.0, -1.0]])
    p, q = a.softmax(-1), b.softmax(-1)
    want = float((p * (p.log() - q.log())).sum(-1).mean())
    assert divergence(a, b, regression=False) == pytest.approx(want, rel=1e-6)
    assert divergence(a, a, regression=False) == 0.0
    assert divergence(a[:, :1], b[:, :1], regression=True) == pytest.approx(0.5)


def test_frozen_kd_teacher_is_exactly_unchanged(make_host: Callable[..., Host], run_tiny: Any) -> None:
    result = run_tiny(make_host(), "kd", steps=6)
    assert result["status"] == "ok", result.get("reason")
    after = result["teacher_after"]
    assert TEACHER_KEYS <= set(after)
    assert after["teacher/drift"] == 0.0 and after["teacher/dev/kl"] == 0.0
    assert all(TEACHER_KEYS <= set(h) for h in result["history"])
    assert not any(k.startswith("teacher/") for k in result["metrics"]["last"])
    # the live teacher's score is the fine-tuned teacher's own dev score
    assert after["teacher/dev/accuracy"] == pytest.approx(result["teacher"]["metrics"]["best"]["dev/accuracy"])


@pytest.mark.parametrize("method", ["reptile-distil", "metadistil"])
def test_rules_that_move_the_teacher_show_drift(method: str, make_host: Callable[..., Host],
                                                run_tiny: Any) -> None:
    result = run_tiny(make_host(), method, steps=6)
    assert result["status"] == "ok", result.get("reason")
    after = result["teacher_after"]
    assert after["teacher/drift"] > 0 and after["teacher/dev/kl"] > 0
    assert math.isfinite(after["teacher/dev/accuracy"])
    assert after == {k: v for k, v in result["history"][-1].items() if k.startswith("teacher/")}


def test_trivial_baseline_and_recorded_models(make_host: Callable[..., Host], run_tiny: Any) -> None:
    result = run_tiny(make_host(), "kd", steps=4)
    base = result["baseline"]
    assert set(base) == {"dev/accuracy"} and 0 < base["dev/accuracy"] < 1
    models = result["extra"]["models"]
    assert models["student"]["pooling"] == "cls" and models["student"]["picked_layers"] == [1]
    assert models["teacher"]["pooling"] == "cls"


class _Data:
    def __init__(self, splits: dict[str, Any]) -> None:
        self.splits = splits


class _Split:
    def __init__(self, labels: torch.Tensor) -> None:
        self.tensors = {"labels": labels}

    def labels_known(self) -> bool:
        return bool((self.tensors["labels"] != -1).all())


class _Task:
    eval_splits = ("dev", "test")

    def __init__(self, num_labels: int) -> None:
        self.num_labels = num_labels
        self.is_regression = num_labels == 1
        self.seen: list[torch.Tensor] = []

    def compute_metrics(self, preds: torch.Tensor, labels: torch.Tensor, split: str) -> dict[str, float]:
        self.seen.append(preds)
        if self.is_regression:
            return {"mse": float((preds - labels).pow(2).mean())}
        return {"accuracy": float((preds == labels).float().mean())}


def test_trivial_baseline_majority_and_mean() -> None:
    task = _Task(3)
    data = _Data({"train": _Split(torch.tensor([2, 2, 1, 0, 2])), "dev": _Split(torch.tensor([2, 1, 2, 2])),
                  "test": _Split(torch.full((3,), -1))})
    assert trivial_baseline(task, data) == {"dev/accuracy": 0.75}  # type: ignore[arg-type]  # test left out (unlabelled)
    assert torch.equal(task.seen[0], torch.tensor([2, 2, 2, 2]))
    reg = _Task(1)
    data = _Data({"train": _Split(torch.tensor([1.0, 3.0])), "dev": _Split(torch.tensor([2.0, 4.0])),
                  "test": _Split(torch.tensor([2.0]))})
    assert trivial_baseline(reg, data) == {"dev/mse": 2.0, "test/mse": 0.0}  # type: ignore[arg-type]


def test_resumed_cell_measures_against_the_same_start(tmp_path: Path, make_host: Callable[..., Host]) -> None:
    """Interrupted after epoch 0 (teacher already moved), resumed: the probe's start is the
    fine-tuned teacher, not the checkpointed one, so the diagnostics match an uninterrupted run."""
    interrupt = InterruptAt()
    host = make_host(interrupt)
    suite = load_suite(str(tiny_suite(tmp_path / "s.toml", "reptile-distil", steps=0)), [
        "train.epochs=2", "train.max_steps=0", "train.log_every=2", "train.checkpoint_every=3",
        "teacher_train.max_steps=4", "task.toy/reviews.per_domain=200",
        "task.toy/reviews.max_train_examples=96"])
    cells = expand(suite, host)
    cache = tmp_path / "cache"
    ref = list(LocalExecutor(None).map(cells, MatrixContext(tmp_path / "ref", cache), host))
    mctx = MatrixContext(tmp_path / "res", cache)
    interrupt.step = 7
    with pytest.raises(Interrupt):
        list(LocalExecutor(None).map(pending(cells, mctx.results_dir, False), mctx, host))
    out = list(LocalExecutor(None).map(pending(cells, mctx.results_dir, False), mctx, host))
    want = next(r for r in ref if r["method"] == "reptile-distil")
    got = next(r for r in out if r["method"] == "reptile-distil")
    assert got["extra"]["resumed_from_step"] == 6
    assert want["teacher_after"]["teacher/drift"] > 0
    assert got["teacher_after"] == want["teacher_after"]
    assert got["history"] == want["history"]
