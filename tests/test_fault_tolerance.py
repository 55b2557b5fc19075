"""Fault tolerance of the runner: kill -9 and resume, NaN -> diverged, OOM retry, --retry-failed.

The kill test runs the real CLI in subprocesses; the others run ``kdbench.cli.main.main`` in-process
with a test plugin written to a .py file and loaded with ``-p`` (exactly as a user would).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kdbench.cli.main import main
from kdbench.contract.errors import ExitCode
from kdbench.contract.hookspecs import hookimpl
from kdbench.engine.checkpoints import load_state
from kdbench.engine.config import load_suite
from kdbench.engine.executors import MatrixContext, pending
from kdbench.engine.local import LocalExecutor
from kdbench.engine.manager import Host, make_plugin_manager
from kdbench.engine.plan import expand
from kdbench.report.results import load_results, read_result
from kdbench.testing import tiny_suite

REPO = Path(__file__).resolve().parents[1]

SUITE = textwrap.dedent("""\
    [suite]
    name = "ft"
    methods = {methods}
    tasks = ["toy/reviews"]
    students = ["bert-l1"]
    seeds = {seeds}
    baselines = {baselines}

    [teachers.bert]
    kind = "tiny-bert"
    layers = 2
    hidden = 32

    [students.bert-l1]
    teacher = "bert"
    kind = "pick-layers"
    layers = 1
    pick = "last"

    [train]
    epochs = {epochs}
    batch_size = 16
    lr = 1e-3
    log_every = 2
    checkpoint_every = 2

    [teacher_train]
    epochs = 2
    batch_size = 32
    lr = 2e-3

    [task."toy/reviews"]
    per_domain = 200
    max_train_examples = 96
    """)

# A fault-injection plugin, loaded with -p like any user plugin.
PLUGIN = textwrap.dedent('''\
    """Test plugin: a loss that turns NaN, an injected CUDA OOM, and an injected failure."""

    from __future__ import annotations

    import os
    from dataclasses import dataclass

    import torch

    from kdbench.contract.hookspecs import hookimpl
    from kdbench.contract.rules import Method
    from kdbench_builtins.losses import CrossEntropy


    @dataclass(frozen=True)
    class NanConfig:
        at_step: int = 3  # the training step (1-based) whose loss becomes NaN


    class NanAfter(CrossEntropy):
        name = "nan-after"
        Config = NanConfig

        def __init__(self, cfg, *, task, teacher, student):
            super().__init__(cfg, task=task, teacher=teacher, student=student)
            self.calls = 0

        def forward(self, student, teacher, batch):
            self.calls += 1
            terms = super().forward(student, teacher, batch)
            if self.calls >= self.cfg.at_step:
                terms["ce"] = terms["ce"] * float("nan")
            return terms


    @hookimpl
    def kdbench_register_losses(register):
        register(NanAfter)


    @hookimpl
    def kdbench_register_methods(register):
        register(Method(name="nan-test", teacher_update="frozen", loss="nan-after"))


    @hookimpl(tryfirst=True)
    def kdbench_run_cell(spec, ctx):
        """OOM for "kd" cells at full micro-batch (KDBENCH_TEST_OOM=1); RuntimeError for the
        methods named in KDBENCH_TEST_FAIL. Otherwise None: the real loop runs."""
        if os.environ.get("KDBENCH_TEST_OOM") == "1" and spec.method == "kd" \\
                and spec.train.micro_batch_size == 0:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        if spec.method in os.environ.get("KDBENCH_TEST_FAIL", "").split(","):
            raise RuntimeError(f"injected failure in {spec.method}")
        return None
    ''')


def write_suite(path: Path, methods: list[str], seeds: list[int], *, baselines: bool = True,
                epochs: int = 3) -> Path:
    """The fault-tolerance suite: toy/reviews, tiny BERT pair, checkpoints every 2 steps."""
    path.write_text(SUITE.format(methods=json.dumps(methods), seeds=json.dumps(seeds),
                                 baselines=str(baselines).lower(), epochs=epochs))
    return path


def results_by_method(results_dir: Path) -> dict[str, dict[str, Any]]:
    """{method: result} for a one-seed run."""
    return {r["method"]: r for r in load_results(results_dir)["result"]}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the in-process tests: the teacher is fine-tuned once and reused."""
    return tmp_path_factory.mktemp("ft-cache")


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fault plugin as a file for -p; no fault is switched on."""
    monkeypatch.delenv("KDBENCH_TEST_OOM", raising=False)
    monkeypatch.delenv("KDBENCH_TEST_FAIL", raising=False)
    path = tmp_path / "faults.py"
    path.write_text(PLUGIN)
    return path


def run_cli(suite: Path, results: Path, cache: Path, plugin: Path, *extra: str) -> int:
    """``kdbench -p plugin run --suite suite ...`` in this process; returns the exit code."""
    return main(["-p", str(plugin), "run", "--suite", str(suite), "--results-dir", str(results),
                 "--cache-dir", str(cache), "--no-leaderboard", *extra])


# -- NaN -> diverged -------------------------------------------------------------------------------


def test_nan_loss_marks_cell_diverged_and_matrix_goes_on(tmp_path: Path, plugin: Path,
                                                         shared_cache: Path) -> None:
    suite = write_suite(tmp_path / "s.toml", ["nan-test", "kd"], [0], baselines=False)
    # NaN from step 3 on; the check runs when metrics are read (every log_every=2 steps) -> step 4
    results = tmp_path / "res"
    code = run_cli(suite, results, shared_cache, plugin, "loss.nan-after.at_step=3")
    assert code == int(ExitCode.OK)  # diverged is a verdict, not a failure
    res = results_by_method(results)
    assert res["nan-test"]["status"] == "diverged"
    assert res["nan-test"]["extra"]["diverged_step"] == 4
    assert "non-finite loss/" in res["nan-test"]["reason"]
    assert res["kd"]["status"] == "ok" and res["teacher"]["status"] == "ok"
    assert res["kd"]["protocol"]["steps"] == 18
    # a diverged cell is final: a rerun (same overrides) skips it
    files = {p.name: p.read_bytes() for p in results.glob("*.json")}
    assert run_cli(suite, results, shared_cache, plugin, "loss.nan-after.at_step=3") == int(ExitCode.OK)
    assert {p.name: p.read_bytes() for p in results.glob("*.json")} == files


# -- OOM -> micro-batch halving ------------------------------------------------------------------


def test_oom_is_retried_with_half_micro_batch(tmp_path: Path, plugin: Path, shared_cache: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDBENCH_TEST_OOM", "1")
    suite = write_suite(tmp_path / "s.toml", ["kd"], [0], baselines=True)
    code = run_cli(suite, tmp_path / "res", shared_cache, plugin)
    assert code == int(ExitCode.OK)
    res = results_by_method(tmp_path / "res")
    kd = res["kd"]
    assert kd["status"] == "ok", kd["reason"]
    assert kd["extra"]["micro_batch_size"] == 8  # batch_size 16 halved; effective batch unchanged
    retries = kd["extra"]["oom_retries"]
    assert len(retries) == 1 and retries[0]["micro_batch_size"] == 8
    assert "OutOfMemoryError" in retries[0]["error"]
    assert kd["config"]["train"]["micro_batch_size"] == 8 and kd["config"]["train"]["batch_size"] == 16
    assert kd["protocol"]["steps"] == 18  # same number of optimizer steps as without accumulation
    assert res["no-kd"]["status"] == "ok" and "oom_retries" not in res["no-kd"]["extra"]


def test_oom_without_retries_fails_the_cell_only(tmp_path: Path, plugin: Path, shared_cache: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDBENCH_TEST_OOM", "1")
    suite = write_suite(tmp_path / "s.toml", ["kd"], [0], baselines=True)
    code = run_cli(suite, tmp_path / "res", shared_cache, plugin, "train.oom_retries=0")
    assert code == int(ExitCode.RUNS_FAILED)
    res = results_by_method(tmp_path / "res")
    assert res["kd"]["status"] == "failed"
    assert res["kd"]["extra"]["error_kind"] == "oom"
    assert "OutOfMemoryError" in res["kd"]["reason"]
    assert "oom_retries" not in res["kd"]["extra"]
    assert res["no-kd"]["status"] == "ok" and res["teacher"]["status"] == "ok"  # the matrix went on


# -- --retry-failed -----------------------------------------------------------------------------


def test_failed_cell_is_skipped_unless_retry_failed(tmp_path: Path, plugin: Path, shared_cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    suite = write_suite(tmp_path / "s.toml", ["kd"], [0], baselines=True)
    results = tmp_path / "res"
    monkeypatch.setenv("KDBENCH_TEST_FAIL", "no-kd")
    assert run_cli(suite, results, shared_cache, plugin) == int(ExitCode.RUNS_FAILED)
    first = results_by_method(results)
    assert first["no-kd"]["status"] == "failed" and first["no-kd"]["extra"]["error_kind"] == "failed"
    assert "injected failure in no-kd" in first["no-kd"]["reason"]
    assert first["kd"]["status"] == "ok"
    files = {p.name: p.read_bytes() for p in results.glob("*.json")}

    monkeypatch.delenv("KDBENCH_TEST_FAIL")  # the cause is fixed
    capsys.readouterr()
    assert run_cli(suite, results, shared_cache, plugin) == int(ExitCode.OK)
    assert "3 cells, 3 already done, 0 to run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in results.glob("*.json")} == files  # nothing rerun

    assert run_cli(suite, results, shared_cache, plugin, "--retry-failed") == int(ExitCode.OK)
    assert "3 cells, 2 already done, 1 to run" in capsys.readouterr().err
    after = results_by_method(results)
    assert after["no-kd"]["status"] == "ok" and after["no-kd"]["protocol"]["steps"] == 18
    for name, data in files.items():  # the finished cells were not touched
        if not name.startswith("no-kd"):
            assert (results / name).read_bytes() == data


def test_cell_claimed_by_a_live_process_is_passed_over(tmp_path: Path, plugin: Path, shared_cache: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    suite = write_suite(tmp_path / "s.toml", ["kd"], [0], baselines=True)
    results = tmp_path / "res"
    cells = expand(load_suite(str(suite)), Host(make_plugin_manager(autoload=False)))
    kd = next(c for c in cells if c.method == "kd")
    no_kd = next(c for c in cells if c.method == "no-kd")
    claims = results / ".claims"
    claims.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        (claims / kd.run_id).write_text(f"{socket.gethostname()} {other.pid}")  # another live run
        (claims / no_kd.run_id).write_text(f"{socket.gethostname()} {dead.pid}")  # left by a kill -9
        assert run_cli(suite, results, shared_cache, plugin) == int(ExitCode.OK)
        printed = capsys.readouterr()
        assert f"running  {kd.run_id}  (claimed by {socket.gethostname()} {other.pid}" in printed.out + printed.err
        done = results_by_method(results)
        assert set(done) == {"teacher", "no-kd"} and done["no-kd"]["status"] == "ok"  # stale claim taken over
        assert sorted(p.name for p in claims.iterdir()) == [kd.run_id]  # own claims removed
    finally:
        other.kill()
        other.wait()
    assert run_cli(suite, results, shared_cache, plugin) == int(ExitCode.OK)  # holder gone: runs now
    assert results_by_method(results)["kd"]["status"] == "ok" and not any(claims.iterdir())


# -- every teacher-update rule resumes exactly -------------------------------------------------


class Interrupt(BaseException):
    """Stands for a kill: not an Exception, so no failure isolation catches it."""


class InterruptAt:
    """Plugin object: interrupt the first method cell whose training log reaches ``step``."""

    def __init__(self) -> None:
        self.step: int | None = None

    @hookimpl
    def kdbench_log_metrics(self, spec: Any, step: int, metrics: Any) -> None:
        if self.step is not None and not spec.is_teacher and step >= self.step \
                and any(k.startswith("loss/") for k in metrics):
            self.step = None
            raise Interrupt


@pytest.mark.parametrize("method,extra", [("kd", []), ("kd", ["train.length_bucketing=2"]),
                                          ("metadistil", []), ("reptile-distil", []), ("meta-kd", [])])
def test_interrupted_cell_resumes_bit_identically(method: str, extra: list[str], tmp_path: Path,
                                                  shared_cache: Path, make_host: Callable[..., Host]) -> None:
    interrupt = InterruptAt()
    host = make_host(interrupt)
    # 5 steps per epoch, 2 epochs; checkpoints at steps 3, 5 (epoch end), 6, 9; interrupted at 8
    suite = load_suite(str(tiny_suite(tmp_path / "s.toml", method, steps=0)), [
        "train.epochs=2", "train.max_steps=0", "train.log_every=2", "train.checkpoint_every=3",
        "teacher_train.max_steps=6", "task.toy/reviews.per_domain=200",
        "task.toy/reviews.max_train_examples=96", "task.toy/reviews.quiz_fraction=0.2", *extra])
    cells = expand(suite, host)
    ref = list(LocalExecutor(None).map(cells, MatrixContext(tmp_path / "ref", shared_cache), host))
    mctx = MatrixContext(tmp_path / "res", shared_cache)
    interrupt.step = 7
    with pytest.raises(Interrupt):
        list(LocalExecutor(None).map(pending(cells, mctx.results_dir, False), mctx, host))
    assert interrupt.step is None
    out = list(LocalExecutor(None).map(pending(cells, mctx.results_dir, False), mctx, host))
    want = next(r for r in ref if r["method"] == method)
    got = next(r for r in out if r["method"] == method)
    assert want["status"] == "ok", want["reason"]
    assert got["extra"]["resumed_from_step"] == 6  # mid-epoch: epoch 1, batch 1
    for key in ("status", "metrics", "history", "protocol"):
        assert got[key] == want[key], f"{method}: {key} differs after resume"


class InterruptTeacherAt:
    """Interrupt the first teacher fine-tuning once it has logged a training loss at ``step``."""

    def __init__(self, step: int) -> None:
        self.step: int | None = step

    @hookimpl
    def kdbench_log_metrics(self, spec: Any, step: int, metrics: Any) -> None:
        if self.step is not None and spec.is_teacher and step >= self.step \
                and any(k.startswith("teacher/loss/") for k in metrics):
            self.step = None
            raise Interrupt


def test_interrupted_teacher_fine_tuning_resumes_bit_identically(tmp_path: Path,
                                                                 make_host: Callable[..., Host]) -> None:
    overrides = ["teacher_train.epochs=3", "teacher_train.max_steps=0", "teacher_train.log_every=2",
                 "task.toy/reviews.per_domain=200", "task.toy/reviews.max_train_examples=96"]
    host = make_host()
    suite = load_suite(str(tiny_suite(tmp_path / "s.toml", "kd", steps=2)), overrides)
    teacher_cell = [c for c in expand(suite, host) if c.is_teacher]
    ref = list(LocalExecutor(None).map(teacher_cell, MatrixContext(tmp_path / "ref", tmp_path / "c1"), host))
    interrupt = InterruptTeacherAt(8)  # 3 steps per epoch: two epochs checkpointed, then mid epoch 3
    host = make_host(interrupt)
    mctx = MatrixContext(tmp_path / "res", tmp_path / "c2")
    with pytest.raises(Interrupt):
        list(LocalExecutor(None).map(teacher_cell, mctx, host))
    assert interrupt.step is None and list((tmp_path / "c2" / "checkpoints").glob("teacher-*.pt"))
    out = list(LocalExecutor(None).map(teacher_cell, mctx, host))
    assert out[0]["teacher"]["resumed_from_step"] == 6 and ref[0]["teacher"]["resumed_from_step"] == 0
    for key in ("status", "metrics"):
        assert out[0][key] == ref[0][key], f"teacher {key} differs after resume"
    assert out[0]["teacher"]["protocol"] == ref[0]["teacher"]["protocol"]
    assert not list((tmp_path / "c2" / "checkpoints").glob("teacher-*.pt"))  # removed when done
    (want_w, _), (got_w, _) = (load_state(next((tmp_path / c / "teachers").glob("*.safetensors")))
                               for c in ("c1", "c2"))
    assert want_w.keys() == got_w.keys() and all(torch.equal(want_w[k], got_w[k]) for k in want_w)


# -- kill -9 and resume -------------------------------------------------------------------------

COMPARED = ("status", "metrics", "protocol", "history", "seeds", "method", "task", "seed", "config")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    roots = [str(REPO), str(REPO / "plugins"), env.get("PYTHONPATH", "")]
    env.update(PYTHONPATH=os.pathsep.join(p for p in roots if p), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", KDBENCH_DISABLE_PLUGIN_AUTOLOAD="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("KDBENCH_TENSORBOARD", None)
    return env


def _start(suite: Path, out: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "kdbench", "run", "--suite", str(suite), "--results-dir",
           str(out / "results"), "--cache-dir", str(out / "cache"), "--no-leaderboard"]
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(), cwd=str(out))


def _wait_for(proc: subprocess.Popen[bytes], ready: Any, timeout: float = 600.0) -> bool:
    """Poll until ``ready()``; False if the process exited first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the run to make progress")


