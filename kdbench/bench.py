"""Step-cost and runner-overhead benchmarks (``kdbench bench``).

Step cost: ONE teacher, ONE student, ONE fixed random batch (B, T). Each method's step is the
production :meth:`kdbench.loop.Loop.train_step` (``rule.step(ctx)``, then the student step) on a
``Loop`` built from the registered method's loss, rule and defaults as the runner builds it, and
is compared with the FLOP model of shared/docs/performance.md §2.3 (``F_T``/``F_S`` from the
models' ``flops_per_example(T)``). Pair: all-MiniLM-L6-v2 from ``../shared/hf`` + a 2-layer
``pick-layers`` student, else the quickstart's tiny-bert 4L-64 + 2 layers; ``eager`` attention
(the Meta-KD loss needs attention maps).

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
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdbench.errors import ConfigError, ExitCode, NotApplicable
from kdbench.memory import reset_hwm, status_kb

if TYPE_CHECKING:
    from kdbench.data import TaskData
    from kdbench.loop import Loop
    from kdbench.manager import Host
    from kdbench.types import Batch, KDModel, Task

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SHARED_HF = Path(__file__).resolve().parents[1].parent / "shared" / "hf"
TINY_TEACHER = {"layers": 4, "hidden": 64, "heads": 2, "intermediate": 128}  # quickstart bert-l4


@dataclass(frozen=True, slots=True)
class StepSpec:
    """One benchmarked method: a registered method plus overrides, and its FLOP model."""

    label: str
    method: str  # registered method name (its loss, rule and defaults)
    model: str  # FLOP model of performance.md §2.3, per training example
    flops: Callable[[float, float], float]  # (F_T, F_S) -> FLOPs per training example
    rule: dict[str, Any] = field(default_factory=dict)  # teacher_update overrides
    cached: bool = False  # teacher outputs from the loop's cache (frozen teacher only)
    stage2: bool = False  # put the loss in its second stage (Meta-KD)
    prepare: bool = True  # call rule.prepare (Meta-KD's is a one-off meta-teacher training)


SPECS: tuple[StepSpec, ...] = (
    StepSpec("kd (live teacher)", "kd", "F_T+3F_S", lambda t, s: t + 3 * s),
    StepSpec("kd (cached teacher)", "kd", "3F_S", lambda t, s: 3 * s, cached=True),
    StepSpec("pkd-skip (live teacher)", "pkd-skip", "≈F_T+3F_S", lambda t, s: t + 3 * s),
    StepSpec("metadistil second_order", "metadistil", "≈4F_T+13F_S", lambda t, s: 4 * t + 13 * s,
             rule={"meta_grad": "second_order", "every": 1}),
    StepSpec("metadistil first_order_exact", "metadistil", "4F_T+11F_S", lambda t, s: 4 * t + 11 * s,
             rule={"meta_grad": "first_order_exact", "every": 1}),
    StepSpec("metadistil first_order_exact (fd)", "metadistil", "4F_T+11F_S", lambda t, s: 4 * t + 11 * s,
             rule={"meta_grad": "first_order_exact", "jvp": "finite_difference", "every": 1}),
    StepSpec("reptile-distil", "reptile-distil", "2F_T+6F_S", lambda t, s: 2 * t + 6 * s),
    StepSpec("meta-kd stage 2", "meta-kd", "≈F_T+3F_S", lambda t, s: t + 3 * s, stage2=True, prepare=False),
)


@dataclass
class Pair:
    """The shared teacher, student, task, data and batch; ``restore`` resets both models."""

    host: Host
    task: Task
    teacher: KDModel
    student: KDModel
    data: TaskData
    batch: Batch
    device: torch.device
    seq_len: int
    snapshot: list[tuple[torch.nn.Module, dict[str, torch.Tensor], list[bool]]] = field(default_factory=list)

    def restore(self) -> None:
        """Weights, requires_grad flags and grads as built (rules train the teacher)."""
        for model, state, flags in self.snapshot:
            model.load_state_dict(state)
            for p, flag in zip(model.parameters(), flags, strict=True):
                p.requires_grad_(flag)
                p.grad = None

    def flops(self) -> tuple[float, float]:
        """(F_T, F_S): forward matmul FLOPs per example at ``seq_len``."""
        return self.teacher.flops_per_example(self.seq_len), self.student.flops_per_example(self.seq_len)


@dataclass
class Step:
    """One production training step: ``Loop.train_step(batch)``, then ``state.step += 1``."""

    loop: Loop
    batch: Batch

    def __call__(self) -> dict[str, torch.Tensor]:
        """Run the step (synchronised on CUDA); return the loop's metrics."""
        out = self.loop.train_step(self.batch)
        self.loop.state.step += 1
        if self.loop.device.type == "cuda":
            torch.cuda.synchronize(self.loop.device)
        return out


