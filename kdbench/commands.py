"""Implementations of the CLI subcommands (imported lazily by kdbench.cli)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

from kdbench.cli import default_cache_dir, make_host, print_json
from kdbench.config import Suite, as_dict, build_config, load_suite, parse_value
from kdbench.errors import ConfigError, ExitCode, KdbenchError
from kdbench.manager import Host


def _suite_from_args(args: argparse.Namespace) -> Suite:
    overrides = list(args.overrides)
    if getattr(args, "deterministic", False):
        overrides += ["train.deterministic=true", "teacher_train.deterministic=true"]
    for key in ("methods", "tasks", "students", "seeds"):
        value = getattr(args, key)
        if value:
            items = [v.strip() for v in value.split(",") if v.strip()]
            rendered = ",".join(v if key == "seeds" else f'"{v}"' for v in items)
            overrides.append(f"suite.{key}=[{rendered}]")
    return load_suite(args.suite, overrides)


def plan(args: argparse.Namespace) -> tuple[Host, Suite, list[Any]]:
    """Host, suite and cells; raises ConfigError listing every problem."""
    from kdbench.plan import expand

    host = make_host(args)
    suite = _suite_from_args(args)
    if args.executor not in host.executors:
        raise ConfigError(f"--executor: {host.executors.unknown(args.executor)}")
    return host, suite, expand(suite, host)


def print_plan(cells: list[Any]) -> None:
    """One line per cell."""
    print(f"{len(cells)} cells:")
    for c in cells:
        na = f"  n-a: {c.na_reason}" if c.na_reason else ""
        print(f"  {c.run_id}  method={c.method} task={c.task} student={c.student or '-'} "
              f"teacher={c.teacher} seed={c.seed}{na}")


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate the suite and print the plan."""
    _, suite, cells = plan(args)
    print_plan(cells)
    print(f"suite {suite.name!r} is valid")
    return int(ExitCode.OK)


def _executor(args: argparse.Namespace, host: Host, cells: list[Any]) -> Any:
    """The executor from --executor, --executor-opt and (local) --workers; raises ConfigError."""
    executor_cls = host.executors.get(args.executor)
    problems: list[str] = []
    opts = {k: parse_value(v) for k, v in (kv.partition("=")[::2] for kv in args.executor_opt)}
    if args.workers is not None:
        if args.executor != "local":
            problems.append(f"--workers: applies to the local executor, not {args.executor!r}; "
                            "give the ray executor --executor-opt num_cpus=/local_cpus= instead")
        elif "workers" in opts:
            problems.append("--workers and --executor-opt workers=: give one of them")
        else:
            opts["workers"] = args.workers
    elif args.executor == "local" and "workers" not in opts:
        opts["workers"] = default_workers(args.device, cells)
    ecfg = build_config(executor_cls.Config, [opts], f"--executor-opt ({args.executor})", problems)
    if problems:
        raise ConfigError(problems)
    return executor_cls(ecfg)


def default_workers(device: str, cells: list[Any]) -> int:
    """One local worker per usable CPU core, or 1 when cells run on a GPU (one GPU, shared)."""
    import os

    import torch

    devices = {c.train.device if c.train.device != "auto" else device for c in cells}
    if any(d.startswith("cuda") or (d == "auto" and torch.cuda.is_available()) for d in devices):
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_paths(args: argparse.Namespace, suite: str) -> tuple[Path, Path]:
    """(results directory, leaderboard page): runs/<suite>/ and runs/<suite>.md by default (git
    ignored); the published leaderboards/ only with --publish, or under --out-dir; beside an
    explicit --results-dir otherwise."""
    out_dir = Path(args.out_dir) if args.out_dir else Path("leaderboards") if args.publish else None
    if args.results_dir:
        results_dir = Path(args.results_dir)
    else:
        results_dir = out_dir / "results" / suite if out_dir else Path("runs") / suite
    return results_dir, (out_dir or results_dir.parent) / f"{suite}.md"


