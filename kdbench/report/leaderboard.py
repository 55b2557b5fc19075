"""Leaderboard tables: pure functions of a board (one row per result file), no plugins.

One table per student and epoch choice: rows are methods, plus the teacher row, the
student-without-KD row (the plan's ``no_kd_method``, listed last) and, when the result files record
it, the trivial predictor (``result["baseline"]``); columns are each task's primary metric on each reported split, then the
average; cells are ``mean ± std (n)`` over seeds, x100. Cost columns: wall time per cell, training
samples/s, peak memory. A task where the teacher cannot teach (``no_headroom``) stays visible but
is left out of the average and of the paired marks. A paired table gives every method's difference
to the suite's reference method (the plan's ``baseline_method``; same task, student and seed) with a bootstrap 95 % interval, a
teacher-after table shows what methods that move the teacher did to it, and a convergence table
what each cell's last epoch still changed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kdbench.contract.lazy import lazy_import
from kdbench.contract.spec import TEACHER

if TYPE_CHECKING:
    import pandas as pd
else:
    pd = lazy_import("pandas")

TRIVIAL = "trivial baseline"
BOOTSTRAP_SAMPLES = 10_000
MIN_SEEDS_FOR_CI = 3  # a percentile bootstrap over fewer paired seeds is degenerate
RANGE_SEEDS = 3  # up to here n^-n > 2.5 %: the percentile interval is [min, max] of the differences
CLAIM_SEEDS = RANGE_SEEDS + 1  # fewest paired seeds on which a published claim is judged
HIDDEN_SPLITS = ("heldout", "quiz")  # carved from train for selection / meta-learning, never reported
TEACHER_OVER_TRIVIAL = 5.0  # x100 points: a teacher this close to the trivial predictor learnt nothing
TEACHER_OVER_NO_KD = 1.0  # x100 points: a student alone this close to the teacher has nothing to learn
NO_HEADROOM = "†"
STILL_CLIMBING = 0.5  # x100 points: a last epoch that adds this much on average means an unconverged student

Columns = list[tuple[str, str]]


def method_order(methods: Iterable[str], no_kd: str = "") -> list[str]:
    """Methods sorted by name, then the no-KD method ``no_kd`` (when given), then the teacher row."""
    names = set(methods)
    last = [m for m in (no_kd, TEACHER) if m and m in names]
    return sorted(names - set(last)) + last


def selection(res: Mapping[str, Any]) -> str:
    """The ``split/metric`` a result selected its best epoch on."""
    return str(res.get("protocol", {}).get("selection", ""))


def primary_columns(board: pd.DataFrame, which: str = "best") -> Columns:
    """(task, "split/metric") pairs to show: each task's primary metric on each reported split
    (the held-out and quiz splits used for selection are not reported)."""
    cols: Columns = []
    for task in sorted(board["task"].dropna().unique()):
        rows = board[(board["task"] == task) & (board["status"] == "ok")]
        if rows.empty:
            cols.append((task, ""))
            continue
        prim = selection(rows.iloc[0]["result"]).split("/", 1)[-1]
        keys = sorted({k for res in rows["result"] for k in (res["metrics"].get(which) or {})})
        reported = [k for k in keys if k.split("/", 1)[0] not in HIDDEN_SPLITS] or keys
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


def _number(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def value(res: Mapping[str, Any], which: str, key: str) -> float | None:
    """One metric of one result: ``which`` is best (the suite's selection), best_on_dev or last.
    Old files have no ``best_on_dev``: their ``best`` stands in when it was selected on dev."""
    metrics = res.get("metrics", {})
    if which == "best_on_dev" and "best_on_dev" not in metrics:
        which = "best" if selection(res).startswith("dev/") else "best_on_dev"
    return _number((metrics.get(which) or {}).get(key))


def _values(rows: pd.DataFrame, which: str, key: str) -> list[float]:
    return [v for res in rows[rows["status"] == "ok"]["result"] if (v := value(res, which, key)) is not None]


def student_rows(board: pd.DataFrame, student: str) -> pd.DataFrame:
    """The student's cells and the teacher cells of its teachers."""
    teachers = board[board["student"] == student]["teacher_name"]
    return board[(board["student"] == student) | ((board["method"] == TEACHER) & board["teacher_name"].isin(teachers))]


def trivial_scores(rows: pd.DataFrame, task: str, key: str) -> list[float]:
    """The trivial predictor's score on ``key``, one per seed (any cell of the seed records it)."""
    per_seed: dict[Any, float] = {}
    for _, r in rows[(rows["task"] == task) & (rows["status"] == "ok")].iterrows():
        v = _number((r["result"].get("baseline") or {}).get(key))
        if v is not None:
            per_seed.setdefault(r["seed"], v)
    return [per_seed[s] for s in sorted(per_seed)]


def no_headroom(sub: pd.DataFrame, cols: Columns, no_kd: str = "") -> dict[tuple[str, str], str]:
    """Columns where KD has nothing to show, with the reason (headline numbers, x100): the teacher
    is within TEACHER_OVER_TRIVIAL points of the trivial predictor, or the no-KD method ``no_kd``
    (when given) within TEACHER_OVER_NO_KD points of the teacher."""
    out = {}
    for task, key in cols:
        rows = sub[sub["task"] == task]
        teacher = _values(rows[rows["method"] == TEACHER], "best", key)
        if not key or not teacher:
            continue
        t = 100 * float(np.mean(teacher))
        trivial = trivial_scores(rows, task, key)
        alone = _values(rows[rows["method"] == no_kd], "best", key) if no_kd else []
        if trivial and t - 100 * float(np.mean(trivial)) <= TEACHER_OVER_TRIVIAL:
            out[(task, key)] = (f"the teacher ({t:.1f}) is within {TEACHER_OVER_TRIVIAL:g} points of the trivial "
                                f"baseline ({100 * float(np.mean(trivial)):.1f})")
        elif alone and t - 100 * float(np.mean(alone)) <= TEACHER_OVER_NO_KD:
            out[(task, key)] = (f"{no_kd} ({100 * float(np.mean(alone)):.1f}) is within "
                                f"{TEACHER_OVER_NO_KD:g} point of the teacher ({t:.1f})")
    return out


def _label(cols: Columns, task: str, key: str, flagged: bool) -> str:
    label = f"{task} {key.split('/')[-1] if key else ''}".strip()
    if len({k for t, k in cols if t == task}) > 1:
        label = f"{task} {key}"
    return f"{label} ↑" + (f" {NO_HEADROOM}" if flagged else "")


def _cost(row: dict[str, Any], ok_rows: pd.DataFrame) -> None:
    row["Wall s/cell"] = f"{ok_rows['wall_s'].mean():.0f}" if not ok_rows.empty else ""
    sps = ok_rows["samples_per_s"].dropna()
    row["Train samples/s"] = f"{sps.mean():.0f}" if not sps.empty else ""
    mfu = ok_rows["mfu"].dropna() if "mfu" in ok_rows else ok_rows["wall_s"].iloc[0:0]
    if not mfu.empty:
        row["MFU %"] = f"{100 * mfu.mean():.1f}"
    mem = ok_rows["peak_memory_mb"].dropna()
    row["Peak MB"] = f"{mem.max():.0f}" if not mem.empty and mem.max() > 0 else ""


def method_table(board: pd.DataFrame, student: str, which: str, notes: list[str],
                 cols: Columns | None = None, flagged: Mapping[tuple[str, str], str] | None = None,
                 no_kd: str = "") -> pd.DataFrame:
    """The main table for one student, rows in :func:`method_order` (``no_kd``: the no-KD method's
    name, listed after the others); ``flagged`` columns (no headroom) are left out of Avg."""
    sub = student_rows(board, student)
    cols = primary_columns(sub) if cols is None else cols
    flagged = flagged or {}
    methods = method_order(sub["method"].unique(), no_kd)
    rows = []
    for method in methods:
        mrows = sub[sub["method"] == method]
        row: dict[str, Any] = {"Method": method}
        means = []
        for task, key in cols:
            trows = mrows[mrows["task"] == task]
            ok = _values(trows, which, key)
            text = _cell(ok)
            bad = trows[trows["status"] != "ok"]
            if not bad.empty:
                status, reason = bad.iloc[0]["status"], bad.iloc[0]["reason"]
                notes.append(f"{method} on {task}: {status} ({len(bad)}/{len(trows)} cells): {reason}")
                text = f"{text} [{len(notes)}]".strip() if text else f"{status} [{len(notes)}]"
            row[_label(cols, task, key, (task, key) in flagged)] = text or "not run"
            if ok and (task, key) not in flagged:
                means.append(float(np.mean(ok)))
        counted = len(cols) - len(flagged)
        row["Avg ↑"] = f"{100 * np.mean(means):.1f}" if means and len(means) == counted else ""
        _cost(row, mrows[mrows["status"] == "ok"])
        rows.append(row)
    trivial = {_label(cols, t, k, (t, k) in flagged): _cell(trivial_scores(sub, t, k)) for t, k in cols}
    if any(trivial.values()):
        rows.append({"Method": TRIVIAL, **trivial})
    return pd.DataFrame(rows).fillna("")


def paired_diffs(sub: pd.DataFrame, method: str, base_method: str, task: str, key: str, which: str) -> np.ndarray:
    """``method`` minus ``base_method`` on ``task``'s ``key``, x100, one entry per seed both have (``sub``:
    one student's ok cells)."""
    base = sub[(sub["method"] == base_method) & (sub["task"] == task)]
    pairs = []
    for _, r in sub[(sub["method"] == method) & (sub["task"] == task)].iterrows():
        b = base[base["seed"] == r["seed"]]
        if b.empty:
            continue
        v, bv = value(r["result"], which, key), value(b.iloc[0]["result"], which, key)
        if v is not None and bv is not None:
            pairs.append(v - bv)
    return 100 * np.asarray(pairs, dtype=float)


def _interval(d: np.ndarray) -> tuple[bool, float, float, str]:
    """(enough seeds, low, high, the CI cell) of paired differences ``d``."""
    if len(d) < MIN_SEEDS_FOR_CI:
        return False, float("nan"), float("nan"), f"n={len(d)} < {MIN_SEEDS_FOR_CI}"
    lo, hi = bootstrap_ci(d)
    return True, lo, hi, f"[{lo:+.2f}, {hi:+.2f}]"


def paired_table(board: pd.DataFrame, student: str, which: str, base_method: str,
                 flagged: Mapping[tuple[str, str], str] | None = None) -> pd.DataFrame:
    """Paired mean difference to ``base_method`` per (method, task), with bootstrap 95 % CI; no
    * mark on flagged (no-headroom) tasks."""
    sub = board[(board["student"] == student) & (board["status"] == "ok")]
    rows: list[dict[str, Any]] = []
    if base_method not in set(sub["method"]):
        return pd.DataFrame(rows)
    for method in sorted(set(sub["method"]) - {base_method, TEACHER}):
        for task, key in primary_columns(sub):
            d = paired_diffs(sub, method, base_method, task, key, which) if key else np.zeros(0)
            if not len(d):
                continue
            enough, lo, hi, ci = _interval(d)
            skip = (task, key) in (flagged or {})
            mark = " *" if enough and not skip and (lo > 0 or hi < 0) else ""
            rows.append({"Method": method, "Task": f"{task} {key}" + (f" {NO_HEADROOM}" if skip else ""),
                         f"Δ vs {base_method}": f"{d.mean():+.2f}{mark}", "95 % CI": ci, "Seeds": len(d)})
    return pd.DataFrame(rows)


def claims_table(board: pd.DataFrame, student: str, which: str, claims: Sequence[Mapping[str, str]],
                 flagged: Mapping[tuple[str, str], str] | None = None) -> pd.DataFrame:
    """Each published claim "``method`` beats ``over``" per task, tested on paired seeds: it holds
    when the bootstrap 95 % interval of ``method`` - ``over`` lies above 0, is reversed when it lies
    below, and is not shown otherwise; with fewer than :data:`CLAIM_SEEDS` paired seeds (where the
    interval is no more than the range of the differences) or on a no-headroom task it is not
    judged. A verdict names a side whose last epoch still added :data:`STILL_CLIMBING` points or more
    on average (its student was cut short by the budget). A claim with no paired cell yet gets one
    "not run" row."""
    sub = board[(board["student"] == student) & (board["status"] == "ok")]
    rows: list[dict[str, Any]] = []
    for i, claim in enumerate(claims):
        method, over = claim["method"], claim["over"]
        name, found = f"{method} > {over} [{chr(97 + i)}]", False
        for task, key in primary_columns(sub):
            d = paired_diffs(sub, method, over, task, key, which) if key else np.zeros(0)
            if not len(d):
                continue
            found = True
            _, lo, hi, ci = _interval(d)
            if (task, key) in (flagged or {}):
                verdict = "not judged (no headroom)"
            elif len(d) < CLAIM_SEEDS:
                verdict = f"open ({len(d)} of {CLAIM_SEEDS}+ seeds)"
            else:
                verdict = "holds" if lo > 0 else "reversed" if hi < 0 else "not shown (CI includes 0)"
            climbing = [m for m in (method, over)
                        if (ch := last_epoch_changes(sub, m, task, key)[1]) and np.mean(ch) >= STILL_CLIMBING]
            verdict += f"; {' and '.join(climbing)} still climbing ↗" if climbing else ""
            rows.append({"Claim": name, "Task": f"{task} {key}", "Δ": f"{d.mean():+.2f}",
                         "95 % CI": ci, "Seeds": len(d), "Verdict": verdict})
        if not found:
            rows.append({"Claim": name, "Task": "", "Δ": "", "95 % CI": "", "Seeds": 0, "Verdict": "not run"})
    return pd.DataFrame(rows)


def _mean(values: Sequence[float], fmt: str) -> str:
    return format(float(np.mean(values)), fmt) if values else ""


def retrained_teachers(board: pd.DataFrame, student: str, cols: Columns) -> list[tuple[str, str, Any, float, float]]:
    """Cells whose own teacher scored differently from the teacher row of their task and seed:
    ``(method, task, seed, the cell's teacher, the teacher cell)`` x100 on the column's key. The
    teacher checkpoint lives in the local cache, so a cell run on another machine retrains it, and
    another CPU model rounds differently; every result file records the teacher it used."""
    sub = student_rows(board, student)
    ok = sub[sub["status"] == "ok"]
    teachers = {(r["task"], r["seed"], r["teacher_name"]): r["result"] for _, r in ok[ok["method"] == TEACHER].iterrows()}
    out = []
    for task, key in cols:
        for _, r in ok[(ok["method"] != TEACHER) & (ok["task"] == task)].iterrows():
            ref = teachers.get((task, r["seed"], r["teacher_name"]))
            own = _number((((r["result"].get("teacher") or {}).get("metrics") or {}).get("best") or {}).get(key))
            row = value(ref, "best", key) if ref is not None else None
            if own is not None and row is not None and own != row:
                out.append((str(r["method"]), task, r["seed"], 100 * own, 100 * row))
    return sorted(out, key=lambda t: (t[1], str(t[2]), t[0]))


def teacher_after_table(board: pd.DataFrame, student: str, cols: Columns, no_kd: str = "") -> pd.DataFrame:
    """For methods whose rule changed the teacher (non-zero parameter drift; not the teacher row,
    nor the no-KD method ``no_kd``): the live teacher's score at the end (next to the fine-tuned
    teacher it started from), its mean KL to that start (mean squared prediction difference for
    regression) and its parameter drift, as the engine's diagnostics record them."""
    sub = student_rows(board, student)
    ok = sub[sub["status"] == "ok"]
    rows: list[dict[str, Any]] = []
    for method in sorted(set(ok["method"].unique()) - {TEACHER, no_kd}):
        for task, key in cols:
            cells = [r for r in ok[(ok["method"] == method) & (ok["task"] == task)]["result"]
                     if r.get("teacher_after")]
            drift = [a for r in cells if (a := _number(r["teacher_after"].get("teacher/drift"))) is not None]
            if not cells or not key or not any(drift):  # a frozen teacher drifts by exactly 0
                continue
            split = key.split("/")[0]
            after = [a for r in cells if (a := _number(r["teacher_after"].get(f"teacher/{key}"))) is not None]
            seeds = {r.get("seed") for r in cells}  # the teachers these cells started from
            start = _values(ok[(ok["method"] == TEACHER) & (ok["task"] == task) & ok["seed"].isin(seeds)], "best", key)
            kl = [a for r in cells for name in ("kl", "sq_diff")  # sq_diff: regression
                  if (a := _number(r["teacher_after"].get(f"teacher/{split}/{name}"))) is not None]
            rows.append({"Method": method, "Task": f"{task} {key}", "Teacher at start": _cell(start),
                         "Teacher after": _cell(after), "KL to start": _mean(kl, ".3g"),
                         "Param drift": _mean(drift, ".3g"), "Seeds": len(cells)})
    return pd.DataFrame(rows)


def last_epoch_changes(ok: pd.DataFrame, method: str, task: str, key: str) -> tuple[list[Any], list[float]]:
    """``method``'s result files on ``task`` with at least two epochs of history (``ok``: finished
    cells), and how much their last epoch changed ``key`` (x100)."""
    cells = [r for r in ok[(ok["method"] == method) & (ok["task"] == task)]["result"]
             if len(r.get("history") or []) >= 2 and key]
    return cells, [100 * (a - b) for r in cells
                   if (a := _number(r["history"][-1].get(key))) is not None
                   and (b := _number(r["history"][-2].get(key))) is not None]


def convergence_table(board: pd.DataFrame, student: str, cols: Columns, no_kd: str = "") -> pd.DataFrame:
    """Per method and column: epochs run, the mean (1-based) epoch the selection split chose, the
    column's metric after the first epoch and the last epoch's change of it (x100, means over seeds,
    from the per-epoch history);
    a mean change of at least STILL_CLIMBING points is marked: the budget stopped a student that was
    still improving."""
    sub = student_rows(board, student)
    ok = sub[(sub["status"] == "ok") & (sub["method"] != TEACHER)]
    rows: list[dict[str, Any]] = []
    for method in method_order(ok["method"].unique(), no_kd):
        for task, key in cols:
            cells, deltas = last_epoch_changes(ok, method, task, key)
            if not deltas:
                continue
            best = [int(r["protocol"]["best_epoch"]) + 1 for r in cells if "best_epoch" in (r.get("protocol") or {})]
            first = [100 * a for r in cells if (a := _number(r["history"][0].get(key))) is not None]
            mean = float(np.mean(deltas))
            rows.append({"Method": method, "Task": f"{task} {key}",
                         "Epochs": "/".join(sorted({str(len(r["history"])) for r in cells})),
                         "Selected epoch": _mean(best, ".1f"), "First epoch": _mean(first, ".1f"),
                         "Last-epoch Δ": f"{mean:+.1f}" + (" ↗" if mean >= STILL_CLIMBING else ""),
                         "Seeds": len(deltas)})
    return pd.DataFrame(rows)
