"""Built-in plugin: the "ray" executor runs every cell of the matrix as a Ray task.

Each cell is one task calling :func:`kdbench.execute_cell` in a Ray worker; the worker rebuilds the
same Host from ``mctx.host_args`` (:func:`kdbench.rebuild_host`; plugins registered in the driver
process only, not through ``-p``, ``KDBENCH_PLUGINS`` or an entry point, are refused up front),
writes the result JSON atomically into the results directory and returns the result dict. Teacher fine-tuning cells run as a first wave; the method
cells then reuse the cached teachers (the cache has a lock file, so two workers never train the
same teacher). Results are yielded as cells finish (``ray.wait``). A cell whose worker process
died (segfault, kill, node loss) is retried up to ``max_retries`` times and resumes from its last
checkpoint; after that it is recorded as ``failed`` with ``extra.error_kind = "worker_died"``.
Ray is imported only when this executor runs: kdbench does not require it (``pip install
kdbench[ray]``).

Usage::

    kdbench run --suite glue-small --executor ray                       # local instance, all cores
    kdbench run --executor ray --executor-opt local_cpus=4 --executor-opt num_cpus=2
    kdbench run --executor ray --executor-opt num_gpus=1                # one GPU per cell

Pointing it at a cluster: start one (``ray start --head`` on the head node, ``ray start
--address=HEAD:6379`` on the others, or a KubeRay/autoscaler cluster), then from a node of the
cluster::

    kdbench run --suite glue-small --executor ray --executor-opt address=auto \\
        --executor-opt num_gpus=1 --results-dir /shared/results --cache-dir /shared/kdbench-cache

or from outside it through Ray Client: ``--executor-opt address=ray://HEAD:10001``. On a cluster,
``--results-dir`` and ``--cache-dir`` must be on a filesystem every node mounts at the same path
(teachers, token caches and checkpoints are shared through it; the driver also writes every
returned result into its own results directory when the worker's file is not visible there), and
kdbench plus any plugins must be installed on every node (``-p file.py`` plugins must exist at
the same absolute path there), or kdbench itself shipped with ``--executor-opt ship_code=true``
(Ray ``runtime_env`` ``py_modules``). ``KDBENCH_*``, ``HF_*``, ``TRANSFORMERS_*`` and
``TOKENIZERS_*`` environment variables of the driver are forwarded to the workers; a local
instance's workers also get the driver's ``sys.path``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdbench import (
    ConfigError,
    Executor,
    HostArgs,
    MatrixContext,
    bf16_emulation_warning,
    check_rebuildable,
    env_flag,
    execute_cell,
    hookimpl,
    new_result,
    provenance,
    rebuild_host,
    result_path,
    this_cpu,
    write_result,
)

if TYPE_CHECKING:
    from kdbench import CellSpec, Host

FORWARD_ENV_PREFIXES = ("KDBENCH_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "CUBLAS_")


@dataclass(frozen=True)
class RayConfig:
    """Options of the "ray" executor (``--executor-opt key=value``)."""

    address: str = ""  # "" = start a local instance; "auto" or "ray://host:10001" = join a cluster
    num_cpus: float = 1.0  # CPUs reserved per cell (also the cell's torch thread count)
    num_gpus: float = 0.0  # GPUs reserved per cell (e.g. 1, or 0.5 to pack two cells per GPU)
    max_retries: int = 2  # retries of a cell whose worker process died
    local_cpus: int = 0  # CPUs of a locally started instance; 0 = every core
    local_gpus: int = -1  # GPUs of a locally started instance; -1 = Ray detects them
    object_store_mb: int = 0  # object store of a locally started instance; 0 = Ray's default
    ship_code: bool = False  # upload kdbench and kdbench_builtins to the cluster (runtime_env py_modules)


def _cell_remote(spec_pickle: bytes, mctx: MatrixContext, threads: int) -> dict[str, Any]:
    """What a Ray worker runs for one cell.

    The spec arrives pickled: it is unpickled only after the plugins are loaded, because its
    option dataclasses may live in a ``-p file.py`` plugin (module ``kdbench_local_<stem>``).
    """
    import torch

    torch.set_num_threads(max(1, threads))
    host = rebuild_host(mctx.host_args)
    spec = pickle.loads(spec_pickle)
    return execute_cell(spec, mctx, host)


def node_cpus(ray: Any) -> list[tuple[bool, str]]:
    """:func:`kdbench.this_cpu` of every alive node of the connected cluster, from one zero-CPU
    task pinned to each (``NodeAffinitySchedulingStrategy``)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(this_cpu)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    pinned = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)) for n in nodes]
    return list(ray.get([task.remote() for task in pinned]))


