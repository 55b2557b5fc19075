"""Step-cost benchmark (``kdbench bench``): one training step per method, FLOP model, throughput.

ONE teacher, ONE student, ONE fixed random batch (B, T) (:mod:`kdbench.cli.bench_pair`). Each row's
step is the production :meth:`kdbench.engine.loop.Loop.train_step` (``rule.step(ctx)``, then the student
step) on a ``Loop`` built from a registered method's loss, rule and defaults as the runner builds
it. The FLOP model is the rule's own :meth:`kdbench.TeacherUpdate.cost_model` (performance.md
§2.3; "—" where a rule declares none), with ``F_T``/``F_S`` from the models'
``flops_per_example(T)``; "× KD" columns are relative to the live-teacher KD step (F_T+3F_S).
Throughput: sequences/s = B / median step time; MFU = model FLOPs/s over the device peak
(:func:`kdbench.engine.runner.device_peak_flops`: datasheet bf16 peak of a known GPU, or
``$KDBENCH_PEAK_TFLOPS``; n/a otherwise). On CUDA the loop runs bf16 autocast and fused AdamW.

Memory, the step's peak above what was live before it: CUDA ``max_memory_allocated``; CPU (a) the
tensor allocator's peak from ``torch.profiler(profile_memory=True)`` in one extra step, (b) the
rise of the process peak RSS (``VmHWM``, reset via ``/proc/self/clear_refs``). (b) is coarse:
glibc keeps freed pages, so it depends on what ran before; compare methods with (a).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdbench.cli.bench_pair import BenchRow, Step, bench_rows, build_pair, build_step, components, row_cost
from kdbench.contract.errors import ConfigError, ExitCode, NotApplicable
from kdbench.contract.rules import StepCost
from kdbench.engine.memory import reset_hwm, status_kb

if TYPE_CHECKING:
    from kdbench.engine.manager import Host

#: the live-teacher KD step (performance.md §2.3): the unit of the "× KD" columns
KD_STEP = StepCost(1.0, 3.0)


def _alloc_peak_mb(step: Callable[[], Any], device: torch.device) -> float | None:
    """Peak tensor memory (MB) a step allocates above what was live before it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    except (AttributeError, RuntimeError):  # profiler internals differ: report nothing
        return None
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


def timed(step: Callable[[], Any], device: torch.device) -> tuple[float, float | None]:
    """Wall seconds of one step and its peak-RSS rise in MB (CPU; None where unavailable)."""
    gc.collect()
    track = device.type == "cpu" and reset_hwm()
    before = status_kb("VmRSS") if track else 0
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    return seconds, (status_kb("VmHWM") - before) / 1024 if track else None


def _summary(runs: list[tuple[float, float | None]], alloc: float | None) -> dict[str, Any]:
    times, rss = [t for t, _ in runs], [m for _, m in runs if m is not None]
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "peak_alloc_mb": alloc, "peak_rss_delta_mb": max(rss) if rss else None}


def _row(row: BenchRow, pair: Any) -> dict[str, Any]:
    """A result row without measurements: the pair, and no cost model yet."""
    f_t, f_s = pair.flops()
    return {"method": row.label, "registered": row.method, "model": "—", "model_flops": None,
            "model_ratio": None, "F_T": f_t, "F_S": f_s, "batch": len(pair.batch), "seq_len": pair.seq_len,
            "shape": pair.shape, "teacher": pair.teacher.origin, "student": pair.student.origin,
            "device": str(pair.device), "threads": torch.get_num_threads(), "status": "ok"}


def _cost_fields(cost: StepCost | None, f_t: float, f_s: float) -> dict[str, Any]:
    if cost is None:
        return {}
    return {"model": cost.formula, "model_flops": cost.flops(f_t, f_s),
            "model_ratio": cost.flops(f_t, f_s) / KD_STEP.flops(f_t, f_s)}


