"""kdbench: a knowledge-distillation benchmark whose teacher-update rule is a plugin.

The public API for plugin authors: the hook markers, the component base classes and the errors.
Plugins import only from here (``import kdbench``), never from kdbench's submodules.

Names resolve on first use (PEP 562), so ``import kdbench`` — and the ``kdbench`` command's own
start-up — does not import torch until a component class is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdbench.errors import (
        ConfigError,
        DataError,
        ExitCode,
        KdbenchError,
        NotApplicable,
        PluginError,
    )
    from kdbench.hookspecs import hookimpl, hookspec
    from kdbench.lazy import lazy_import
    from kdbench.options import option
    from kdbench.registry import Registrar
    from kdbench.taskopts import DataOptions, SourceOptions, TextDataOptions
    from kdbench.types import (
        Batch,
        DistillLoss,
        KDModel,
        Method,
        ModelKind,
        ModelOutput,
        NoConfig,
        QuizStream,
        StepContext,
        StepCost,
        StudentKind,
        Task,
        TeacherUpdate,
    )

__version__ = "0.1.0"

_HOME = {
    **dict.fromkeys(("ConfigError", "DataError", "ExitCode", "KdbenchError", "NotApplicable",
                     "PluginError"), "kdbench.errors"),
    **dict.fromkeys(("hookimpl", "hookspec"), "kdbench.hookspecs"),
    "lazy_import": "kdbench.lazy",
    "option": "kdbench.options",
    "Registrar": "kdbench.registry",
    **dict.fromkeys(("DataOptions", "SourceOptions", "TextDataOptions"), "kdbench.taskopts"),
    **dict.fromkeys(("Batch", "DistillLoss", "KDModel", "Method", "ModelKind", "ModelOutput",
                     "NoConfig", "QuizStream", "StepContext", "StepCost", "StudentKind",
                     "Task", "TeacherUpdate"), "kdbench.types"),
}

__all__ = [
    "Batch",
    "ConfigError",
    "DataError",
    "DataOptions",
    "DistillLoss",
    "ExitCode",
    "KDModel",
    "KdbenchError",
    "Method",
    "ModelKind",
    "ModelOutput",
    "NoConfig",
    "NotApplicable",
    "PluginError",
    "QuizStream",
    "Registrar",
    "SourceOptions",
    "StepContext",
    "StepCost",
    "StudentKind",
    "Task",
    "TeacherUpdate",
    "TextDataOptions",
    "__version__",
    "hookimpl",
    "hookspec",
    "lazy_import",
    "option",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'kdbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
