"""The "ray" executor: same cells and bit-identical metrics as the local executor on CPU; teacher
cells run first; a worker that dies is retried, and recorded as failed past ``max_retries``."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kdbench.contract.hookspecs import hookimpl
from kdbench.engine.config import load_suite
from kdbench.engine.executors import HostArgs, MatrixContext
from kdbench.engine.local import LocalExecutor
from kdbench.engine.manager import Host, make_plugin_manager
from kdbench.engine.plan import expand
from kdbench.report.results import load_results, read_result, result_path
from kdbench.testing import tiny_suite

try:
    import ray
except ImportError as exc:  # ray is in the test extra; a bare install skips with the reason
    pytest.skip(f"ray is not installed ({exc}); pip install 'kdbench[ray]'", allow_module_level=True)

from kdbench_builtins.executor_ray import RayConfig, RayExecutor

pytestmark = pytest.mark.slow

COMPARED = ("status", "metrics", "protocol", "history", "seeds", "config", "method", "seed")

CRASH_PLUGIN = textwrap.dedent('''\
    """Test plugin: kill the worker process running a cell (as a segfault or node loss would)."""

    from __future__ import annotations

    import os
    import signal
    from dataclasses import dataclass
    from pathlib import Path

    from kdbench.contract.hookspecs import hookimpl
    from kdbench.contract.rules import Method, TeacherUpdate


    @dataclass(frozen=True)
    class TagConfig:
        tag: int = 0


    class FrozenTagged(TeacherUpdate):
        """A frozen rule with options: its Config class lives only in this -p file."""

        name = "frozen-tagged"
        Config = TagConfig


    @hookimpl
    def kdbench_register_teacher_updates(register):
        register(FrozenTagged)


    @hookimpl
    def kdbench_register_methods(register):
        register(Method(name="kd-tagged", teacher_update="frozen-tagged", loss="kd"))


    @hookimpl(tryfirst=True)
    def kdbench_run_cell(spec, ctx):
        """no-kd cells die on their first attempt only; kd cells die on every attempt."""
        if spec.is_teacher or spec.method == "kd-tagged":
            return None
        marker = Path(os.environ["KDBENCH_TEST_CRASH_DIR"]) / spec.run_id
        if spec.method == "kd" or not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return None
    ''')


def _cells(tmp: Path, host: Host, seeds: str, *more: str) -> list[Any]:
    suite = load_suite(str(tiny_suite(tmp / "tiny.toml", "kd", steps=12)),
                       [*more, f"suite.seeds={seeds}", "suite.baselines=true", "train.epochs=2",
                        "train.max_steps=0", "task.toy/reviews.per_domain=200",
                        "task.toy/reviews.max_train_examples=96"])
    return expand(suite, host)


def test_ray_matches_local_executor(tmp_path: Path, make_host: Callable[..., Host]) -> None:
    host = make_host()
    cells = _cells(tmp_path, host, "[0, 1]")
    assert len(cells) == 6  # 2 teachers + (kd, no-kd) x 2 seeds
    local = list(LocalExecutor(None).map(cells, MatrixContext(tmp_path / "local", tmp_path / "lc"), host))

    started: list[str] = []
    executor = RayExecutor(RayConfig(num_cpus=1, local_cpus=2, object_store_mb=100))
    remote = list(executor.map(cells, MatrixContext(tmp_path / "ray", tmp_path / "rc"), host,
                               on_start=lambda s: started.append(s.run_id)))
    assert not ray.is_initialized()  # the instance it started is shut down

    assert sorted(started) == sorted(c.run_id for c in cells)
    order = [r["method"] for r in remote]
    assert order[:2] == ["teacher", "teacher"]  # the teacher wave finishes before method cells
    assert sorted(r["run_id"] for r in remote) == sorted(r["run_id"] for r in local)
    by_id = {r["run_id"]: r for r in local}
    for r in remote:
        want = by_id[r["run_id"]]
        for key in COMPARED:
            assert r.get(key) == want.get(key), f"{r['run_id']}: {key} differs between ray and local"
        assert r["status"] == "ok", r["reason"]
        # the worker wrote the same result file the driver got back
        assert read_result(result_path(tmp_path / "ray", r["run_id"]))["metrics"] == r["metrics"]
    method_rows = [r for r in remote if r["method"] != "teacher"]
    assert all(r["teacher"]["cached"] for r in method_rows)  # method cells reuse the teacher wave's
    assert len(load_results(tmp_path / "ray")) == 6


def test_dead_worker_is_retried_then_recorded_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = tmp_path / "crash.py"
    plugin.write_text(CRASH_PLUGIN)
    (tmp_path / "markers").mkdir()
    monkeypatch.setenv("KDBENCH_TEST_CRASH_DIR", str(tmp_path / "markers"))  # forwarded to workers
    host = Host(make_plugin_manager(autoload=False, extra=[str(plugin)]))
    cells = _cells(tmp_path, host, "[0]", 'suite.methods=["kd", "kd-tagged"]',
                   "teacher_update.frozen-tagged.tag=7")
    assert len(cells) == 4
    mctx = MatrixContext(tmp_path / "res", tmp_path / "cache", HostArgs(extra=(str(plugin),), autoload=False))
    # ship_code: workers import kdbench and kdbench_builtins from the uploaded copies
    executor = RayExecutor(RayConfig(num_cpus=1, local_cpus=2, max_retries=1, object_store_mb=100,
                                     ship_code=True))
    results = {r["method"]: r for r in executor.map(cells, mctx, host)}
    assert results["teacher"]["status"] == "ok"
    # the spec's option classes come from the -p file; the worker loads it before unpickling them
    assert results["kd-tagged"]["status"] == "ok", results["kd-tagged"]["reason"]
    assert results["kd-tagged"]["config"]["teacher_update"] == {"name": "frozen-tagged", "tag": 7}
    assert results["no-kd"]["status"] == "ok", results["no-kd"]["reason"]  # died once, retried
    assert results["no-kd"]["protocol"]["epochs_run"] == 2
    kd = results["kd"]
    assert kd["status"] == "failed" and kd["extra"]["error_kind"] == "worker_died"
    assert kd["extra"]["max_retries"] == 1
    # the driver recorded the lost cell, so a plain rerun skips it and --retry-failed reruns it
    assert read_result(result_path(tmp_path / "res", kd["run_id"]))["status"] == "failed"


def test_bad_options_are_config_errors(tmp_path: Path, make_host: Callable[..., Host]) -> None:
    from kdbench.contract.errors import ConfigError

    host = make_host()
    cells = _cells(tmp_path, host, "[0]")
    with pytest.raises(ConfigError, match="max_retries"):
        list(RayExecutor(RayConfig(max_retries=-1)).map(cells, MatrixContext(tmp_path, tmp_path), host))
    with pytest.raises(ConfigError, match="address"):
        list(RayExecutor(RayConfig(address="nowhere")).map(cells, MatrixContext(tmp_path, tmp_path), host))


class InProcessOnly:
    """A plugin object registered in the driver: workers could never load it."""

    @hookimpl
    def kdbench_log_metrics(self, spec: Any, step: int, metrics: Any) -> None:
        """Observe nothing."""


def test_in_process_plugins_are_refused(tmp_path: Path, make_host: Callable[..., Host]) -> None:
    from kdbench.contract.errors import ConfigError

    host = make_host(InProcessOnly())
    cells = _cells(tmp_path, host, "[0]")
    with pytest.raises(ConfigError, match=r"test_ray\.InProcessOnly.*-p MODULE_OR_FILE"):
        list(RayExecutor(RayConfig()).map(cells, MatrixContext(tmp_path, tmp_path), host))
    assert not ray.is_initialized()  # refused before starting anything


def test_the_bf16_check_probes_every_node(tmp_path: Path, make_host: Callable[..., Host],
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`kdbench run`'s bf16 warning under Ray comes from the nodes (a probe task per node), not
    from the driver's CPU; a second node without bf16 kernels is named with the count."""
    import kdbench_builtins.executor_ray as executor_ray
    from kdbench import this_cpu

    probed: list[list[tuple[bool, str]]] = []
    real_probe = executor_ray.node_cpus

    def two_nodes(ray_module: Any) -> list[tuple[bool, str]]:
        probed.append(real_probe(ray_module))  # the real probe: a task on each alive node
        return [*probed[-1], (False, "Some CPU (family 1 model 1), AVX2")]

    monkeypatch.setattr(executor_ray, "node_cpus", two_nodes)
    host = make_host()
    teacher = [c for c in _cells(tmp_path, host, "[0]", "teacher_train.precision=bf16") if c.is_teacher]
    executor = RayExecutor(RayConfig(num_cpus=1, local_cpus=1, object_store_mb=100))
    assert executor.bf16_warning(teacher, "auto") is None  # not the driver's CPU: map() probes the nodes
    [result] = executor.map(teacher, MatrixContext(tmp_path / "res", tmp_path / "c"), host)
    assert result["status"] == "ok", result["reason"]
    assert probed == [[this_cpu()]]  # one alive node, which reports this machine's CPU
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if "without bf16 kernels" in ln]
    assert line.startswith("kdbench: note: 1 of the cells to run train with precision = \"bf16\"")
    assert f"{1 + (not this_cpu()[0])} of 2 nodes" in line and "Some CPU (family 1 model 1), AVX2" in line