def _prepare(pair: Any, rows: list[BenchRow], warmup: int,
             precision: str = "auto") -> tuple[list[dict[str, Any]], dict[int, Step]]:
    """Result rows and the built, warmed-up steps by row index (n-a and failed rows get none)."""
    out: list[dict[str, Any]] = []
    steps: dict[int, Step] = {}
    for row in rows:
        entry = _row(row, pair)
        out.append(entry)
        try:
            loss_cls, _, rule = components(pair.host, row)
            entry.update(_cost_fields(row_cost(loss_cls, rule, bool(row.options.get("cached_teacher"))),
                                      entry["F_T"], entry["F_S"]))
            step = build_step(pair, row, precision=precision)
            for _ in range(warmup):
                step()
        except (NotApplicable, ConfigError) as exc:
            entry.update(status="n-a", reason=str(exc))
            continue
        except RuntimeError as exc:  # e.g. CUDA out of memory, an op without double backward
            entry.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            continue
        steps[len(out) - 1] = step
    return out, steps


def _throughput(row: dict[str, Any], peak: float) -> None:
    """sequences/s, achieved model TFLOP/s and MFU (None without a cost model or a known peak)."""
    seq_s = row["batch"] / row["median_s"]
    flops_s = row["model_flops"] * seq_s if row["model_flops"] is not None else None
    row.update(seq_per_s=seq_s, model_tflops=flops_s / 1e12 if flops_s is not None else None,
               peak_tflops=peak / 1e12 if peak else None,
               mfu=flops_s / peak if flops_s is not None and peak else None)


def step_costs(shape: str = "minilm", student_layers: int = 0, seq_len: int = 0, batch: int = 32,
               repeats: int = 3, device: str = "cpu", threads: int | None = None, warmup: int = 0,
               memory: bool = True, methods: tuple[str, ...] | None = None, attn: str = "",
               host: Host | None = None, precision: str = "auto") -> list[dict[str, Any]]:
    """Time one training step of every registered method's rows (or ``methods``) on one pair.

    ``precision`` is every loop's ``train.precision`` ("auto": bf16 autocast on CUDA, fp32 on CPU).
    All loops are built first and warmed up (``warmup`` steps each; 0: 1 on CPU, 3 on CUDA), then
    timed round-robin (one step of each per round), so a machine whose load drifts slows every
    method alike; ``ratio_kd`` is the median over rounds of the per-round ratio to the first row
    whose model is exactly F_T+3F_S (live-teacher KD).

    Returns:
        One dict per row: ``method`` (row label), ``registered``, ``model`` (formula or "—"),
        ``median_s``, ``min_s``, ``times_s``, ``ratio_kd``, ``model_ratio`` (model / KD's),
        ``measured_over_model``, ``seq_per_s``, ``model_tflops``, ``mfu``, ``peak_alloc_mb``,
        ``peak_total_mb`` (CUDA), ``peak_rss_delta_mb``, ``status`` ("ok", "n-a" or "failed" with
        ``reason``), plus the pair's ``shape``, ``teacher``, ``student``, ``F_T``, ``F_S``.
    """
    from kdbench.engine.runner import device_peak_flops
    from kdbench.engine.training import resolve_precision

    torch.set_num_threads(threads or os.cpu_count() or 1)
    pair = build_pair(shape, student_layers, seq_len, batch, device, attn, host=host)
    out, steps = _prepare(pair, bench_rows(pair.host, methods), warmup or (3 if pair.device.type == "cuda" else 1),
                          precision)
    resolved = resolve_precision(pair.device, precision)
    for entry in out:
        entry["precision"] = resolved
    runs: dict[int, list[tuple[float, float | None]]] = {i: [] for i in steps}
    for _ in range(repeats):
        for i, step in steps.items():
            runs[i].append(timed(step, pair.device))
    peak = device_peak_flops(pair.device)
    for i, step in steps.items():
        out[i].update(_summary(runs[i], _alloc_peak_mb(step, pair.device) if memory else None))
        if pair.device.type == "cuda":
            out[i]["peak_total_mb"] = torch.cuda.max_memory_allocated(pair.device) / 2**20
        _throughput(out[i], peak)
    kd = next((i for i in steps if steps[i].cost == KD_STEP), None)
    for i in steps:
        if kd is not None:
            ratios = [a[0] / b[0] for a, b in zip(runs[i], runs[kd], strict=True)]
            out[i]["ratio_kd"] = statistics.median(ratios)
            if out[i]["model_ratio"] is not None:
                out[i]["measured_over_model"] = out[i]["ratio_kd"] / out[i]["model_ratio"]
    return out


