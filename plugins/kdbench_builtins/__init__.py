"""kdbench built-in plugins: tasks, models, students, losses, teacher-update rules, methods.

They use exactly the hooks a third-party plugin uses (see kdbench/contract/hookspecs.py). The host
loads the modules ``PLUGINS`` lists, in that order, each under its module name (so
``-p no:kdbench_builtins.metakd`` blocks one); it names none of them itself.
"""

from __future__ import annotations

PLUGINS = (
    "kdbench_builtins.tasks_glue",
    "kdbench_builtins.tasks_amazon",
    "kdbench_builtins.tasks_cifar100",
    "kdbench_builtins.tasks_toy",
    "kdbench_builtins.models_text",
    "kdbench_builtins.models_vision",
    "kdbench_builtins.students",
    "kdbench_builtins.losses",
    "kdbench_builtins.frozen",
    "kdbench_builtins.metadistil",
    "kdbench_builtins.reptile",
    "kdbench_builtins.metakd",
    "kdbench_builtins.executor_ray",
)