def _package_dir(module: str) -> Path:
    """Directory of an importable package."""
    mod = __import__(module)
    return Path(mod.__file__).resolve().parent  # type: ignore[arg-type]


class RayExecutor(Executor):
    """Cells as Ray tasks: teacher cells first, then method cells; yields results as they finish."""

    name = "ray"
    version = "1"
    Config = RayConfig

    def __init__(self, cfg: RayConfig | None) -> None:
        """``cfg`` comes from ``--executor-opt``; None means the defaults."""
        super().__init__(cfg if cfg is not None else RayConfig())

    # -- setup ---------------------------------------------------------------------------------
    def _check(self) -> None:
        """Every bad option at once, as one ConfigError."""
        cfg = self.cfg
        problems = []
        if cfg.num_cpus < 0 or cfg.num_gpus < 0:
            problems.append("--executor-opt num_cpus/num_gpus (ray) must be >= 0")
        if cfg.max_retries < 0:
            problems.append("--executor-opt max_retries (ray) must be >= 0, e.g. max_retries=2")
        if cfg.address and not (cfg.address == "auto" or cfg.address.startswith("ray://")
                                or ":" in cfg.address):
            problems.append(f"--executor-opt address={cfg.address!r} (ray): expected '' (local), 'auto', "
                            "'HOST:PORT' or 'ray://HOST:10001'")
        if problems:
            raise ConfigError(problems)

    def _portable(self, mctx: MatrixContext) -> MatrixContext:
        """Absolute paths and an explicit autoload flag, so workers rebuild the same Host."""
        a = mctx.host_args
        extra = tuple(str(Path(p).resolve()) if p.endswith(".py") or os.sep in p else p for p in a.extra)
        autoload = a.autoload if a.autoload is not None else not env_flag("KDBENCH_DISABLE_PLUGIN_AUTOLOAD")
        return dataclasses.replace(mctx, results_dir=Path(mctx.results_dir).resolve(),
                                   cache_dir=Path(mctx.cache_dir).resolve(),
                                   host_args=HostArgs(extra, a.blocked, autoload))

    def _runtime_env(self) -> dict[str, Any]:
        """Forwarded environment variables, and how workers find kdbench's code."""
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}
        runtime: dict[str, Any] = {}
        if self.cfg.ship_code:
            runtime["py_modules"] = [str(_package_dir("kdbench")), str(_package_dir("kdbench_builtins"))]
        elif not self.cfg.address:  # a local instance: the workers get the driver's import path
            roots = [str(_package_dir("kdbench").parent), str(_package_dir("kdbench_builtins").parent)]
            here = [p for p in sys.path if p and Path(p).is_dir()]
            env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*roots, *here]))
        if env:
            runtime["env_vars"] = env
        return runtime

    def _init(self, ray: Any) -> bool:
        """Connect to or start Ray; True when this call started (and must stop) it."""
        if ray.is_initialized():
            return False
        cfg = self.cfg
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "runtime_env": self._runtime_env()}
        if cfg.address:
            ray.init(address=cfg.address, **kwargs)
        else:
            kwargs["num_cpus"] = cfg.local_cpus or os.cpu_count() or 1
            if cfg.local_gpus >= 0:
                kwargs["num_gpus"] = cfg.local_gpus
            if cfg.object_store_mb:
                kwargs["object_store_memory"] = cfg.object_store_mb * 2**20
            ray.init(**kwargs)
        return True

    def bf16_warning(self, specs: Sequence[CellSpec], device: str) -> str | None:
        """None: cells run on the cluster's nodes, which :meth:`map` probes once connected."""
        return None

    # -- running -------------------------------------------------------------------------------
    def map(self, specs: Sequence[CellSpec], mctx: MatrixContext, host: Host,
            on_start: Callable[[CellSpec], None] | None = None) -> Iterator[dict[str, Any]]:
        """Teacher cells as a first wave, then the method cells; yield each result as it lands."""
        self._check()
        if not specs:
            return
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("--executor ray needs Ray: pip install 'kdbench[ray]' (or ray>=2.9), "
                              "or use --executor local") from exc
        mctx = self._portable(mctx)
        check_rebuildable(host, mctx.host_args, "--executor ray", "use --executor local")
        started = self._init(ray)
        try:
            cfg = self.cfg
            gpus = ray.cluster_resources().get("GPU", 0)
            if gpus and not cfg.num_gpus:
                print(f"kdbench: ray: the cluster has {gpus:g} GPU(s) but num_gpus=0, so cells run on "
                      "CPU; pass --executor-opt num_gpus=1 to give each cell a GPU", file=sys.stderr)
            # the bf16 check of `kdbench run`, on the nodes: "auto" cells train where Ray puts them
            device = mctx.device if mctx.device != "auto" else "cuda" if cfg.num_gpus else "cpu"
            warning = bf16_emulation_warning(specs, device, lambda: node_cpus(ray))
            if warning:
                print(warning, file=sys.stderr)
            remote = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                                max_retries=cfg.max_retries, retry_exceptions=False)(_cell_remote)
            mref = ray.put(mctx)
            threads = max(1, int(cfg.num_cpus))
            teachers = [s for s in specs if s.is_teacher]
            methods = [s for s in specs if not s.is_teacher]
            for wave in (teachers, methods):
                yield from self._wave(ray, remote, wave, mref, mctx, host, threads, on_start)
        finally:
            if started:
                ray.shutdown()

    def _wave(self, ray: Any, remote: Any, wave: list[CellSpec], mref: Any, mctx: MatrixContext,
              host: Host, threads: int, on_start: Callable[[CellSpec], None] | None,
              ) -> Iterator[dict[str, Any]]:
        """Submit every cell of ``wave``; yield results in completion order."""
        running: dict[Any, tuple[CellSpec, float]] = {}
        for spec in wave:
            if on_start:
                on_start(spec)
            running[remote.remote(pickle.dumps(spec), mref, threads)] = (spec, time.perf_counter())
        try:
            while running:
                done, _ = ray.wait(list(running), num_returns=1)
                for ref in done:
                    spec, t0 = running.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # the worker died past its retries, or Ray itself failed
                        result = self._lost(spec, exc, mctx, host, time.perf_counter() - t0)
                    else:
                        if not result_path(mctx.results_dir, result["run_id"]).exists():
                            write_result(mctx.results_dir, result)  # worker on another filesystem
                    yield result
        finally:
            for ref in running:  # the consumer stopped early (Ctrl-C, error): do not leak tasks
                ray.cancel(ref, force=True)

    def _lost(self, spec: CellSpec, exc: BaseException, mctx: MatrixContext, host: Host,
              wall: float) -> dict[str, Any]:
        """Record a cell whose task never returned a result."""
        import ray.exceptions as rex

        if isinstance(exc, rex.OutOfMemoryError):  # Ray's memory monitor killed the worker
            kind = "oom"
        elif isinstance(exc, rex.WorkerCrashedError | rex.NodeDiedError):
            kind = "worker_died"
        else:
            kind = "ray"
        result = new_result(spec)
        result.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500], wall_s=wall)
        result["extra"].update(error_kind=kind, max_retries=self.cfg.max_retries)
        result["suite_info"] = dict(mctx.suite_info)
        result["provenance"] = provenance(f"ray:{self.cfg.address or 'local'}", host.plugin_versions())
        host.update_result(result)
        write_result(mctx.results_dir, result)
        return result


@hookimpl
def kdbench_register_executors(register: Any) -> None:
    """The Ray executor."""
    register(RayExecutor)
