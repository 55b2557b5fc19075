"""The host's structure: layers that import only downwards, no import cycles, built-ins on the public
surface, and no built-in component named by the host.

Layers, lowest first (README "Layout"): ``contract`` (what plugins import through ``kdbench``),
``report`` (result files and pages), ``engine`` (planning, data, the loop, executors), ``cli``. The
facade modules ``kdbench``, ``kdbench.__main__`` and ``kdbench.testing`` sit on top. Every import
counts: module level, inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import kdbench

ROOT = Path(kdbench.__file__).parent
BUILTINS = ROOT.parent / "plugins" / "kdbench_builtins"
LAYERS = ("contract", "report", "engine", "cli")
FACADE = {"kdbench", "kdbench.__main__", "kdbench.testing"}


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = (package, *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module of ``known`` that ``path`` (module ``name``) imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([node.module] if node.module else [])])
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in known}


def _graph(root: Path, package: str) -> dict[str, set[str]]:
    files = {_module_name(p, root, package): p for p in root.rglob("*.py")}
    return {name: _imports(path, name, set(files)) - {name} for name, path in files.items()}


def _layer(module: str) -> int:
    if module in FACADE:
        return len(LAYERS)
    part = module.split(".")[1]
    return LAYERS.index(part)


def test_every_host_module_is_in_a_layer():
    graph = _graph(ROOT, "kdbench")
    stray = [m for m in graph if m not in FACADE and m.split(".")[1] not in LAYERS]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_layers_import_only_downwards():
    graph = _graph(ROOT, "kdbench")
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if _layer(d) > _layer(m))
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize(("root", "package"), [(ROOT, "kdbench"), (BUILTINS, "kdbench_builtins")])
def test_no_import_cycles(root, package):
    assert not _cycles(_graph(root, package))


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_builtins_import_only_the_public_surface():
    """Built-in plugins use what a third-party plugin can: ``kdbench``'s public names (and
    ``kdbench.testing`` in tests), never a host module."""
    bad = []
    for path in sorted(BUILTINS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                bad += [f"{path.name}: import {a.name}" for a in node.names
                        if a.name.startswith("kdbench.")]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdbench."):
                bad.append(f"{path.name}: from {node.module} import ...")
            elif isinstance(node, ast.ImportFrom) and node.module == "kdbench":
                bad += [f"{path.name}: kdbench.{a.name} is not public" for a in node.names
                        if a.name not in kdbench.__all__]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id == "kdbench" and node.attr not in kdbench.__all__):
                bad.append(f"{path.name}: kdbench.{node.attr} is not public")
    assert not bad, "\n".join(bad)


def test_public_names_resolve():
    for name in kdbench.__all__:
        assert getattr(kdbench, name) is not None, name


def _string_literals(path: Path) -> set[str]:
    """String constants of a module, docstrings and comments left out."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs}


#: registered names that are also ordinary words in host code: the "model" student kind (a student
#: with its own checkpoint) vs. registry labels in messages and /proc/cpuinfo's "model name"
COMMON_WORDS = {"model"}


def test_host_names_no_builtin_component():
    """Method knowledge lives in plugins: no host module's code (docstrings aside) names a
    registered method, task, model, student kind, loss or teacher-update rule, or loads a built-in
    plugin module by name. Data files (suites, bench pairs) may name them, as users' suites do."""
    from kdbench.engine.manager import Host

    host = Host.create(autoload=False)
    names = set()
    for registry in ("methods", "tasks", "models", "students", "losses", "teacher_updates"):
        names |= set(getattr(host, registry).names())
    names |= {f"kdbench_builtins.{p.stem}" for p in BUILTINS.glob("*.py") if p.stem != "__init__"}
    names -= COMMON_WORDS
    hits = sorted(f"{p.relative_to(ROOT.parent)}: {s!r}" for p in ROOT.rglob("*.py")
                  for s in _string_literals(p) & names)
    assert not hits, "\n".join(hits)


def test_graph_sees_function_level_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\n")
    assert _graph(pkg, "pkg") == {"pkg": set(), "pkg.a": {"pkg", "pkg.b"}, "pkg.b": {"pkg.a"}}
    assert _cycles(_graph(pkg, "pkg")) == [["pkg.a", "pkg.b"]]


def test_layers_listed_are_packages():
    for layer in LAYERS:
        assert importlib.import_module(f"kdbench.{layer}").__file__.endswith("__init__.py")