def cmd_run(args: argparse.Namespace) -> int:
    """Plan, run pending cells, render the leaderboard page, print its headline tables."""
    from kdbench.executors import HostArgs, MatrixContext, pending, set_aside_unreadable
    from kdbench.runview import RunView, headline

    host, suite, cells = plan(args)
    if not cells:
        print("kdbench: nothing to run: the plan is empty", file=sys.stderr)
        return int(ExitCode.NOTHING_TO_RUN)
    executor = _executor(args, host, cells)
    if args.dry_run:
        print_plan(cells)
        return int(ExitCode.OK)
    results_dir, page = run_paths(args, suite.name)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    extra = tuple(p for p in args.plugins if not p.startswith("no:"))
    blocked = tuple(p[3:] for p in args.plugins if p.startswith("no:"))
    mctx = MatrixContext(results_dir, cache_dir, HostArgs(extra, blocked), args.device,
                         {"description": suite.description, "budget": suite.budget, "path": suite.path,
                          "reference": suite.reference})
    for run_id, moved, why in set_aside_unreadable(cells, results_dir):
        print(f"kdbench: {run_id}: rerunning the cell: its result file was unreadable ({why}); "
              f"the file was moved to {moved}", file=sys.stderr)
    todo = pending(cells, results_dir, args.retry_failed)
    workers = getattr(executor.cfg, "workers", 0)
    print(f"kdbench: suite {suite.name!r}: {len(cells)} cells, {len(cells) - len(todo)} already done, "
          f"{len(todo)} to run -> {results_dir}" + (f" ({min(workers, len(todo))} workers)" if workers > 1 and todo else ""),
          file=sys.stderr)
    view = RunView(suite.name, len(todo))
    executor.on_progress = view.progress
    try:
        for result in executor.map(todo, mctx, host):
            view.finished(result)
    finally:
        view.close()
    written = None
    if not args.no_leaderboard:
        written = write_leaderboard(host, results_dir, page, suite.name)
        table = headline(written.read_text(encoding="utf-8"))
        if table:
            print(table)
    print(view.summary(suite.name, len(cells) - len(todo), results_dir, written), file=sys.stderr)
    return int(ExitCode.RUNS_FAILED if view.counts["failed"] else ExitCode.OK)


def _shipped_suite(result: dict[str, Any]) -> Suite | None:
    """The built-in suite the result came from (loaded from the shipped file), or None."""
    from kdbench.config import builtin_suites

    shipped = builtin_suites().get(str(result.get("suite")))
    if shipped is None or Path(result.get("suite_info", {}).get("path", "")).name != shipped.name:
        return None
    return load_suite(str(shipped))


def _suite_info(result: dict[str, Any], suite: Suite | None) -> dict[str, Any]:
    """Description, budget and reference rows for a table header: from the shipped suite file
    when the results came from a built-in suite (so an edited budget or reference shows without
    rerunning cells), else as recorded in the result."""
    if suite is None:
        return dict(result.get("suite_info", {}))
    return {"description": suite.description, "budget": suite.budget, "reference": suite.reference}


def coverage(host: Host, suite: Suite, board: Any) -> dict[str, Any]:
    """Which of ``suite``'s planned cells have no result file yet, matched on (method, task,
    student, teacher, seed) so that runs with overrides count.

    Returns ``{"planned": N, "done": N, "missing": {(student, task): {method: [seeds]}}}``;
    planned cells that are n-a by plan and have no file count as done (their reason is known).
    """
    from kdbench.plan import expand

    have = {(r.method, r.task, r.student or "", r.teacher_name, r.seed) for r in board.itertuples()}
    missing: dict[tuple[str, str], dict[str, list[int]]] = {}
    cells = expand(suite, host)
    for c in cells:
        if (c.method, c.task, c.student, c.teacher, c.seed) not in have and not c.na_reason:
            missing.setdefault((c.student, c.task), {}).setdefault(c.method, []).append(c.seed)
    return {"planned": len(cells), "done": len(cells) - sum(len(v) for m in missing.values() for v in m.values()),
            "missing": missing}


def render(host: Host, results_dir: Path, suite: str, plot: Path | None = None) -> str:
    """Render the markdown for one results directory."""
    from kdbench import __version__
    from kdbench.results import load_results

    board = load_results(results_dir)
    if board.empty:
        raise KdbenchError(f"no result files under {results_dir}. Hint: run `kdbench run --suite {suite}` first")
    shipped = _shipped_suite(board.iloc[0]["result"])
    info = _suite_info(board.iloc[0]["result"], shipped)
    meta = {"source": results_dir.as_posix(), "kdbench_version": __version__,
            "description": info.get("description", ""), "budget": info.get("budget", ""),
            "reference": info.get("reference", [])}
    if shipped is not None:
        meta["coverage"] = coverage(host, shipped, board)
    if plot is not None:
        from kdbench.leaderboard import plot_cost

        if plot_cost(board, suite, str(plot)):
            meta["plot"] = plot.name
    return host.render_leaderboard(board, suite, meta)


def render_plan(host: Host, name: str, path: Path) -> str:
    """The page of a built-in suite that has no results yet: what it runs, its budget, its planned
    cells (all "not run yet") and the papers' reference numbers."""
    import pandas as pd

    from kdbench import __version__

    suite = load_suite(str(path))
    meta = {"source": f"kdbench/configs/{path.name} (no results yet)", "kdbench_version": __version__,
            "description": suite.description, "budget": suite.budget, "reference": suite.reference,
            "coverage": coverage(host, suite, pd.DataFrame())}
    return host.render_leaderboard(pd.DataFrame(), name, meta)


