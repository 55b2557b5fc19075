"""Peak memory of one cell: CUDA allocator peak, or the process's peak RSS (Linux VmHWM, reset per cell)."""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def status_kb(key: str) -> int:
    """A ``/proc/self/status`` field in kB (0 where unavailable)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(x.split()[1]) for x in lines if x.startswith(key + ":")), 0)


def reset_hwm() -> bool:
    """Reset the process peak RSS (VmHWM) to the current RSS; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def reset_peak(device: torch.device) -> None:
    """Start measuring a new peak on ``device``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_hwm()


def peak_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, else the peak RSS since the last reset (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = status_kb("VmHWM")
    return (hwm or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
