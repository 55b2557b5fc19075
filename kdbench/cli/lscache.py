"""The listing cache: ``kdbench ls`` answers without importing torch once it has run before.

Listing components means importing every plugin, and plugins define torch modules, so a cold
``kdbench ls`` pays about a second for torch alone. The rendered listing is kept under
``<cache dir>/ls/<key>.txt``, where the key covers everything that can change it: kdbench's
version, the interpreter, the ``ls`` arguments, the plugin environment variables, the entry points
of group ``kdbench`` (name, target, distribution and version), size and mtime of every Python file
of kdbench, the built-in plugins and each ``-p``/entry-point plugin's top-level package or file,
and the mtimes of the ``sys.path`` directories (installing or removing a package changes them).
Editing, installing or removing a plugin therefore gives a new key. ``KDBENCH_LS_CACHE=0`` turns
the cache off.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path

from kdbench.contract.version import __version__

ENV_KEYS = ("KDBENCH_DISABLE_PLUGIN_AUTOLOAD", "KDBENCH_PLUGINS", "KDBENCH_DISABLED_PLUGINS")
GROUP = "kdbench"  # same as kdbench.engine.manager.GROUP (not imported: the manager imports pluggy)


def enabled() -> bool:
    """False when ``KDBENCH_LS_CACHE`` is 0/false/no."""
    return os.environ.get("KDBENCH_LS_CACHE", "1").strip().lower() not in ("0", "false", "no")


def _package_files(modname: str) -> list[Path]:
    """Python files of ``modname``'s top-level package (or the module file), found without importing."""
    try:
        spec = importlib.util.find_spec(modname.split(".")[0])
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.py"))
    return [Path(spec.origin)] if spec.origin and spec.origin.endswith(".py") else []


def _stat(path: Path) -> list[object]:
    try:
        st = path.stat()
    except OSError:
        return [str(path), None]
    return [str(path), st.st_size, st.st_mtime_ns]


def key(args: argparse.Namespace) -> str:
    """Hash of everything the listing of ``args`` depends on."""
    plugins = list(args.plugins)
    modules = ["kdbench", "kdbench_builtins"]
    files: list[Path] = []
    for spec in plugins:
        if spec.startswith("no:"):
            continue
        if spec.endswith(".py") or os.sep in spec:
            files.append(Path(spec).resolve())
        else:
            modules.append(spec)
    eps = []
    for ep in sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: (e.name, e.value)):
        dist = getattr(ep, "dist", None)
        eps.append([ep.name, ep.value, dist.name if dist else "", dist.version if dist else ""])
        modules.append(ep.value.split(":")[0])
    for mod in dict.fromkeys(modules):
        files.extend(_package_files(mod))
    state = {
        "kdbench": __version__, "python": [sys.executable, sys.version], "what": args.what,
        "plugins": plugins, "env": {k: os.environ.get(k, "") for k in ENV_KEYS}, "entry_points": eps,
        "files": [_stat(p) for p in files],
        "path": [_stat(Path(p)) for p in sys.path if p and os.path.isdir(p)],
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:24]


def _path(cache_dir: Path, args: argparse.Namespace) -> Path:
    return cache_dir / "ls" / f"{key(args)}.txt"


def lookup(cache_dir: Path, args: argparse.Namespace) -> str | None:
    """The cached listing for ``args``, or None."""
    if not enabled():
        return None
    try:
        return _path(cache_dir, args).read_text(encoding="utf-8")
    except OSError:
        return None


def store(cache_dir: Path, args: argparse.Namespace, text: str) -> None:
    """Keep ``text`` as the listing for ``args`` (atomic; an unwritable cache is ignored)."""
    if not enabled():
        return
    path = _path(cache_dir, args)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