def write_leaderboard(host: Host, results_dir: Path, out: Path, suite: str) -> Path:
    """Render and write ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(host, results_dir, suite, out.with_suffix(".png")), encoding="utf-8")
    return out


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """Regenerate (or --check) leaderboards/<suite>.md for every results directory."""
    host = make_host(args)
    out_dir = Path(args.out_dir)
    dirs = [Path(d) for d in args.results] or sorted(p for p in (out_dir / "results").glob("*") if p.is_dir())
    if not dirs:
        raise KdbenchError(f"no results directories under {out_dir / 'results'}")
    stale = []
    if not args.check:
        out_dir.mkdir(parents=True, exist_ok=True)
    if not args.results:  # built-in suites with no results get a page of their plan and references
        from kdbench.config import builtin_suites

        for name, path in sorted(builtin_suites().items()):
            if name in {d.name for d in dirs}:
                continue
            target, text = out_dir / f"{name}.md", render_plan(host, name, path)
            if args.check:  # an out-dir need not hold every plan page; one that is there must be fresh
                if target.exists() and target.read_text(encoding="utf-8") != text:
                    stale.append(str(target))
            else:
                target.write_text(text, encoding="utf-8")
                print(f"wrote {target}")
    for d in dirs:
        target = out_dir / f"{d.name}.md"
        png = target.with_suffix(".png")
        text = render(host, d, d.name, None if args.check else png)
        if args.check and png.exists():  # the table references the committed plot
            text = render(host, d, d.name, Path(tempfile.mkdtemp()) / png.name)
        if args.check:
            if not target.exists() or target.read_text(encoding="utf-8") != text:
                stale.append(str(target))
        else:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target}")
    if stale:
        raise KdbenchError(f"leaderboards differ from their results: {', '.join(stale)}. Hint: run `kdbench leaderboard`")
    return int(ExitCode.OK)


def _component_rows(host: Host, kind: str) -> list[dict[str, Any]]:
    reg = host.registries[kind]
    rows = []
    for name in reg.names():
        obj = reg.get(name)
        row = {"name": name, "version": getattr(obj, "version", ""), "plugin": reg.plugin(name),
               "origin": reg.origin(name)}
        if kind == "tasks":
            row.update(metric=", ".join(obj.metrics), labels=obj.num_labels, modality=obj.modality,
                       sources=", ".join(obj.sources), domains=len(obj.domains))
        elif kind == "methods":
            row.update(teacher_update=obj.teacher_update, loss=obj.loss, paper=obj.paper)
        elif kind == "teacher_updates":
            row.update(changes_teacher=obj.changes_teacher, needs_quiz=obj.needs_quiz)
        elif kind == "models":
            row.update(modality=obj.modality, params=_param_count(obj))
        if kind in ("losses", "teacher_updates", "models", "students", "tasks"):
            cfg: Any = getattr(obj, "Config", None)
            if isinstance(cfg, type) and dataclasses.is_dataclass(cfg):
                row["options"] = ", ".join(f"{k}={v!r}" for k, v in as_dict(cfg()).items())
        rows.append(row)
    return rows


def _param_count(kind_cls: Any) -> str:
    """Parameter count of a model kind's default configuration (CIFAR-100 head for vision,
    2 labels for text), when it builds offline; "per checkpoint" otherwise."""
    import torch

    try:
        config_cls: Any = kind_cls.Config
        cfg = config_cls() if isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls) else None
        model = kind_cls(cfg).build(100 if kind_cls.modality == "vision" else 2, torch.Generator().manual_seed(0))
    except Exception:
        return "per checkpoint"
    return f"{model.num_parameters() / 1e6:.3f}M"


def cmd_ls(args: argparse.Namespace) -> int:
    """List components with origin and version."""
    from tabulate import tabulate

    if args.what == "suites":
        from kdbench.config import builtin_suites

        for name, path in sorted(builtin_suites().items()):
            print(f"{name:20s} {path}")
        return int(ExitCode.OK)
    from kdbench import lscache

    host = make_host(args)
    if args.what == "plugins":
        rows = [{"plugin": n, "version": v} for n, v in sorted(host.plugin_versions().items())]
    else:
        rows = _component_rows(host, args.what.replace("-", "_"))
    text = (tabulate(rows, headers="keys", disable_numparse=True) if rows else "(none)") + "\n"
    sys.stdout.write(text)
    lscache.store(default_cache_dir(), args, text)
    return int(ExitCode.OK)


def cmd_bench(args: argparse.Namespace) -> int:
    """``kdbench bench``: see :mod:`kdbench.bench`."""
    from kdbench import bench

    return bench.cmd_bench(args)


def cmd_plugins(args: argparse.Namespace) -> int:
    """JSON description of the loaded plugins."""
    host = make_host(args)
    out = []
    versions = host.plugin_versions()
    for name, plugin in host.pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = sorted(h.name for h in host.pm.get_hookcallers(plugin) or [])
        if args.hook and args.hook not in hooks:
            continue
        out.append({"name": name, "version": versions.get(name, ""), "hooks": hooks})
    print_json(out)
    return int(ExitCode.OK)
