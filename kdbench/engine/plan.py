"""Expand a suite into cells (method x task x student x seed) with resolved configurations.

Every problem in the suite is collected and raised together as one :class:`ConfigError`.
Teacher fine-tuning cells come first (one per task x teacher x seed): every method of the matrix
then distils the very same cached teacher.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdbench.contract.errors import ConfigError, PluginError
from kdbench.contract.options import identity
from kdbench.contract.registry import suggest
from kdbench.contract.spec import TEACHER, CellSpec, Suite, TrainConfig
from kdbench.contract.taskopts import SourceOptions, data_options
from kdbench.engine.config import build_config, builtin_suites, section, task_section, train_for_task
from kdbench.engine.manager import ROLE_NO_KD, ROLE_REFERENCE

if TYPE_CHECKING:
    from kdbench.contract.rules import Method
    from kdbench.engine.manager import Host


def config_hash(obj: Any, n: int = 8) -> str:
    """Stable short hash of a JSON-able object."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def make_run_id(spec: CellSpec) -> str:
    """``method__task__student__sSEED__hash``, deterministic and filesystem-safe.

    The hash covers the resolved configuration except execution-only options (device, threads,
    logging, checkpoint cadence, micro-batch), so moving a cell to another machine keeps its id,
    and except later-added options left at their default, so published results keep theirs. Both
    apply to every component's Config (:func:`kdbench.contract.options.identity`).
    """
    student = spec.student or spec.teacher
    resolved = spec.resolved()
    ident = {**resolved, "student_model": ({"kind": spec.student_kind, **identity(spec.student_cfg)}
                                           if spec.student else {}),
             "teacher": {"name": spec.teacher, "kind": spec.teacher_kind, **identity(spec.teacher_cfg)},
             "loss": {"name": spec.loss, **identity(spec.loss_cfg)},
             "teacher_update": {"name": spec.teacher_update, **identity(spec.teacher_update_cfg)},
             "task_options": identity(spec.task_cfg),
             "train": identity(spec.train), "teacher_train": identity(spec.teacher_train)}
    return f"{spec.method}__{spec.task.replace('/', '-')}__{student}__s{spec.seed}__{config_hash(ident)}"


def _train_config(suite: Suite, key: str, method_defaults: dict[str, Any], method: str,
                  problems: list[str]) -> TrainConfig:
    layers = [method_defaults]
    for raw in suite.layers():
        layers += [section(raw, key), section(raw, "method", method, key)]
    cfg: TrainConfig = build_config(TrainConfig, layers, f"[{key}]", problems)
    return cfg


def expand(suite: Suite, host: Host, warnings: list[str] | None = None) -> list[CellSpec]:
    """All cells of ``suite``: teacher cells first, then method cells; raise on any problem.

    Every section and key is checked against the registries and the components' Configs; a
    section that no planned cell reads is an error, or a warning appended to ``warnings`` when
    the suite's own method/task list uses it and only ``--methods``/``--tasks`` left it out.
    """
    problems: list[str] = list(host.configure(suite))
    methods = _plan_methods(suite, host, problems)
    tasks = {t: host.tasks.get(t) for t in suite.tasks
             if _known(host, "tasks", t, f"{suite.path} [suite] tasks", problems)}
    check_sections(suite, host, methods, list(tasks), problems, warnings if warnings is not None else [])
    for i, claim in enumerate(suite.claims, 1):
        for k in ("method", "over"):
            _known(host, "methods", claim[k], f"{suite.path} [[suite.claims]] #{i} {k}", problems)
    if not suite.seeds:
        problems.append(f"{suite.path} [suite]: seeds is empty")
    if not suite.methods or not suite.tasks or not suite.students:
        problems.append(f"{suite.path} [suite]: needs at least one method, task and student")
    generic_teacher_train = _train_config(suite, "teacher_train", {}, "", problems)
    if not methods:  # still check the generic [train] section
        _train_config(suite, "train", {}, "", problems)
    task_cfgs = {name: build_config(cls.Config, [task_section(raw, name) for raw in suite.layers()],
                                    f"[task.{name!r}]", problems) for name, cls in tasks.items()}
    for name, cls in tasks.items():  # a source is one the task understands
        source = task_cfgs[name].source if isinstance(task_cfgs[name], SourceOptions) else None
        if source is not None and source not in cls.sources:
            problems.append(f"[task.{name!r}]: source = {source!r} is not allowed; use one of "
                            f"{', '.join(map(repr, cls.sources))}.{suggest(source, list(cls.sources))}")
    teachers = _teachers(suite, host, problems)
    students = _students(suite, host, teachers, problems)
    no_kd = _teacher_method(host, problems)
    teacher_loss = host.losses.get(no_kd.loss) if no_kd is not None else None
    cells: list[CellSpec] = []
    teacher_cells: dict[tuple[str, str, int], CellSpec] = {}
    for method_name in methods:
        for spec in _method_cells(suite, host, method_name, tasks, task_cfgs, teachers, students,
                                  generic_teacher_train, problems):
            cells.append(_with_id(spec))
            key = (spec.task, spec.teacher, spec.seed)
            if key not in teacher_cells and no_kd is not None and teacher_loss is not None:
                t_train = train_for_task(generic_teacher_train, tasks[spec.task], spec.task_cfg,
                                         "teacher_train", problems)
                tspec = CellSpec(suite.name, TEACHER, spec.task, "", spec.seed, spec.teacher,
                                 spec.teacher_kind, spec.teacher_cfg, "", None, teacher_loss.name,
                                 teacher_loss.Config(), no_kd.teacher_update, None, spec.task_cfg,
                                 t_train, t_train, {"task": spec.versions["task"]})
                teacher_cells[key] = _with_id(tspec)
    if problems:
        raise ConfigError(_dedupe(problems))
    return list(teacher_cells.values()) + cells


