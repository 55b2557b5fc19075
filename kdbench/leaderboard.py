"""Leaderboards: a pure function of result files, rendered to markdown with pandas + tabulate.

One table per student: rows are methods, plus the teacher row and the student-without-KD row
(``no-kd``); columns are each task's primary metric on each eval split, then the average; cells
are ``mean ± std (n)`` over seeds, x100. Cost columns: wall time per cell, training samples/s,
peak memory. Failed and n-a cells become footnotes. A second table gives, for every method, the
paired difference to frozen KD (same task, student and seed) with a bootstrap 95 % interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from kdbench.hookspecs import hookimpl
from kdbench.lazy import lazy_import

if TYPE_CHECKING:
    import pandas as pd
else:
    pd = lazy_import("pandas")

BASELINE = "kd"
ORDER_LAST = ("no-kd", "teacher")
BOOTSTRAP_SAMPLES = 10_000
MIN_SEEDS_FOR_CI = 3  # a percentile bootstrap over fewer paired seeds is degenerate
RANGE_SEEDS = 3  # up to here n^-n > 2.5 %: the percentile interval is [min, max] of the differences


def primary_columns(board: pd.DataFrame, which: str) -> list[tuple[str, str]]:
    """(task, "split/metric") pairs to show: each task's primary metric on each eval split."""
    cols = []
    for task in sorted(board["task"].dropna().unique()):
        rows = board[(board["task"] == task) & (board["status"] == "ok")]
        if rows.empty:
            cols.append((task, ""))
            continue
        r = rows.iloc[0]["result"]
        prim = r.get("protocol", {}).get("selection", "").split("/", 1)[-1]
        keys = sorted({k for res in rows["result"] for k in (res["metrics"].get(which) or {})})
        sel_split = r.get("protocol", {}).get("selection", "").split("/", 1)[0]
        reported = [k for k in keys if not (k.startswith("quiz/") and sel_split == "quiz")]
        picked = [k for k in reported if k.split("/", 1)[-1] == prim] or reported[:1]
        cols += [(task, k) for k in picked]
    return cols


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    arr = 100 * np.asarray(values, dtype=float)
    if len(arr) == 1:
        return f"{arr[0]:.1f} (1)"
    return f"{arr.mean():.1f} ± {arr.std(ddof=1):.1f} ({len(arr)})"


