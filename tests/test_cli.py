from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdbench.cli.main import main
from kdbench.contract.errors import ExitCode
from kdbench.testing import tiny_suite


def test_misspelled_method_one_line_exit_code(capsys):
    code = main(["run", "--methods", "metadistl", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == ExitCode.CONFIG_ERROR
    assert "unknown method 'metadistl'; Did you mean 'metadistil'?" in err
    assert "Traceback" not in err and err.startswith("kdbench: error:")


def test_suite_with_three_mistakes_reports_all(tmp_path, capsys):
    path = tiny_suite(tmp_path / "s.toml", "kd")
    text = path.read_text().replace('methods = ["kd"]', 'methods = ["kdd"]').replace("epochs = 1\nbatch_size = 16",
                                                                                     'epochs = "1"\nbatch_size = 16\nbach = 3', 1)
    path.write_text(text)
    assert main(["validate", "--suite", str(path)]) == ExitCode.CONFIG_ERROR
    err = capsys.readouterr().err
    assert "3 problems" in err and "unknown method 'kdd'" in err
    assert "epochs expects int, got str ('1')" in err and "unknown key 'bach'" in err


def test_dry_run_lists_cells(capsys):
    assert main(["run", "--dry-run"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "cells:" in out and "teacher__toy-reviews" in out and "metadistil__toy-digits" in out


def test_ls_and_plugins(capsys):
    assert main(["ls", "methods"]) == 0
    out = capsys.readouterr().out
    for name in ("kd", "pkd-skip", "metadistil", "reptile-distil", "meta-kd", "no-kd"):
        assert f"\n{name} " in out
    assert main(["ls", "tasks"]) == 0
    assert "glue/mnli" in capsys.readouterr().out
    assert main(["plugins", "--hook", "kdbench_register_methods"]) == 0
    names = {p["name"] for p in json.loads(capsys.readouterr().out)}
    assert "kdbench_builtins.metadistil" in names


LS_PROBE = ("import sys; from kdbench.cli.main import main; rc = main(sys.argv[1:]); "
            "print('torch imported:', 'torch' in sys.modules); sys.exit(rc)")
RULE = """import kdbench

@kdbench.hookimpl
def kdbench_register_methods(register):
    register(kdbench.Method("{name}", teacher_update="frozen", loss="kd"))
"""


def test_ls_listing_cache_skips_torch_and_follows_plugin_edits(tmp_path):
    env = {**os.environ, "KDBENCH_CACHE": str(tmp_path / "cache"), "KDBENCH_LS_CACHE": "1"}
    plugin = tmp_path / "myrule.py"
    plugin.write_text(RULE.format(name="first-name"))

    def ls(*args: str) -> str:
        done = subprocess.run([sys.executable, "-c", LS_PROBE, "-p", str(plugin), "ls", *args],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    cold, warm = ls(), ls()
    assert "first-name" in cold and "torch imported: True" in cold
    assert warm.replace("False", "True") == cold and "torch imported: False" in warm
    assert "glue/sst2" in ls("tasks")  # each listing has its own entry
    plugin.write_text(RULE.format(name="second-name-longer"))  # an edited plugin is a new key
    edited = ls()
    assert "second-name-longer" in edited and "first-name" not in edited
    assert "torch imported: True" in edited
    env["KDBENCH_LS_CACHE"] = "0"
    assert "torch imported: True" in ls()


def test_public_api_resolves_lazily():
    import kdbench

    assert sorted(kdbench.__all__) == sorted([*kdbench._HOME, "__version__"])
    assert all(getattr(kdbench, name) is not None for name in kdbench.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Tsk'"):
        kdbench.Tsk  # noqa: B018


def test_bad_plugin_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    assert main(["-p", str(bad), "ls", "methods"]) == ExitCode.PLUGIN_ERROR
    assert "error loading plugin" in capsys.readouterr().err


def test_leaderboard_without_results(tmp_path, capsys):
    assert main(["leaderboard", "--out-dir", str(tmp_path)]) == ExitCode.USAGE_ERROR


def test_leaderboard_into_a_new_directory(tmp_path, capsys):
    results = Path(__file__).resolve().parents[1] / "leaderboards" / "results" / "quickstart"
    out = tmp_path / "new" / "boards"
    assert main(["leaderboard", str(results), "--out-dir", str(out)]) == 0
    assert (out / "quickstart.md").read_text().startswith("<!-- generated")
    assert (out / "quickstart.png").read_bytes()[:4] == b"\x89PNG"


def test_leaderboard_plan_pages_for_suites_without_results(tmp_path, capsys):
    results = Path(__file__).resolve().parents[1] / "leaderboards" / "results" / "quickstart"
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "quickstart").symlink_to(results)
    (tmp_path / "plans").symlink_to(results.parents[1] / "plans")  # plan pages render from plan files
    assert main(["leaderboard", "--out-dir", str(tmp_path)]) == 0
    page = (tmp_path / "cifar100.md").read_text()
    assert "No kdbench results yet" in page and "| Not run yet" in page and "kd, " in page
    assert "## Reference numbers" in (tmp_path / "glue.md").read_text()
    assert "No kdbench results" not in (tmp_path / "quickstart.md").read_text()
    assert main(["leaderboard", "--out-dir", str(tmp_path), "--check"]) == 0
    (tmp_path / "glue.md").write_text(page)
    assert main(["leaderboard", "--out-dir", str(tmp_path), "--check"]) == ExitCode.USAGE_ERROR
    assert "glue.md" in capsys.readouterr().err


def test_run_end_to_end_subprocess(tmp_path):
    suite = tiny_suite(tmp_path / "tiny.toml", "kd", steps=6)
    cmd = [sys.executable, "-m", "kdbench", "run", "--suite", str(suite), "--out-dir", str(tmp_path / "lb"),
           "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    board = (tmp_path / "lb" / "tiny.md").read_text()
    assert "| kd " in board and "| teacher " in board
    results = list((tmp_path / "lb" / "results" / "tiny").glob("*.json"))
    assert len(results) == 3 and (tmp_path / "lb" / "results" / "tiny" / "plan.json") in results  # 2 cells + plan
    # a second run skips finished cells and re-renders the same table
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "2 already done, 0 to run" in again.stderr
    check = subprocess.run([sys.executable, "-m", "kdbench", "leaderboard", "--out-dir", str(tmp_path / "lb"), "--check"],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("argv", [["ls", "suites"]])
def test_ls_suites(argv, capsys):
    assert main(argv) == 0
    assert "quickstart" in capsys.readouterr().out


def test_real_glue_task_end_to_end_cli(tmp_path, shared_dir):
    """A tiny model on real RTE files from ../shared through `kdbench run`."""
    suite = tiny_suite(tmp_path / "rte.toml", "kd", task="glue/rte", steps=5)
    cmd = [sys.executable, "-m", "kdbench", "run", "--suite", str(suite), "--out-dir", str(tmp_path / "lb"),
           "--cache-dir", str(tmp_path / "cache"), f'task."glue/rte".data_dir="{shared_dir / "data" / "glue"}"',
           'task."glue/rte".max_train_examples=300', 'task."glue/rte".max_seq_length=64']
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "lb" / "results" / "tiny").glob("*__*.json")]
    assert {r["status"] for r in results} == {"ok"} and len(results) == 2
    kd = next(r for r in results if r["method"] == "kd")
    assert kd["data"]["rows"]["dev"] == 277 and kd["data"]["rows"]["train"] == 270  # 300 capped, 10 % quiz
    assert "glue/rte accuracy" in (tmp_path / "lb" / "tiny.md").read_text()


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bf16_kernels_is_said_before_training(tmp_path, capsys, monkeypatch, native):
    import kdbench.report.results as machine

    monkeypatch.setattr(machine, "cpu_runs_bf16_natively", lambda: native)
    suite = tiny_suite(tmp_path / "tiny.toml", "kd", steps=2)
    argv = ["run", "--suite", str(suite), "--workers", "1", "--results-dir", str(tmp_path / "res"),
            "--cache-dir", str(tmp_path / "c"), "--no-leaderboard", "--device", "cpu",
            "train.precision=bf16", "teacher_train.precision=fp32"]
    assert main(argv) == ExitCode.OK
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "without bf16 kernels" in ln]
    if native:
        assert warned == []
    else:  # the kd cell trains its student in bf16; the teacher cell trains in fp32
        assert len(warned) == 1 and warned[0].startswith("kdbench: note: 1 of the cells to run")
        assert "fp32 GEMMs on the bf16 operands" in warned[0] and "provenance.cpu_bf16_gemm" in warned[0]
    assert main([*argv[:-2], "train.precision=fp32"]) == ExitCode.OK  # fp32 cells (new run ids): no line
    assert "without bf16 kernels" not in capsys.readouterr().err


def test_bf16_warning_counts_the_nodes_without_bf16_kernels(tmp_path):
    from kdbench import bf16_emulation_warning
    from kdbench.engine.config import load_suite
    from kdbench.engine.manager import Host
    from kdbench.engine.plan import expand

    host = Host.create()
    cells = expand(load_suite(str(tiny_suite(tmp_path / "tiny.toml", "kd", steps=2)),
                              ["train.precision=bf16", "teacher_train.precision=fp32"]), host)
    amx, avx2 = (True, "Xeon (family 6 model 143), AVX512"), (False, "EPYC (family 25 model 1), AVX2")

    def never() -> list[tuple[bool, str]]:
        raise AssertionError("no cell trains in bf16 on a CPU: the machines are not probed")

    assert bf16_emulation_warning(cells, "cpu", lambda: [amx, amx]) is None
    assert bf16_emulation_warning(cells, "cuda", never) is None  # "auto" cells train on the GPU
    fp32 = expand(load_suite(str(tiny_suite(tmp_path / "tiny.toml", "kd", steps=2)), []), host)
    assert bf16_emulation_warning(fp32, "cpu", never) is None
    one = bf16_emulation_warning(cells, "cpu", lambda: [avx2])
    assert one is not None and "1 of the cells to run" in one and "(EPYC (family 25 model 1), AVX2)" in one
    some = bf16_emulation_warning(cells, "cpu", lambda: [amx, avx2, avx2])
    assert some is not None and "(2 of 3 nodes: EPYC (family 25 model 1), AVX2)" in some
