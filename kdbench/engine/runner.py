"""Built-in plugin: the default ``kdbench_run_cell`` (trylast) assembles one cell and trains it.

teacher cell:  pre-trained teacher --CE, shared loop--> fine-tuned teacher, cached (teachers.py)
method cell:   cached teacher + fresh student + loss + teacher-update rule --shared loop--> result
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from kdbench.contract.errors import NotApplicable
from kdbench.contract.hookspecs import hookimpl
from kdbench.contract.spec import RunContext
from kdbench.engine.checkpoints import load_checkpoint, save_checkpoint, save_path
from kdbench.engine.diagnostics import trivial_baseline
from kdbench.engine.loop import Loop, LoopState
from kdbench.engine.memory import peak_mb, reset_peak
from kdbench.engine.training import generator, seed_for
from kdbench.report.results import new_result

if TYPE_CHECKING:
    from kdbench.contract.spec import CellSpec


def resolve_device(ctx: RunContext, spec: CellSpec) -> torch.device:
    """The suite's train.device wins over the run context's default."""
    return torch.device(spec.train.device) if spec.train.device != "auto" else ctx.device


def set_determinism(on: bool) -> None:
    """torch deterministic algorithms (CPU runs are deterministic regardless)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def seed_global(seed: int) -> dict[str, int]:
    """Seed the global RNGs that library code (dropout) draws from; return the seeds used."""
    s = seed_for(seed, "global")
    torch.manual_seed(s)
    random.seed(s)
    return {"global(dropout)": s, "order": seed_for(seed, "order", 0), "augment": seed_for(seed, "augment"),
            "rule": seed_for(seed, "rule"), "init": seed_for(seed, "init"), "quiz": seed_for(seed, "quiz", 0)}


def run_cell(spec: CellSpec, ctx: RunContext) -> dict[str, Any]:
    """Train and evaluate one cell; the default implementation of ``kdbench_run_cell``."""
    from kdbench.engine import teachers
    from kdbench.engine.data import prepare_data

    host = ctx.host
    result = new_result(spec)
    if spec.na_reason:
        result.update(status="n-a", reason=spec.na_reason)
        return result
    t_start = time.perf_counter()
    device = resolve_device(ctx, spec)
    set_determinism(spec.train.deterministic)
    if spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    task = host.tasks.get(spec.task)(spec.task_cfg)
    teacher_kind = host.models.get(spec.teacher_kind)(spec.teacher_cfg)
    init_gen = generator(seed_for(spec.seed, "init"))
    teacher = teacher_kind.build(task.num_labels, init_gen)
    data = prepare_data(task, tokenizer=teacher.tokenizer, cache_dir=ctx.cache_dir / "data", seed=spec.seed)
    result["data"] = data.info
    result["baseline"] = trivial_baseline(task, data)
    reset_peak(device)

    def log(step: int, metrics: dict[str, float]) -> None:
        if metrics:
            host.log_metrics(spec, step, metrics)
            result["extra"]["last_metrics"].update(metrics)

    teacher_record = teachers.get_or_train(spec, teacher, task, data, device, ctx, log)
    result["teacher"] = teacher_record
    if spec.is_teacher:
        result.update(status="ok", metrics=teacher_record["metrics"],
                      protocol=teacher_record.get("protocol", {}), wall_s=time.perf_counter() - t_start)
        result["extra"]["cached_teacher"] = teacher_record.get("cached", False)
        result["throughput"] = teacher_record.get("throughput", {})
        result["peak_memory_mb"] = peak_mb(device)
        return result

    seeds = seed_global(spec.seed)
    try:  # a component may find the cell not applicable (shapes, widths, domains)
        loop, resumed, cache_ok, student = _build_loop(spec, ctx, task, teacher_kind, teacher,
                                                             init_gen, data, device, log)
        state = loop.run()
    except NotApplicable as exc:
        result.update(status="n-a", reason=str(exc))
        return result
    wall = time.perf_counter() - t_start
    result.update(status="ok", wall_s=wall)
    _fill_metrics(result, loop, state)
    result["extra"].update(resumed_from_step=resumed, teacher_cache=cache_ok,
                           params={"teacher": teacher.num_parameters(), "student": student.num_parameters()},
                           models={"teacher": model_record(teacher), "student": model_record(student)})
    result["seeds"] = seeds
    result["throughput"] = throughput(state, student, teacher, data, cache_ok, device)
    result["peak_memory_mb"] = peak_mb(device)
    save_path(ctx.cache_dir, spec.run_id).unlink(missing_ok=True)
    return result


