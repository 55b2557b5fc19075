"""Built-in plugin: TensorBoard logging through ``kdbench_log_metrics``.

Active when ``KDBENCH_TENSORBOARD`` names a directory and the optional ``tensorboard`` package is
installed (``pip install kdbench[tensorboard]``). One run directory per cell. Other trackers
(MLflow, W&B) attach the same way from their own plugins; kdbench does not depend on them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kdbench.contract.hookspecs import hookimpl

if TYPE_CHECKING:
    from kdbench.contract.spec import CellSpec

_writers: dict[str, Any] = {}


def _writer(run_id: str) -> Any:
    root = os.environ.get("KDBENCH_TENSORBOARD", "")
    if not root:
        return None
    if run_id not in _writers:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            _writers[run_id] = None
        else:
            _writers[run_id] = SummaryWriter(os.path.join(root, run_id))
    return _writers[run_id]


@hookimpl
def kdbench_log_metrics(spec: CellSpec, step: int, metrics: Mapping[str, float]) -> None:
    """Write scalars to TensorBoard."""
    writer = _writer(spec.run_id)
    if writer is None:
        return
    for key, value in metrics.items():
        writer.add_scalar(key, value, step)
    writer.flush()
