from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import kdbench
from kdbench.contract.errors import DuplicateNameError, PluginError, UnknownNameError
from kdbench.contract.registry import Registry
from kdbench.engine.manager import Host, make_plugin_manager

FAKE = str(Path(__file__).with_name("fakeplugin.py"))
CORE = ("kdbench.engine.runner", "kdbench.report.leaderboard", "kdbench.engine.local")


def fake_host(*extra: str) -> Host:
    return Host(make_plugin_manager(autoload=False, builtins=CORE, extra=[FAKE, *extra]))


class A:
    name = "alpha"


class B:
    name = "alpha"


def test_unknown_name_suggests_and_lists():
    reg: Registry = Registry("method")
    reg.add(A)
    with pytest.raises(UnknownNameError) as err:
        reg.get("alpah")
    assert "unknown method 'alpah'; Did you mean 'alpha'?" in str(err.value)
    assert "Available: alpha" in str(err.value)


def test_duplicate_names_both_origins():
    reg: Registry = Registry("teacher update")
    reg.current_plugin = "first"
    reg.add(A)
    reg.current_plugin = "second"
    with pytest.raises(DuplicateNameError) as err:
        reg.add(B)
    msg = str(err.value)
    assert "teacher update 'alpha' is already registered" in msg
    assert "test_registry_manager.py" in msg and "plugin 'first'" in msg and "plugin 'second'" in msg
    assert "-p no:second" in msg


def test_same_object_twice_is_fine_and_freeze():
    reg: Registry = Registry("task")
    reg.add(A)
    reg.add(A)
    reg.freeze()
    with pytest.raises(DuplicateNameError):
        reg.add(type("C", (), {"name": "c"}))


def test_builtins_register_everything():
    host = Host(make_plugin_manager(autoload=False))
    for name in ("kd", "pkd-skip", "pkd-last", "metadistil", "reptile-distil", "meta-kd", "no-kd"):
        assert name in host.methods, name
    assert "frozen" in host.teacher_updates and "local" in host.executors


def test_builtin_modules_come_from_the_plugin_package_and_block_by_module_name():
    """The host lists no built-in plugin module: ``kdbench_builtins.PLUGINS`` does; each is
    registered (and blocked, ``-p no:MODULE``) under its module name."""
    import kdbench_builtins
    from kdbench.engine.manager import HOST_PLUGINS, builtin_plugins

    assert builtin_plugins() == (*HOST_PLUGINS, *kdbench_builtins.PLUGINS)
    pm = make_plugin_manager(autoload=False)
    names = {n for n, p in pm.list_name_plugin() if p is not None}
    assert set(kdbench_builtins.PLUGINS) <= names
    blocked = Host(make_plugin_manager(autoload=False, blocked=["kdbench_builtins.metakd"]))
    assert "meta-kd" not in blocked.methods and "kd" in blocked.methods


def test_role_method_finds_the_one_holder_or_none(tmp_path):
    host = Host(make_plugin_manager(autoload=False))
    assert host.role_method("student-only").name == "no-kd" and host.role_method("reference").name == "kd"
    assert host.role_method("no-such-role") is None
    assert fake_host().role_method("reference") is None  # the fake plugin has no reference method
    twin = tmp_path / "twin.py"
    twin.write_text(textwrap.dedent("""
        import kdbench
        @kdbench.hookimpl
        def kdbench_register_methods(register):
            register(kdbench.Method("plain", "frozen", "ce", role="student-only"))
    """))
    with pytest.raises(PluginError) as err:
        fake_host(str(twin)).role_method("student-only")
    msg = str(err.value)
    assert "'student-only'" in msg and "'plain'" in msg and str(twin) in msg and "-p no:" in msg


def test_p_path_and_block(tmp_path):
    host = fake_host()
    assert "fkd" in host.methods
    host = Host(make_plugin_manager(autoload=False, builtins=CORE, extra=[FAKE], blocked=[FAKE]))
    assert "fkd" not in host.methods


def test_broken_plugin_import_one_line(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import does_not_exist_xyz\n")
    with pytest.raises(PluginError) as err:
        make_plugin_manager(autoload=False, builtins=CORE, extra=[str(bad)])
    msg = str(err.value)
    assert 'error loading plugin "' in msg and "No module named 'does_not_exist_xyz'" in msg
    assert "\n" not in msg


def test_misspelled_hook_is_named_with_suggestion(tmp_path):
    bad = tmp_path / "typo.py"
    bad.write_text(textwrap.dedent("""
        import kdbench
        @kdbench.hookimpl
        def kdbench_register_teacher_update(register):
            pass
    """))
    with pytest.raises(PluginError) as err:
        make_plugin_manager(autoload=False, builtins=CORE, extra=[str(bad)])
    msg = str(err.value)
    assert "unknown hook 'kdbench_register_teacher_update'" in msg
    assert "kdbench_register_teacher_updates" in msg and "-p no:" in msg


def test_duplicate_method_across_plugins(tmp_path):
    dup = tmp_path / "dup.py"
    dup.write_text(textwrap.dedent("""
        import kdbench
        @kdbench.hookimpl
        def kdbench_register_methods(register):
            register(kdbench.Method("fkd", "frozen", "fake-kd"))
    """))
    with pytest.raises(DuplicateNameError) as err:
        fake_host(str(dup))
    assert "method 'fkd' is already registered" in str(err.value)


def test_autoload_env_switch(monkeypatch):
    monkeypatch.setenv("KDBENCH_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = make_plugin_manager(builtins=CORE)
    assert all(not n.startswith("anchored") for n, _ in pm.list_name_plugin())


def test_host_does_not_import_builtins():
    for path in Path(kdbench.__file__).parent.rglob("*.py"):
        src = path.read_text()
        assert "import kdbench_builtins" not in src and "from kdbench_builtins" not in src, path


def test_a_bad_plugin_named_by_the_environment_is_named_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDBENCH_PLUGINS", "no_such_plugin_xyz")
    with pytest.raises(PluginError, match="remove no_such_plugin_xyz from KDBENCH_PLUGINS"):
        make_plugin_manager(autoload=False)
    with pytest.raises(PluginError, match="drop -p no_such_plugin_xyz"):  # -p wins when both name it
        make_plugin_manager(autoload=False, extra=["no_such_plugin_xyz"])