def minilm_available() -> bool:
    """True when ../shared/hf holds the MiniLM checkpoint."""
    return (SHARED_HF / "hub" / ("models--" + MINILM.replace("/", "--"))).is_dir()


def build_pair(teacher: str = "minilm", student_layers: int = 2, seq_len: int = 64, batch: int = 32,
               device: str = "cpu", attn: str = "eager", seed: int = 0) -> Pair:
    """Build the teacher/student pair and one fixed random batch of ``batch`` x ``seq_len`` tokens.

    ``teacher="minilm"`` falls back to the tiny pair (with a warning) when ../shared/hf is absent.
    """
    from kdbench.data import TaskData, TensorSplit
    from kdbench.loop import generator, seed_for, transform
    from kdbench.manager import Host, make_plugin_manager

    if teacher not in ("minilm", "tiny"):
        raise ConfigError(f"bench --teacher {teacher!r}: use 'minilm' or 'tiny'")
    if teacher == "minilm" and not minilm_available():
        warnings.warn(f"{SHARED_HF} has no {MINILM}; benchmarking the tiny pair instead", stacklevel=2)
        teacher = "tiny"
    host = Host(make_plugin_manager(autoload=False))
    task_cls = host.tasks.get("toy/reviews")  # multi-domain text classification (Meta-KD applies)
    task = task_cls(task_cls.Config())
    hf, tiny = host.models.get("hf"), host.models.get("tiny-bert")
    kind = (hf(hf.Config(checkpoint=MINILM, attn_implementation=attn, cache_dir=str(SHARED_HF / "hub"),
                         local_files_only=True)) if teacher == "minilm"
            else tiny(tiny.Config(**TINY_TEACHER, attn_implementation=attn, max_position=max(128, seq_len))))
    skind_cls = host.students.get("pick-layers")
    skind = skind_cls(skind_cls.Config(layers=student_layers, pick="skip"))
    dev = torch.device(device)
    init = generator(seed_for(seed, "init"))  # the runner's order: teacher, then student
    t_model = kind.build(task.num_labels, init).to(dev)
    s_model = skind.build(kind, task.num_labels, init).to(dev)
    g = generator(seed_for(seed, "bench-batch"))
    vocab = len(t_model.tokenizer)

    def split(name: str) -> TensorSplit:
        ids = torch.randint(5, vocab, (batch, seq_len), generator=g)  # (B, T), no special tokens
        tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                   "token_type_ids": torch.zeros_like(ids),
                   "labels": torch.randint(0, task.num_labels, (batch,), generator=g),
                   "index": torch.arange(batch),
                   "domain": torch.randint(0, len(task.domains), (batch,), generator=g)}
        return TensorSplit(name, tensors, ("input_ids", "attention_mask", "token_type_ids")).to(dev)

    splits = {"train": split("train"), "quiz": split("quiz")}
    data = TaskData(task, splits, {"mean_tokens": seq_len, "bench": True}, "bench")
    fixed = transform(task, next(splits["train"].batches(batch)), train=True, gen=None, device=dev)
    snap = [(m, {k: v.detach().clone() for k, v in m.state_dict().items()},
             [p.requires_grad for p in m.parameters()]) for m in (t_model, s_model)]
    return Pair(host, task, t_model, s_model, data, fixed, dev, seq_len, snap)


def build_step(pair: Pair, spec: StepSpec, lr: float = 5e-5) -> Step:
    """ONE production training step of ``spec`` on the pair, as a callable :class:`Step`.

    Restores the pair first, builds the method's loss and rule from its registered defaults plus
    ``spec.rule``, a :class:`~kdbench.loop.Loop` around them, then ``rule.prepare`` and the teacher
    cache as ``Loop.run`` does.

    Raises:
        NotApplicable / ConfigError: the method cannot run on this pair.
    """
    from kdbench.config import TrainConfig, build_config
    from kdbench.loop import Loop, teacher_cache

    pair.restore()
    host, where = pair.host, f"bench method {spec.method!r}"
    method = host.methods.get(spec.method)
    loss_cls, rule_cls = host.losses.get(method.loss), host.teacher_updates.get(method.teacher_update)
    problems: list[str] = []
    loss_cfg = build_config(loss_cls.Config, [dict(method.defaults.get("loss", {}))], where, problems)
    rule_cfg = build_config(rule_cls.Config, [dict(method.defaults.get("teacher_update", {})), spec.rule],
                            where, problems)
    if problems:
        raise ConfigError(problems)
    cfg = TrainConfig(epochs=10_000, batch_size=len(pair.batch), lr=lr, schedule="constant",
                      log_every=10**9, device=str(pair.device))
    loss = loss_cls(loss_cfg, task=pair.task, teacher=pair.teacher, student=pair.student).to(pair.device)
    rule = rule_cls(rule_cfg)
    loop = Loop(pair.task, pair.data, pair.student, pair.teacher, loss, rule, cfg, 0, pair.device,
                lambda step, metrics: None, cache_teacher=spec.cached, stash={"resuming": False})
    if spec.stage2:
        loss.begin_epoch(1, 2)
    if spec.prepare:
        rule.prepare(loop.ctx)
    if spec.cached:
        loop.tcache = teacher_cache(pair.teacher, pair.task, pair.data.splits["train"], loop.ctx.want,
                                    cfg, pair.device, loop.autocast)
    return Step(loop, pair.batch)


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


