"""Deferred imports, so ``kdbench ls`` does not pay for datasets/pandas/sklearn until they are used."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    """A module proxy that imports ``name`` on first attribute access."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._lazy_name = name
        self._lazy_module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_lazy"):
            raise AttributeError(attr)
        if self._lazy_module is None:
            self._lazy_module = importlib.import_module(self._lazy_name)
        return getattr(self._lazy_module, attr)


def lazy_import(name: str) -> Any:
    """``datasets = lazy_import("datasets")``: imported when first used."""
    return LazyModule(name)