def _fresh_checkpoint(ckpt_dir: Path, since: float, pattern: str = "*.pt") -> Any:
    def ready() -> bool:
        try:
            return any(p.stat().st_mtime >= since for p in ckpt_dir.glob(pattern))
        except FileNotFoundError:  # renamed or deleted while listing
            return False
    return ready


def _final(results_dir: Path) -> dict[str, dict[str, Any]]:
    """Every result file parses; {run_id: result}."""
    out = {}
    for path in sorted(results_dir.glob("*__*.json")):  # result files, not plan.json
        r = read_result(path)
        assert path.name == f"{r['run_id']}.json"
        out[r["run_id"]] = r
    return out


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_is_bit_identical(tmp_path: Path) -> None:
    suite = write_suite(tmp_path / "suite.toml", ["kd"], [0, 1], baselines=True, epochs=4)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir()
    run_dir.mkdir()
    ref = _start(suite, ref_dir, ref_dir / "log.txt")  # uninterrupted, alongside the killed runs
    rng = random.Random(20240611)
    log = run_dir / "log.txt"
    kills = []
    procs = [ref]
    try:
        for attempt in range(3):
            t0 = time.time()
            proc = _start(suite, run_dir, log)
            procs.append(proc)
            if attempt == 0:  # somewhere in planning, data preparation or teacher fine-tuning
                ready = lambda: "to run ->" in log.read_text(errors="replace")  # noqa: E731
            else:  # a moment after a checkpoint (1: teacher fine-tuning or a method cell; 2: a method
                # cell), mid-epoch or at an epoch end
                ready = _fresh_checkpoint(run_dir / "cache" / "checkpoints", t0,
                                          "*.pt" if attempt == 1 else "[!t]*.pt")
            if _wait_for(proc, ready):
                time.sleep(rng.uniform(0.0, 1.0) if attempt == 0 else rng.uniform(0.0, 0.12))
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=600)
            kills.append(proc.returncode)
        final = _start(suite, run_dir, log)
        procs.append(final)
        assert final.wait(timeout=900) == 0, log.read_text(errors="replace")[-3000:]
        assert ref.wait(timeout=900) == 0, (ref_dir / "log.txt").read_text(errors="replace")[-3000:]
    finally:
        for p in procs:  # only the processes this test started
            if p.poll() is None:
                p.kill()
                p.wait()
    assert kills == [-signal.SIGKILL] * 3, f"the run finished before being killed: {kills}"

    got, want = _final(run_dir / "results"), _final(ref_dir / "results")
    assert sorted(got) == sorted(want) and len(want) == 6  # 2 teachers + (kd, no-kd) x 2 seeds
    for run_id, w in want.items():
        g = got[run_id]
        for key in COMPARED:
            assert g.get(key) == w.get(key), f"{run_id}: {key} differs after resume"
        if not run_id.startswith("teacher"):
            assert g["teacher"]["metrics"] == w["teacher"]["metrics"]
            assert g["teacher"]["key"] == w["teacher"]["key"]
    assert all(r["status"] == "ok" for r in got.values())
    resumed = [r["extra"].get("resumed_from_step", 0) for r in got.values()]
    assert any(s > 0 for s in resumed), "no cell resumed from a checkpoint; kills missed training"
    # pandas sees exactly the cells: leftover temp files (.<name>.tmp<pid>) are never results
    board = load_results(run_dir / "results")
    assert sorted(board["run_id"]) == sorted(want)
    assert not list((run_dir / "cache" / "checkpoints").glob("*.pt"))  # finished cells clean up
