"""Plugin loading and the Host: the only code that touches ``pm.hook``.

Discovery order: built-ins (the host's own ``HOST_PLUGINS``, then the modules the built-in plugin
package ``kdbench_builtins`` lists in its ``PLUGINS``), installed distributions through the
entry-point group ``kdbench`` (unless ``KDBENCH_DISABLE_PLUGIN_AUTOLOAD`` is set), then
``-p MODULE`` or ``-p path/to/plugin.py``. ``-p no:NAME`` blocks a plugin by name (a built-in's
name is its module, e.g. ``no:kdbench_builtins.metakd``; an entry point's is its entry-point name).
The host names no built-in module itself: the package says which it has.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from kdbench.contract import hookspecs
from kdbench.contract.errors import ConfigError, PluginError
from kdbench.contract.registry import Registry, suggest

if TYPE_CHECKING:
    from kdbench.contract.rules import Method
    from kdbench.contract.spec import CellSpec, RunContext, Suite

HOST_PLUGINS = ("kdbench.engine.runner", "kdbench.engine.local", "kdbench.engine.logging_tb")
BUILTIN_PACKAGE = "kdbench_builtins"  # a plugin package: its PLUGINS names its plugin modules
GROUP = "kdbench"
#: the ``Method.role`` values the host acts on (see kdbench.contract.rules.Method): the no-KD row
#: (its loss also fine-tunes the teachers) and the method paired tables compare against
ROLE_NO_KD, ROLE_REFERENCE = "student-only", "reference"
KINDS = ("tasks", "models", "students", "losses", "teacher_updates", "methods", "executors")
_KIND_LABEL = {"tasks": "task", "models": "model", "students": "student", "losses": "loss",
               "teacher_updates": "teacher update", "methods": "method", "executors": "executor"}


def env_flag(name: str) -> bool:
    """True when the environment variable is set to something other than "", "0" or "false"."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _import_plugin(spec: str, given: str = "-p") -> ModuleType:
    """Import ``-p`` argument: a module name or a path to a .py file; ``given`` names where it
    came from for the hints (``-p`` or ``KDBENCH_PLUGINS``)."""
    drop = f"drop -p {spec}" if given == "-p" else f"remove {spec} from KDBENCH_PLUGINS"
    try:
        if spec.endswith(".py") or os.sep in spec:
            path = Path(spec)
            if not path.is_file():
                raise PluginError(f"plugin file {spec!r} not found. Hint: check the path given to {given}")
            modname = f"kdbench_local_{path.stem}"
            loader_spec = importlib.util.spec_from_file_location(modname, path)
            assert loader_spec is not None and loader_spec.loader is not None
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[modname] = module
            loader_spec.loader.exec_module(module)
            return module
        return importlib.import_module(spec)
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(
            f'error loading plugin "{spec}": {type(exc).__name__}: {exc}. '
            f"Hint: fix it, or {drop}"
        ) from exc


def _hook_suggestion(exc: pluggy.PluginValidationError, pm: pluggy.PluginManager) -> str:
    text = str(exc)
    known = [n for n in dir(hookspecs) if n.startswith("kdbench_")]
    name = pm.get_name(exc.plugin) or "?"
    found = re.search(r"unknown hook '([^']+)'", text)
    if found:
        hook = found.group(1)
        return (f"plugin {name!r} implements unknown hook {hook!r}.{suggest(hook, known)} "
                f"Hint: rename the function, or skip the plugin with -p no:{name}")
    return f"{text}. Hint: skip the plugin with -p no:{name}"


def builtin_plugins() -> tuple[str, ...]:
    """The built-in plugin modules, in registration order: ``HOST_PLUGINS``, then the ``PLUGINS``
    of the built-in plugin package (none when this build has no such package)."""
    try:
        package = importlib.import_module(BUILTIN_PACKAGE)
    except ModuleNotFoundError as exc:
        if exc.name == BUILTIN_PACKAGE:
            return HOST_PLUGINS
        raise
    return (*HOST_PLUGINS, *getattr(package, "PLUGINS", ()))


def make_plugin_manager(
    *, autoload: bool | None = None, extra: Sequence[str] = (), blocked: Sequence[str] = (),
    builtins: Sequence[str] | None = None,
) -> pluggy.PluginManager:
    """Build a fresh manager: built-ins (``builtin_plugins()`` unless ``builtins`` is given),
    entry points, ``-p`` plugins; validate every hookimpl."""
    if builtins is None:
        builtins = builtin_plugins()
    if autoload is None:
        autoload = not env_flag("KDBENCH_DISABLE_PLUGIN_AUTOLOAD")
    from_env = [p for p in os.environ.get("KDBENCH_PLUGINS", "").split(",") if p]
    given = {**dict.fromkeys(from_env, "KDBENCH_PLUGINS"), **dict.fromkeys(extra, "-p")}
    extra = [*extra, *from_env]
    blocked = [*blocked, *filter(None, os.environ.get("KDBENCH_DISABLED_PLUGINS", "").split(","))]
    pm = pluggy.PluginManager("kdbench")
    pm.add_hookspecs(hookspecs)
    for name in blocked:
        pm.set_blocked(name)
    for modname in builtins:
        if pm.is_blocked(modname):
            continue
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:  # built-in not present in this build
                continue
            raise
        pm.register(module, name=modname)
    if autoload:
        for ep in importlib.metadata.entry_points(group=GROUP):
            if pm.is_blocked(ep.name) or pm.get_plugin(ep.name) is not None:
                continue
            try:  # one name at a time keeps distribution info for versions (as pytest does)
                pm.load_setuptools_entrypoints(GROUP, name=ep.name)
            except pluggy.PluginValidationError as exc:
                raise PluginError(_hook_suggestion(exc, pm)) from exc
            except Exception as exc:
                raise PluginError(
                    f'error loading plugin "{ep.name}" ({ep.value}): {type(exc).__name__}: {exc}. '
                    f"Hint: fix or uninstall it, or skip it with -p no:{ep.name}"
                ) from exc
    for spec in extra:
        if spec in blocked:
            continue
        module = _import_plugin(spec, given[spec])
        if pm.is_registered(module):
            continue
        try:
            pm.register(module, name=spec)
        except pluggy.PluginValidationError as exc:
            raise PluginError(_hook_suggestion(exc, pm)) from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(_hook_suggestion(exc, pm)) from exc
    return pm


