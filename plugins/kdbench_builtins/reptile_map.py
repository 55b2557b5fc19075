"""ReptileDistil's parameter map: which teacher parameter each student parameter pulls.

Student layer i of the student's transformer layer list pulls teacher layer(s) ``layer_map(...)[i]``;
every other parameter (embeddings, pooler, head) pulls the teacher parameter of the same name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from kdbench import ConfigError, NotApplicable

#: "picked" pairs student layer i with the teacher layer it was copied from (``picked_layers`` of a
#: pick-layers student); "auto" is "picked" for such students and "skip" (the reference's fixed
#: map) for students built whole; the others are fixed maps by depth
MAPPINGS = ("auto", "picked", "first", "last", "skip", "both")


def _layer_list(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList holding the model's ``num_layers`` transformer layers, with its name."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == num_layers and num_layers > 0:
            if len({type(m) for m in mod}) == 1:
                return name, mod
    return None


def layer_map(strategy: str, n_student: int, n_teacher: int,
              picked: Sequence[int] | None = None) -> dict[int, tuple[int, ...]]:
    """Student layer index -> teacher layer indices (0-based) for a mapping strategy; ``picked``
    is the student's ``picked_layers`` (needed by "picked").

    Raises:
        ConfigError: "picked" for a student that records no picked layers.
        NotApplicable: the depths do not fit the strategy.
    """
    if strategy not in MAPPINGS:
        raise ConfigError(f"teacher_update 'reptile' key 'mapping' must be one of {MAPPINGS}, "
                          f"got {strategy!r}")
    if n_student > n_teacher:
        raise NotApplicable(f"reptile: student has {n_student} layers, teacher only {n_teacher}")
    if strategy == "auto":
        strategy = "skip" if picked is None else "picked"
    if strategy == "picked":
        if picked is None:
            raise ConfigError("teacher_update 'reptile' mapping = \"picked\" needs a student that "
                              "records the teacher layers it was copied from (the pick-layers "
                              "student); set mapping = \"skip\" (the reference's) or \"first\"")
        if len(picked) != n_student or not all(0 <= j < n_teacher for j in picked):
            raise NotApplicable(f"reptile: picked layers {list(picked)} do not fit a {n_student}-layer "
                                f"student of a {n_teacher}-layer teacher")
        return {i: (int(j),) for i, j in enumerate(picked)}
    if strategy == "both":
        if n_teacher != 2 * n_student:
            raise NotApplicable(f"reptile mapping 'both' needs a teacher twice as deep as the "
                                f"student ({n_student} vs {n_teacher} layers). Hint: use 'skip'.")
        return {i: (2 * i, 2 * i + 1) for i in range(n_student)}
    if strategy == "first":
        return {i: (i,) for i in range(n_student)}
    if strategy == "last":
        return {i: (i + n_teacher - n_student,) for i in range(n_student)}
    return {i: ((i + 1) * n_teacher // n_student - 1,) for i in range(n_student)}


def parameter_pairs(student: nn.Module, teacher: nn.Module, strategy: str) -> list[tuple[str, str]]:
    """(student name, teacher name) pairs by structure: layer i of the student's layer list maps
    to the strategy's teacher layer(s); every other parameter maps to the same name.

    Raises:
        NotApplicable: a name has no teacher counterpart or two paired shapes differ.
    """
    s_params, t_params = dict(student.named_parameters()), dict(teacher.named_parameters())
    n_s, n_t = _num_layers(student), _num_layers(teacher)
    s_list, t_list = _layer_list(student, n_s), _layer_list(teacher, n_t)
    mapped: dict[str, list[str]] = {}
    if s_list is not None and t_list is not None:
        (s_pre, s_mods), (t_pre, t_mods) = s_list, t_list
        picked = getattr(student, "picked_layers", None)
        for i, js in layer_map(strategy, len(s_mods), len(t_mods), picked).items():
            for rest, _ in s_mods[i].named_parameters():
                mapped[f"{s_pre}.{i}.{rest}"] = [f"{t_pre}.{j}.{rest}" for j in js]
    pairs = [(n, t) for n in s_params for t in mapped.get(n, [n])]  # student order
    for s_name, t_name in pairs:
        if t_name not in t_params:
            raise NotApplicable(f"reptile: student parameter {s_name!r} has no teacher counterpart "
                                f"{t_name!r}; reptile needs the teacher's architecture. Hint: "
                                "choose a student of the teacher's family and width.")
        s_shape, t_shape = tuple(s_params[s_name].shape), tuple(t_params[t_name].shape)
        if s_shape != t_shape:
            raise NotApplicable(f"reptile: student {s_name!r} {s_shape} and teacher {t_name!r} "
                                f"{t_shape} have mismatched shapes; reptile needs identical shapes. "
                                "Hint: choose a student of the teacher's width.")
    return pairs


def _num_layers(model: nn.Module) -> int:
    """``model.num_layers``, or 0 when the model does not define it."""
    try:
        n: Any = model.num_layers
        return int(n)
    except (NotImplementedError, AttributeError, TypeError):
        return 0
