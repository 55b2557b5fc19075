"""Suites: TOML files plus ``key=value`` overrides, validated all at once.

Precedence for every component option, lowest first: the component's ``Config`` defaults <
the method's ``defaults`` < the suite file < the command line. Within the file and within the
command line, a method-specific section (``[method.metadistil.loss]``) beats a generic one
(``[loss.kd]``), and a task name (``[task."glue/sst2"]``) beats a glob (``[task."glue/*"]``).

Suite file layout (see ``kdbench/configs/*.toml``)::

    [suite]            name, methods ("all" = every registered method), tasks, students, seeds,
                       baselines, description, budget, reference (published numbers)
    [teachers.NAME]    kind = <model kind>, then that kind's Config fields
    [students.NAME]    teacher = NAME, kind = <student kind>, then that kind's Config fields
    [train]            TrainConfig fields for distillation cells
    [teacher_train]    TrainConfig fields for teacher fine-tuning
    [loss.NAME] [teacher_update.NAME] [task.NAME-or-glob] [method.NAME.{loss,teacher_update,train}]
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import re
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from kdbench.errors import ConfigError, KdbenchError
from kdbench.options import as_dict, coerce, identity, option, type_problem, validate_config
from kdbench.registry import suggest
from kdbench.taskopts import data_options

__all__ = ["Suite", "TrainConfig", "as_dict", "build_config", "identity", "load_suite"]


Optimizer = Literal["adamw", "sgd"]
Schedule = Literal["linear", "constant", "multistep"]
Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """The shared loop's options (one set for distillation, one for teacher fine-tuning)."""

    epochs: int = option(3, ge=1)  # passes over the training split
    batch_size: int = option(32, ge=1)  # examples per optimizer step
    #: 0 = batch_size; smaller = gradient accumulation (set on OOM retry)
    micro_batch_size: int = option(0, ge=0, execution_only=True)
    eval_batch_size: int = option(256, ge=1)  # examples per evaluation forward
    lr: float = option(5e-5, gt=0)  # peak learning rate
    weight_decay: float = option(0.0, ge=0)  # AdamW/SGD weight decay (not on bias/LayerNorm)
    optimizer: Optimizer = "adamw"
    momentum: float = option(0.9, ge=0, lt=1)  # SGD momentum
    schedule: Schedule = "linear"  # linear (warmup then decay) | constant | multistep
    warmup: float = option(0.0, ge=0, le=1)  # warmup fraction of total steps (linear schedule)
    milestones: tuple[int, ...] = option((), ge=1)  # epochs at which multistep multiplies lr by gamma
    gamma: float = option(0.1, gt=0)  # multistep factor
    grad_clip: float = option(1.0, ge=0)  # max grad norm; 0 = off
    #: split that selects the best epoch: "" = "heldout" if the task carves one, else the task's
    #: first eval split; or "quiz" / "heldout" / an eval split (resolved at plan time)
    select: str = ""
    log_every: int = option(50, ge=1, execution_only=True)  # steps between kdbench_log_metrics calls
    max_steps: int = option(0, ge=0)  # stop after this many steps (0 = no cap); for smoke tests
    device: str = option("auto", execution_only=True)  # auto | cpu | cuda | cuda:N
    precision: Precision = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the student (frozen-teacher rules only: no double backward)
    deterministic: bool = False  # torch.use_deterministic_algorithms + cuBLAS workspace
    #: CPU intra-op threads (torch.set_num_threads); 0 = torch's default. Execution-only, but not
    #: bit-neutral: thread counts can move the last float bits (leaderboards/README.md)
    threads: int = option(0, ge=0, execution_only=True)
    #: steps between resumable checkpoints; 0 = end of every epoch
    checkpoint_every: int = option(0, ge=0, execution_only=True)
    #: on OOM, halve the micro-batch (same effective batch) this often
    oom_retries: int = option(1, ge=0, execution_only=True)
    #: text: sort by length within windows of this many batches; 0 = off (added after v1 results)
    length_bucketing: int = option(0, ge=0, id_default=0)
    #: regression: start the output bias at the mean training label (added after v1 results; the
    #: planner resolves it to False for classification, where it does nothing, so only regression
    #: ids change)
    label_mean_bias: bool = option(True, id_default=False)

    def validate(self) -> list[str]:
        """Device names and the milestone order."""
        problems = []
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            problems.append(f"device = {self.device!r} is not allowed; use auto, cpu, cuda, cuda:N or mps")
        if list(self.milestones) != sorted(set(self.milestones)):
            problems.append(f"milestones = {list(self.milestones)} must be increasing epochs")
        return problems