def _fmt(value: Any, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`step_costs` rows (measured step time against the FLOP model)."""
    head = ("| method | FLOP model | median step (s) | min (s) | × KD measured | × KD FLOP model | measured / model "
            "| peak alloc Δ (MB) | peak RSS Δ (MB) |\n|---|---|--:|--:|--:|--:|--:|--:|--:|")
    lines = [head]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['model']} | {r['status']}: {r.get('reason', '')} | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['model']} | {r['median_s']:.3f} | {r['min_s']:.3f} "
                     f"| {_fmt(r.get('ratio_kd'), '.2f')} | {_fmt(r['model_ratio'], '.2f', '—')} "
                     f"| {_fmt(r.get('measured_over_model'), '.2f')} "
                     f"| {_fmt(r['peak_alloc_mb'], '.0f')} | {_fmt(r['peak_rss_delta_mb'], '.0f')} |")
    return "\n".join(lines)


def throughput_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of sequences/s, model TFLOP/s and MFU of the measured rows."""
    peak = next((r["peak_tflops"] for r in rows if r.get("peak_tflops")), None)
    mfu_head = f"MFU (of {peak:.0f} TFLOP/s)" if peak else "MFU (peak unknown: set KDBENCH_PEAK_TFLOPS)"
    lines = [f"| method | sequences/s | model TFLOP/s | {mfu_head} | peak memory (MB) |",
             "|---|--:|--:|--:|--:|"]
    for r in (r for r in rows if r["status"] == "ok"):
        mem = r.get("peak_total_mb", r["peak_alloc_mb"])
        lines.append(f"| {r['method']} | {r['seq_per_s']:.1f} | {_fmt(r['model_tflops'], '.3f', '—')} "
                     f"| {'n/a' if r['mfu'] is None else format(100 * r['mfu'], '.1f') + '%'} "
                     f"| {_fmt(mem, '.0f')} |")
    return "\n".join(lines)


def describe(rows: list[dict[str, Any]]) -> str:
    """One line naming the pair, FLOPs, batch and device of a :func:`step_costs` run."""
    r = rows[0]
    dev = r["device"] + (f" ({torch.cuda.get_device_name(r['device'])})" if r["device"].startswith("cuda") else "")
    return (f"shape {r['shape']}: teacher {r['teacher']} (F_T {r['F_T'] / 1e9:.3f} GFLOP/example), student "
            f"{r['student']} (F_S {r['F_S'] / 1e9:.3f}), B={r['batch']} T={r['seq_len']}, {dev}, "
            f"{r['threads']} threads, {r['precision']}, torch {torch.__version__}")


# -- CLI ----------------------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace, host: Host | None = None) -> int:
    """Print the step-cost and throughput tables (or the runner-overhead table)."""
    if getattr(args, "overhead", False):
        from kdbench.cli.bench_overhead import overhead_phases, overhead_table, time_ls_cold_warm

        runs = [overhead_phases() for _ in range(max(1, args.repeats))]
        ls_times = time_ls_cold_warm(max(1, args.repeats))
        print(overhead_table(runs, ls_times))
        payload: Any = {"runs": runs, "ls_s": ls_times}
    else:
        methods = tuple(m.strip() for m in args.methods.split(",")) if getattr(args, "methods", None) else None
        if host is None and hasattr(args, "plugins"):
            from kdbench.cli.args import make_host

            host = make_host(args)
        rows = step_costs(args.shape, seq_len=args.seq_len, batch=args.batch, repeats=args.repeats,
                          device=args.device, threads=args.threads or None, methods=methods,
                          attn=getattr(args, "attn", ""), warmup=getattr(args, "warmup", 0), host=host,
                          precision=getattr(args, "precision", "auto"))
        print(f"{describe(rows)}\n\n{format_table(rows)}\n\n{throughput_table(rows)}")
        payload = rows
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return int(ExitCode.OK)


def main(argv: list[str] | None = None) -> int:
    """``python -m kdbench.cli.bench`` without the CLI hook-up."""
    from kdbench.cli.args import add_bench_parser

    parser = argparse.ArgumentParser(prog="kdbench bench")
    add_bench_parser(parser.add_subparsers(dest="command", required=True), [])
    return cmd_bench(parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
