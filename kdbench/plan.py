"""Expand a suite into cells (method x task x student x seed) with resolved configurations.

Every problem in the suite is collected and raised together as one :class:`ConfigError`.
Teacher fine-tuning cells come first (one per task x teacher x seed): every method of the matrix
then distils the very same cached teacher.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kdbench.config import (
    Suite,
    TrainConfig,
    as_dict,
    build_config,
    drop_later_defaults,
    section,
    task_section,
    train_for_task,
    train_identity,
)
from kdbench.errors import ConfigError

if TYPE_CHECKING:
    from kdbench.manager import Host

TEACHER = "teacher"  # the method name of teacher fine-tuning cells (the leaderboard's teacher row)


@dataclass(frozen=True)
class CellSpec:
    """One cell, fully resolved. ``run_id`` is derived from everything that determines it."""

    suite: str
    method: str
    task: str
    student: str  # student definition name; "" for teacher cells
    seed: int
    teacher: str  # teacher definition name
    teacher_kind: str
    teacher_cfg: Any
    student_kind: str
    student_cfg: Any
    loss: str
    loss_cfg: Any
    teacher_update: str
    teacher_update_cfg: Any
    task_cfg: Any
    train: TrainConfig
    teacher_train: TrainConfig
    versions: dict[str, str] = field(default_factory=dict)
    na_reason: str = ""
    run_id: str = ""

    @property
    def is_teacher(self) -> bool:
        """True for a teacher fine-tuning cell."""
        return self.method == TEACHER

    def resolved(self) -> dict[str, Any]:
        """The JSON-able resolved configuration (what ``run_id`` hashes)."""
        return {
            "method": self.method, "task": self.task, "student": self.student, "seed": self.seed,
            "teacher": {"name": self.teacher, "kind": self.teacher_kind, **as_dict(self.teacher_cfg)},
            "student_model": ({"kind": self.student_kind, **as_dict(self.student_cfg)}
                              if self.student else {}),
            "loss": {"name": self.loss, **as_dict(self.loss_cfg)},
            "teacher_update": {"name": self.teacher_update, **as_dict(self.teacher_update_cfg)},
            "task_options": as_dict(self.task_cfg),
            "train": as_dict(self.train),
            "teacher_train": as_dict(self.teacher_train),
            "versions": dict(self.versions),
        }


def config_hash(obj: Any, n: int = 8) -> str:
    """Stable short hash of a JSON-able object."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def make_run_id(spec: CellSpec) -> str:
    """``method__task__student__sSEED__hash``, deterministic and filesystem-safe.

    The hash covers the resolved configuration except execution-only options (device, threads,
    logging, checkpoint cadence, micro-batch), so moving a cell to another machine keeps its id,
    and except later-added options left at their default, so published results keep theirs.
    """
    student = spec.student or spec.teacher
    resolved = spec.resolved()
    ident = {**resolved, "student_model": drop_later_defaults(resolved["student_model"]),
             "task_options": drop_later_defaults(resolved["task_options"]),
             "train": train_identity(spec.train), "teacher_train": train_identity(spec.teacher_train)}
    return f"{spec.method}__{spec.task.replace('/', '-')}__{student}__s{spec.seed}__{config_hash(ident)}"


def _train_config(suite: Suite, key: str, method_defaults: dict[str, Any], method: str,
                  problems: list[str]) -> TrainConfig:
    layers = [method_defaults]
    for raw in suite.layers():
        layers += [section(raw, key), section(raw, "method", method, key)]
    cfg: TrainConfig = build_config(TrainConfig, layers, f"[{key}]", problems)
    return cfg