def _build_loop(spec: CellSpec, ctx: RunContext, task: Any, teacher_kind: Any, teacher: Any,
                init_gen: torch.Generator, data: Any, device: torch.device, log: Any) -> tuple[Any, ...]:
    """Student, loss, rule and the Loop for a method cell (restored from its checkpoint if any)."""
    from kdbench.engine.artifacts import ArtifactStore

    host = ctx.host
    teacher.to(device)
    student_kind = host.students.get(spec.student_kind)(spec.student_cfg, host.models.as_mapping())
    student = student_kind.build(teacher_kind, task.num_labels, init_gen).to(device)
    if task.modality == "vision" and device.type == "cuda":  # cuDNN prefers NHWC for convs
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    loss_cls = host.losses.get(spec.loss)
    loss = loss_cls(spec.loss_cfg, task=task, teacher=teacher, student=student).to(device)
    rule = host.teacher_updates.get(spec.teacher_update)(spec.teacher_update_cfg)
    data = replace(data, splits={k: v.to(device) for k, v in data.splits.items()})
    if spec.train.compile and not rule.changes_teacher:
        # only where nothing differentiates through the student twice (frozen-teacher rules)
        student.compile()
    cache_ok = (not rule.changes_teacher and not task.augments and loss.uses_teacher
                and not (loss.needs & {"hidden", "attentions"}))
    ckpt = save_path(ctx.cache_dir, spec.run_id)
    loop = Loop(task, data, student, teacher, loss, rule, spec.train, spec.seed, device, log,
                checkpoint=lambda lp: save_checkpoint(lp, ckpt), cache_teacher=cache_ok,
                pretrained_teacher=lambda: teacher_kind.build(
                    task.num_labels, generator(seed_for(spec.seed, "init"))).to(device),
                artifacts=ArtifactStore(ctx.cache_dir / "artifacts"),
                desc=f"{spec.method} {spec.task} s{spec.seed}")
    resumed = load_checkpoint(loop, ckpt)
    return loop, resumed, cache_ok, student


def _fill_metrics(result: dict[str, Any], loop: Loop, state: LoopState) -> None:
    result["metrics"], result["protocol"] = loop.summary()
    result["history"] = state.history
    last = state.history[-1] if state.history else {}
    result["teacher_after"] = {k: v for k, v in last.items() if k.startswith("teacher/")}


def model_record(model: Any) -> dict[str, Any]:
    """What was resolved when ``model`` was built: origin, read-out pooling, picked layers."""
    rec: dict[str, Any] = {"origin": getattr(model, "origin", "")}
    for key in ("pooling", "picked_layers"):
        value = getattr(model, key, None)
        if value is not None:
            rec[key] = list(value) if isinstance(value, tuple) else value
    return rec


def throughput(state: LoopState, student: Any, teacher: Any, data: Any, cached: bool,
               device: torch.device) -> dict[str, float]:
    """Samples/s over training time and model FLOPs utilisation (when the peak is known)."""
    sps = state.samples / state.train_seconds if state.train_seconds else 0.0
    out = {"samples_per_s": sps, "train_s": state.train_seconds}
    lengths = data.info.get("token_lengths", {}).get("train", {})
    seq = max(1, round(lengths.get("mean", 128)))  # FLOPs scale with real tokens (dynamic padding)
    try:
        fs, ft = student.flops_per_example(seq), teacher.flops_per_example(seq)
    except NotImplementedError:
        return out
    flops = 3 * fs + (0 if cached else ft)  # model FLOPs of a KD step; rules add their own work
    out["model_flops_per_sample"] = flops
    peak = device_peak_flops(device)
    if peak:
        out["mfu"] = flops * sps / peak
        out["peak_flops"] = peak
    return out


#: dense bf16 datasheet peaks (FLOP/s) by device-name substring; KDBENCH_PEAK_TFLOPS overrides
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
             "L4": 121e12, "RTX 4090": 165e12, "V100": 125e12}


def device_peak_flops(device: torch.device) -> float:
    """Peak FLOP/s used for MFU: $KDBENCH_PEAK_TFLOPS, else the datasheet bf16 peak of a known GPU."""
    env = float(os.environ.get("KDBENCH_PEAK_TFLOPS", "0") or 0)
    if env:
        return env * 1e12
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), 0.0)


@hookimpl(trylast=True)
def kdbench_run_cell(spec: CellSpec, ctx: RunContext) -> dict[str, Any]:
    """The shared loop."""
    return run_cell(spec, ctx)