def train_for_task(cfg: TrainConfig, task_cls: Any, task_cfg: Any, where: str,
                   problems: list[str]) -> TrainConfig:
    """``cfg`` resolved for one task: ``label_mean_bias`` only where it acts (regression), and
    ``select = ""`` made "heldout" when the task carves a held-out split (else "" = the first
    eval split, kept as is so run ids do not change).
    An unknown or absent selection split is appended to ``problems``."""
    opts = data_options(task_cfg, text=task_cls.modality == "text", task=task_cls.name)
    heldout, quiz = opts.heldout_fraction > 0, opts.quiz_fraction > 0
    allowed = [*task_cls.eval_splits, *(["quiz"] if quiz else []), *(["heldout"] if heldout else [])]
    if cfg.select and cfg.select not in allowed:
        problems.append(f"[{where}] select = {cfg.select!r}: task {task_cls.name!r} has no such split; use "
                        f"one of {', '.join(allowed)}{suggest(cfg.select, allowed)} (\"heldout\" needs "
                        "the task option heldout_fraction > 0, \"quiz\" quiz_fraction > 0)")
    select = cfg.select or ("heldout" if heldout else "")  # "" stays "" (the first eval split): same ids
    return dataclasses.replace(cfg, select=select,
                               label_mean_bias=cfg.label_mean_bias and task_cls.num_labels == 1)


