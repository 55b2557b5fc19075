"""kdbench: a knowledge-distillation benchmark whose teacher-update rule is a plugin.

The public API for plugin authors: the hook markers, the component base classes and the errors.
Plugins import only from here (``import kdbench``), never from kdbench's submodules.
"""

from __future__ import annotations

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
from kdbench.registry import Registrar
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
    StudentKind,
    Task,
    TeacherUpdate,
)

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "ConfigError",
    "DataError",
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
    "StepContext",
    "StudentKind",
    "Task",
    "TeacherUpdate",
    "__version__",
    "hookimpl",
    "hookspec",
    "lazy_import",
]