def step_costs(teacher: str = "minilm", student_layers: int = 2, seq_len: int = 64, batch: int = 32,
               repeats: int = 3, device: str = "cpu", threads: int | None = None, warmup: int = 1,
               memory: bool = True, methods: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Time one training step of every :data:`SPECS` entry (or the ``methods`` labels) on one pair.

    All methods' loops are built first, warmed up, then timed round-robin (one step of each per
    round), so a machine whose load drifts slows every method alike; ``ratio_kd`` is the median
    over rounds of the per-round ratio to live-teacher KD.

    Returns:
        One dict per method: ``method``, ``model`` (formula), ``median_s``, ``min_s``, ``times_s``,
        ``ratio_kd`` (measured / live-teacher KD), ``model_ratio`` (FLOP model / KD's),
        ``measured_over_model``, ``peak_alloc_mb``, ``peak_rss_delta_mb``, ``status`` ("ok" or
        "n-a" with ``reason``), plus the pair's ``teacher``, ``student``, ``F_T``, ``F_S``.
    """
    torch.set_num_threads(threads or os.cpu_count() or 1)
    pair = build_pair(teacher, student_layers, seq_len, batch, device)
    f_t, f_s = pair.flops()
    kd_flops = f_t + 3 * f_s
    rows: list[dict[str, Any]] = []
    steps: dict[int, Callable[[], Any]] = {}
    for spec in SPECS:
        if methods and spec.label not in methods and spec.method not in methods:
            continue
        rows.append({"method": spec.label, "model": spec.model, "F_T": f_t, "F_S": f_s,
                     "model_ratio": spec.flops(f_t, f_s) / kd_flops, "batch": batch,
                     "seq_len": seq_len, "teacher": pair.teacher.origin,
                     "student": pair.student.origin, "device": str(pair.device),
                     "threads": torch.get_num_threads(), "status": "ok"})
        try:
            steps[len(rows) - 1] = build_step(pair, spec)
        except (NotApplicable, ConfigError) as exc:
            rows[-1].update(status="n-a", reason=str(exc))
    for step in steps.values():
        for _ in range(warmup):
            step()
    runs: dict[int, list[tuple[float, float | None]]] = {i: [] for i in steps}
    for _ in range(repeats):
        for i, step in steps.items():
            runs[i].append(timed(step, pair.device))
    for i, step in steps.items():
        rows[i].update(_summary(runs[i], _alloc_peak_mb(step, pair.device) if memory else None))
    kd = next((i for i in steps if rows[i]["method"] == SPECS[0].label), None)
    for i in steps:
        if kd is not None:
            ratios = [a[0] / b[0] for a, b in zip(runs[i], runs[kd], strict=True)]
            rows[i]["ratio_kd"] = statistics.median(ratios)
            rows[i]["measured_over_model"] = rows[i]["ratio_kd"] / rows[i]["model_ratio"]
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`step_costs` rows."""
    head = ("| method | FLOP model | median step (s) | min (s) | × KD measured | × KD FLOP model | measured / model "
            "| peak alloc Δ (MB) | peak RSS Δ (MB) |\n|---|---|--:|--:|--:|--:|--:|--:|--:|")
    lines = [head]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['model']} | n-a: {r.get('reason', '')} | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['model']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {_fmt(r.get('ratio_kd'), '.2f')} "
                     f"| {r['model_ratio']:.2f} | {_fmt(r.get('measured_over_model'), '.2f')} "
                     f"| {_fmt(r['peak_alloc_mb'], '.0f')} | {_fmt(r['peak_rss_delta_mb'], '.0f')} |")
    return "\n".join(lines)


def describe(rows: list[dict[str, Any]]) -> str:
    """One line naming the pair, FLOPs, batch and device of a :func:`step_costs` run."""
    r = rows[0]
    return (f"teacher {r['teacher']} (F_T {r['F_T'] / 1e9:.3f} GFLOP/example), student {r['student']} "
            f"(F_S {r['F_S'] / 1e9:.3f}), B={r['batch']} T={r['seq_len']}, {r['device']}, "
            f"{r['threads']} threads, torch {torch.__version__}")


