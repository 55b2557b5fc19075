"""Running a planned matrix: skip finished cells, isolate failures, write every result atomically.

``execute_cell`` is the unit every executor runs (in-process, or in a Ray worker): it turns
exceptions into recorded statuses — a raise is ``failed``, a NaN/inf loss ``diverged`` (with the
step), an out-of-memory error is retried with half the micro-batch (same effective batch, by
gradient accumulation) up to ``train.oom_retries`` times — so one cell never stops the others.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kdbench.contract.errors import KdbenchError
from kdbench.contract.types import NoConfig
from kdbench.report.results import FINAL, provenance, read_result, result_path, write_result

if TYPE_CHECKING:
    from kdbench.contract.spec import CellSpec
    from kdbench.engine.manager import Host

@dataclass(frozen=True)
class HostArgs:
    """How to rebuild the same Host in another process (Ray workers)."""

    extra: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()
    autoload: bool | None = None


def rebuild_host(a: HostArgs) -> Host:
    """The Host that ``a`` describes (in a worker process)."""
    from kdbench.engine.manager import Host as HostCls
    from kdbench.engine.manager import make_plugin_manager

    return HostCls(make_plugin_manager(autoload=a.autoload, extra=a.extra, blocked=a.blocked))


def _plugin_ids(pm: Any) -> set[str]:
    """Module names of a manager's plugins (class path for plugin objects)."""
    return {getattr(plugin, "__name__", None) or f"{type(plugin).__module__}.{type(plugin).__qualname__}"
            for _, plugin in pm.list_name_plugin() if plugin is not None}


def check_rebuildable(host: Host, a: HostArgs, where: str, hint: str) -> None:
    """Workers rebuild the Host from ``a``: refuse plugins registered in this process only."""
    import sys

    # rebuilding re-imports -p files; keep this process's modules (the specs pickle their classes)
    saved = {k: v for k, v in sys.modules.items() if k.startswith("kdbench_local_")}
    try:
        rebuilt = _plugin_ids(rebuild_host(a).pm)
    finally:
        sys.modules.update(saved)
    missing = sorted(_plugin_ids(host.pm) - rebuilt)
    if missing:
        from kdbench.contract.errors import ConfigError

        raise ConfigError(f"{where}: plugin(s) {', '.join(missing)} were registered in this process "
                          f"only, so worker processes cannot load them. Hint: load them with "
                          f"-p MODULE_OR_FILE (or KDBENCH_PLUGINS), or {hint}")


@dataclass
class MatrixContext:
    """Everything ``execute_cell`` needs, picklable for remote workers."""

    results_dir: Path
    cache_dir: Path
    host_args: HostArgs = field(default_factory=HostArgs)
    device: str = "auto"
    suite_info: dict[str, Any] = field(default_factory=dict)  # description/budget, copied into results


def is_oom(exc: BaseException) -> bool:
    """CUDA/CPU out-of-memory errors, by type or message."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def execute_cell(spec: CellSpec, mctx: MatrixContext, host: Host | None = None) -> dict[str, Any]:
    """Run one cell with failure isolation, add provenance, write the result; return it."""
    from kdbench.contract.spec import RunContext
    from kdbench.engine.checkpoints import save_path
    from kdbench.engine.training import Diverged
    from kdbench.report.results import new_result

    if host is None:
        host = rebuild_host(mctx.host_args)
    ctx = RunContext(host, mctx.results_dir, mctx.cache_dir, mctx.device)
    attempt, retries = spec, []  # type: CellSpec, list[dict[str, Any]]
    while True:
        try:
            result = host.run_cell(attempt, ctx)
            break
        except Diverged as exc:
            save_path(mctx.cache_dir, spec.run_id).unlink(missing_ok=True)  # never resumed
            result = new_result(spec)
            result.update(status="diverged", reason=str(exc))
            result["extra"]["diverged_step"] = exc.step
            break
        except KdbenchError:  # bad data or config: stop the run (exit 8/6), never fail cell by cell
            raise
        except Exception as exc:
            if is_oom(exc) and len(retries) < spec.train.oom_retries:
                micro = (attempt.train.micro_batch_size or attempt.train.batch_size) // 2
                if micro >= 1:
                    retries.append({"error": f"{type(exc).__name__}: {exc}"[:300], "micro_batch_size": micro})
                    attempt = dataclasses.replace(
                        attempt, train=dataclasses.replace(attempt.train, micro_batch_size=micro))
                    continue
            result = new_result(spec)
            status = "oom" if is_oom(exc) else "failed"
            result.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500])
            result["extra"]["error_kind"] = status
            result["extra"]["traceback"] = traceback.format_exc(limit=8)[-4000:]
            break
    if retries:
        result.setdefault("extra", {})["oom_retries"] = retries
        result["extra"]["micro_batch_size"] = attempt.train.micro_batch_size
    result["suite_info"] = dict(mctx.suite_info)
    result["provenance"] = provenance(str(ctx.device), host.plugin_versions())
    host.update_result(result)
    write_result(mctx.results_dir, result)
    return result


def _status(results_dir: Path, run_id: str) -> tuple[str | None, dict[str, Any] | None]:
    """(status, result) of a cell's result file; (None, None) when absent, "corrupt" when unreadable."""
    path = result_path(results_dir, run_id)
    if not path.exists():
        return None, None
    try:
        result = read_result(path)
    except Exception:
        return "corrupt", None
    return result["status"], result


