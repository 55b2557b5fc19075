"""Pytest fixtures for plugin authors (``pytest_plugins = ["kdbench.testing"]``).

* ``make_host(*plugins)`` — a fresh Host with the built-ins plus the given plugin modules (no
  entry-point autoload, so tests see exactly what they ask for).
* ``run_tiny(host, method, task=None, steps=20, overrides=None)`` — plan and run one tiny
  cell offline (``task`` None: the default in ``kdbench/fixtures.toml``, a small text task) (``overrides``: ``["teacher_update.NAME.key=value", ...]``) and return its result.
"""

from __future__ import annotations

import textwrap
import tomllib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from kdbench.engine.manager import Host, make_plugin_manager

TINY_SUITE = textwrap.dedent("""\
    [suite]
    name = "tiny"
    methods = ["{method}"]
    tasks = ["{task}"]
    students = ["{student}"]
    seeds = [{seed}]
    baselines = false

    [teachers.bert]
    kind = "tiny-bert"
    layers = 2
    hidden = 32

    [teachers.cnn]
    kind = "resnet8"

    [students.bert-l1]
    teacher = "bert"
    kind = "pick-layers"
    layers = 1
    pick = "last"

    [students.cnn]
    teacher = "cnn"
    kind = "model"
    model = "resnet8"

    [train]
    epochs = 1
    batch_size = 16
    lr = 1e-3
    max_steps = {steps}
    log_every = 5

    [teacher_train]
    epochs = 1
    batch_size = 32
    lr = 2e-3
    max_steps = {steps}
    """)


def _fixtures() -> dict[str, Any]:
    testing: dict[str, Any] = tomllib.loads((resources.files("kdbench") / "fixtures.toml").read_text())["testing"]
    return testing


def tiny_suite(path: Path, method: str, task: str | None = None, steps: int = 20, seed: int = 0) -> Path:
    """Write the tiny suite TOML for one method and task (None: the default); return its path."""
    fx = _fixtures()
    task = task or fx["task"]
    student = fx["students"].get(task, fx["student"])
    path.write_text(TINY_SUITE.format(method=method, task=task, student=student, steps=steps, seed=seed))
    return path


def run_tiny_cell(host: Host, tmp: Path, method: str, task: str | None = None, steps: int = 20,
                  overrides: list[str] | None = None) -> dict[str, Any]:
    """Plan the tiny suite and run its method cell (after its teacher cell); return the result."""
    from kdbench.engine.config import load_suite
    from kdbench.engine.executors import MatrixContext
    from kdbench.engine.local import LocalExecutor
    from kdbench.engine.plan import expand

    suite = load_suite(str(tiny_suite(tmp / "tiny.toml", method, task, steps)), overrides)
    cells = expand(suite, host)
    mctx = MatrixContext(tmp / "results", tmp / "cache")
    results = list(LocalExecutor(None).map(cells, mctx, host))
    return next(r for r in results if r["method"] == method)


@pytest.fixture
def make_host() -> Callable[..., Host]:
    """Factory: ``make_host(module, ...)``."""

    def factory(*plugins: Any) -> Host:
        pm = make_plugin_manager(autoload=False)
        for plugin in plugins:
            if not pm.is_registered(plugin):
                pm.register(plugin)
        pm.check_pending()
        return Host(pm)

    return factory


@pytest.fixture
def run_tiny(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """Factory: ``run_tiny(host, method, task=None, steps=20, overrides=None)``.

    Plans the tiny suite (a 2-layer tiny-BERT or a ResNet-8 teacher, one seed, ``steps`` optimizer
    steps) for ``method`` on ``task`` and runs its teacher cell and method cell offline; returns
    the method cell's result dict. ``overrides`` are the command line's ``key=value`` strings,
    e.g. ``["teacher_update.anchored.mu=0.5", "train.epochs=2"]``; a bad one raises
    :class:`kdbench.ConfigError` listing every problem, exactly as ``kdbench run`` would.
    """

    def runner(host: Host, method: str, task: str | None = None, steps: int = 20,
               overrides: list[str] | None = None) -> dict[str, Any]:
        return run_tiny_cell(host, tmp_path, method, task, steps, overrides)

    return runner
