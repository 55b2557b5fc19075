"""Worker processes for the local executor (``kdbench run --workers N``).

Each worker is a fresh interpreter (multiprocessing "spawn": forking a process that has imported
torch is unsafe) that rebuilds the Host from ``HostArgs`` as Ray workers do, runs with one torch
thread (a suite's ``train.threads`` still wins) and executes one cell at a time through
:func:`kdbench.engine.executors.execute_cell`, which writes the result atomically. The parent claims each
cell (``<results>/.claims/<run_id>``, as the in-process executor does), hands out a method cell
only once its teacher's fine-tuning cell has finished (teachers are cached; a method cell started
earlier would wait on the cache lock), forwards progress lines, and records a worker that died
mid-cell as ``failed`` (``extra.error_kind = "worker_died"``) before starting a fresh one. A worker
exits as soon as its parent is gone (``kill -9`` of ``kdbench run``); killed cells resume from
their checkpoints on the next run.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kdbench.contract.errors import KdbenchError
from kdbench.contract.options import as_dict, identity
from kdbench.engine.plan import config_hash

if TYPE_CHECKING:
    from kdbench.contract.spec import CellSpec
    from kdbench.engine.executors import MatrixContext
    from kdbench.engine.manager import Host

#: seconds between two progress messages of one worker (the last one of a phase always goes)
PROGRESS_INTERVAL = 0.25
OnProgress = Callable[[int, str, int, int, str], None]  # (worker, label, done, total, what)


def teacher_key(spec: CellSpec) -> str:
    """What a cell's fine-tuned teacher depends on (the spec-level part of the teacher cache key):
    a method cell and its teacher cell share it."""
    return config_hash({"teacher": [spec.teacher_kind, as_dict(spec.teacher_cfg)], "task": spec.task,
                        "task_options": identity(spec.task_cfg), "seed": spec.seed,
                        "recipe": identity(spec.teacher_train)}, n=16)


def _exit_with_parent() -> None:
    """Daemon thread of a worker: end the process when the parent process is gone."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(3)


def _throttled(conn: Any) -> Callable[[str, int, int, str], None]:
    last = [0.0]

    def sink(label: str, done: int, total: int, what: str) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < PROGRESS_INTERVAL:
            return
        last[0] = now
        conn.send(("progress", label, done, total, what))

    return sink


