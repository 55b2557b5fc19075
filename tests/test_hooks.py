"""Every hookspec is documented and has a test_hook_* test here (datasette's two tests)."""

from __future__ import annotations

import inspect
import sys
import types
from pathlib import Path

import pytest
import torch

import kdbench
from kdbench.contract import hookspecs
from kdbench.engine.config import load_suite
from kdbench.engine.manager import Host, make_plugin_manager
from kdbench.engine.plan import expand

HOOKS = [n for n, f in vars(hookspecs).items() if n.startswith("kdbench_") and callable(f)]
FAKE = str(Path(__file__).with_name("fakeplugin.py"))
CORE = ("kdbench.engine.runner", "kdbench.report.leaderboard", "kdbench.engine.local")


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_and_tested(hook):
    assert len(inspect.getdoc(getattr(hookspecs, hook)) or "") > 40, f"{hook} needs a real docstring"
    short = hook.removeprefix("kdbench_")
    tests = [n for n in vars(sys.modules[__name__]) if n.startswith("test_hook_")]
    assert any(short in n for n in tests), f"no test_hook_* test for {hook}"


def plugin_module(**hooks) -> types.ModuleType:
    mod = types.ModuleType("hook_test_plugin")
    for name, fn in hooks.items():
        setattr(mod, name, kdbench.hookimpl(fn))
    return mod


def host_with(mod, builtins=None) -> Host:
    pm = make_plugin_manager(autoload=False, **({} if builtins is None else {"builtins": builtins}))
    pm.register(mod)
    return Host(pm)


def _registers(kind: str, obj) -> None:
    def hook(register):
        register(obj)

    host = host_with(plugin_module(**{f"kdbench_register_{kind}": hook}), builtins=CORE)
    assert host.registries[kind].get(obj.name) is obj
    assert host.registries[kind].plugin(obj.name) == "hook_test_plugin"


def test_hook_register_tasks():
    _registers("tasks", type("T", (kdbench.Task,), {"name": "x/t"}))


def test_hook_register_models():
    _registers("models", type("M", (kdbench.ModelKind,), {"name": "m"}))


def test_hook_register_students():
    _registers("students", type("S", (kdbench.StudentKind,), {"name": "s"}))


def test_hook_register_losses():
    _registers("losses", type("L", (kdbench.DistillLoss,), {"name": "l"}))


def test_hook_register_teacher_updates():
    _registers("teacher_updates", type("R", (kdbench.TeacherUpdate,), {"name": "r"}))


def test_hook_register_methods():
    _registers("methods", kdbench.Method("mm", "frozen", "kd"))


def test_hook_register_executors():
    from kdbench.engine.local import LocalExecutor

    _registers("executors", type("E", (LocalExecutor,), {"name": "e"}))


def test_hook_configure(tmp_path):
    def kdbench_configure(suite):
        return [f"suite {suite.name!r}: problem from a plugin"]

    pm = make_plugin_manager(autoload=False, builtins=CORE, extra=[FAKE])
    pm.register(plugin_module(kdbench_configure=kdbench_configure))
    host = Host(pm)
    p = tmp_path / "s.toml"
    p.write_text('[suite]\nname="s"\nmethods=["fkd"]\ntasks=["fake/text"]\nstudents=["nope"]\n')
    with pytest.raises(kdbench.ConfigError) as err:
        expand(load_suite(str(p)), host)
    assert "problem from a plugin" in str(err.value) and "no [students.nope] section" in str(err.value)


def test_hook_run_cell_wrapper_and_log_metrics_and_update_result(make_host, run_tiny):
    seen: dict[str, list] = {"wrapped": [], "logged": []}

    @kdbench.hookimpl(wrapper=True)
    def kdbench_run_cell(spec, ctx):
        seen["wrapped"].append(spec.method)
        result = yield
        result["extra"]["wrapped"] = True
        return result

    @kdbench.hookimpl
    def kdbench_log_metrics(spec, step, metrics):
        seen["logged"].append(dict(metrics))

    @kdbench.hookimpl
    def kdbench_update_result(result):
        result["provenance"]["tested_by"] = "test_hooks"

    mod = types.ModuleType("observer")
    mod.kdbench_run_cell = kdbench_run_cell
    mod.kdbench_log_metrics = kdbench_log_metrics
    mod.kdbench_update_result = kdbench_update_result
    result = run_tiny(make_host(mod), "kd", steps=6)
    assert result["status"] == "ok", result.get("reason")
    assert seen["wrapped"] == ["teacher", "kd"] and result["extra"]["wrapped"]
    assert any("loss/kd" in m for m in seen["logged"]) and any("loss/ce" in m for m in seen["logged"])
    assert result["provenance"]["tested_by"] == "test_hooks"
    # the CPU is part of provenance: results are bit-reproducible only on the same CPU model
    assert result["provenance"]["cpu"].endswith(", " + torch.backends.cpu.get_cpu_capability())


def test_hook_run_cell(make_host, run_tiny):
    @kdbench.hookimpl
    def kdbench_run_cell(spec, ctx):
        if spec.method == "kd":
            from kdbench.report.results import new_result

            r = new_result(spec)
            r.update(status="n-a", reason="replaced by a plugin")
            return r
        return None

    result = run_tiny(make_host(plugin_module(kdbench_run_cell=kdbench_run_cell)), "kd", steps=4)
    assert (result["status"], result["reason"]) == ("n-a", "replaced by a plugin")
