"""Hook specifications: the plugin author's reference.

Built-in plugins (``plugins/kdbench_builtins``) implement exactly these hooks; third-party
distributions expose a module through the ``kdbench`` entry-point group. Implementations may accept
any subset of a hook's arguments. Hooks are always called with keyword arguments.

Registration hooks run once per process, every implementation in turn; each receives a
``register`` callable (:class:`kdbench.contract.registry.Registrar`) and calls it once per component. The
key is the component's ``name`` attribute. Components are then chosen by name from the
configuration and called directly by the runner: a teacher-update rule is *not* a hook, because
exactly one rule runs per cell.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Mapping

    from kdbench.contract.registry import Registrar
    from kdbench.contract.rules import DistillLoss, Method, TeacherUpdate
    from kdbench.contract.spec import CellSpec, RunContext, Suite
    from kdbench.contract.types import ModelKind, StudentKind, Task

hookspec = pluggy.HookspecMarker("kdbench")
hookimpl = pluggy.HookimplMarker("kdbench")

# -- registration ------------------------------------------------------------------------------


@hookspec
def kdbench_register_tasks(register: Registrar[type[Task]]) -> None:
    """Register task classes: ``register(Sst2)``; the key is ``Task.name`` (e.g. "glue/sst2")."""


@hookspec
def kdbench_register_models(register: Registrar[type[ModelKind]]) -> None:
    """Register model kinds usable as teacher or student: ``register(HFModel)`` ("hf")."""


@hookspec
def kdbench_register_students(register: Registrar[type[StudentKind]]) -> None:
    """Register ways to make a student from a teacher, e.g. "pick-layers" (k layers of a
    checkpoint) or "model" (its own checkpoint or architecture)."""


@hookspec
def kdbench_register_losses(register: Registrar[type[DistillLoss]]) -> None:
    """Register distillation losses: ``register(HintonKD)``; the key is ``DistillLoss.name``."""


@hookspec
def kdbench_register_teacher_updates(register: Registrar[type[TeacherUpdate]]) -> None:
    """Register teacher-update rules: ``register(MetaDistil)``; key ``TeacherUpdate.name``.

    See :class:`kdbench.contract.types.TeacherUpdate` for the prepare/step contract.
    """


@hookspec
def kdbench_register_methods(register: Registrar[Method]) -> None:
    """Register methods (teacher update + loss + defaults + paper); leaderboards rank these."""


@hookspec
def kdbench_register_executors(register: Registrar[type[Any]]) -> None:
    """Register matrix executors (``kdbench.engine.executors.Executor`` subclasses), e.g. "ray"."""


# -- configuration -----------------------------------------------------------------------------


@hookspec
def kdbench_configure(suite: Suite) -> list[str] | None:
    """Validate the merged configuration before planning (cross-component rules; a single
    component's options are better checked by its Config, see :mod:`kdbench.contract.options`).

    ``suite`` is a :class:`kdbench.engine.config.Suite`: ``name``, ``path``, the selected ``methods``,
    ``tasks``, ``students`` and ``seeds`` (after ``--methods`` etc.), ``teachers`` and
    ``student_defs`` (the ``[teachers.*]``/``[students.*]`` tables), and the raw layers
    ``file_raw`` (the suite file) and ``cli_raw`` (the ``key=value`` overrides) as nested dicts.
    Return a list of problems (strings; empty or None when fine). The host collects every
    problem from every plugin and reports them together (exit 6). Do not mutate ``suite``.
    """


# -- running -----------------------------------------------------------------------------------


@hookspec(firstresult=True)
def kdbench_run_cell(spec: CellSpec, ctx: RunContext) -> dict[str, Any] | None:
    """Train and evaluate one cell (method x task x student x seed); return its result dict.

    Stops at the first non-None result. ``kdbench.engine.runner`` implements the shared loop
    ``trylast``. Wrap it with ``@hookimpl(wrapper=True)`` to time or profile cells, or return a
    result first to replace the loop for some cells.
    """


@hookspec
def kdbench_log_metrics(spec: CellSpec, step: int, metrics: Mapping[str, float]) -> None:
    """Observe training metrics (loss terms by name, lr, teacher-update metrics, eval scores)
    every ``train.log_every`` steps and after every evaluation. Must not mutate ``metrics``."""


# -- reporting ---------------------------------------------------------------------------------


@hookspec
def kdbench_update_result(result: dict[str, Any]) -> None:
    """Add provenance to a cell's result before it is written: mutate ``result["provenance"]``
    or ``result["extra"]`` in place."""
