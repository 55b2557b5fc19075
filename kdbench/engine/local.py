"""The built-in "local" executor: cells on this machine, one after another in this process or in
worker processes (:mod:`kdbench.engine.workers`), each claimed so that two ``kdbench run`` sharing a
results folder never run the same cell."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kdbench.contract.errors import ConfigError
from kdbench.contract.hookspecs import hookimpl
from kdbench.engine.claims import try_claim
from kdbench.engine.executors import Executor, MatrixContext, check_rebuildable, execute_cell, final_result
from kdbench.engine.training import set_progress_sink
from kdbench.engine.workers import Pool
from kdbench.report.results import new_result

if TYPE_CHECKING:
    from kdbench.contract.spec import CellSpec
    from kdbench.engine.manager import Host


@dataclass(frozen=True)
class LocalConfig:
    """Options of the "local" executor (``kdbench run --workers N`` sets ``workers``)."""

    workers: int = 1  # worker processes; 1 = every cell in this process, one after another


def _begin(spec: CellSpec, mctx: MatrixContext) -> dict[str, Any] | None:
    """Claim ``spec`` for this process: None when it is ours to run, else the result to report
    instead (``running`` when another live process holds it, nothing written; the final result
    when another process finished it after this run was planned)."""
    holder = try_claim(mctx.results_dir / ".claims" / spec.run_id)
    if holder is not None:
        result = new_result(spec)
        result.update(status="running", reason=f"claimed by {holder} (rerun later; if that process "
                                               f"is gone, delete {mctx.results_dir / '.claims' / spec.run_id})")
        return result
    done = final_result(mctx.results_dir, spec.run_id)
    if done is not None:
        _end(spec, mctx)
    return done


def _end(spec: CellSpec, mctx: MatrixContext) -> None:
    (mctx.results_dir / ".claims" / spec.run_id).unlink(missing_ok=True)


class LocalExecutor(Executor):
    """Cells on this machine: in this process one after another (``workers = 1``), or in
    ``workers`` worker processes (:mod:`kdbench.engine.workers`). A cell another live process has
    claimed is passed over with status ``running`` (nothing written); one that another process
    finished meanwhile yields that result."""

    name = "local"
    Config = LocalConfig

    def __init__(self, cfg: LocalConfig | None = None) -> None:
        """``cfg`` None means the defaults (one cell at a time, in this process)."""
        super().__init__(cfg if cfg is not None else LocalConfig())
        if self.cfg.workers < 1:
            raise ConfigError(f"--workers must be >= 1 (got {self.cfg.workers}); 1 runs every cell in this process")

    def map(self, specs: Sequence[CellSpec], mctx: MatrixContext, host: Host,
            on_start: Callable[[CellSpec], None] | None = None) -> Iterator[dict[str, Any]]:
        """In plan order (teacher cells first); yield each result as its cell ends."""
        workers = min(self.cfg.workers, len(specs))
        if workers > 1:
            check_rebuildable(host, mctx.host_args, "--workers", "use --workers 1")
            pool = Pool(workers, mctx, host, lambda s: _begin(s, mctx), lambda s: _end(s, mctx),
                        on_start, self.on_progress)
            yield from pool.map(specs)
            return
        yield from self._sequential(specs, mctx, host, on_start)

    def _sequential(self, specs: Sequence[CellSpec], mctx: MatrixContext, host: Host,
                    on_start: Callable[[CellSpec], None] | None) -> Iterator[dict[str, Any]]:
        report = self.on_progress  # None: leave this process's sink (or tqdm bars) as they are
        previous = set_progress_sink(lambda *a: report(0, *a)) if report is not None else None
        try:
            for spec in specs:
                skipped = _begin(spec, mctx)
                if skipped is not None:
                    yield skipped
                    continue
                try:
                    if on_start:
                        on_start(spec)
                    result = execute_cell(spec, mctx, host)
                finally:
                    _end(spec, mctx)
                yield result
        finally:
            if report is not None:
                set_progress_sink(previous)


@hookimpl
def kdbench_register_executors(register: Any) -> None:
    """The local executor."""
    register(LocalExecutor)