def final_result(results_dir: Path, run_id: str) -> dict[str, Any] | None:
    status, result = _status(results_dir, run_id)
    return result if status in FINAL else None


def set_aside_unreadable(specs: Sequence[CellSpec], results_dir: Path) -> list[tuple[str, Path, str]]:
    """Move every unreadable result file of ``specs`` (truncated, invalid JSON, another schema)
    to ``<file>.unreadable-<UTC time>``, so that rerunning its cell never overwrites it (and the
    leaderboard, which reads ``*.json``, skips it). Returns ``(run_id, moved_to, why)`` each."""
    import time

    from kdbench.contract.errors import DataError

    moved = []
    for spec in specs:
        path = result_path(results_dir, spec.run_id)
        if not path.exists():
            continue
        try:
            read_result(path)
        except DataError as exc:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            target = path.with_name(f"{path.name}.unreadable-{stamp}")
            n = 1
            while target.exists():
                n += 1
                target = path.with_name(f"{path.name}.unreadable-{stamp}-{n}")
            os.replace(path, target)
            moved.append((spec.run_id, target, str(exc.__cause__ or exc)))
    return moved


def pending(specs: Sequence[CellSpec], results_dir: Path, retry_failed: bool) -> list[CellSpec]:
    """Cells without a final result (and failed ones when ``retry_failed``)."""
    todo = []
    for spec in specs:
        status, _ = _status(results_dir, spec.run_id)
        if status in FINAL or (status == "failed" and not retry_failed):
            continue
        todo.append(spec)
    return todo


class Executor:
    """Runs cells; subclasses decide where. ``map`` yields results as cells finish.

    ``on_progress(worker, label, done, total, what)``, when set, receives the running cells'
    progress lines (executors that cannot forward them ignore it)."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = NoConfig
    on_progress: Callable[[int, str, int, int, str], None] | None = None

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def map(self, specs: Sequence[CellSpec], mctx: MatrixContext, host: Host,
            on_start: Callable[[CellSpec], None] | None = None) -> Iterator[dict[str, Any]]:
        """Run every spec; yield each result dict."""
        raise NotImplementedError

    def bf16_warning(self, specs: Sequence[CellSpec], device: str) -> str | None:
        """The line to print before training when cells would train in bf16 on a CPU without bf16
        kernels (:func:`bf16_emulation_warning`), for cells that run on this machine; an executor whose cells run
        elsewhere returns None here and checks its machines itself before it submits a cell."""
        return bf16_emulation_warning(specs, device, lambda: [this_cpu()])


def this_cpu() -> tuple[bool, str]:
    """Whether this machine's CPU runs bf16 natively, and the CPU (``provenance``'s description)."""
    from kdbench.report.results import cpu_description, cpu_runs_bf16_natively

    return cpu_runs_bf16_natively(), cpu_description()


def bf16_emulation_warning(specs: Sequence[CellSpec], device: str,
                 machines: Callable[[], Sequence[tuple[bool, str]]]) -> str | None:
    """One line when some of ``specs`` train in bf16 on a CPU and some machine they may run on has
    no bf16 kernels, else None. ``device`` is the default of cells whose ``train.device`` is
    ``auto`` where they run; ``machines()`` gives :func:`this_cpu` of each machine (called only
    when some cell trains in bf16 on a CPU)."""
    from kdbench.engine.training import cells_training_bf16_on_cpu

    n = cells_training_bf16_on_cpu(specs, device)
    found = machines() if n else ()
    slow = sorted({cpu for native, cpu in found if not native})
    if not slow:
        return None
    where = slow[0] if len(found) == 1 else \
        f"{sum(not native for native, _ in found)} of {len(found)} nodes: {'; '.join(slow)}"
    return (f'kdbench: note: {n} of the cells to run train with precision = "bf16" on a CPU without '
            f"bf16 kernels ({where}): their matrix products run as fp32 GEMMs on the bf16 operands "
            "(Bf16GemmInFp32: about fp32 speed, the bf16 kernels' rounding up to summation order; "
            "recorded as provenance.cpu_bf16_gemm)")
