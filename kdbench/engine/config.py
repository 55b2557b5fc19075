"""Suites: TOML files plus ``key=value`` overrides, validated all at once.

Precedence for every component option, lowest first: the component's ``Config`` defaults <
the method's ``defaults`` < the suite file < the command line. Within the file and within the
command line, a method-specific section (``[method.metadistil.loss]``) beats a generic one
(``[loss.kd]``), and a task name (``[task."glue/sst2"]``) beats a glob (``[task."glue/*"]``).

Suite file layout (see ``kdbench/configs/*.toml``)::

    [suite]            name, methods ("all" = every registered method), tasks, students, seeds,
                       baselines, description, budget, reference (published numbers),
                       claims ([[suite.claims]] method, over, source: "method beats over", tested)
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
from importlib import resources
from pathlib import Path
from typing import Any

from kdbench.contract.errors import ConfigError, KdbenchError
from kdbench.contract.options import as_dict, coerce, identity, type_problem, validate_config
from kdbench.contract.registry import suggest
from kdbench.contract.spec import Suite, TrainConfig
from kdbench.contract.taskopts import data_options

__all__ = ["as_dict", "build_config", "identity", "load_suite"]


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
                        f"one of {', '.join(allowed)} (\"heldout\" needs the task option "
                        f"heldout_fraction > 0, \"quiz\" quiz_fraction > 0).{suggest(cfg.select, allowed)}")
    select = cfg.select or ("heldout" if heldout else "")  # "" stays "" (the first eval split): same ids
    return dataclasses.replace(cfg, select=select,
                               label_mean_bias=cfg.label_mean_bias and task_cls.num_labels == 1)


SUITE_KEYS = {"name", "methods", "tasks", "students", "seeds", "baselines", "description",
              "budget", "reference", "claims"}
CLAIM_KEYS = ("method", "over", "source")
REFERENCE_KEYS = ("row", "source", "verified", "values")
TOP_KEYS = {"suite", "teachers", "students", "train", "teacher_train", "loss", "teacher_update",
            "task", "method"}
#: top-level sections whose entries are themselves named tables (``[teachers.NAME]``, ...)
NAMED_TABLES = ("teachers", "students", "loss", "teacher_update", "task", "method")


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
        for key, value in raw.items():
            if key not in TOP_KEYS:
                problems.append(f"{where}: unknown section {key!r}.{suggest(key, sorted(TOP_KEYS))}")
            elif not isinstance(value, dict):
                problems.append(f"{where}: [{key}] must be a table, got {value!r}. "
                                f"Hint: write {key}.<key>=<value>")
            elif key in NAMED_TABLES:
                problems += [f"{where} [{key}]: {name!r} must be a table of options, got {opts!r}. "
                             f"Hint: write {key}.{name}.<option>=<value>"
                             for name, opts in value.items() if not isinstance(opts, dict)]
        for key in raw.get("suite", {}) if isinstance(raw.get("suite"), dict) else ():
            if key not in SUITE_KEYS:
                problems.append(f"{where} [suite]: unknown key {key!r}.{suggest(key, sorted(SUITE_KEYS))}")
    if problems:  # the rest reads these tables
        raise ConfigError(problems)
    merged = deep_merge(file_raw, cli_raw)
    s = merged.get("suite", {})
    suite = Suite(
        name=_text(s.get("name", path.stem), "suite.name", problems), path=str(path), file_raw=file_raw,
        cli_raw=cli_raw,
        methods=_str_list(s.get("methods", []), "suite.methods", problems),
        tasks=_str_list(s.get("tasks", []), "suite.tasks", problems),
        students=_str_list(s.get("students", list(merged.get("students", {}))), "suite.students", problems),
        seeds=_seed_list(s.get("seeds", [0]), problems),
        baselines=_flag(s.get("baselines", True), "suite.baselines", problems),
        description=_text(s.get("description", ""), "suite.description", problems),
        budget=_text(s.get("budget", ""), "suite.budget", problems),
        reference=_references(s.get("reference", []), str(path), problems),
        claims=_claims(s.get("claims", []), str(path), problems),
        teachers=dict(merged.get("teachers", {})), student_defs=dict(merged.get("students", {})),
    )
    if problems:
        raise ConfigError(problems)
    return suite


def _text(value: Any, key: str, problems: list[str]) -> str:
    """A string option of ``[suite]``."""
    if not isinstance(value, str):
        problems.append(f"{key} expects a string, got {value!r}")
        return ""
    return value


def _references(value: Any, where: str, problems: list[str]) -> list[dict[str, Any]]:
    """``[[suite.reference]]`` tables: ``row`` and ``source`` (non-empty strings), ``verified``
    (a boolean) and ``values`` (a table of column -> published number)."""
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        problems.append(f"{where} [suite] reference: expects [[suite.reference]] tables with keys "
                        f"{', '.join(REFERENCE_KEYS)}, got {value!r}")
        return []
    for i, ref in enumerate(value, 1):
        label = f"{where} [[suite.reference]] #{i}"
        problems += [f"{label}: unknown key {k!r}; allowed: {', '.join(REFERENCE_KEYS)}."
                     f"{suggest(k, list(REFERENCE_KEYS))}" for k in ref if k not in REFERENCE_KEYS]
        problems += [f"{label}: {k} must be a non-empty string, got {ref.get(k)!r}" for k in ("row", "source")
                     if not isinstance(ref.get(k), str) or not ref[k].strip()]
        if not isinstance(ref.get("verified"), bool):
            problems.append(f"{label}: verified must be true or false, got {ref.get('verified')!r}")
        values = ref.get("values")
        if not isinstance(values, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
            problems.append(f"{label}: values must be a table of column = number, e.g. "
                            f'values = {{ "glue/sst2 accuracy" = 90.77 }}, got {values!r}')
    return [dict(r) for r in value]


def _claims(value: Any, where: str, problems: list[str]) -> list[dict[str, str]]:
    """``[[suite.claims]]`` tables, each exactly ``method``, ``over`` and ``source`` (non-empty strings);
    the method names are checked against the registry when the suite is planned."""
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        problems.append(f"{where} [suite] claims: expects [[suite.claims]] tables with keys "
                        f"{', '.join(CLAIM_KEYS)}, got {value!r}")
        return []
    out = []
    for i, claim in enumerate(value, 1):
        bad = [k for k in claim if k not in CLAIM_KEYS]
        empty = [k for k in CLAIM_KEYS if not isinstance(claim.get(k), str) or not claim[k].strip()]
        problems += [f"{where} [[suite.claims]] #{i}: unknown key {k!r}; allowed: {', '.join(CLAIM_KEYS)}."
                     f"{suggest(k, list(CLAIM_KEYS))}" for k in bad]
        problems += [f"{where} [[suite.claims]] #{i}: {k} must be a non-empty string, got {claim.get(k)!r}"
                     for k in empty]
        if not bad and not empty:
            out.append({k: claim[k] for k in CLAIM_KEYS})
    return out


def _str_list(value: Any, key: str, problems: list[str]) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{key} expects a list of names, got {value!r}")
        return []
    return list(value)


def _seed_list(value: Any, problems: list[str]) -> list[int]:
    """``suite.seeds`` (``--seeds``): distinct non-negative integers."""
    ok = isinstance(value, list) and value and all(type(v) is int and v >= 0 for v in value)
    if not ok or len(set(value)) != len(value):
        problems.append("suite.seeds (--seeds) expects distinct non-negative integers, e.g. "
                        f"seeds = [0, 1, 2] or --seeds 0,1,2; got {value!r}")
        return []
    return list(value)


def _flag(value: Any, key: str, problems: list[str]) -> bool:
    """A TOML boolean (a quoted "false" would otherwise count as true)."""
    if not isinstance(value, bool):
        problems.append(f"{key} expects true or false (TOML booleans, unquoted), got {value!r}")
    return bool(value)


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
    (:mod:`kdbench.contract.options`) are appended to ``problems``, each prefixed with ``where``; the
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


