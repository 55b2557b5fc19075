from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from kdbench.config import load_suite, parse_overrides
from kdbench.errors import ConfigError
from kdbench.manager import Host, make_plugin_manager
from kdbench.plan import expand

FAKE = str(Path(__file__).with_name("fakeplugin.py"))
CORE = ("kdbench.runner", "kdbench.leaderboard", "kdbench.executors")

SUITE = textwrap.dedent("""
    [suite]
    name = "s"
    methods = ["fkd", "quiz-kd", "text-kd"]
    tasks = ["fake/text", "fake/vision"]
    students = ["small", "cnn"]
    seeds = [0, 1]

    [teachers.big]
    kind = "fake-bert"
    layers = 4

    [teachers.cnnt]
    kind = "fake-cnn"

    [students.small]
    teacher = "big"
    kind = "same"
    layers = 2

    [students.cnn]
    teacher = "cnnt"
    kind = "same"

    [train]
    epochs = 2

    [loss.fake-kd]
    alpha = 0.7
""")


@pytest.fixture
def host() -> Host:
    return Host(make_plugin_manager(autoload=False, builtins=CORE, extra=[FAKE]))


def write(tmp_path: Path, text: str = SUITE) -> str:
    p = tmp_path / "s.toml"
    p.write_text(text)
    return str(p)


def test_matrix_and_teacher_cells(host, tmp_path):
    cells = expand(load_suite(write(tmp_path)), host)
    teachers = [c for c in cells if c.is_teacher]
    methods = [c for c in cells if not c.is_teacher]
    # 2 tasks x 1 matching student each x 2 seeds; methods 3 + no-kd baseline
    assert len(teachers) == 4 and len(methods) == 4 * 4
    assert cells[: len(teachers)] == teachers  # teacher cells first
    na = [c for c in methods if c.na_reason]
    assert {(c.method, c.task) for c in na} == {("text-kd", "fake/vision")}


def test_precedence_defaults_method_file_cli(host, tmp_path):
    path = write(tmp_path)
    cell = next(c for c in expand(load_suite(path), host) if c.method == "fkd")
    assert cell.loss_cfg.temperature == 2.0  # method default beats component default
    assert cell.loss_cfg.alpha == 0.7  # suite file
    assert cell.train.epochs == 2
    cell = next(c for c in expand(load_suite(path, ["loss.fake-kd.temperature=3", "train.epochs=5"]), host)
                if c.method == "fkd")
    assert cell.loss_cfg.temperature == 3.0 and cell.train.epochs == 5  # CLI beats all


def test_run_ids_stable_and_sensitive(host, tmp_path):
    path = write(tmp_path)
    a = [c.run_id for c in expand(load_suite(path), host)]
    b = [c.run_id for c in expand(load_suite(path), host)]
    assert a == b and len(set(a)) == len(a)
    c = [c.run_id for c in expand(load_suite(path, ["loss.fake-kd.alpha=0.1"]), host)]
    assert a != c
    assert a[4].startswith(("fkd__fake-text__small__s0__", "fkd__fake-text__small__s1__"))
    # fields added later keep old ids at their default, and change them otherwise
    assert [c.run_id for c in expand(load_suite(path, ["train.length_bucketing=0"]), host)] == a
    d = [c.run_id for c in expand(load_suite(path, ["train.length_bucketing=8"]), host)]
    assert len(set(a) & set(d)) == 4  # only the teacher cells keep theirs


def test_all_errors_at_once(host, tmp_path):
    text = SUITE.replace('"fkd", "quiz-kd"', '"fkdd", "quiz-kd"').replace("alpha = 0.7", 'alpha = "0.7"\ntemprature = 2')
    with pytest.raises(ConfigError) as err:
        expand(load_suite(write(tmp_path, text), ["train.epochz=3"]), host)
    msg = str(err.value)
    assert "problems" in msg
    assert "unknown method 'fkdd'; Did you mean 'fkd'?" in msg
    assert "alpha expects float, got str ('0.7')" in msg
    assert "unknown key 'temprature'. Did you mean 'temperature'?" in msg
    assert "unknown key 'epochz'" in msg


def test_quiz_needed_but_disabled_is_na(host, tmp_path):
    text = SUITE + '\n[task."fake/*"]\nquiz_fraction = 0.0\n'
    cells = expand(load_suite(write(tmp_path, text)), host)
    reasons = {c.na_reason for c in cells if c.method == "quiz-kd"}
    assert reasons == {"quiz-kd needs a quiz split; task 'fake/text' has quiz_fraction=0",
                       "quiz-kd needs a quiz split; task 'fake/vision' has quiz_fraction=0"}


def test_overrides_parse():
    assert parse_overrides(["a.b=2", "a.c=[1,2]", "t.glue/sst2.x=abc"]) == {
        "a": {"b": 2, "c": [1, 2]}, "t": {"glue/sst2": {"x": "abc"}}}
    with pytest.raises(ConfigError):
        parse_overrides(["novalue"])


def test_unknown_suite_name():
    with pytest.raises(ConfigError) as err:
        load_suite("quickstrat")
    assert "Did you mean 'quickstart'?" in str(err.value)
