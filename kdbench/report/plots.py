"""Score against training cost: one panel per task, the cost the tables show (wall seconds per
cell), the legend outside the data. Rendered with matplotlib's Agg backend (no display)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from kdbench.contract.spec import TEACHER
from kdbench.report.leaderboard import method_order, primary_columns, trivial_scores, value

if TYPE_CHECKING:
    import pandas as pd

MARKERS = "o^sDvP*X<>ph"


def _points(board: pd.DataFrame, task: str, key: str) -> list[tuple[str, str, float, float]]:
    """(method, student, mean wall s/cell, mean headline score x100) for the task's method cells."""
    ok = board[(board["status"] == "ok") & (board["task"] == task) & (board["method"] != TEACHER)]
    out = []
    for (method, student), rows in ok.groupby(["method", "student"]):
        vals = [v for res in rows["result"] if (v := value(res, "best", key)) is not None]
        secs = rows["wall_s"].dropna()
        if vals and not secs.empty:
            out.append((str(method), str(student), float(secs.mean()), 100 * float(np.mean(vals))))
    return out


def _reference_lines(ax: Any, board: pd.DataFrame, task: str, key: str) -> None:
    teacher = board[(board["status"] == "ok") & (board["task"] == task) & (board["method"] == TEACHER)]
    scores = [v for res in teacher["result"] if (v := value(res, "best", key)) is not None]
    if scores:
        ax.axhline(100 * float(np.mean(scores)), color="0.3", ls="--", lw=1, label="teacher")
    trivial = trivial_scores(board, task, key)
    if trivial:
        ax.axhline(100 * float(np.mean(trivial)), color="0.6", ls=":", lw=1, label="trivial baseline")


def plot_cost(board: pd.DataFrame, suite: str, path: str, no_kd: str = "") -> bool:
    """Headline metric (mean over seeds, x100) against wall seconds per cell (log scale), one panel
    per task, one colour per method (in :func:`method_order`: the no-KD method ``no_kd`` last), one
    marker per student; the teacher and the trivial predictor as horizontal lines. Saved as PNG;
    False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    panels = [(task, key, pts) for task, key in primary_columns(board) if key and (pts := _points(board, task, key))]
    if not panels:
        return False
    methods = method_order({p[0] for _, _, pts in panels for p in pts}, no_kd)
    students = sorted({p[1] for _, _, pts in panels for p in pts})
    colors = matplotlib.colormaps["tab10"]
    ncols = 2 if len(panels) == 4 else min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False)
    for ax, (task, key, pts) in zip(axes.flat, panels, strict=False):
        for method, student, secs, score in pts:
            ax.scatter(secs, score, color=colors(methods.index(method) % 10),
                       marker=MARKERS[students.index(student) % len(MARKERS)], s=36, zorder=3)
        _reference_lines(ax, board, task, key)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(f"{task} ({key.split('/')[-1]})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both", lw=0.5)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("best-epoch score (x100)", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("wall s per cell (log)", fontsize=8)
    handles = [plt.Line2D([], [], ls="", marker="o", color=colors(i % 10), label=m) for i, m in enumerate(methods)]
    if len(students) > 1:
        handles += [plt.Line2D([], [], ls="", marker=MARKERS[i % len(MARKERS)], color="0.2", label=f"student {s}")
                    for i, s in enumerate(students)]
    lines = {str(h.get_label()): h for ax in axes.flat for h in ax.get_lines()}
    handles += [lines[name] for name in ("teacher", "trivial baseline") if name in lines]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle(f"{suite}: score vs training cost", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return True