def bootstrap_ci(diffs: np.ndarray, seed: int = 0, n: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the mean of paired differences."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diffs), size=(n, len(diffs)))
    means = diffs[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _value(res: Mapping[str, Any], which: str, key: str) -> float | None:
    v = (res.get("metrics", {}).get(which) or {}).get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def method_table(board: pd.DataFrame, student: str, which: str, notes: list[str]) -> pd.DataFrame:
    """The main table for one student."""
    sub = board[(board["student"] == student) | ((board["method"] == "teacher")
                                                 & board["teacher_name"].isin(
                                                     board[board["student"] == student]["teacher_name"]))]
    cols = primary_columns(sub, which)
    methods = sorted(m for m in sub["method"].unique() if m not in ORDER_LAST)
    methods += [m for m in ORDER_LAST if m in set(sub["method"])]
    rows = []
    for method in methods:
        mrows = sub[sub["method"] == method]
        row: dict[str, Any] = {"Method": method}
        means = []
        for task, key in cols:
            trows = mrows[mrows["task"] == task]
            ok = [v for res in trows[trows["status"] == "ok"]["result"]
                  if (v := _value(res, which, key)) is not None]
            label = f"{task} {key.split('/')[-1] if key else ''}".strip()
            if len({key for _, key in cols if _ == task}) > 1:
                label = f"{task} {key}"
            text = _cell(ok)
            bad = trows[trows["status"] != "ok"]
            if not bad.empty:
                status, reason = bad.iloc[0]["status"], bad.iloc[0]["reason"]
                notes.append(f"{method} on {task}: {status} ({len(bad)}/{len(trows)} cells): {reason}")
                text = f"{text} [{len(notes)}]".strip() if text else f"{status} [{len(notes)}]"
            row[label + " ↑"] = text or "not run"
            if ok:
                means.append(float(np.mean(ok)))
        row["Avg ↑"] = f"{100 * np.mean(means):.1f}" if means and len(means) == len(cols) else ""
        ok_rows = mrows[mrows["status"] == "ok"]
        row["Wall s/cell"] = f"{ok_rows['wall_s'].mean():.0f}" if not ok_rows.empty else ""
        sps = ok_rows["samples_per_s"].dropna()
        row["Train samples/s"] = f"{sps.mean():.0f}" if not sps.empty else ""
        mfu = ok_rows["mfu"].dropna() if "mfu" in ok_rows else ok_rows["wall_s"].iloc[0:0]
        if not mfu.empty:
            row["MFU %"] = f"{100 * mfu.mean():.1f}"
        mem = ok_rows["peak_memory_mb"].dropna()
        row["Peak MB"] = f"{mem.max():.0f}" if not mem.empty and mem.max() > 0 else ""
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def paired_table(board: pd.DataFrame, student: str, which: str) -> pd.DataFrame:
    """Paired mean difference to frozen KD per (method, task), with bootstrap 95 % CI."""
    sub = board[(board["student"] == student) & (board["status"] == "ok")]
    base = sub[sub["method"] == BASELINE]
    rows: list[dict[str, Any]] = []
    if base.empty:
        return pd.DataFrame(rows)
    for method in sorted(set(sub["method"]) - {BASELINE, "teacher"}):
        for task, key in primary_columns(sub, which):
            if not key:
                continue
            pairs = []
            for _, r in sub[(sub["method"] == method) & (sub["task"] == task)].iterrows():
                b = base[(base["task"] == task) & (base["seed"] == r["seed"])]
                if b.empty:
                    continue
                v, bv = _value(r["result"], which, key), _value(b.iloc[0]["result"], which, key)
                if v is not None and bv is not None:
                    pairs.append(v - bv)
            if not pairs:
                continue
            d = 100 * np.asarray(pairs)
            enough = len(d) >= MIN_SEEDS_FOR_CI
            lo, hi = bootstrap_ci(d) if enough else (float("nan"), float("nan"))
            mark = " *" if enough and (lo > 0 or hi < 0) else ""
            rows.append({"Method": method, "Task": f"{task} {key}", "Δ vs kd": f"{d.mean():+.2f}{mark}",
                         "95 % CI": f"[{lo:+.2f}, {hi:+.2f}]" if enough else f"n={len(d)} < {MIN_SEEDS_FOR_CI}",
                         "Seeds": len(d)})
    return pd.DataFrame(rows)


def render_markdown(board: pd.DataFrame, suite: str, meta: Mapping[str, Any]) -> str:
    """The whole leaderboard page for one suite."""
    lines = [f"<!-- generated by `kdbench leaderboard` from {meta.get('source', '?')} "
             f"({len(board)} result files, kdbench {meta.get('kdbench_version', '?')}); do not edit -->",
             f"# {suite} leaderboard", ""]
    if meta.get("description"):
        lines += [str(meta["description"]), ""]
    if board.empty:  # a suite's plan: no kdbench numbers yet
        lines += ["No kdbench results yet: every planned cell below is not run yet. "
                  f"`kdbench run --suite {suite}` runs them and this page then shows their scores.", ""]
        if meta.get("budget"):
            lines += [f"Budget: {meta['budget']}", ""]
        refs = meta.get("reference") or []
        lines += coverage_section(meta.get("coverage"), suite) + (reference_section(refs) or [
            "No reference rows: the suite file lists no published numbers (its comments say why).", ""])
        return "\n".join(lines).rstrip() + "\n"
    seeds = sorted(board["seed"].dropna().unique().tolist())
    selection = sorted({r.get("protocol", {}).get("selection", "") for r in board["result"]} - {""})
    lines += [f"Protocol: scores x100, mean ± sample std over seeds {seeds} (n per cell in brackets). "
              f"**Best epoch** selected on `{', '.join(selection) or '?'}` and reported on the same split "
              "(the GLUE convention); last-epoch tables follow. Every number comes from a result file "
              f"under `{meta.get('source', '?')}`.", ""]
    if meta.get("budget"):
        lines += [f"Budget: {meta['budget']}", ""]
    lines += coverage_section(meta.get("coverage"), suite)
    for which, title in (("best", "best epoch"), ("last", "last epoch")):
        for student in sorted(s for s in board["student"].dropna().unique() if s):
            notes: list[str] = []
            table = method_table(board, student, which, notes)
            if table.empty:
                continue
            r = board[board["student"] == student].iloc[0]["result"]
            cfg = r.get("config", {})
            lines += [f"## Student `{student}` ({title})", "",
                      f"Teacher `{cfg.get('teacher', {}).get('name', '?')}` "
                      f"({cfg.get('teacher', {}).get('kind', '?')}); student: "
                      + " ".join(f"{k}={v}" for k, v in cfg.get("student_model", {}).items() if v not in ("", {}, None))
                      + ".", "",
                      table.to_markdown(index=False, disable_numparse=True), ""]
            lines += [f"[{i}] {n}" for i, n in enumerate(notes, 1)] + ([""] if notes else [])
            if which == "best":
                paired = paired_table(board, student, which)
                if not paired.empty:
                    lines += [f"Paired difference to frozen `kd` (same task, student, seed; x100; "
                              f"bootstrap 95 % CI over seeds, {BOOTSTRAP_SAMPLES} resamples; * = the "
                              "interval excludes 0):", "",
                              paired.to_markdown(index=False, disable_numparse=True), ""]
                    few = sorted({int(n) for n in paired["Seeds"] if MIN_SEEDS_FOR_CI <= n <= RANGE_SEEDS})
                    if few:
                        lines += [f"With {' or '.join(map(str, few))} seeds this interval is exactly the range of the "
                                  "per-seed differences (a resample of n seeds repeats the smallest one with "
                                  "probability n^-n > 2.5 %), so * says every seed moved the same way: a "
                                  "consistency mark, not a 5 % significance test.", ""]
    if meta.get("plot"):
        lines += ["## Score against training cost", "", f"![{suite}: score vs training cost]({meta['plot']})", ""]
    lines += reference_section(meta.get("reference") or [])
    return "\n".join(lines).rstrip() + "\n"


def coverage_section(cov: Mapping[str, Any] | None, suite: str) -> list[str]:
    """How much of the suite's plan has results, and a table of the cells not run yet."""
    if not cov:
        return []
    head = f"Coverage: {cov['done']} of {cov['planned']} planned cells are done (a result file, or n-a by plan)."
    if not cov["missing"]:
        return [head, ""]

    def cell(methods: Mapping[str, list[int]]) -> str:
        by_seeds: dict[tuple[int, ...], list[str]] = {}
        for m, seeds in methods.items():
            by_seeds.setdefault(tuple(seeds), []).append(m)
        return "; ".join(f"{', '.join(ms)} (seeds {', '.join(map(str, sd))})" for sd, ms in by_seeds.items())

    rows = [{"Student": student or "(teacher)", "Task": task, "Not run yet": cell(methods)}
            for (student, task), methods in sorted(cov["missing"].items())]
    return [f"{head} The cells below have no result file yet; `kdbench run --suite {suite}` runs "
            "exactly these (finished cells are skipped).", "",
            pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]


def reference_section(refs: list[Mapping[str, Any]]) -> list[str]:
    """Published numbers, each row marked with its source and whether it was verified."""
    if not refs:
        return []
    cols = sorted({k for r in refs for k in r.get("values", {})})
    rows = [{"Reference row": f"{r.get('row', '?')} [{chr(97 + i)}]",
             **{c: f"{r['values'][c]:.2f}" if c in r.get("values", {}) else "" for c in cols}}
            for i, r in enumerate(refs)]
    out = ["## Reference numbers (published; not produced by kdbench)", "",
           pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
    for i, r in enumerate(refs):
        state = "verified from the source" if r.get("verified") else "UNVERIFIED: see the source"
        out.append(f"[{chr(97 + i)}] {r.get('source', '?')} ({state})")
    return [*out, ""]


def plot_cost(board: pd.DataFrame, suite: str, path: str) -> bool:
    """Primary metric (best epoch, mean over seeds) against training seconds per cell, one marker
    per method and task; saved as PNG. False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = board[(board["status"] == "ok") & (board["method"] != "teacher")]
    points = []
    for (method, task), rows in ok.groupby(["method", "task"]):
        key = rows.iloc[0]["result"].get("protocol", {}).get("selection", "")
        vals = [v for res in rows["result"] if (v := _value(res, "best", key)) is not None]
        secs = rows["train_s"].dropna()
        if vals and not secs.empty:
            points.append((method, task, float(secs.mean()), 100 * float(np.mean(vals))))
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tasks = sorted({p[1] for p in points})
    for method in sorted({p[0] for p in points}):
        mine = [p for p in points if p[0] == method]
        ax.scatter([p[2] for p in mine], [p[3] for p in mine], label=method,
                   marker="os^Dvx+*<>ph"[sorted({q[0] for q in points}).index(method) % 12])
    ax.set_xscale("log")
    ax.set_xlabel("training time per cell (s, log scale)")
    ax.set_ylabel("best-epoch primary metric (x100)")
    ax.set_title(f"{suite}: score vs training cost ({', '.join(tasks)})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return True


@hookimpl(trylast=True)
def kdbench_render_leaderboard(board: pd.DataFrame, suite: str, meta: Mapping[str, Any]) -> str:
    """Default markdown renderer."""
    return render_markdown(board, suite, meta)