def _plan_methods(suite: Suite, host: Host, problems: list[str]) -> list[str]:
    """The suite's methods ("all" = every registered one), known ones only, plus the no-KD row."""
    names = [n for m in suite.methods for n in (host.methods.names() if m == "all" else [m])]
    where = f"{suite.path} [suite] methods"
    methods = [m for m in dict.fromkeys(names) if _known(host, "methods", m, where, problems)]
    no_kd = _role_method(host, ROLE_NO_KD, problems)
    if suite.baselines and no_kd is not None and no_kd.name not in methods:
        methods.append(no_kd.name)
    return methods


def _role_method(host: Host, role: str, problems: list[str]) -> Method | None:
    """``host.role_method(role)``; two holders of the role are a problem of the plan."""
    try:
        return host.role_method(role)
    except PluginError as exc:
        problems.append(str(exc))
        return None


def _teacher_method(host: Host, problems: list[str]) -> Method | None:
    """The method teacher fine-tuning cells are trained as: the one with ``role = "student-only"`` (the
    teacher is fine-tuned exactly as the student-without-KD row is trained, with its loss and its
    teacher-update rule's name)."""
    before = len(problems)
    found = _role_method(host, ROLE_NO_KD, problems)
    if found is None:
        if len(problems) == before:  # none, rather than two (already a problem)
            problems.append(f"exactly one registered method must have role {ROLE_NO_KD!r} (its loss "
                            "fine-tunes the teachers); found none")
        return None
    if found.loss not in host.losses:
        problems.append(f"method {found.name!r} (role {ROLE_NO_KD!r}, its loss fine-tunes the teachers): "
                        f"{host.losses.unknown(found.loss)}")
        return None
    return found


def plan_facts(suite: Suite, host: Host) -> dict[str, Any]:
    """What a leaderboard page needs from the suite and the plugins, for ``write_plan``: name, how
    to rerun it, description, budget, reference rows, published claims, and the names of the methods holding the
    roles the page acts on: ``baseline_method`` (role "reference": the paired tables compare every
    method to it) and ``no_kd_method`` (role "student-only": the student-without-KD row, listed last and
    used by the no-headroom check); "" when no registered method holds the role."""
    shipped = builtin_suites().get(suite.name)
    builtin = shipped is not None and Path(suite.path).resolve() == Path(shipped).resolve()
    reference, no_kd = host.role_method(ROLE_REFERENCE), host.role_method(ROLE_NO_KD)
    return {"name": suite.name, "suite_arg": suite.name if builtin else suite.path,
            "description": suite.description, "budget": suite.budget, "reference": suite.reference,
            "claims": suite.claims,
            "baseline_method": reference.name if reference is not None else "",
            "no_kd_method": no_kd.name if no_kd is not None else ""}


def _teachers(suite: Suite, host: Host, problems: list[str]) -> dict[str, tuple[str, Any]]:
    """``{name: (model kind, Config)}`` of every ``[teachers.NAME]`` section."""
    teachers: dict[str, tuple[str, Any]] = {}
    for tname, tdef in suite.teachers.items():
        kind = tdef.get("kind")
        if not isinstance(kind, str) or not _known(host, "models", kind, f"[teachers.{tname}] kind", problems):
            continue
        opts = {k: v for k, v in tdef.items() if k != "kind"}
        teachers[tname] = (kind, build_config(host.models.get(kind).Config, [opts], f"[teachers.{tname}]", problems))
    return teachers


