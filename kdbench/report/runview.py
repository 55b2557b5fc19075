"""What ``kdbench run`` shows: progress while cells run, one line per finished cell, then the
headline table (stdout) and a one-line summary (stderr).

On a terminal, one overall line counts cells and shows each worker's running cell (its phase and
step, e.g. ``meta-kd toy/reviews s0 meta-teacher 12/96``), and finished cells scroll above it.
Not on a terminal (a log file, CI), only one line per finished cell is written.
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

#: seconds between two redraws of the progress line
REDRAW = 0.2


def duration(seconds: float) -> str:
    """``"8 min 32 s"``, ``"1 h 02 min"`` or ``"12.3 s"``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class RunView:
    """Progress and per-cell lines on stderr for one ``kdbench run``."""

    def __init__(self, suite: str, total: int, tty: bool | None = None) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.total, self.finished_n, self.counts = total, 0, Counter[str]()
        self.t0 = self.drawn = time.perf_counter()
        self.lines: dict[int, str] = {}
        self.bar: Any = None
        if self.tty and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=suite, unit="cell", file=sys.stderr, dynamic_ncols=True)

    def progress(self, worker: int, label: str, done: int, total: int, what: str) -> None:
        """A running cell's progress (``Executor.on_progress``)."""
        if self.bar is None:
            return
        self.lines[worker] = f"{label} {what} {done}/{total}"
        now = time.perf_counter()
        if now - self.drawn >= REDRAW or done >= total:
            self.drawn = now
            self.bar.set_postfix_str(" | ".join(self.lines[k] for k in sorted(self.lines)))

    def finished(self, result: dict[str, Any]) -> None:
        """A cell ended (or was passed over): one line."""
        status = result["status"]
        self.finished_n += 1
        self.counts[status] += 1
        line = f"{status:8s} {result['run_id']}"
        if status in ("ok", "diverged", "failed") and result.get("wall_s"):
            line += f"  {duration(float(result['wall_s']))}"
        if status != "ok" and result.get("reason"):
            line += f"  ({str(result['reason'])[:120]})"
        if self.bar is not None:
            label = f"{result.get('method')} {result.get('task')} s{result.get('seed')} "  # as runner.py names loops
            self.lines = {k: v for k, v in self.lines.items() if not v.startswith(label)}
            self.bar.set_postfix_str(" | ".join(self.lines[k] for k in sorted(self.lines)), refresh=False)
            self.bar.write(f"  {line}")
            self.bar.update(1)
        else:
            print(f"[{self.finished_n}/{self.total}] {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Remove the progress line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self, suite: str, already: int, results_dir: Path, page: Path | None) -> str:
        """One line: cells by status, wall time, where results and page went."""
        c = self.counts
        parts = [f"{c['ok']} ok", f"{c['n-a']} n-a", f"{c['failed']} failed"]
        if c["diverged"]:
            parts.append(f"{c['diverged']} diverged")
        parts.append(f"{c['running']} skipped (running elsewhere)")
        where = f"results {results_dir}/" + (f", page {page}" if page is not None else "")
        return (f"kdbench: {suite}: {', '.join(parts)}, {already} already done; "
                f"{duration(time.perf_counter() - self.t0)} wall; {where}")


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def _compact(rows: list[str]) -> list[str]:
    """A markdown table re-aligned to its content's widths, up to its "Avg" column (the cost
    columns stay on the page)."""
    table = [_cells(r) for r in rows if not set(r.replace("|", "").strip()) <= set(":- ")]
    keep = next((i + 1 for i, c in enumerate(table[0]) if c.startswith("Avg")), len(table[0]))
    table = [[re.sub(r" \[\d+\]$", "", c) for c in r[:keep]] for r in table]  # footnotes are on the page
    widths = [max(len(r[i]) if i < len(r) else 0 for r in table) for i in range(len(table[0]))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip()

    return [fmt(table[0]), "  ".join("-" * w for w in widths), *(fmt(r) for r in table[1:])]


def headline(page: str) -> str:
    """The headline tables of a rendered leaderboard page, compact for a terminal: the first table
    under each best-epoch section (``## ... (best epoch)``) with its heading."""
    out: list[str] = []
    lines = page.splitlines()
    for i, line in enumerate(lines):
        if not (line.startswith("## ") and "(best epoch)" in line):
            continue
        start = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("|")
                      or lines[j].startswith("## ")), len(lines))
        if start == len(lines) or lines[start].startswith("## "):
            continue
        end = next((j for j in range(start, len(lines)) if not lines[j].startswith("|")), len(lines))
        out += ["", line[3:].replace("`", ""), *_compact(lines[start:end])]
    return "\n".join(out).strip("\n")
