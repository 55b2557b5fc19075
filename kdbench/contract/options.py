"""Options of a component's ``Config``: declared checks, one validation hook, run-id identity.

A component (task, model kind, student kind, loss, teacher-update rule, executor) describes its
options as a frozen dataclass, ``Config``. The host checks every option *before any training*:

* **Types** come from the annotations; ``Literal["adamw", "sgd"]`` makes a typed choice whose
  wrong values are reported with the allowed ones and a did-you-mean.
* **Ranges** are declared with :func:`option`::

      @dataclass(frozen=True)
      class Config:
          temperature: float = kdbench.option(4.0, gt=0)          # > 0
          alpha: float = kdbench.option(0.5, ge=0, le=1)          # in [0, 1]
          soft_loss: Literal["kl", "prob_mse"] = "kl"             # a typed choice

* **Anything else** (a rule that involves several options, a path that must exist) goes in one
  hook: a ``validate(self)`` method on the Config that returns the problems as strings (or raises
  ``ValueError``/``kdbench.ConfigError``). It runs at plan time, after types and ranges passed::

          def validate(self) -> list[str]:
              return ["every must divide inner_steps"] if self.inner_steps % self.every else []

The host prefixes each problem with where the option was set (``[loss.kd] temperature: ...``) and
reports every problem of the whole suite at once (exit code 6). A ``ValueError`` raised by the
dataclass itself (``__post_init__``) is reported the same way, never as a traceback.

**Run ids** hash every option. Two kinds of metadata leave a field out:
``option(..., execution_only=True)`` (how a cell runs, not what it computes: device, threads,
log cadence) and ``option(..., id_default=value)`` (an option added after results were published:
left out of the id while it equals ``value``, so those results keep their ids).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal

from kdbench.contract.errors import KdbenchError
from kdbench.contract.registry import suggest

_MISSING: Any = object()
_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def option(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, execution_only: bool = False, id_default: Any = _MISSING,
           help: str = "") -> Any:
    """A dataclass field with declared bounds and run-id metadata (see the module docstring).

    Bounds apply to numbers and to every item of a tuple/list of numbers. A mutable default
    (list, dict) is not allowed: use a tuple.
    """
    meta: dict[str, Any] = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if execution_only:
        meta["execution_only"] = True
    if id_default is not _MISSING:
        meta["id_default"] = id_default
    if help:
        meta["help"] = help
    return dataclasses.field(default=default, metadata=meta)


def device_problem(key: str, name: str) -> str | None:
    """Why ``name`` is not a device kdbench accepts (``train.device``, ``--device``), or None."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name):
        return None
    return f"{key} = {name!r} is not allowed; use auto, cpu, cuda, cuda:N or mps"


def type_name(tp: Any) -> str:
    """A readable name of an annotation: ``float``, ``one of 'a', 'b'``, ``tuple[int, ...]``."""
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (tuple, list):
        return f"a list of {type_name(typing.get_args(tp)[0]) if typing.get_args(tp) else 'values'}"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against the annotation ``tp``; ints widen to floats, lists to tuples."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if tp is type(None):
        return value is None, value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = []
        for v in value:
            ok, out = coerce(v, args[0] if args else Any)
            if not ok:
                return False, value
            items.append(out)
        return True, tuple(items) if origin is tuple else items
    if origin is dict:
        return isinstance(value, dict), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp in (bool, str):
        return isinstance(value, tp), value
    return isinstance(value, tp) if isinstance(tp, type) else True, value


def type_problem(key: str, value: Any, tp: Any) -> str:
    """The message for a value of the wrong type or outside a typed choice."""
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    choices = [str(a) for m in members if typing.get_origin(m) is Literal for a in typing.get_args(m)]
    if choices and isinstance(value, str):
        return f"{key} = {value!r} is not allowed; use {type_name(tp)}.{suggest(value, choices)}"
    return (f"{key} expects {type_name(tp)}, got {type(value).__name__} ({value!r}). "
            "Hint: in TOML, write numbers and booleans without quotes")


def bound_problems(cfg: Any) -> list[str]:
    """Problems with the declared bounds of ``cfg``'s fields (``option(ge=..., ...)``)."""
    problems = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        for key, (sym, ok) in _BOUNDS.items():
            if key not in f.metadata:
                continue
            bad = [v for v in values if isinstance(v, (int, float)) and not ok(v, f.metadata[key])]
            if bad:
                problems.append(f"{f.name} = {value!r} must be {sym} {f.metadata[key]:g}")
    return problems


def validate_config(cfg: Any) -> list[str]:
    """Bounds, then the Config's own ``validate()`` hook; every problem as a string."""
    if not dataclasses.is_dataclass(cfg):
        return []
    problems = bound_problems(cfg)
    hook = getattr(cfg, "validate", None)
    if problems or not callable(hook):
        return problems
    try:
        return [str(p) for p in (hook() or [])]
    except (ValueError, KdbenchError) as exc:
        return [str(exc)]


def identity(cfg: Any) -> dict[str, Any]:
    """The JSON-able fields of ``cfg`` that determine a result (what run ids and cache keys hash):
    all fields except ``execution_only`` ones and ``id_default`` ones at that default."""
    if not dataclasses.is_dataclass(cfg):
        return {}
    out = {}
    for f in dataclasses.fields(cfg):
        value = jsonable(getattr(cfg, f.name))
        if f.metadata.get("execution_only"):
            continue
        if "id_default" in f.metadata and value == jsonable(f.metadata["id_default"]):
            continue
        out[f.name] = value
    return out


def as_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-able dict of a Config dataclass (every field)."""
    if not dataclasses.is_dataclass(cfg):
        return {}
    return {f.name: jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def jsonable(value: Any) -> Any:
    """Tuples as lists, dict keys as strings, recursively."""
    if isinstance(value, tuple | list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value