def _students(suite: Suite, host: Host, teachers: dict[str, tuple[str, Any]],
              problems: list[str]) -> dict[str, tuple[str, str, Any, str]]:
    """``{name: (teacher name, student kind, Config, modality)}`` of the planned students."""
    students: dict[str, tuple[str, str, Any, str]] = {}
    for sname in suite.students:
        sdef = suite.student_defs.get(sname)
        if sdef is None:
            problems.append(f"{suite.path} [suite] students: no [students.{sname}] section."
                            f"{suggest(sname, list(suite.student_defs))}")
            continue
        tname, kind = str(sdef.get("teacher")), sdef.get("kind")
        if tname not in suite.teachers:
            problems.append(f"[students.{sname}] teacher {tname!r} has no [teachers.{tname}] section."
                            f"{suggest(tname, list(suite.teachers))}")
            continue
        if not isinstance(kind, str) or not _known(host, "students", kind, f"[students.{sname}] kind", problems):
            continue
        opts = {k: v for k, v in sdef.items() if k not in ("kind", "teacher")}
        known = len(problems)
        scfg = build_config(host.students.get(kind).Config, [opts], f"[students.{sname}]", problems)
        if tname in teachers and len(problems) == known:  # the kind's checks need valid options
            tkind, tcfg = teachers[tname]
            try:
                student_kind = host.students.get(kind)(scfg, host.models.as_mapping())
                modality = student_kind.modality(host.models.get(tkind)(tcfg))
            except ConfigError as exc:
                problems.append(f"[students.{sname}]: {exc}")
                continue
            students[sname] = (tname, kind, scfg, modality)
    return students


def _method_cells(suite: Suite, host: Host, method_name: str, tasks: dict[str, Any],
                  task_cfgs: dict[str, Any], teachers: dict[str, tuple[str, Any]],
                  students: dict[str, tuple[str, str, Any, str]], generic_teacher_train: TrainConfig,
                  problems: list[str]) -> list[CellSpec]:
    """The cells of one method (task x student x seed), ids not yet set."""
    method = host.methods.get(method_name)
    defaults = {k: dict(v) for k, v in method.defaults.items()}
    for key in defaults:
        if key not in METHOD_SECTIONS:
            problems.append(f"method {method_name!r} defaults: unknown section {key!r}")
    loss_cls = host.losses.get(method.loss) if method.loss in host.losses else None
    rule_cls = host.teacher_updates.get(method.teacher_update) if method.teacher_update in host.teacher_updates else None
    if loss_cls is None:
        problems.append(f"method {method_name!r}: {host.losses.unknown(method.loss)}")
    if rule_cls is None:
        problems.append(f"method {method_name!r}: {host.teacher_updates.unknown(method.teacher_update)}")
    if loss_cls is None or rule_cls is None:
        return []
    loss_layers, rule_layers = [defaults.get("loss", {})], [defaults.get("teacher_update", {})]
    for raw in suite.layers():
        loss_layers += [section(raw, "loss", method.loss), section(raw, "method", method_name, "loss")]
        rule_layers += [section(raw, "teacher_update", method.teacher_update),
                        section(raw, "method", method_name, "teacher_update")]
    # one message per section, not per method that shares it (problems are deduplicated)
    loss_cfg = build_config(loss_cls.Config, loss_layers, f"[loss.{method.loss}]", problems)
    rule_cfg = build_config(rule_cls.Config, rule_layers, f"[teacher_update.{method.teacher_update}]", problems)
    train = _train_config(suite, "train", defaults.get("train", {}), method_name, problems)
    teacher_train = _train_config(suite, "teacher_train", {}, method_name, []) if any(
        section(raw, "method", method_name, "teacher_train") for raw in suite.layers()) else generic_teacher_train
    problem = rule_cls.check_train(rule_cfg, train)
    if problem:
        problems.append(f"method {method_name!r}: {problem}")
    modalities = {cls.modality for cls in tasks.values()}
    for sname, (_, skind, scfg, modality) in students.items():
        problem = rule_cls.check_student(rule_cfg, skind, scfg) if modality in modalities else None
        if problem:
            problems.append(f"method {method_name!r}, [students.{sname}]: {problem}")
    cells = []
    for task_name, task_cls in tasks.items():
        t_train = train_for_task(train, task_cls, task_cfgs[task_name], "train", problems)
        t_teacher_train = train_for_task(teacher_train, task_cls, task_cfgs[task_name], "teacher_train", problems)
        task = task_cls(task_cfgs[task_name])
        reason = loss_cls.check(task) or rule_cls.check(task) or ""
        if not reason and rule_cls.needs_quiz and not data_options(
                task_cfgs[task_name], text=task_cls.modality == "text", task=task_name).quiz_fraction:
            reason = f"{method_name} needs a quiz split; task {task_name!r} has quiz_fraction=0"
        versions = {"method": method.version, "task": task_cls.version,
                    "loss": loss_cls.version, "teacher_update": rule_cls.version}
        for sname, (tname, skind, scfg, modality) in students.items():
            if modality != task_cls.modality:
                continue
            tkind, tcfg = teachers[tname]
            cells += [CellSpec(suite.name, method_name, task_name, sname, seed, tname, tkind, tcfg, skind,
                               scfg, method.loss, loss_cfg, method.teacher_update, rule_cfg,
                               task_cfgs[task_name], t_train, t_teacher_train, versions, reason)
                      for seed in suite.seeds]
    return cells


