"""Named registries with collision errors, did-you-mean and origins."""

from __future__ import annotations

import difflib
import inspect
import sys
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from kdbench.contract.errors import DuplicateNameError, UnknownNameError

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class Registrar(Protocol[T_contra]):
    """The ``register`` callable handed to ``kdbench_register_*`` hooks."""

    def __call__(self, obj: T_contra, *, name: str | None = None) -> object:
        """Register ``obj`` under ``name`` (default: ``obj.name``)."""
        ...


def suggest(name: str, choices: list[str]) -> str:
    """Return "Did you mean ...?" for the closest of ``choices``, or "" if none is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _origin_of(obj: object) -> str:
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):  # an instance: where register() was called
        frame = sys._getframe(2)
        return f"{frame.f_code.co_filename}:{frame.f_lineno}"
    target = obj
    try:
        path = inspect.getsourcefile(target)  # type: ignore[arg-type]
        _, line = inspect.getsourcelines(target)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return getattr(target, "__module__", "?")
    return f"{path}:{line}"


class Registry(Generic[T]):
    """Maps names to components for one kind (``kind`` is used in messages, e.g. "method")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._plugins: dict[str, str] = {}
        self.current_plugin = "?"  # set by the host while a plugin's register hook runs
        self._frozen = False

    def add(self, obj: T, *, name: str | None = None) -> T:
        """Register ``obj``; a second registration of the same name is an error."""
        if self._frozen:
            raise DuplicateNameError(f"{self.kind} registry is frozen; register from a hook")
        key = name if name is not None else getattr(obj, "name", None)
        if not isinstance(key, str) or not key:
            raise DuplicateNameError(
                f"{self.kind} {obj!r} from plugin {self.current_plugin!r} has no name; "
                "set a `name` attribute or pass name=..."
            )
        origin = _origin_of(obj)
        if key in self._items and self._items[key] is not obj:
            raise DuplicateNameError(
                f"{self.kind} {key!r} is already registered ({self._origins[key]}, plugin "
                f"{self._plugins[key]!r}); second registration from {origin} (plugin "
                f"{self.current_plugin!r}). Hint: rename one, or skip a plugin with "
                f"-p no:{self.current_plugin}"
            )
        self._items[key] = obj
        self._origins[key] = origin
        self._plugins[key] = self.current_plugin
        return obj

    __call__ = add

    def get(self, name: str) -> T:
        """Return the component called ``name`` or raise a did-you-mean error."""
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown(name)) from None

    def unknown(self, name: str) -> str:
        """The message for an unknown ``name``."""
        names = sorted(self._items)
        return (
            f"unknown {self.kind} {name!r};{suggest(name, names)} "
            f"Available: {', '.join(names) or '(none)'}"
        )

    def origin(self, name: str) -> str:
        """Source location where ``name`` was defined."""
        return self._origins[name]

    def plugin(self, name: str) -> str:
        """Name of the plugin that registered ``name``."""
        return self._plugins[name]

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def freeze(self) -> None:
        """Refuse further registrations."""
        self._frozen = True

    def as_mapping(self) -> dict[str, T]:
        """A read-only view's worth of the entries (a new dict)."""
        return dict(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
