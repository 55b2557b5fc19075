from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from kdbench.contract.errors import ConfigError
from kdbench.engine.config import load_suite, parse_overrides
from kdbench.engine.manager import Host, make_plugin_manager
from kdbench.engine.plan import expand, plan_facts

FAKE = str(Path(__file__).with_name("fakeplugin.py"))
CORE = ("kdbench.engine.runner", "kdbench.report.leaderboard", "kdbench.engine.local")

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


ROLE_PLUGIN = """
import dataclasses
import kdbench


@dataclasses.dataclass(frozen=True, slots=True)
class TaskConfig(kdbench.TextDataOptions):
    max_seq_length: int = 16


class Text(kdbench.Task):
    name = "r/text"
    Config = TaskConfig


class Bert(kdbench.ModelKind):
    name = "r-bert"


class Same(kdbench.StudentKind):
    name = "r-same"


@dataclasses.dataclass(frozen=True, slots=True)
class LossConfig:
    alpha: float = 0.5
{later}

class Loss(kdbench.DistillLoss):
    name = "r-kd"
    Config = LossConfig


class CE(kdbench.DistillLoss):
    name = "r-ce"
    uses_teacher = False


@dataclasses.dataclass(frozen=True, slots=True)
class RuleConfig:
    lr: float = 0.1
{later}

class Still(kdbench.TeacherUpdate):
    name = "still"
    Config = RuleConfig


@kdbench.hookimpl
def kdbench_register_tasks(register):
    register(Text)


@kdbench.hookimpl
def kdbench_register_models(register):
    register(Bert)


@kdbench.hookimpl
def kdbench_register_students(register):
    register(Same)


@kdbench.hookimpl
def kdbench_register_losses(register):
    register(Loss)
    register(CE)


@kdbench.hookimpl
def kdbench_register_teacher_updates(register):
    register(Still)


@kdbench.hookimpl
def kdbench_register_methods(register):
    register(kdbench.Method("base", "still", "r-kd", role="reference"))
    register(kdbench.Method("other", "still", "r-kd"))
    register(kdbench.Method("plain", "still", "r-ce", role="student-only"))
"""

ROLE_SUITE = """
[suite]
name = "roles"
methods = ["base", "other"]
tasks = ["r/text"]
students = ["small"]
seeds = [0]

[teachers.big]
kind = "r-bert"

[students.small]
teacher = "big"
kind = "r-same"
"""


def role_host(tmp_path: Path, later: bool = False) -> Host:
    """Plugins whose no-KD method is "plain" (rule "still", loss "r-ce") and reference method
    "base"; ``later`` adds an option with ``id_default`` to the loss and the rule."""
    field = '    new: str = kdbench.option("old", id_default="old")' if later else ""
    plugin = tmp_path / ("roles_later.py" if later else "roles.py")
    plugin.write_text(ROLE_PLUGIN.format(later=field))
    return Host(make_plugin_manager(autoload=False, builtins=CORE, extra=[str(plugin)]))


def test_roles_are_found_by_role_not_by_name(tmp_path):
    """Teacher cells train as the no-KD-role method does (its loss and its rule's name), that
    method is planned as the baseline row, and the plan facts name both role methods."""
    from kdbench.engine.plan import plan_facts

    host = role_host(tmp_path)
    suite = load_suite(write(tmp_path, ROLE_SUITE))
    cells = expand(suite, host)
    assert [c.method for c in cells] == ["teacher", "base", "other", "plain"]
    teacher = cells[0]
    assert (teacher.loss, teacher.teacher_update, teacher.teacher_update_cfg) == ("r-ce", "still", None)
    facts = plan_facts(suite, host)
    assert (facts["baseline_method"], facts["no_kd_method"]) == ("base", "plain")
    assert facts["suite_arg"] == suite.path  # not a shipped suite: rerun by its path
    no_baseline = load_suite(write(tmp_path, ROLE_SUITE + "\n"), ["suite.baselines=false"])
    assert [c.method for c in expand(no_baseline, host)] == ["teacher", "base", "other"]


