"""kdbench: a knowledge-distillation benchmark whose teacher-update rule is a plugin.

The public API for plugin authors: the hook markers, the component base classes, the records hooks
receive, and the errors. Plugins import only from here (``import kdbench`` or ``from kdbench import
NAME``, NAME in ``__all__``), never from kdbench's submodules.

Names resolve on first use (PEP 562), so ``import kdbench`` — and the ``kdbench`` command's own
start-up — does not import torch until a component class is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdbench.contract import metrics
    from kdbench.contract.errors import (
        ConfigError,
        DataError,
        ExitCode,
        KdbenchError,
        NotApplicable,
        PluginError,
    )
    from kdbench.contract.hookspecs import hookimpl, hookspec
    from kdbench.contract.lazy import lazy_import
    from kdbench.contract.options import option
    from kdbench.contract.registry import Registrar, suggest
    from kdbench.contract.rules import (
        Artifacts,
        DistillLoss,
        Method,
        QuizStream,
        StepContext,
        StepCost,
        TeacherUpdate,
    )
    from kdbench.contract.spec import CellSpec, RunContext, Suite, TrainConfig
    from kdbench.contract.taskopts import DataOptions, SourceOptions, TextDataOptions
    from kdbench.contract.tensors import TaskData, TensorSplit
    from kdbench.contract.types import Batch, KDModel, ModelKind, ModelOutput, NoConfig, StudentKind, Task
    from kdbench.engine.checkpoints import tensor_digest
    from kdbench.engine.config import build_config
    from kdbench.engine.executors import (
        Executor,
        HostArgs,
        MatrixContext,
        bf16_emulation_warning,
        check_rebuildable,
        execute_cell,
        rebuild_host,
        this_cpu,
    )
    from kdbench.engine.manager import Host, env_flag
    from kdbench.report.results import new_result, provenance, result_path, write_result

from kdbench.contract.version import __version__

#: where each public name lives (imported on first use). Beyond the component base classes:
_HOME = {
    **dict.fromkeys(("ConfigError", "DataError", "ExitCode", "KdbenchError", "NotApplicable",
                     "PluginError"), "kdbench.contract.errors"),
    **dict.fromkeys(("hookimpl", "hookspec"), "kdbench.contract.hookspecs"),
    "lazy_import": "kdbench.contract.lazy",
    "option": "kdbench.contract.options",
    "Registrar": "kdbench.contract.registry",
    **dict.fromkeys(("DataOptions", "SourceOptions", "TextDataOptions"), "kdbench.contract.taskopts"),
    **dict.fromkeys(("Batch", "KDModel", "ModelKind", "ModelOutput", "NoConfig", "StudentKind", "Task"),
                    "kdbench.contract.types"),
    **dict.fromkeys(("Artifacts", "DistillLoss", "Method", "QuizStream", "StepContext", "StepCost",
                     "TeacherUpdate"), "kdbench.contract.rules"),
    # any plugin: "did you mean" hints for bad option values (``suggest(name, choices)``), and a
    # nested Config (a dict of options inside a section) built with a section's checks
    "suggest": "kdbench.contract.registry",
    "build_config": "kdbench.engine.config",
    # task authors: the metric modules (``metrics.score(names, preds, labels)``)
    "metrics": "kdbench.contract.metrics",
    # rule and loss authors: the prepared tensors (``StepContext.data``) and a content key of tensors
    **dict.fromkeys(("TaskData", "TensorSplit"), "kdbench.contract.tensors"),
    "tensor_digest": "kdbench.engine.checkpoints",
    # hook authors (kdbench_configure, kdbench_run_cell, ...): the records the hooks receive
    **dict.fromkeys(("CellSpec", "RunContext", "Suite", "TrainConfig"), "kdbench.contract.spec"),
    # executor authors: the base class, running one cell, rebuilding the Host in a worker, the
    # bf16 check of the machines cells run on, and the result files
    **dict.fromkeys(("Executor", "HostArgs", "MatrixContext", "bf16_emulation_warning", "check_rebuildable",
                     "execute_cell", "rebuild_host", "this_cpu"), "kdbench.engine.executors"),
    **dict.fromkeys(("Host", "env_flag"), "kdbench.engine.manager"),
    **dict.fromkeys(("new_result", "provenance", "result_path", "write_result"), "kdbench.report.results"),
}

#: public names that are modules: ``_HOME`` names the module itself
_MODULES = frozenset({"metrics"})

__all__ = [
    "Artifacts",
    "Batch",
    "CellSpec",
    "ConfigError",
    "DataError",
    "DataOptions",
    "DistillLoss",
    "Executor",
    "ExitCode",
    "Host",
    "HostArgs",
    "KDModel",
    "KdbenchError",
    "MatrixContext",
    "Method",
    "ModelKind",
    "ModelOutput",
    "NoConfig",
    "NotApplicable",
    "PluginError",
    "QuizStream",
    "Registrar",
    "RunContext",
    "SourceOptions",
    "StepContext",
    "StepCost",
    "StudentKind",
    "Suite",
    "Task",
    "TaskData",
    "TeacherUpdate",
    "TensorSplit",
    "TextDataOptions",
    "TrainConfig",
    "__version__",
    "bf16_emulation_warning",
    "build_config",
    "check_rebuildable",
    "env_flag",
    "execute_cell",
    "hookimpl",
    "hookspec",
    "lazy_import",
    "metrics",
    "new_result",
    "option",
    "provenance",
    "rebuild_host",
    "result_path",
    "suggest",
    "tensor_digest",
    "this_cpu",
    "write_result",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'kdbench' has no attribute {name!r}")
    module = importlib.import_module(home)
    value = module if name in _MODULES else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
