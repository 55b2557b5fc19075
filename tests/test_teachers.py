"""One fine-tuned teacher per (task, teacher, seed), cached, shared, rebuilt when corrupt."""

from __future__ import annotations

import types

import kdbench
from kdbench.engine.config import load_suite
from kdbench.engine.executors import MatrixContext
from kdbench.engine.local import LocalExecutor
from kdbench.engine.plan import expand
from kdbench.testing import tiny_suite


def run(host, tmp, results):
    suite = load_suite(str(tiny_suite(tmp / "t.toml", "kd", steps=6)))
    cells = expand(suite, host)
    return list(LocalExecutor(None).map(cells, MatrixContext(tmp / results, tmp / "cache"), host))


def observer():
    logged: list[str] = []
    mod = types.ModuleType("teacher_observer")

    @kdbench.hookimpl
    def kdbench_log_metrics(spec, step, metrics):
        logged.extend(k for k in metrics if k.startswith("teacher/loss"))

    mod.kdbench_log_metrics = kdbench_log_metrics
    return mod, logged


def test_second_run_reuses_teacher_and_corrupt_entry_is_rebuilt(make_host, tmp_path):
    mod, logged = observer()
    host = make_host(mod)
    first = run(host, tmp_path, "r1")
    assert [r["status"] for r in first] == ["ok", "ok"]
    assert first[0]["extra"]["cached_teacher"] is False and logged  # trained now
    logged.clear()
    second = run(host, tmp_path, "r2")
    assert second[0]["extra"]["cached_teacher"] is True and not logged  # no teacher training
    assert second[0]["metrics"] == first[0]["metrics"]
    assert second[1]["metrics"] == first[1]["metrics"]  # same teacher -> same distillation
    (entry,) = (tmp_path / "cache" / "teachers").glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # truncate
    third = run(host, tmp_path, "r3")
    assert third[0]["extra"]["cached_teacher"] is False and logged  # rebuilt, not trusted
    assert third[0]["metrics"] == first[0]["metrics"]  # deterministic rebuild
    assert third[1]["metrics"] == first[1]["metrics"]


def test_teacher_key_changes_with_recipe(tmp_path):
    from kdbench.engine.manager import Host

    host = Host.create(autoload=False)
    path = tiny_suite(tmp_path / "t.toml", "kd")
    a = expand(load_suite(str(path)), host)[1]
    b = expand(load_suite(str(path), ["teacher_train.lr=1e-3"]), host)[1]
    assert a.run_id != b.run_id  # the method cell depends on its teacher's recipe


def test_teacher_lock_waits_for_a_live_holder_then_takes_it(tmp_path) -> None:
    import os
    import socket
    import subprocess
    import sys
    import threading
    import time

    from kdbench.engine.claims import ClaimLock as _Lock

    path = tmp_path / "t.lock"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    path.write_text(f"{socket.gethostname()} {other.pid}")
    threading.Timer(1.5, lambda: (other.kill(), other.wait())).start()
    t0 = time.monotonic()
    with _Lock(path):
        assert path.read_text() == f"{socket.gethostname()} {os.getpid()}"
        assert time.monotonic() - t0 >= 1.0  # waited for the holder to die
    assert not path.exists()
