"""Bad input, table-driven: every case ends with its documented exit code, one line on stderr that
names the culprit, no traceback, and no result file touched.

Each case builds its inputs under ``tmp_path`` and runs ``kdbench run`` (or ``validate``/``ls``/
``leaderboard``) in-process against a results directory that already holds one finished result.
Data cases use ``run``: the files are read and checked before any model is built (the teacher cache
stays empty).
"""

from __future__ import annotations

import json
import pickle
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from kdbench.cli.main import main
from kdbench.contract.errors import ExitCode
from kdbench.testing import tiny_suite

CONFIG, DATA, PLUGIN, USAGE, INTERNAL, INTERRUPTED = (ExitCode.CONFIG_ERROR, ExitCode.DATA_ERROR,
                                                     ExitCode.PLUGIN_ERROR, ExitCode.USAGE_ERROR,
                                                     ExitCode.INTERNAL_ERROR, ExitCode.INTERRUPTED)


@dataclass
class Case:
    name: str
    argv: Callable[[Path], list[str]]  # tmp -> arguments after the subcommand's own
    code: int
    culprit: str  # must appear in the one stderr line
    command: str = "run"


def suite(tmp: Path, task: str = "toy/reviews", extra: str = "", method: str = "kd") -> str:
    path = tiny_suite(tmp / "s.toml", method, task)
    path.write_text(path.read_text() + textwrap.dedent(extra))
    return str(path)


def plugin(tmp: Path, body: str, name: str) -> str:
    path = tmp / f"{name}.py"
    path.write_text("import kdbench\nfrom dataclasses import dataclass\n" + textwrap.dedent(body))
    return str(path)


def rule_plugin(config: str, name: str) -> str:
    """Plugin source: a teacher-update rule ``name`` with the Config body ``config`` and a method
    ``<name>-kd`` that uses it."""
    return f"""
@dataclass(frozen=True)
class RuleConfig:
{textwrap.indent(textwrap.dedent(config), "    ")}
class Rule(kdbench.TeacherUpdate):
    name = "{name}"
    Config = RuleConfig

@kdbench.hookimpl
def kdbench_register_teacher_updates(register):
    register(Rule)

@kdbench.hookimpl
def kdbench_register_methods(register):
    register(kdbench.Method("{name}-kd", teacher_update="{name}", loss="kd"))
"""


RULE = rule_plugin("""
    beta: float = kdbench.option(0.9, gt=0, lt=1)
    every: int = 1

    def validate(self):
        return [] if self.every >= 1 else [f"every = {self.every} must be >= 1"]
    """, "ema")

POST_INIT = rule_plugin("""
    lr: float = 0.1

    def __post_init__(self):
        if self.lr > 1:
            raise ValueError(f"lr = {self.lr} is too large for a teacher step")
    """, "picky")


def sst2(tmp: Path, train_rows: list[str], header: str = "sentence\tlabel") -> str:
    d = tmp / "glue" / "SST-2"
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.tsv").write_text("\n".join([header, *train_rows]) + "\n", encoding="utf-8")
    (d / "dev.tsv").write_text("sentence\tlabel\na fine film\t1\na dull film\t0\n", encoding="utf-8")
    return suite(tmp, "glue/sst2", f'\n[task."glue/sst2"]\ndata_dir = "{tmp / "glue"}"\n')


GOOD_SST2 = [f"{w} film {i}\t{i % 2}" for i, w in enumerate(["good", "bad"] * 10)]


def amazon(tmp: Path, broken: bytes | None = None) -> str:
    root = tmp / "acl"
    for folder in ("books", "dvd", "electronics", "kitchen_&_housewares"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for side in ("positive", "negative"):
            text = "".join(f"<review>\n<review_text>\n{side} {i}\n</review_text>\n</review>\n" for i in range(25))
            (root / folder / f"{side}.review").write_text(text, encoding="utf-8")
    if broken is not None:
        (root / "dvd" / "negative.review").write_bytes(broken)
    return suite(tmp, "amazon/books", f'\n[task."amazon/*"]\ndata_dir = "{root}"\n')


def cifar(tmp: Path, train: object) -> str:
    d = tmp / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    ok = {b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0, 1, 2, 3], b"filenames": [b"a"] * 4}
    (d / "train").write_bytes(pickle.dumps(train, protocol=2))
    (d / "test").write_bytes(pickle.dumps(ok, protocol=2))
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"c"] * 100}, protocol=2))
    return suite(tmp, "cifar100", f'\n[task.cifar100]\ndata_dir = "{tmp}"\n')