METHOD_SECTIONS = ("loss", "teacher_update", "train", "teacher_train")


def check_sections(suite: Suite, host: Host, methods: list[str], tasks: list[str], problems: list[str],
                   warnings: list[str]) -> None:
    """Every ``[loss.X]``, ``[teacher_update.X]``, ``[method.X]`` and ``[task.X]`` section (suite
    file and command line) names a registered component, and some planned cell reads it.

    A section that no cell of the suite reads is an error (a typo, or an option for a method the
    suite does not plan). One that only cells left out by ``--methods``/``--tasks`` would read is
    fine in the suite file (a suite configures all its methods) and a one-line warning on the
    command line (the override has no effect on this run).
    """
    planned = [host.methods.get(m) for m in methods]
    listed = _listed(suite, host)
    for where, raw in ((suite.path, suite.file_raw), ("command line", suite.cli_raw)):
        warn = warnings if raw is suite.cli_raw else []
        for kind, attr in (("losses", "loss"), ("teacher_updates", "teacher_update")):
            for name, opts in _tables(raw, attr):
                label = f"{where} [{attr}.{name}]"
                if not _known(host, kind, name, label, problems):
                    continue
                if not any(getattr(m, attr) == name for m in planned):
                    build_config(host.registries[kind].get(name).Config, [opts], label, problems)
                    _unread(label, any(getattr(m, attr) == name for m in listed), problems, warn)
        for name, sub in _tables(raw, "method"):
            label = f"{where} [method.{name}]"
            if not _known(host, "methods", name, label, problems):
                continue
            for key, value in sub.items():
                if key not in METHOD_SECTIONS:
                    problems.append(f"{label}: unknown section {key!r}.{suggest(key, list(METHOD_SECTIONS))} "
                                    f"Known: {', '.join(METHOD_SECTIONS)}")
                elif not isinstance(value, dict):  # e.g. teacher_update = "frozen": the rule is registered
                    problems.append(f"{label}: {key!r} must be a table of options, got {value!r}. "
                                    f"Hint: write method.{name}.{key}.<option>=<value>")
            if name not in methods:
                _unread(label, host.methods.get(name) in listed, problems, warn)
        for pattern, _ in _tables(raw, "task"):
            label = f"{where} [task.{pattern!r}]"
            if not any(fnmatch.fnmatchcase(t, pattern) for t in host.tasks.names()):
                problems.append(f"{label}: matches no registered task.{suggest(pattern, host.tasks.names())} "
                                f"Available: {', '.join(host.tasks.names())}")
            elif not any(fnmatch.fnmatchcase(t, pattern) for t in tasks):
                in_suite = any(fnmatch.fnmatchcase(t, pattern) for t in _listed_tasks(suite))
                _unread(label, in_suite, problems, warn)


def _tables(raw: dict[str, Any], attr: str) -> list[tuple[str, dict[str, Any]]]:
    """The ``[attr.NAME]`` tables of one layer (``load_suite`` rejected any non-table entry)."""
    return [(name, opts) for name, opts in raw.get(attr, {}).items() if isinstance(opts, dict)]


def _unread(label: str, listed: bool, problems: list[str], warnings: list[str]) -> None:
    if listed:
        warnings.append(f"{label} has no effect: --methods/--tasks left out every cell that reads it")
    else:
        problems.append(f"{label}: no planned cell reads it. Hint: remove it, or plan a method/task that uses it")


def _listed(suite: Suite, host: Host) -> list[Any]:
    """The methods the suite file lists (before ``--methods``), as registered Method objects."""
    value = suite.file_raw.get("suite", {}).get("methods", suite.methods)
    names = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, list) else []
    names = host.methods.names() if "all" in names else [n.strip() for n in names]
    return [host.methods.get(n) for n in names if n in host.methods]


def _listed_tasks(suite: Suite) -> list[str]:
    """The tasks the suite file lists (before ``--tasks``)."""
    value = suite.file_raw.get("suite", {}).get("tasks", suite.tasks)
    return [t.strip() for t in value.split(",")] if isinstance(value, str) else list(value)


def _with_id(spec: CellSpec) -> CellSpec:
    object.__setattr__(spec, "run_id", make_run_id(spec))
    return spec


def _known(host: Host, kind: str, name: str, where: str, problems: list[str]) -> bool:
    reg = host.registries[kind]
    if name in reg:
        return True
    problems.append(f"{where}: {reg.unknown(name)}")
    return False


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
