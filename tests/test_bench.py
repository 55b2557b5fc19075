"""``kdbench bench``: rows from the method registry, rule-declared FLOP models, throughput and MFU."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import kdbench
from kdbench.cli import bench_pair
from kdbench.cli.args import build_parser
from kdbench.cli.bench import KD_STEP, cmd_bench, step_costs
from kdbench.cli.bench_pair import bench_rows, build_pair, build_step, components, row_cost
from kdbench.contract.errors import ConfigError
from kdbench.engine.manager import Host, make_plugin_manager

torch.set_num_threads(1)
HOST_FILES = sorted((Path(kdbench.__file__).parent / "cli").glob("bench*.py"))


class Costless(kdbench.TeacherUpdate):
    """A third-party rule that declares no cost model."""

    name = "costless"


def _register_rules(register: Any) -> None:
    register(Costless)


def _register_methods(register: Any) -> None:
    register(kdbench.Method("costless-kd", "costless", "kd",
                            bench={"live": {}, "cached": {"cached_teacher": True}}))


THIRD_PARTY = SimpleNamespace(kdbench_register_teacher_updates=kdbench.hookimpl(_register_rules),
                              kdbench_register_methods=kdbench.hookimpl(_register_methods))


def _host(*plugins: object) -> Host:
    pm = make_plugin_manager(autoload=False)
    for plugin in plugins:
        pm.register(plugin)
    return Host(pm)


def _formula(host: Host, label: str) -> str:
    row = next(r for r in bench_rows(host) if r.label == label)
    loss_cls, _, rule = components(host, row)
    cost = row_cost(loss_cls, rule, bool(row.options.get("cached_teacher")))
    return cost.formula if cost else "—"


def test_host_names_no_builtin_method_rule_or_loss() -> None:
    assert {"bench.py", "bench_pair.py"} <= {p.name for p in HOST_FILES}
    for path in HOST_FILES:
        text = path.read_text().lower()
        for word in ("metadistil", "reptile", "meta-kd", "pkd", '"kd"', "'kd'", '"frozen"'):
            assert word not in text, f"{path.name} names {word}"


def test_step_cost_formula() -> None:
    assert kdbench.StepCost(4, 11).formula == "4F_T+11F_S"
    assert kdbench.StepCost(0, 3).formula == "3F_S"
    assert kdbench.StepCost(1, 3, approx=True).formula == "≈F_T+3F_S"
    assert kdbench.StepCost(2.5, 8.5).formula == "2.5F_T+8.5F_S"
    assert kdbench.StepCost(2, 6).flops(10.0, 1.0) == 26.0


def test_builtin_rules_declare_the_performance_md_models() -> None:
    host = _host()
    expected = {"kd (live teacher)": "F_T+3F_S", "kd (cached teacher)": "3F_S", "no-kd": "3F_S",
                "pkd-skip (live teacher)": "≈F_T+3F_S", "metadistil second_order": "≈4F_T+13F_S",
                "metadistil first_order_exact": "4F_T+11F_S", "metadistil first_order_exact (fd)": "4F_T+11F_S",
                "metadistil-pkd": "≈4F_T+11F_S", "reptile-distil": "2F_T+6F_S", "meta-kd stage 2": "≈F_T+3F_S"}
    assert {label: _formula(host, label) for label in expected} == expected
    assert {r.method for r in bench_rows(host)} == set(host.methods)  # every method has a row


def test_cost_models_follow_the_rule_config() -> None:
    host = _host()
    meta = host.teacher_updates.get("metadistil")
    rule = meta(meta.Config(every=2, quiz_batches=2))
    assert rule.cost_model().formula == "2.5F_T+8.5F_S"  # (F_T+3F_S) + (3F_T+(5+3·2)F_S)/2
    rep = host.teacher_updates.get("reptile")
    assert rep(rep.Config(inner_steps=2)).cost_model().formula == "2F_T+9F_S"
    frozen = host.teacher_updates.get("frozen")
    assert frozen(frozen.Config()).cost_model(live_teacher=False) == kdbench.StepCost(0, 3)


def test_row_selection_and_variant_errors() -> None:
    host = _host()
    assert [r.label for r in bench_rows(host, ("kd",))] == ["kd (live teacher)", "kd (cached teacher)"]
    assert [r.label for r in bench_rows(host, ("kd (cached teacher)",))] == ["kd (cached teacher)"]
    with pytest.raises(ConfigError, match="unknown 'kdd'.*Did you mean 'kd'"):
        bench_rows(host, ("kdd",))
    bad = SimpleNamespace(kdbench_register_methods=kdbench.hookimpl(
        lambda register: register(kdbench.Method("odd", "frozen", "kd", bench={"x": {"cached": True}}))))
    with pytest.raises(ConfigError, match="method 'odd' bench variant 'x': unknown option 'cached'.*cached_teacher"):
        bench_rows(_host(bad))


def test_tiny_shape_throughput_mfu_na_and_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    host = _host()
    monkeypatch.delenv("KDBENCH_PEAK_TFLOPS", raising=False)
    rows = step_costs("tiny", seq_len=8, batch=4, repeats=1, threads=1, methods=("kd",), host=host)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    live, cached = rows
    assert live["ratio_kd"] == 1.0 and live["model_ratio"] == 1.0 and live["mfu"] is None
    assert cached["model_ratio"] == pytest.approx(3 * cached["F_S"] / KD_STEP.flops(cached["F_T"], cached["F_S"]))
    assert live["seq_per_s"] == pytest.approx(4 / live["median_s"])
    assert live["model_tflops"] == pytest.approx((live["F_T"] + 3 * live["F_S"]) * live["seq_per_s"] / 1e12)
    monkeypatch.setenv("KDBENCH_PEAK_TFLOPS", "0.002")
    rows = step_costs("tiny", seq_len=8, batch=4, repeats=1, threads=1, methods=("kd (live teacher)",), host=host)
    (row,) = rows
    assert row["peak_tflops"] == 0.002
    assert row["mfu"] == pytest.approx(row["model_flops"] * row["seq_per_s"] / 2e9) and row["mfu"] > 0


def test_third_party_rows_without_a_cost_model() -> None:
    rows = step_costs("tiny", seq_len=8, batch=4, repeats=1, threads=1, methods=("costless-kd",),
                      host=_host(THIRD_PARTY), memory=False)
    assert [(r["method"], r["model"], r["status"]) for r in rows] == [
        ("costless-kd live", "—", "ok"), ("costless-kd cached", "—", "ok")]
    assert all(r["mfu"] is None and r["model_ratio"] is None and r["seq_per_s"] > 0 for r in rows)


def test_sdpa_tiny_pair_and_na_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bert-base code path (SDPA) on the tiny shape; a loss on attention maps is n-a there."""
    monkeypatch.delenv("KDBENCH_PEAK_TFLOPS", raising=False)
    rows = step_costs("tiny", seq_len=8, batch=4, repeats=1, threads=1, attn="sdpa",
                      methods=("kd (live teacher)", "meta-kd"), host=_host(), memory=False)
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "n-a" and "eager" in rows[1]["reason"]


