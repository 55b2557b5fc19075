"""The engine's :class:`kdbench.Artifacts` store: content-keyed tensor files shared by cells
(fine-tuned teachers, Meta-KD's meta-teacher)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from kdbench.engine.checkpoints import CorruptCheckpoint, load_state, save_state
from kdbench.engine.claims import ClaimLock


class ArtifactStore:
    """Content-keyed tensor files shared by cells (``<root>/<key>.safetensors``).

    Entries carry an integrity hash (kdbench.engine.checkpoints): a corrupt entry is rebuilt, never
    trusted. A claim file keeps two workers (two ``kdbench run``, Ray) from building one key at once.
    Keys must hash everything the tensors depend on; :func:`kdbench.engine.checkpoints.tensor_digest`
    hashes tensor contents.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def get_or_build(self, key: str, build: Callable[[], tuple[dict[str, Tensor], dict[str, Any]]],
                     ) -> tuple[dict[str, Tensor], dict[str, Any], bool]:
        """``(tensors, record, cached)``: the stored entry, or ``build()``'s result stored now.

        ``build`` returns tensors and a JSON-able record. Cached tensors are on the CPU.
        """
        path = self.root / f"{key}.safetensors"
        with ClaimLock(path.with_suffix(".lock")):
            if path.exists():
                try:
                    tensors, meta = load_state(path)
                    return tensors, json.loads(meta["record"]), True
                except (CorruptCheckpoint, KeyError, json.JSONDecodeError):
                    path.unlink(missing_ok=True)  # rebuilt below
            tensors, record = build()
            save_state(path, tensors, {"record": json.dumps(record)})
        return tensors, record, False
