"""Typed data options shared by every task Config: one definition, one default per option.

A task's ``Config`` extends :class:`DataOptions` (vision) or :class:`TextDataOptions` (text), plus
:class:`SourceOptions` when it reads files, and overrides a default only where the task needs
another one::

    @dataclass(frozen=True)
    class MyConfig(kdbench.TextDataOptions, kdbench.SourceOptions):
        max_seq_length: int = 64  # this task's sentences are short
        my_option: str = "x"

The shared pipeline (``kdbench.engine.data``) and the planner read these fields through
:func:`data_options`, never through ``getattr`` with a local default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kdbench.contract.errors import PluginError
from kdbench.contract.options import option


@dataclass(frozen=True)
class DataOptions:
    """Options of the shared data pipeline that apply to every task."""

    max_train_examples: int = option(0, ge=0)  # 0 = all; else a seeded, stratified cap on train
    #: stratified share of train held out as the "quiz" split (0 = none)
    quiz_fraction: float = option(0.1, ge=0, lt=0.5)
    data_seed: int = option(42, ge=0)  # seed of the cap and the quiz split
    #: stratified share of train held out as the "heldout" split that selects the best epoch
    #: (0 = none; seeded by the cell seed; added after v1 results)
    heldout_fraction: float = option(0.0, ge=0, lt=0.5, id_default=0.0)


@dataclass(frozen=True)
class TextDataOptions(DataOptions):
    """:class:`DataOptions` plus the tokenisation length of text tasks."""

    #: tokens per example (pairs truncated longest-first; 3 are special)
    max_seq_length: int = option(128, ge=4)


@dataclass(frozen=True)
class SourceOptions:
    """Where a task's files come from (tasks that read files or download them)."""

    source: str = "local"  # one of the task's ``sources``
    data_dir: str = ""  # the folder holding the task's files


#: every field name the pipeline owns (a Config defining one must extend the typed base)
PIPELINE_FIELDS = frozenset(f.name for f in dataclasses.fields(TextDataOptions))


def data_options(cfg: Any, *, text: bool, task: str = "") -> DataOptions:
    """The data options of a task Config: ``cfg`` itself when it extends the typed base.

    A Config with no pipeline option at all (e.g. ``NoConfig``) gets the defaults. A Config that
    defines some of them without extending the base is a plugin error (its values would be read
    by name with nothing checking their types), as is a text task without ``max_seq_length``.

    Args:
        cfg: the task's Config instance.
        text: True for a text task (needs :class:`TextDataOptions`).
        task: the task name, for the error message.
    """
    want = TextDataOptions if text else DataOptions
    if isinstance(cfg, want):
        return cfg
    own = sorted(f.name for f in dataclasses.fields(cfg)) if dataclasses.is_dataclass(cfg) else []
    stray = [n for n in own if n in PIPELINE_FIELDS]
    if stray or isinstance(cfg, DataOptions):
        raise PluginError(f"task {task!r}: its Config {type(cfg).__name__} must extend "
                          f"kdbench.{want.__name__} (it defines {', '.join(stray) or 'part of it'})")
    return want()
