"""Implementations of the CLI subcommands (imported lazily by kdbench.cli.main)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from kdbench.cli.args import default_cache_dir, make_host, print_json
from kdbench.contract.errors import ConfigError, ExitCode, KdbenchError
from kdbench.contract.registry import suggest
from kdbench.contract.spec import Suite
from kdbench.engine.config import as_dict, build_config, load_suite, parse_value
from kdbench.engine.manager import Host


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
    from kdbench.engine.plan import expand

    host = make_host(args)
    suite = _suite_from_args(args)
    if args.executor not in host.executors:
        raise ConfigError(f"--executor: {host.executors.unknown(args.executor)}")
    warnings: list[str] = []
    cells = expand(suite, host, warnings)
    for line in warnings:
        print(f"kdbench: warning: {line}", file=sys.stderr)
    return host, suite, cells


def print_plan(cells: list[Any]) -> None:
    """One line per cell."""
    print(f"{len(cells)} cells:")
    for c in cells:
        na = f"  n-a: {c.na_reason}" if c.na_reason else ""
        print(f"  {c.run_id}  method={c.method} task={c.task} student={c.student or '-'} "
              f"teacher={c.teacher} seed={c.seed}{na}")


def check_data(host: Host, cells: list[Any], verbose: bool = False) -> None:
    """Read and check the files of every planned task once (no model is built); the first bad
    file raises :class:`kdbench.contract.errors.DataError` (exit 8) before anything trains."""
    from kdbench.contract.options import as_dict
    from kdbench.engine.data import check_files

    seen = set()
    for c in cells:
        key = (c.task, repr(as_dict(c.task_cfg)))
        if c.na_reason or key in seen:
            continue
        seen.add(key)
        rows = check_files(host.tasks.get(c.task)(c.task_cfg))
        if verbose:
            print(f"  data ok: {c.task}  " + ", ".join(f"{k} {v:,}" for k, v in sorted(rows.items())))


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate the suite (and with --data its files) and print the plan."""
    host, suite, cells = plan(args)
    print_plan(cells)
    if args.data:
        check_data(host, cells, verbose=True)
    print(f"suite {suite.name!r} is valid" + (" (data checked)" if args.data else ""))
    return int(ExitCode.OK)


def _executor(args: argparse.Namespace, host: Host, cells: list[Any]) -> Any:
    """The executor from --executor, --executor-opt and (local) --workers; raises ConfigError."""
    executor_cls = host.executors.get(args.executor)
    pairs = [kv.partition("=") for kv in args.executor_opt]
    problems = [f"--executor-opt {''.join(p)!r}: expected key=value, e.g. --executor-opt num_cpus=2"
                for p in pairs if not (p[0] and p[1])]
    opts = {k: parse_value(v) for k, eq, v in pairs if k and eq}
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


def check_writable(folder: Path, role: str) -> None:
    """Create ``folder`` and write a probe file in it, or raise a one-line ConfigError (before any
    cell runs, so no cell fails on it)."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"{role} {folder}: cannot write there ({exc.strerror or exc}); "
                          "give a folder you can create and write to") from exc


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
    from kdbench.engine.executors import HostArgs, MatrixContext, pending, set_aside_unreadable
    from kdbench.engine.plan import plan_facts
    from kdbench.report.publish import write_leaderboard
    from kdbench.report.results import write_plan
    from kdbench.report.runview import RunView, headline

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
    for role, folder in (("cache folder (--cache-dir, $KDBENCH_CACHE)", cache_dir),
                         ("results folder (--results-dir, --out-dir)", results_dir),
                         ("page folder (--out-dir)", page.parent)):
        check_writable(folder, role)
    # the files of the cells about to run, before any model loads or anything is written
    check_data(host, pending(cells, results_dir, args.retry_failed))
    extra = tuple(p for p in args.plugins if not p.startswith("no:"))
    blocked = tuple(p[3:] for p in args.plugins if p.startswith("no:"))
    mctx = MatrixContext(results_dir, cache_dir, HostArgs(extra, blocked), args.device,
                         {"description": suite.description, "budget": suite.budget, "path": suite.path,
                          "reference": suite.reference})
    write_plan(results_dir, plan_facts(suite, host), cells)  # what the leaderboard needs of the plan, next to the results
    for run_id, moved, why in set_aside_unreadable(cells, results_dir):
        print(f"kdbench: {run_id}: rerunning the cell: its result file was unreadable ({why}); "
              f"the file was moved to {moved}", file=sys.stderr)
    todo = pending(cells, results_dir, args.retry_failed)
    workers = getattr(executor.cfg, "workers", 0)
    print(f"kdbench: suite {suite.name!r}: {len(cells)} cells, {len(cells) - len(todo)} already done, "
          f"{len(todo)} to run -> {results_dir}" + (f" ({min(workers, len(todo))} workers)" if workers > 1 and todo else ""),
          file=sys.stderr)
    warning = executor.bf16_warning(todo, args.device)  # a Ray executor checks its nodes in map()
    if warning:
        print(warning, file=sys.stderr)
    view = RunView(suite.name, len(todo))
    executor.on_progress = view.progress
    try:
        for result in executor.map(todo, mctx, host):
            view.finished(result)
    finally:
        view.close()
    written = None
    if not args.no_leaderboard:
        written = write_leaderboard(results_dir, page)
        table = headline(written.read_text(encoding="utf-8"))
        if table:
            print(table)
    print(view.summary(suite.name, len(cells) - len(todo), results_dir, written), file=sys.stderr)
    return int(ExitCode.RUNS_FAILED if view.counts["failed"] else ExitCode.OK)


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """``kdbench leaderboard``: see :mod:`kdbench.report.publish` (reads result files only, loads no plugin)."""
    from kdbench.report.publish import cmd_leaderboard as publish

    return publish(args)


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
        from kdbench.engine.config import builtin_suites

        for name, path in sorted(builtin_suites().items()):
            print(f"{name:20s} {path}")
        return int(ExitCode.OK)
    from kdbench.cli import lscache

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
    """``kdbench bench``: see :mod:`kdbench.cli.bench`."""
    from kdbench.cli import bench

    return bench.cmd_bench(args)


def cmd_plugins(args: argparse.Namespace) -> int:
    """JSON description of the loaded plugins."""
    host = make_host(args)
    known = [n for n in dir(host.pm.hook) if n.startswith("kdbench_")]
    if args.hook and args.hook not in known:
        raise KdbenchError(f"--hook {args.hook!r} is not a kdbench hook.{suggest(args.hook, known)} "
                         f"Known: {', '.join(sorted(known))}")
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
