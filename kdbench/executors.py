"""Running a planned matrix: skip finished cells, isolate failures, write every result atomically.

``execute_cell`` is the unit every executor runs (in-process, or in a Ray worker): it turns
exceptions into recorded statuses — a raise is ``failed``, a NaN/inf loss ``diverged`` (with the
step), an out-of-memory error is retried with half the micro-batch (same effective batch, by
gradient accumulation) up to ``train.oom_retries`` times — so one cell never stops the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kdbench.hookspecs import hookimpl
from kdbench.results import FINAL, provenance, read_result, result_path, write_result
from kdbench.types import NoConfig

if TYPE_CHECKING:
    from kdbench.manager import Host
    from kdbench.plan import CellSpec

@dataclass(frozen=True)
class HostArgs:
    """How to rebuild the same Host in another process (Ray workers)."""

    extra: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()
    autoload: bool | None = None


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
    from kdbench.loop import Diverged, save_path
    from kdbench.manager import Host as HostCls
    from kdbench.manager import make_plugin_manager
    from kdbench.results import new_result
    from kdbench.runner import RunContext

    if host is None:
        a = mctx.host_args
        host = HostCls(make_plugin_manager(autoload=a.autoload, extra=a.extra, blocked=a.blocked))
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


def _final_result(results_dir: Path, run_id: str) -> dict[str, Any] | None:
    status, result = _status(results_dir, run_id)
    return result if status in FINAL else None


def pending(specs: Sequence[CellSpec], results_dir: Path, retry_failed: bool) -> list[CellSpec]:
    """Cells without a final result (and failed ones when ``retry_failed``)."""
    todo = []
    for spec in specs:
        status, _ = _status(results_dir, spec.run_id)
        if status in FINAL or (status == "failed" and not retry_failed):
            continue
        todo.append(spec)
    return todo


def _holder(path: Path) -> str | None:
    """Who holds the claim at ``path`` ("host pid"), or None when it is stale or unreadable."""
    try:
        host, _, pid = path.read_text().partition(" ")
    except OSError:
        return None
    if host != socket.gethostname():
        return f"{host} {pid}"  # liveness on another machine cannot be checked: respect the claim
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return None
    except PermissionError:
        pass  # alive, owned by another user
    return f"{host} {pid}"


def try_claim(path: Path) -> str | None:
    """Create the claim file ``path`` ("host pid") for this process: None when it is now ours,
    else its live holder. A claim left by a dead process on this host is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _holder(path)
            if holder is not None:
                return holder
            path.unlink(missing_ok=True)  # stale
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{socket.gethostname()} {os.getpid()}")
        return None


@contextlib.contextmanager
def claim(results_dir: Path, run_id: str) -> Iterator[str | None]:
    """Claim a cell for this process so that two ``kdbench run`` processes sharing a results
    directory never run it twice: ``<results_dir>/.claims/<run_id>`` holds "host pid". Yields None
    when the claim is ours, else the holder; the file is removed when the cell ends."""
    path = results_dir / ".claims" / run_id
    holder = try_claim(path)
    if holder is not None:
        yield holder
        return
    try:
        yield None
    finally:
        path.unlink(missing_ok=True)


class Executor:
    """Runs cells; subclasses decide where. ``map`` yields results as cells finish."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = NoConfig

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def map(self, specs: Sequence[CellSpec], mctx: MatrixContext, host: Host,
            on_start: Callable[[CellSpec], None] | None = None) -> Iterator[dict[str, Any]]:
        """Run every spec; yield each result dict."""
        raise NotImplementedError


class LocalExecutor(Executor):
    """One cell after another in this process (the default)."""

    name = "local"

    def map(self, specs: Sequence[CellSpec], mctx: MatrixContext, host: Host,
            on_start: Callable[[CellSpec], None] | None = None) -> Iterator[dict[str, Any]]:
        """Sequential, in plan order (teacher cells first). A cell another live process has
        claimed is passed over with status ``running`` (nothing written); one that another process
        finished meanwhile yields that result."""
        from kdbench.results import new_result

        for spec in specs:
            with claim(mctx.results_dir, spec.run_id) as holder:
                if holder is not None:
                    result = new_result(spec)
                    result.update(status="running", reason=f"claimed by {holder} (rerun later; if that process "
                                                           f"is gone, delete {mctx.results_dir / '.claims' / spec.run_id})")
                    yield result
                    continue
                done = _final_result(mctx.results_dir, spec.run_id)
                if done is not None:  # another process finished it after this run was planned
                    yield done
                    continue
                if on_start:
                    on_start(spec)
                yield execute_cell(spec, mctx, host)


@hookimpl
def kdbench_register_executors(register: Any) -> None:
    """The local executor."""
    register(LocalExecutor)