@dataclass
class Suite:
    """A merged, validated suite. ``file_raw``/``cli_raw`` keep the two layers apart."""

    name: str
    path: str
    file_raw: dict[str, Any]
    cli_raw: dict[str, Any]
    methods: list[str]
    tasks: list[str]
    students: list[str]
    seeds: list[int]
    baselines: bool = True
    description: str = ""
    budget: str = ""
    #: published numbers shown as reference rows: [{row, source, verified, values{"task metric": x}}]
    reference: list[dict[str, Any]] = field(default_factory=list)
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)
    student_defs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def layers(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(file, cli) raw dictionaries, lowest precedence first."""
        return self.file_raw, self.cli_raw


SUITE_KEYS = {"name", "methods", "tasks", "students", "seeds", "baselines", "description",
              "budget", "reference"}
TOP_KEYS = {"suite", "teachers", "students", "train", "teacher_train", "loss", "teacher_update",
            "task", "method"}


def builtin_suites() -> dict[str, Path]:
    """Suites shipped in ``kdbench/configs``."""
    root = resources.files("kdbench") / "configs"
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".toml")}


def parse_value(text: str) -> Any:
    """A CLI value as TOML (numbers, booleans, lists, quoted strings), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.epochs=2", "loss.kd.temperature=4"]`` → nested dict. Task names with "/" are
    kept whole: ``task.glue/sst2.max_seq_length=64``."""
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r} is not key=value (e.g. train.epochs=2)")
            continue
        parts = [p.strip('"') for p in re.findall(r'"[^"]*"|[^.]+', key)]  # task."glue/sst2".x
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r} conflicts with another override")
                break
        else:
            node[parts[-1]] = parse_value(value)
    if problems:
        raise ConfigError(problems)
    return out


def load_suite(name_or_path: str, overrides: list[str] | None = None) -> Suite:
    """Read a suite by built-in name or path and layer the CLI overrides on it."""
    suites = builtin_suites()
    path = Path(name_or_path)
    if name_or_path in suites:
        path = suites[name_or_path]
    elif not path.is_file():
        raise ConfigError(
            f"suite {name_or_path!r} not found: not a file and not a built-in suite.{suggest(name_or_path, list(suites))} "
            f"Available: {', '.join(sorted(suites))}"
        )
    try:
        file_raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    cli_raw = parse_overrides(overrides or [])
    problems: list[str] = []
    for where, raw in ((str(path), file_raw), ("command line", cli_raw)):
        for key in raw:
            if key not in TOP_KEYS:
                problems.append(f"{where}: unknown section {key!r}.{suggest(key, sorted(TOP_KEYS))}")
        for key in raw.get("suite", {}):
            if key not in SUITE_KEYS:
                problems.append(f"{where} [suite]: unknown key {key!r}.{suggest(key, sorted(SUITE_KEYS))}")
    merged = deep_merge(file_raw, cli_raw)
    s = merged.get("suite", {})
    suite = Suite(
        name=str(s.get("name", path.stem)), path=str(path), file_raw=file_raw, cli_raw=cli_raw,
        methods=_str_list(s.get("methods", []), "suite.methods", problems),
        tasks=_str_list(s.get("tasks", []), "suite.tasks", problems),
        students=_str_list(s.get("students", list(merged.get("students", {}))), "suite.students", problems),
        seeds=[int(x) for x in s.get("seeds", [0])],
        baselines=bool(s.get("baselines", True)), description=str(s.get("description", "")),
        budget=str(s.get("budget", "")), reference=list(s.get("reference", [])),
        teachers=dict(merged.get("teachers", {})), student_defs=dict(merged.get("students", {})),
    )
    if problems:
        raise ConfigError(problems)
    return suite


def _str_list(value: Any, key: str, problems: list[str]) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{key} expects a list of names, got {value!r}")
        return []
    return list(value)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``top`` over ``base``, recursively."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def section(raw: dict[str, Any], *path: str) -> dict[str, Any]:
    """``raw[path[0]][path[1]]...`` or {}."""
    node: Any = raw
    for part in path:
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return dict(node) if isinstance(node, dict) else {}


def task_section(raw: dict[str, Any], task: str) -> dict[str, Any]:
    """Options for ``task`` from ``[task.*]``: globs first, the exact name last."""
    tasks = raw.get("task", {})
    out: dict[str, Any] = {}
    for key in sorted(k for k in tasks if k != task and fnmatch.fnmatchcase(task, k)):
        out.update(tasks[key])
    out.update(tasks.get(task, {}))
    return out


def build_config(cls: type, layers: list[dict[str, Any]], where: str, problems: list[str]) -> Any:
    """Instantiate the dataclass ``cls`` from option dicts (later layers win) and validate it.

    Unknown keys, wrong types, typed choices, declared bounds and the Config's ``validate()`` hook
    (:mod:`kdbench.options`) are appended to ``problems``, each prefixed with ``where``; the
    defaults are used for bad keys so validation can continue.
    """
    if not dataclasses.is_dataclass(cls):
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in fields:
                problems.append(f"{where}: unknown key {key!r}.{suggest(key, sorted(fields))} "
                                f"Known: {', '.join(sorted(fields)) or '(none)'}")
                continue
            ok, coerced = coerce(value, hints[key])
            if not ok:
                problems.append(f"{where}: {type_problem(key, value, hints[key])}")
                continue
            values[key] = coerced
    try:
        cfg = cls(**values)
    except (ValueError, TypeError, KdbenchError) as exc:  # a Config's own __post_init__ check
        problems.append(f"{where}: {exc}")
        return cls()
    problems.extend(f"{where}: {p}" for p in validate_config(cfg))
    return cfg