def test_no_kd_role_missing_or_held_twice_is_a_problem(host, tmp_path):
    from kdbench.engine.plan import plan_facts

    assert plan_facts(load_suite(write(tmp_path)), host)["baseline_method"] == ""  # no reference method
    twin = tmp_path / "twin.py"
    twin.write_text("import kdbench\n@kdbench.hookimpl\ndef kdbench_register_methods(register):\n"
                    "    register(kdbench.Method('plain', 'frozen', 'ce', role='student-only'))\n")
    two = Host(make_plugin_manager(autoload=False, builtins=CORE, extra=[FAKE, str(twin)]))
    with pytest.raises(ConfigError, match=r"methods 'no-kd' .*'plain' .*all have role 'student-only'"):
        expand(load_suite(write(tmp_path)), two)
    plugin = tmp_path / "noroles.py"
    plugin.write_text(ROLE_PLUGIN.format(later="").replace(', role="student-only"', ""))
    none = Host(make_plugin_manager(autoload=False, builtins=CORE, extra=[str(plugin)]))
    with pytest.raises(ConfigError, match="exactly one registered method must have role 'student-only'.*found none"):
        expand(load_suite(write(tmp_path, ROLE_SUITE)), none)


def test_later_loss_and_rule_options_at_their_default_keep_run_ids(tmp_path):
    """``kdbench.option(..., id_default=...)`` keeps published ids for loss and rule options too."""
    path = write(tmp_path, ROLE_SUITE)
    before = [c.run_id for c in expand(load_suite(path), role_host(tmp_path))]
    later = role_host(tmp_path, later=True)
    assert [c.run_id for c in expand(load_suite(path), later)] == before
    moved = [c.run_id for c in expand(load_suite(path, ['loss.r-kd.new="x"']), later)]
    assert [a == b for a, b in zip(before, moved, strict=True)] == [True, False, False, True]
    moved = [c.run_id for c in expand(load_suite(path, ['teacher_update.still.new="x"']), later)]
    assert [a == b for a, b in zip(before, moved, strict=True)] == [True, False, False, False]


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


def test_claims_are_checked_before_anything_runs(host, tmp_path):
    """[[suite.claims]]: exactly method, over, source (checked when the suite is read), both method
    names registered (checked when it is planned, with a did-you-mean); good claims reach the plan facts."""
    good = '[[suite.claims]]\nmethod = "fkd"\nover = "quiz-kd"\nsource = "paper A"\n'
    typo = '[[suite.claims]]\nmethod = "fkdd"\nover = "quiz-kd"\nsource = "paper B"\n'
    shape = '[[suite.claims]]\nmethod = "fkd"\novr = "quiz-kd"\nsource = ""\n'

    def suite_with(*claims: str) -> str:
        return write(tmp_path, SUITE.replace("seeds = [0, 1]\n", "seeds = [0, 1]\n" + "".join(claims)))

    with pytest.raises(ConfigError) as err:
        load_suite(suite_with(good, shape))
    msg = str(err.value)
    assert "[[suite.claims]] #2: unknown key 'ovr'; allowed: method, over, source. Did you mean 'over'?" in msg
    assert "[[suite.claims]] #2: over must be a non-empty string, got None" in msg
    assert "[[suite.claims]] #2: source must be a non-empty string, got ''" in msg
    with pytest.raises(ConfigError, match=r"\[\[suite.claims\]\] #2 method: unknown method 'fkdd'; Did you mean 'fkd'\?"):
        expand(load_suite(suite_with(good, typo)), host)
    ok = load_suite(suite_with(good))
    expand(ok, host)
    assert plan_facts(ok, host)["claims"] == [{"method": "fkd", "over": "quiz-kd", "source": "paper A"}]


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