def expand(suite: Suite, host: Host) -> list[CellSpec]:
    """All cells of ``suite``: teacher cells first, then method cells; raise on any problem."""
    problems: list[str] = list(host.configure(suite))
    where = f"{suite.path} [suite]"
    names = [n for m in suite.methods for n in (host.methods.names() if m == "all" else [m])]
    methods = [m for m in dict.fromkeys(names) if _known(host, "methods", m, where + " methods", problems)]
    if suite.baselines and "no-kd" in host.methods and "no-kd" not in methods:
        methods.append("no-kd")
    tasks = {t: host.tasks.get(t) for t in suite.tasks
             if _known(host, "tasks", t, where + " tasks", problems)}
    if not suite.seeds:
        problems.append(f"{where}: seeds is empty")
    if not suite.methods or not suite.tasks or not suite.students:
        problems.append(f"{where}: needs at least one method, task and student")
    generic_teacher_train = _train_config(suite, "teacher_train", {}, "", problems)
    if not methods:  # still check the generic [train] section
        _train_config(suite, "train", {}, "", problems)

    task_cfgs = {}
    for name, task_cls in tasks.items():
        layers = [task_section(raw, name) for raw in suite.layers()]
        task_cfgs[name] = build_config(task_cls.Config, layers, f"[task.{name!r}]", problems)

    teachers: dict[str, tuple[Any, Any]] = {}
    for tname, tdef in suite.teachers.items():
        kind = tdef.get("kind")
        if not isinstance(kind, str) or not _known(host, "models", kind, f"[teachers.{tname}] kind", problems):
            continue
        cls = host.models.get(kind)
        opts = {k: v for k, v in tdef.items() if k != "kind"}
        teachers[tname] = (kind, build_config(cls.Config, [opts], f"[teachers.{tname}]", problems))

    students: dict[str, tuple[str, str, Any, str]] = {}
    for sname in suite.students:
        sdef = suite.student_defs.get(sname)
        if sdef is None:
            from kdbench.registry import suggest

            problems.append(f"{where} students: no [students.{sname}] section.{suggest(sname, list(suite.student_defs))}")
            continue
        tname, kind = str(sdef.get("teacher")), sdef.get("kind")
        if tname not in suite.teachers:
            problems.append(f"[students.{sname}] teacher {tname!r} has no [teachers.{tname}] section")
            continue
        if not isinstance(kind, str) or not _known(host, "students", kind, f"[students.{sname}] kind", problems):
            continue
        opts = {k: v for k, v in sdef.items() if k not in ("kind", "teacher")}
        scfg = build_config(host.students.get(kind).Config, [opts], f"[students.{sname}]", problems)
        if tname in teachers:
            tkind, tcfg = teachers[tname]
            try:
                student_kind = host.students.get(kind)(scfg, host.models.as_mapping())
                modality = student_kind.modality(host.models.get(tkind)(tcfg))
            except ConfigError as exc:
                problems.append(f"[students.{sname}]: {exc}")
                continue
            students[sname] = (tname, kind, scfg, modality)

    cells: list[CellSpec] = []
    teacher_cells: dict[tuple[str, str, int], CellSpec] = {}
    ce_loss = "ce" if "ce" in host.losses else ""
    for method_name in methods:
        method = host.methods.get(method_name)
        defaults = {k: dict(v) for k, v in method.defaults.items()}
        for key in defaults:
            if key not in ("loss", "teacher_update", "train"):
                problems.append(f"method {method_name!r} defaults: unknown section {key!r}")
        loss_cls = host.lookup("losses", method.loss, f"method {method_name!r} loss") \
            if method.loss in host.losses else None
        rule_cls = host.teacher_updates.get(method.teacher_update) \
            if method.teacher_update in host.teacher_updates else None
        if loss_cls is None:
            problems.append(f"method {method_name!r}: {host.losses.unknown(method.loss)}")
        if rule_cls is None:
            problems.append(f"method {method_name!r}: {host.teacher_updates.unknown(method.teacher_update)}")
        if loss_cls is None or rule_cls is None:
            continue
        loss_layers, rule_layers = [defaults.get("loss", {})], [defaults.get("teacher_update", {})]
        for raw in suite.layers():
            loss_layers += [section(raw, "loss", method.loss), section(raw, "method", method_name, "loss")]
            rule_layers += [section(raw, "teacher_update", method.teacher_update),
                            section(raw, "method", method_name, "teacher_update")]
        loss_cfg = build_config(loss_cls.Config, loss_layers, f"method {method_name!r} loss {method.loss!r}", problems)
        rule_cfg = build_config(rule_cls.Config, rule_layers,
                                f"method {method_name!r} teacher_update {method.teacher_update!r}", problems)
        train = _train_config(suite, "train", defaults.get("train", {}), method_name, problems)
        teacher_train = _train_config(suite, "teacher_train", {}, method_name, []) if any(
            section(raw, "method", method_name, "teacher_train") for raw in suite.layers()) else generic_teacher_train
        for task_name, task_cls in tasks.items():
            t_train = train_for_task(train, task_cls, task_cfgs[task_name], "train", problems)
            t_teacher_train = train_for_task(teacher_train, task_cls, task_cfgs[task_name],
                                             "teacher_train", problems)
            task = task_cls(task_cfgs[task_name])
            reason = loss_cls.check(task) or rule_cls.check(task) or ""
            if not reason and rule_cls.needs_quiz and not getattr(task_cfgs[task_name], "quiz_fraction", 0):
                reason = (f"{method_name} needs a quiz split; task {task_name!r} has quiz_fraction=0")
            for sname, (tname, skind, scfg, modality) in students.items():
                if modality != task_cls.modality:
                    continue
                student_problem = getattr(rule_cls, "check_student", lambda *a: None)(rule_cfg, skind, scfg)
                if student_problem:
                    problems.append(f"method {method_name!r}, [students.{sname}]: {student_problem}")
                tkind, tcfg = teachers[tname]
                for seed in suite.seeds:
                    versions = {"method": method.version, "task": task_cls.version,
                                "loss": loss_cls.version, "teacher_update": rule_cls.version}
                    spec = CellSpec(suite.name, method_name, task_name, sname, seed, tname, tkind,
                                    tcfg, skind, scfg, method.loss, loss_cfg, method.teacher_update,
                                    rule_cfg, task_cfgs[task_name], t_train, t_teacher_train,
                                    versions, reason)
                    cells.append(_with_id(spec))
                    key = (task_name, tname, seed)
                    if key not in teacher_cells and ce_loss:
                        t_generic = train_for_task(generic_teacher_train, task_cls, task_cfgs[task_name],
                                                   "teacher_train", problems)
                        tspec = CellSpec(suite.name, TEACHER, task_name, "", seed, tname, tkind, tcfg,
                                         "", None, ce_loss, host.losses.get(ce_loss).Config(),
                                         "frozen", None, task_cfgs[task_name], t_generic, t_generic,
                                         {"task": task_cls.version})
                        teacher_cells[key] = _with_id(tspec)
    if problems:
        raise ConfigError(_dedupe(problems))
    return list(teacher_cells.values()) + cells


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