class Evil:
    """Unpickling this would create the file ``pwned`` beside the data."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        import os

        return (os.system, (f"touch {self.marker}",))


S = "--suite"
CNN = 'suite.students=["cnn"]'
CASES = [
    # suite files and overrides
    Case("typo'd loss section", lambda t: ["loss.kdd.temperature=3"], CONFIG, "Did you mean 'kd'?"),
    Case("typo'd method section", lambda t: ["method.kdd.loss.temperature=3"], CONFIG, "unknown method 'kdd'"),
    Case("typo'd rule section", lambda t: ["teacher_update.metadistl.every=2"], CONFIG, "'metadistil'"),
    Case("typo'd third-party rule", lambda t: ["-p", plugin(t, RULE, "ema1"), "teacher_update.emma.beta=0.5"],
         CONFIG, "Did you mean 'ema'?"),
    Case("negative temperature", lambda t: ["loss.kd.temperature=-1"], CONFIG, "temperature = -1.0 must be > 0"),
    Case("unknown optimizer", lambda t: ['train.optimizer="sgdd"'], CONFIG, "Did you mean 'sgd'?"),
    Case("unknown schedule", lambda t: ['train.schedule="cosine"'], CONFIG, "schedule = 'cosine'"),
    Case("unknown precision", lambda t: ['train.precision="fp16"'], CONFIG, "precision = 'fp16'"),
    Case("zero epochs", lambda t: ["train.epochs=0"], CONFIG, "epochs = 0 must be >= 1"),
    Case("quoted number", lambda t: ['train.epochs="3"'], CONFIG, "without quotes"),
    Case("unknown top section", lambda t: ["trian.epochs=1"], CONFIG, "Did you mean 'train'?"),
    Case("unknown method sub-section", lambda t: ["method.kd.trian.lr=1"], CONFIG, "Did you mean 'train'?"),
    Case("unread section", lambda t: ["--methods", "kd", "loss.tinybert.hidden_weight=2"], CONFIG,
         "[loss.tinybert]: no planned cell reads it"),
    Case("task glob matches nothing", lambda t: ["task.glue/sst3.max_seq_length=8"], CONFIG, "'glue/sst2'"),
    Case("bad device", lambda t: ['train.device="gpu"'], CONFIG, "device = 'gpu'"),
    Case("override without =", lambda t: ["train.epochs"], CONFIG, "train.epochs"),
    Case("suite not found", lambda t: [S, "quickstrat"], CONFIG, "Did you mean 'quickstart'?"),
    Case("suite not TOML", lambda t: [S, str(_write(t / "x.toml", "[suite\n"))], CONFIG, "x.toml"),
    Case("unknown [suite] key", lambda t: [S, suite(t), "suite.seed=[1]"], CONFIG,
         "Did you mean 'seeds'?"),
    Case("unknown method flag", lambda t: ["--methods", "metadistl"], CONFIG, "Did you mean 'metadistil'?"),
    Case("seed not a number", lambda t: ["--seeds", "0,x"], CONFIG, "suite.seeds (--seeds) expects distinct"),
    Case("repeated seed", lambda t: ["--seeds", "1,1"], CONFIG, "got [1, 1]"),
    Case("fractional seed", lambda t: [S, suite(t), "suite.seeds=[0.5]"], CONFIG, "got [0.5]"),
    Case("reference row without a source",
         lambda t: [S, suite(t), 'suite.reference=[{row="KD", verified=true, values={"toy acc"=80.0}}]'],
         CONFIG, "[[suite.reference]] #1: source must be a non-empty string"),
    Case("quoted boolean", lambda t: [S, suite(t), 'suite.baselines="false"'], CONFIG,
         "suite.baselines expects true or false"),
    Case("unknown executor", lambda t: ["--executor", "rayy"], CONFIG, "Did you mean 'ray'?"),
    Case("executor option without =", lambda t: ["--executor-opt", "workers"], CONFIG,
         "--executor-opt 'workers': expected key=value"),
    Case("student kind typo", lambda t: [S, suite(t, extra="")] + ['suite.students=["bert-l2"]'], CONFIG,
         "[students.bert-l2]"),
    Case("student pick typo", lambda t: ['students.bert-l2.pick="frist"'], CONFIG,
         "[students.bert-l2]: pick = 'frist' is not allowed; use one of 'first', 'skip', 'last'. "
         "Did you mean 'first'?"),
    Case("student depth zero", lambda t: ["students.bert-l2.layers=0"], CONFIG, "layers = 0 must be >= 1"),
    Case("student deeper than its teacher", lambda t: ["students.bert-l2.layers=5"], CONFIG,
         "[students.bert-l2]: student layers = 5, but the source checkpoint has 4 layers; choose 1..4"),
    Case("teacher width not a multiple of heads", lambda t: ["teachers.bert-l4.hidden=33"], CONFIG,
         "[teachers.bert-l4]: hidden = 33 must be a multiple of heads"),
    Case("section given a value", lambda t: ["train=5"], CONFIG, "[train] must be a table, got 5"),
    Case("named section given a value", lambda t: ["teachers.bert-l4=2"], CONFIG,
         "'bert-l4' must be a table of options"),
    Case("method's rule given a name", lambda t: ['method.kd.teacher_update="frozen"'], CONFIG,
         "[method.kd]: 'teacher_update' must be a table of options"),
    Case("rule choice typo", lambda t: ['teacher_update.meta-kd.meta_split="meta_trian"'], CONFIG,
         "[teacher_update.meta-kd]: meta_split = 'meta_trian' is not allowed; use one of 'meta_train', "
         "'train'."),
    Case("rule and optimizer disagree", lambda t: ["--methods", "metadistil-adam", 'train.optimizer="sgd"'],
         CONFIG,
         "pilot = 'adam' mirrors an AdamW student step, but train.optimizer = 'sgd'"),
    Case("negative train cap", lambda t: ["task.toy/reviews.max_train_examples=-5"], CONFIG,
         "max_train_examples = -5 must be >= 0"),
    Case("task source typo", lambda t: [S, "glue-small", 'task.glue/sst2.source="hubb"'], CONFIG,
         "source = 'hubb' is not allowed; use one of 'local', 'hub'. Did you mean 'hub'?"),
    Case("task choice typo", lambda t: ['task.toy/reviews.domain="book"'], CONFIG, "Did you mean 'books'?"),
    Case("model student kind typo", lambda t: ['students.resnet8.model="resnet9"'], CONFIG,
         "student model = 'resnet9' is not a model kind. Did you mean 'resnet8'?"),
    Case("model student option typo", lambda t: ["students.resnet8.options={depth=3}"], CONFIG,
         "(model kind 'resnet8'): unknown key 'depth'"),
    # command line
    Case("page folder is a file", lambda t: ["--out-dir", str(_write(t / "page", ""))], CONFIG,
         "page folder (--out-dir) "),
    Case("plugins --hook typo", lambda t: ["--hook", "kdbench_register_method"], USAGE,
         "Did you mean 'kdbench_register_methods'?", command="plugins"),
    Case("unknown flag", lambda t: ["--bogus"], USAGE, "--bogus"),
    Case("unknown --device", lambda t: ["--device", "gpu"], USAGE, "--device: 'gpu' is not allowed"),
    Case("bench without timed steps", lambda t: ["--repeats", "0"], USAGE, "--repeats: must be >= 1",
         command="bench"),
    Case("ls of nothing", lambda t: ["nothing"], USAGE, "'nothing'", command="ls"),
    # plugins
    Case("plugin file missing", lambda t: ["-p", str(t / "nope.py")], PLUGIN, "nope.py"),
    Case("plugin import error", lambda t: ["-p", plugin(t, "import no_such_module_xyz\n", "broken1")], PLUGIN,
         "no_such_module_xyz"),
    Case("duplicate method", lambda t: ["-p", plugin(t, """
        @kdbench.hookimpl
        def kdbench_register_methods(register):
            register(kdbench.Method("kd", teacher_update="frozen", loss="kd"))
        """, "dup1")], PLUGIN, "'kd' is already registered"),
    Case("typo'd hook", lambda t: ["-p", plugin(t, """
        @kdbench.hookimpl
        def kdbench_register_method(register):
            pass
        """, "hook1")], PLUGIN, "Did you mean 'kdbench_register_methods'?"),
    Case("rule option out of range", lambda t: ["-p", plugin(t, RULE, "ema2"), S, suite(t, method="ema-kd"),
                                                "teacher_update.ema.beta=1.5"], CONFIG, "beta = 1.5 must be < 1"),
    Case("rule validate() hook", lambda t: ["-p", plugin(t, RULE, "ema3"), S, suite(t, method="ema-kd"),
                                            "teacher_update.ema.every=0"], CONFIG, "every = 0 must be >= 1"),
    Case("rule __post_init__ ValueError", lambda t: ["-p", plugin(t, POST_INIT, "picky1"), S,
                                                    suite(t, method="picky-kd"), "teacher_update.picky.lr=3"],
         CONFIG, "lr = 3.0 is too large"),
    Case("plugin bug", lambda t: ["-p", plugin(t, """
        @kdbench.hookimpl
        def kdbench_configure(suite):
            raise RuntimeError("boom in configure")
        """, "bug1")], INTERNAL, "boom in configure"),
    Case("interrupted", lambda t: ["-p", plugin(t, """
        @kdbench.hookimpl
        def kdbench_configure(suite):
            raise KeyboardInterrupt
        """, "ctrlc1")], INTERRUPTED, "interrupted"),
    # data, checked before any model is built
    Case("GLUE bad label", lambda t: [S, sst2(t, [*GOOD_SST2, "a film\tmaybe"])], DATA, "train.tsv:22"),
    Case("GLUE missing column", lambda t: [S, sst2(t, GOOD_SST2, header="sentence\tlabl")], DATA, "train.tsv:1"),
    Case("GLUE missing file", lambda t: [S, suite(t, "glue/sst2", f'[task."glue/sst2"]\ndata_dir = "{t}"\n')],
         DATA, "SST-2/train.tsv"),
    Case("GLUE empty text", lambda t: [S, sst2(t, [*GOOD_SST2, "\t1"])], DATA, "train.tsv:22"),
    Case("Amazon unclosed review", lambda t: [S, amazon(t, b"<review>\n<review_text>\nnever closed\n")], DATA,
         "negative.review:2"),
    Case("Amazon not UTF-8", lambda t: [S, amazon(t, b"<review_text>\ncaf\xe9\n</review_text>\n")], DATA,
         "negative.review"),
    Case("CIFAR command payload", lambda t: [S, cifar(t, {b"data": Evil(t / "pwned")}), CNN], DATA,
         "cifar-100-python/train"),
    Case("CIFAR wrong shape", lambda t: [S, cifar(t, {b"data": np.zeros((4, 100), np.uint8),
                                                      b"fine_labels": [0, 1, 2, 3]}), CNN], DATA, "cifar-100-python/train"),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results, cache = tmp_path / "results", tmp_path / "cache"
    results.mkdir()
    done = results / "kd__toy-reviews__bert-l1__s0__00000000.json"
    done.write_text(json.dumps({"run_id": done.stem, "status": "ok"}))
    before = {p.name: p.read_bytes() for p in results.iterdir()}
    args = case.argv(tmp_path)
    plugins = [a for i, a in enumerate(args) if a == "-p" or (i and args[i - 1] == "-p")]
    rest = [a for a in args if a not in plugins]
    argv = [*plugins, case.command, *rest]
    if case.command == "run":
        argv += ["--results-dir", str(results), "--cache-dir", str(cache), "--workers", "1"]
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("kdbench: warning:")]
    assert code == case.code, err
    assert len(lines) == 1, err
    assert case.culprit in lines[0], err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in results.iterdir()} == before
    assert not (cache / "teachers").exists()  # no model was built or trained
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled


@pytest.mark.parametrize("argv", [["validate", "--suite", "quickstart"], ["run", "--dry-run"]])
def test_closed_stdout_is_quiet(argv: list[str]) -> None:
    """``kdbench validate | head -1``: no BrokenPipeError traceback, nothing on stderr, exit 0."""
    import os
    import subprocess
    import sys

    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before kdbench writes: every write hits a closed pipe
    done = subprocess.run([sys.executable, "-m", "kdbench", *argv], stdout=writer, stderr=subprocess.PIPE,
                          text=True, timeout=300, env={**os.environ, "KDBENCH_DISABLE_PLUGIN_AUTOLOAD": "1"})
    os.close(writer)
    assert done.returncode == ExitCode.OK, done.stderr
    assert done.stderr == ""