def worker_main(conn: Any, mctx: MatrixContext) -> None:
    """A worker process: receive pickled specs, send ``("result", dict)`` back, until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    import torch

    from kdbench.engine.executors import execute_cell, rebuild_host
    from kdbench.engine.training import set_progress_sink

    torch.set_num_threads(1)
    host = rebuild_host(mctx.host_args)  # plugins first: specs may pickle -p plugins' classes
    set_progress_sink(_throttled(conn))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        try:
            conn.send(("result", execute_cell(pickle.loads(message), mctx, host)))
        except KdbenchError as exc:  # bad data stops the run, in the parent, with its exit code
            conn.send(("error", exc))


@dataclass
class _Worker:
    slot: int
    process: Any
    conn: Any
    spec: CellSpec | None = None
    started: float = 0.0


class Pool:
    """``n`` worker processes running cells; :meth:`map` yields results as cells finish.

    ``begin(spec)`` is called before a cell is handed out: it returns a result to yield instead
    of running the cell (claimed elsewhere, already finished), or None once the cell is ours;
    ``end(spec)`` is called when it is over (release the claim).
    """

    def __init__(self, n: int, mctx: MatrixContext, host: Host,
                 begin: Callable[[CellSpec], dict[str, Any] | None], end: Callable[[CellSpec], None],
                 on_start: Callable[[CellSpec], None] | None = None,
                 on_progress: OnProgress | None = None) -> None:
        self.n, self.mctx, self.host, self.begin, self.end = n, mctx, host, begin, end
        self.on_start, self.on_progress = on_start, on_progress
        self.mp = multiprocessing.get_context("spawn")
        self.workers: list[_Worker] = []

    def _spawn(self, slot: int) -> _Worker:
        parent, child = self.mp.Pipe()
        proc = self.mp.Process(target=worker_main, args=(child, self.mctx), daemon=True,
                               name=f"kdbench-worker-{slot}")
        proc.start()
        child.close()
        return _Worker(slot, proc, parent)

    def map(self, specs: Sequence[CellSpec]) -> Iterator[dict[str, Any]]:
        """Run ``specs`` (plan order: teacher cells first); yield each result."""
        queue = list(specs)
        teachers = {teacher_key(s) for s in queue if s.is_teacher}
        self.workers = [self._spawn(i) for i in range(self.n)]
        try:
            while queue or any(w.spec for w in self.workers):
                yield from self._dispatch(queue, teachers)
                busy = [w for w in self.workers if w.spec is not None]
                if not busy:
                    continue
                ready = multiprocessing.connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
                for w in busy:
                    if w.conn in ready or w.process.sentinel in ready:
                        yield from self._receive(w, teachers)
        finally:
            self._stop()

    def _dispatch(self, queue: list[CellSpec], teachers: set[str]) -> Iterator[dict[str, Any]]:
        """Hand a ready cell to every idle worker; yield the results of cells not run here."""
        for w in list(self.workers):
            if w.spec is None and queue and not w.process.is_alive():
                w.conn.close()
                w = self.workers[w.slot] = self._spawn(w.slot)
            while w.spec is None and queue:
                ready = [s for s in queue if s.is_teacher or s.na_reason or teacher_key(s) not in teachers]
                if not ready and any(x.spec for x in self.workers):
                    return  # the rest wait for a teacher that is being fine-tuned
                spec = (ready or queue)[0]
                queue.remove(spec)
                skipped = self.begin(spec)
                if skipped is not None:
                    if spec.is_teacher:
                        teachers.discard(teacher_key(spec))
                    yield skipped
                    continue
                if self.on_start:
                    self.on_start(spec)
                w.conn.send(pickle.dumps(spec))
                w.spec, w.started = spec, time.perf_counter()

    def _receive(self, w: _Worker, teachers: set[str]) -> Iterator[dict[str, Any]]:
        """Messages of a worker: progress lines, a result; or its death."""
        spec = w.spec
        assert spec is not None
        while True:
            try:
                if not w.conn.poll():
                    break
                message = w.conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "progress":
                if self.on_progress:
                    self.on_progress(w.slot, *message[1:])
                continue
            w.spec = None
            self._finish(spec, teachers)
            if message[0] == "error":
                raise message[1]
            yield message[1]
            return
        if not w.process.is_alive():
            self._finish(spec, teachers)
            yield self._died(spec, w)
            w.conn.close()
            self.workers[w.slot] = self._spawn(w.slot)

    def _finish(self, spec: CellSpec, teachers: set[str]) -> None:
        if spec.is_teacher:
            teachers.discard(teacher_key(spec))
        self.end(spec)

    def _died(self, spec: CellSpec, w: _Worker) -> dict[str, Any]:
        """Record a cell whose worker process died (segfault, kill, out of memory)."""
        from kdbench.report.results import new_result, provenance, write_result

        result = new_result(spec)
        code = w.process.exitcode
        result.update(status="failed", wall_s=time.perf_counter() - w.started,
                      reason=f"worker process died (exit code {code}); `kdbench run --retry-failed` resumes "
                             "it from its last checkpoint")
        result["extra"].update(error_kind="worker_died", exit_code=code)
        result["suite_info"] = dict(self.mctx.suite_info)
        result["provenance"] = provenance(f"local worker {w.slot}", self.host.plugin_versions())
        self.host.update_result(result)
        write_result(self.mctx.results_dir, result)
        return result

    def _stop(self) -> None:
        """Ask idle workers to exit; terminate busy ones (an interrupted run); release claims."""
        for w in self.workers:
            try:
                if w.spec is None:
                    w.conn.send(None)
                else:
                    w.process.terminate()
                    self.end(w.spec)
            except OSError:
                pass
        for w in self.workers:
            w.process.join(timeout=30)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()