def plugin_version(pm: pluggy.PluginManager, plugin: object) -> str:
    """Version of the distribution providing ``plugin`` (kdbench's for built-ins)."""
    for plug, dist in pm.list_plugin_distinfo():
        if plug is plugin:
            return str(dist.version)
    name = getattr(plugin, "__name__", "")
    if name.startswith(("kdbench.", f"{BUILTIN_PACKAGE}.")):
        from kdbench.contract.version import __version__

        return __version__
    return str(getattr(plugin, "__version__", "unknown"))


class Host:
    """Registries filled from the plugins, and a typed facade over the hooks."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.registries: dict[str, Registry[Any]] = {k: Registry(_KIND_LABEL[k]) for k in KINDS}
        for kind, reg in self.registries.items():
            hook = getattr(pm.hook, f"kdbench_register_{kind}")
            for impl in hook.get_hookimpls():
                reg.current_plugin = impl.plugin_name
                try:
                    impl.function(register=reg.add)
                except PluginError:
                    raise
                except Exception as exc:
                    raise PluginError(
                        f"plugin {impl.plugin_name!r} failed in kdbench_register_{kind}: "
                        f"{type(exc).__name__}: {exc}. Hint: skip it with -p no:{impl.plugin_name}"
                    ) from exc
            reg.freeze()

    @classmethod
    def create(cls, **kwargs: Any) -> Host:
        """``Host(make_plugin_manager(**kwargs))``."""
        return cls(make_plugin_manager(**kwargs))

    # registries, typed for readers
    @property
    def tasks(self) -> Registry[Any]:
        """Task classes."""
        return self.registries["tasks"]

    @property
    def models(self) -> Registry[Any]:
        """Model kinds."""
        return self.registries["models"]

    @property
    def students(self) -> Registry[Any]:
        """Student kinds."""
        return self.registries["students"]

    @property
    def losses(self) -> Registry[Any]:
        """Loss classes."""
        return self.registries["losses"]

    @property
    def teacher_updates(self) -> Registry[Any]:
        """Teacher-update rules."""
        return self.registries["teacher_updates"]

    @property
    def methods(self) -> Registry[Any]:
        """Methods."""
        return self.registries["methods"]

    @property
    def executors(self) -> Registry[Any]:
        """Matrix executors."""
        return self.registries["executors"]

    def role_method(self, role: str) -> Method | None:
        """The one registered method whose ``Method.role`` is ``role`` ("student-only", "reference"), or
        None when no method holds it. Two holders are a PluginError naming both plugins."""
        found = [m for m in (self.methods.get(n) for n in self.methods.names()) if m.role == role]
        if len(found) > 1:
            owners = ", ".join(f"{m.name!r} (plugin {self.methods.plugin(m.name)!r})" for m in found)
            raise PluginError(f"methods {owners} all have role {role!r}; at most one method may hold a role. "
                              f"Hint: skip all but one of those plugins with -p no:PLUGIN")
        return found[0] if found else None

    def plugin_versions(self) -> dict[str, str]:
        """{plugin name: version} of every registered plugin."""
        return {name: plugin_version(self.pm, plugin)
                for name, plugin in self.pm.list_name_plugin() if plugin is not None}

    # hook facade
    def configure(self, suite: Suite) -> list[str]:
        """Every problem reported by ``kdbench_configure`` implementations."""
        problems: list[str] = []
        for found in self.pm.hook.kdbench_configure(suite=suite):
            problems.extend(found or [])
        return problems

    def run_cell(self, spec: CellSpec, ctx: RunContext) -> dict[str, Any]:
        """Run one cell through ``kdbench_run_cell``."""
        result = self.pm.hook.kdbench_run_cell(spec=spec, ctx=ctx)
        if result is None:
            raise PluginError("no plugin ran the cell; is kdbench.engine.runner blocked (-p no:...)?")
        return dict(result)

    def log_metrics(self, spec: CellSpec, step: int, metrics: Mapping[str, float]) -> None:
        """Send metrics to every ``kdbench_log_metrics`` observer."""
        self.pm.hook.kdbench_log_metrics(spec=spec, step=step, metrics=metrics)

    def update_result(self, result: dict[str, Any]) -> None:
        """Let plugins add provenance."""
        self.pm.hook.kdbench_update_result(result=result)

    def lookup(self, kind: str, name: str, where: str) -> Any:
        """Registry lookup whose error says where the name came from."""
        reg = self.registries[kind]
        if name not in reg:
            raise ConfigError(f"{where}: {reg.unknown(name)}")
        return reg.get(name)