# -- runner overhead --------------------------------------------------------------------------

_OVERHEAD_SCRIPT = """\
import json, sys, tempfile, time
from pathlib import Path
t0 = time.perf_counter()
from kdbench.manager import Host, make_plugin_manager
t1 = time.perf_counter()
host = Host(make_plugin_manager())
t2 = time.perf_counter()
from kdbench.config import load_suite
from kdbench.plan import expand
cells = expand(load_suite("quickstart"), host)
t3 = time.perf_counter()
from kdbench.testing import run_tiny_cell
with tempfile.TemporaryDirectory() as tmp:
    status = run_tiny_cell(host, Path(tmp), "kd", steps=1)["status"]
t4 = time.perf_counter()
with tempfile.TemporaryDirectory() as tmp:  # the same two cells again: what later cells pay
    run_tiny_cell(host, Path(tmp), "kd", steps=1)
t5 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "host": t2 - t1, "plan": t3 - t2, "cell": t4 - t3,
                  "warm_cell": t5 - t4, "cells": len(cells), "status": status}))
"""


def overhead_phases() -> dict[str, Any]:
    """Phases of runner overhead, timed inside a fresh interpreter (cold imports included):
    imports, plugin loading + Host, planning the quickstart suite, and a tiny ``kd`` cell with
    ``max_steps=1`` (its teacher cell and method cell: data, models, one step and evaluation each)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _OVERHEAD_SCRIPT], capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"overhead script failed: {proc.stderr.strip()[-800:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process"] = wall
    return out


def time_ls(env: dict[str, str] | None = None) -> tuple[float, str]:
    """Wall time and stdout of ``python -m kdbench ls`` in a new process (raises if it fails)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kdbench", "ls"], capture_output=True, text=True,
                          check=True, env=env)
    return time.perf_counter() - t0, proc.stdout


def time_ls_cold_warm(repeats: int) -> dict[str, list[float]]:
    """``kdbench ls`` times in new processes: without the listing cache, and with it warm."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "KDBENCH_CACHE": tmp, "KDBENCH_LS_CACHE": "0"}
        cold = [time_ls(env)[0] for _ in range(repeats)]
        env["KDBENCH_LS_CACHE"] = "1"
        time_ls(env)
        warm = [time_ls(env)[0] for _ in range(repeats)]
    return {"cold": cold, "warm": warm}


def overhead_table(runs: list[dict[str, Any]], ls_times: dict[str, list[float]]) -> str:
    """Markdown table of median overhead phases (targets: overhead < 2 s, ``kdbench ls`` < 1 s)."""
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("import", "host", "plan", "cell", "warm_cell", "process")}
    total = med["host"] + med["plan"] + med["cell"]
    rows = [("imports (kdbench, torch, ...)", med["import"], ""),
            ("plugin loading + Host", med["host"], ""), ("plan quickstart suite", med["plan"], ""),
            ("tiny kd cell, max_steps=1 (teacher + method cell)", med["cell"], ""),
            ("overhead = Host + plan + cell", total, "< 2 s"),
            ("the same two cells again in the same process (warm)", med["warm_cell"], ""),
            ("whole process", med["process"], ""),
            ("`kdbench ls`, cold (first listing after a plugin change)", statistics.median(ls_times["cold"]), ""),
            ("`kdbench ls`, warm (listing cache)", statistics.median(ls_times["warm"]), "< 1 s")]
    return "\n".join(["| phase | median (s) | target |", "|---|--:|---|",
                      *(f"| {n} | {v:.2f} | {t} |" for n, v, t in rows)])


# -- CLI ----------------------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> int:
    """Print the step-cost (or runner-overhead) markdown table."""
    if getattr(args, "overhead", False):
        runs = [overhead_phases() for _ in range(max(1, args.repeats))]
        ls_times = time_ls_cold_warm(max(1, args.repeats))
        print(overhead_table(runs, ls_times))
        payload: Any = {"runs": runs, "ls_s": ls_times}
    else:
        methods = tuple(m.strip() for m in args.methods.split(",")) if getattr(args, "methods", None) else None
        rows = step_costs(args.teacher, seq_len=args.seq_len, batch=args.batch, repeats=args.repeats,
                          device=args.device, threads=args.threads or None, methods=methods)
        print(f"{describe(rows)}\n\n{format_table(rows)}")
        payload = rows
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return int(ExitCode.OK)


def main(argv: list[str] | None = None) -> int:
    """``python -m kdbench.bench`` without the CLI hook-up."""
    from kdbench.cli import add_bench_parser

    parser = argparse.ArgumentParser(prog="kdbench bench")
    add_bench_parser(parser.add_subparsers(dest="command", required=True), [])
    return cmd_bench(parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