def test_cli_tables_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDBENCH_PEAK_TFLOPS", raising=False)
    out_json = tmp_path / "bench.json"
    args = build_parser().parse_args(["bench", "--shape", "tiny", "--seq-len", "8", "--batch", "4", "--repeats", "1",
                                      "--threads", "1", "--methods", "kd,reptile-distil", "--json", str(out_json)])
    assert cmd_bench(args, host=_host()) == 0
    out = capsys.readouterr().out
    assert "| kd (live teacher) | F_T+3F_S |" in out and "| reptile-distil | 2F_T+6F_S |" in out
    assert re.search(r"\| kd \(cached teacher\) \| [\d.]+ \| [\d.]+ \| n/a \| \d+ \|", out)  # throughput table
    assert [r["method"] for r in json.loads(out_json.read_text())] == [
        "kd (live teacher)", "kd (cached teacher)", "reptile-distil"]


def test_unknown_shape_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="bert-base"):
        build_pair("gpt-7", seq_len=8, batch=2)


def test_minilm_shape_reads_shared_hf_and_never_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pair reads ../shared/hf beside the repo; a checkpoint that does not load is a ConfigError
    naming it, not a silent switch to another shape."""
    shared = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the repo
    assert bench_pair.SHARED_HF == shared / "hf"
    assert bench_pair.minilm_available() == (shared / "hf/hub/models--sentence-transformers--all-MiniLM-L6-v2").is_dir()
    (tmp_path / "hub/models--sentence-transformers--all-MiniLM-L6-v2").mkdir(parents=True)  # present, empty
    monkeypatch.setattr(bench_pair, "SHARED_HF", tmp_path)
    with pytest.raises(ConfigError, match="all-MiniLM-L6-v2"):
        build_pair("minilm", seq_len=8, batch=2, host=_host())


@pytest.mark.slow
def test_bert_base_shape_matches_performance_md() -> None:
    """12L-768 teacher: 22.35 GFLOP/sequence forward at T=128; the 6-layer student half of it."""
    pair = build_pair("bert-base", batch=2, host=_host())
    f_t, f_s = pair.flops()
    assert pair.seq_len == 128 and pair.teacher.num_layers == 12 and pair.student.num_layers == 6
    assert f_t == pytest.approx(22.35e9, rel=0.01) and f_s == pytest.approx(11.17e9, rel=0.01)
    assert pair.teacher.model.config._attn_implementation == "sdpa"


def test_precision_reaches_every_step_and_the_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--precision bf16`` builds each step's loop with bf16 autocast (what the CPU suites run); the
    rows and the header line say which precision ran; the default on CPU is fp32."""
    host = _host()
    pair = build_pair("tiny", seq_len=8, batch=4, host=host)
    (row,) = bench_rows(host, ("kd (live teacher)",))
    with build_step(pair, row, precision="bf16").loop.autocast() as ctx:
        assert isinstance(ctx, torch.autocast) and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not isinstance(build_step(pair, row).loop.autocast(), torch.autocast)
    args = build_parser().parse_args(["bench", "--shape", "tiny", "--seq-len", "8", "--batch", "4", "--repeats", "1",
                                      "--threads", "1", "--methods", "kd", "--precision", "bf16",
                                      "--json", str(tmp_path / "b.json")])
    assert cmd_bench(args, host=host) == 0
    assert ", 1 threads, bf16, torch" in capsys.readouterr().out
    assert {r["precision"] for r in json.loads((tmp_path / "b.json").read_text())} == {"bf16"}
    rows = step_costs("tiny", seq_len=8, batch=4, repeats=1, threads=1, methods=("kd (live teacher)",), host=host,
                      memory=False)
    assert rows[0]["precision"] == "fp32"
