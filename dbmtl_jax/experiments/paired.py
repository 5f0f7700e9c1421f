"""Paired per-seed comparisons of methods and the convergence figures every table reports.

Seeds are paired across methods (same initialisation and batch order), so two
methods are compared by the per-seed differences of their Δp (Lin et al.,
Eq. 3–4; every run against the STL row's metrics averaged over its seeds, so
the reference is common to all seeds and cancels in a difference) rather than
by their means: ``d_s = Δp_a(s) − Δp_b(s)`` over the
seeds both ran, reported as ``mean(d) ± t_{0.975, n−1} · sd(d) / √n``.  Rows are
ranked by the ranks these intervals allow: a row's *rank range* runs from one
plus the number of rows separated above it (paired interval excluding 0) to
the number of rows minus those separated below it; rows whose ranges start at 1
(no row separated above them) are the top group.

Across settings (one change of the recipe or optimizer, e.g. Adam's b1 = 0.9 → 0): a row's *gain* is its
per-seed Δp under the changed setting minus its Δp under the first, both against one STL; the
*interaction* of two rows is the paired difference of their gains (does the change help one row more
than the other?).

Convergence (the study protocol of results/README.md): the share of runs
whose validation-selected epoch lies in the last 20 % of training; the
relative change of the summed training loss over the last 20 % of epochs;
and the share of the run's whole training-loss decrease that falls in its last
20 % of epochs, which stays meaningful where the loss goes to zero
geometrically (memorisation), where the relative change never becomes small.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from dbmtl_jax.experiments.reselect import last_epochs
from dbmtl_jax.experiments.report import (Row, Setting, device_text, optimizer_text, rebase_delta_p, runs_delta_p,
                                          schedule_text, setting_title, signed, wall_time_by_device)

__all__ = [
    "PairedInterval",
    "t_quantile_975",
    "paired_interval",
    "rank_ranges",
    "order_rows",
    "rank_text",
    "selected_late",
    "late_task_selections",
    "summed_train_loss",
    "loss_change_last_fifth",
    "loss_share_last_fifth",
    "convergence_line",
    "paired_table_markdown",
    "borrow_stl",
    "stl_donor",
    "reference_stl",
    "find_row",
    "check_split",
    "paired_report",
    "across_settings_report",
]

# Two-sided 95 % quantiles t_{0.975, df} of Student's t for df = 1 … 30, to 5 decimals (so that a printed
# 2-decimal bound is the exact interval's rounding).
_T975 = (12.70620, 4.30265, 3.18245, 2.77645, 2.57058, 2.44691, 2.36462, 2.30600, 2.26216, 2.22814, 2.20099,
         2.17881, 2.16037, 2.14479, 2.13145, 2.11991, 2.10982, 2.10092, 2.09302, 2.08596, 2.07961, 2.07387,
         2.06866, 2.06390, 2.05954, 2.05553, 2.05183, 2.04841, 2.04523, 2.04227)


def t_quantile_975(df: int) -> float:
    """``t_{0.975, df}``: tabulated to df = 30, then the Cornish–Fisher expansion around the normal
    quantile to third order in 1/df (error < 1e-4 from df = 31 on)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}.")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


class PairedInterval(NamedTuple):
    """Mean per-seed difference with its 95 % t-interval over ``n`` paired seeds."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def separated(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def text(self, digits: int = 2) -> str:
        if self.n < 2:
            return f"{self.mean:+.{digits}f} (n={self.n})"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def paired_interval(a: Mapping[int, float], b: Mapping[int, float]) -> Optional[PairedInterval]:
    """The paired difference ``a − b`` over the seeds both have a finite value for (None if none)."""
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    if not seeds:
        return None
    d = np.asarray([a[s] - b[s] for s in seeds], np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return PairedInterval(mean, -math.inf, math.inf, 1)
    half = t_quantile_975(len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return PairedInterval(mean, mean - half, mean + half, len(d))


def _finite_mean(xs: Iterable[float]) -> float:
    """The mean of the finite values (−inf if there are none)."""
    vals = [v for v in xs if math.isfinite(v)]
    return float(np.mean(vals)) if vals else -math.inf


def rank_ranges(scores: Mapping[str, Mapping[int, float]]) -> dict[str, tuple[int, int]]:
    """The ranks each row can take by the paired intervals: ``(1 + above, n − below)``.

    ``above`` counts the rows that are ahead of this one with a paired 95 % interval (:func:`paired_interval`,
    over the seeds both have a finite score for, at least two) excluding 0, ``below`` those behind it by such
    an interval, ``n`` the rows with a finite score (higher is better, e.g. Δp).  Rows whose ranges overlap
    are not ordered by the intervals; a row whose range starts at 1 has no row separated above it (the top
    group, bold in the tables), so a row close to the best by mean but separated from another row cannot
    rank first.  Rows without a finite score get no range.
    """
    rows = [k for k in scores if _finite_mean(scores[k].values()) > -math.inf]
    above = {k: 0 for k in rows}
    below = {k: 0 for k in rows}
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            iv = paired_interval(scores[a], scores[b])
            if iv is None or not iv.separated:  # one shared seed: an unbounded interval, never separated
                continue
            ahead, behind = (a, b) if iv.low > 0 else (b, a)
            above[behind] += 1
            below[ahead] += 1
    n = len(rows)
    return {k: (1 + above[k], n - below[k]) for k in rows}


def order_rows(rows: Iterable[Row], scores: Callable[[Row], Sequence[float]],
               label: Callable[[Row], str] = lambda r: r.label) -> list[Row]:
    """The table order: STL first, then by the mean of each row's finite ``scores`` (best first), rows without
    a finite score last, ties by label."""
    def key(r: Row) -> tuple:
        vals = [v for v in scores(r) if math.isfinite(v)]
        return (r.method != "stl", not vals, -float(np.mean(vals)) if vals else 0.0, label(r))
    return sorted(rows, key=key)


def rank_text(r: tuple[int, int]) -> str:
    """``(1, 1)`` → ``"1"``, ``(2, 7)`` → ``"2–7"``."""
    return str(r[0]) if r[0] == r[1] else f"{r[0]}–{r[1]}"


def selected_late(run: Mapping[str, Any], fraction: float = 0.2) -> bool:
    """Whether the run's validation-selected epoch (the latest over tasks) lies in the last ``fraction``: the last
    ``ceil(fraction·E)`` epochs (:func:`last_epochs`, the loss figures' window; ``e > (1 − fraction)·E`` in floats
    counted epoch 63 of 90 in the last 30 %)."""
    return late_task_selections(run, fraction) > 0


def late_task_selections(run: Mapping[str, Any], fraction: float = 0.2) -> int:
    """How many of the run's per-task selected epochs lie in the last ``fraction`` of training.  For STL,
    whose tasks are separate networks selected one by one, this is the count of late networks."""
    epochs = int(run["config"]["recipe"]["epochs"])
    start = epochs - last_epochs(epochs, fraction)
    return sum(int(e) > start for e in run["selected_epoch"].values() if e is not None)


def summed_train_loss(run: Mapping[str, Any]) -> list[float]:
    """The run's training loss per epoch, summed over its tasks (``history.train_loss``; empty without one); a
    loss the record stores as null or "inf" is NaN or inf."""
    losses = (run.get("history") or {}).get("train_loss") or []
    return [float(np.sum([math.nan if v is None else float(v) for v in np.ravel(np.asarray(x, object))]))
            for x in losses]


def _loss_ends(run: Mapping[str, Any], fraction: float) -> Optional[tuple[float, float, float]]:
    """Summed training loss at epoch 1, at ``e₀ = E − last_epochs(E, fraction)`` (the epochs after e₀ are the
    last ``ceil(fraction·E)``, at least one, as in the late-selection count) and at the last epoch E."""
    totals = summed_train_loss(run)
    if len(totals) < 2:
        return None
    e0 = len(totals) - last_epochs(len(totals), fraction)
    return totals[0], totals[max(0, e0 - 1)], totals[-1]


def loss_change_last_fifth(run: Mapping[str, Any], fraction: float = 0.2) -> float:
    """Relative drop of the summed per-epoch training loss over the last ``fraction`` of epochs:
    ``(L(e₀) − L(E)) / L(e₀)`` with ``e₀ = E − ceil(fraction·E)`` (positive: still falling)."""
    ends = _loss_ends(run, fraction)
    if ends is None:
        return math.nan
    _, start, end = ends
    return (start - end) / abs(start) if start else math.nan


def loss_share_last_fifth(run: Mapping[str, Any], fraction: float = 0.2) -> float:
    """Share of the run's summed-training-loss decrease that happens in its last ``fraction`` of epochs:
    ``(L(e₀) − L(E)) / (L(1) − L(E))`` with ``e₀`` as in :func:`loss_change_last_fifth` (0: the curve was
    flat at the end; NaN when the loss did not fall over the run)."""
    ends = _loss_ends(run, fraction)
    if ends is None:
        return math.nan
    first, start, end = ends
    return (start - end) / (first - end) if first > end else math.nan


def _seed_scores(row: Row) -> dict[int, float]:
    return {int(s): float(d) for s, d in zip(row.seeds, row.delta_p)}


def _selected_runs(row: Row) -> list:
    """The row's runs that selected an epoch (none do under ``--average-last`` or ``--average-epochs``)."""
    return [r for r in row.runs if all(e is not None for e in r["selected_epoch"].values())]


def _late_cell(row: Row) -> str:
    """``"k of n"``: how many of the row's runs select an epoch in the last 20 % ("—" if none selected)."""
    selected = _selected_runs(row)
    return f"{sum(selected_late(r) for r in selected)} of {len(selected)}" if selected else "—"


def _window_text(runs: Sequence[Mapping[str, Any]], fraction: float = 0.2) -> str:
    """`` (the last 2 of 6 epochs)`` where ``ceil(fraction·E)`` epochs are not exactly the fraction of E."""
    epochs = sorted({int(r["config"]["recipe"]["epochs"]) for r in runs})
    odd = [(last_epochs(e, fraction), e) for e in epochs if abs(last_epochs(e, fraction) - fraction * e) > 1e-9]
    return " (" + ", ".join(f"the last {k} of {e} epochs" for k, e in odd) + ")" if odd else ""


def convergence_line(st: Setting, rows: Sequence[Row], loss_rows: Sequence[Row]) -> str:
    """The convergence figures every table reports (see the module docstring)."""
    runs = [r for row in rows if row.method != "stl" for r in row.runs]
    if any(e is None for r in runs for e in r["selected_epoch"].values()):  # averaged curves: nothing selected
        over = sorted({str(r.get("averaged_over", "the last epochs of each run")) for r in runs})
        parts = [f"no epoch selected (metrics averaged over {', '.join(over)})"]
    elif not runs:  # an STL-only table: its late selections are in its row
        parts = []
    else:
        late = sum(selected_late(r) for r in runs)
        per_row = [sum(selected_late(r) for r in row.runs) / len(row.runs)
                   for row in rows if row.method != "stl" and row.runs]
        worst = max(per_row) if per_row else math.nan
        parts = [f"selected epoch in the last 20 % of training{_window_text(runs)}: {late} of {len(runs)} "
                 f"multi-task runs "
                 f"(worst row {worst:.0%})"]
    for row in loss_rows:
        ch = [loss_change_last_fifth(r) for r in row.runs]
        share = [loss_share_last_fifth(r) for r in row.runs]
        parts.append(f"{row.label} training loss change over the last 20 % of epochs{_window_text(row.runs)}: "
                     + ", ".join(f"{100 * c:.1f} %" for c in ch)
                     + " (share of the run's whole decrease: " + ", ".join(f"{100 * c:.1f} %" for c in share) + ")")
    return "; ".join(parts) + "." if parts else ""


def _cpu_text(runs: Sequence[Mapping[str, Any]]) -> str:
    """``one CPU core each`` when every CPU run recorded that it could use one core only (``cpu_cores``,
    e.g. pinned by ``taskset``), else ``CPU`` (older records do not say)."""
    cores = {r.get("cpu_cores") for r in runs if str(r.get("device") or "cpu:cpu") == "cpu:cpu"}
    return "one CPU core each" if cores == {1} else "CPU"


def _wall_time_text(runs: Sequence[Mapping[str, Any]]) -> str:
    """The runs' summed wall time, per device (a record's ``device``: "cpu:cpu", "gpu:NVIDIA H200", ...)."""
    per = wall_time_by_device(runs)
    cpu = _cpu_text(runs)
    if set(per) <= {"cpu:cpu"}:
        return f"Wall time of the runs in this table: {sum(t for _, t in per.values()) / 60:.0f} min ({cpu})."
    parts = [f"{t / 60:.0f} min for {n} run{'s' * (n != 1)} on "
             + (cpu if dev == "cpu:cpu" else device_text(dev)) for dev, (n, t) in per.items()]
    return "Wall time of the runs in this table: " + "; ".join(parts) + "."


def paired_table_markdown(
    st: Setting,
    rows: Sequence[Row],
    references: Mapping[str, Row],
    *,
    label: Callable[[Row], str] = lambda r: r.label,
    loss_rows: Sequence[Row] = (),
    wall_time: bool = True,
) -> str:
    """A table of rows with Δp (mean ± sd over seeds), the paired difference to each reference row
    (95 % t-interval), the rank range the intervals allow (:func:`rank_ranges`; bold: ranks from 1), and the
    convergence figures under it.  Rows are listed STL first,
    then by mean Δp (best first).  Rows that
    share a label (e.g. one method with and without ``--grad-stats``) are told apart by their gradient
    path and config hash."""
    base = [label(r) for r in rows]
    names = {}
    for r, b in zip(rows, base):
        names[id(r)] = b if base.count(b) == 1 else f"{b} [{r.config.get('grad_path')}, {r.config_hash}]"
    label = lambda r: names[id(r)]  # noqa: E731 - unique within this table
    scores = {label(r): _seed_scores(r) for r in rows if r.method != "stl"}
    ranks = rank_ranges(scores)

    rows = order_rows(rows, lambda r: r.delta_p, label)
    head = (["method", "seeds", "Δp % (mean ± sd)"] + [f"Δp − {k} [95 % CI]" for k in references]
            + ["rank range", "selected in the last 20 %"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        key = label(row)
        vals = [v for v in row.delta_p if math.isfinite(v)]
        sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan
        cell = "—" if not vals else signed(np.mean(vals)) + (f" ± {sd:.2f}" if len(vals) > 1 else " (one seed)")
        rr = ranks.get(key)
        name = f"**{key}**" if rr is not None and rr[0] == 1 else key
        n_fin = len(vals)
        cells = [name, str(len(row.runs)) if n_fin == len(row.runs) else f"{n_fin} of {len(row.runs)} finite", cell]
        for ref in references.values():
            iv = None if ref is row else paired_interval(_seed_scores(row), _seed_scores(ref))
            # fewer pairs than the smaller row has seeds: non-finite runs or other seed sets; say how many
            short = iv is not None and 2 <= iv.n < min(len(row.runs), len(ref.runs))
            cells.append("—" if iv is None else iv.text() + (f" (n={iv.n})" if short else ""))
        cells.append("—" if rr is None else rank_text(rr))
        late = _late_cell(row)
        selected = _selected_runs(row) if row.method == "stl" else []
        if selected:  # one network per task: also count the late networks
            late += (f" ({sum(late_task_selections(r) for r in selected)} of "
                     f"{sum(len(r['selected_epoch']) for r in selected)} task networks)")
        cells.append(late)
        lines.append("| " + " | ".join(cells) + " |")
    dropped = [f"{label(row)} seed {s}" for row in rows for s, d in zip(row.seeds, row.delta_p) if not math.isfinite(d)]
    note = (f"Left out of means and intervals (non-finite Δp: a diverged run or a missing metric): "
            f"{', '.join(dropped)}.\n\n") if dropped else ""
    key_line = ("Rank range: the ranks a row can take when only the paired 95 % intervals that exclude 0 order two "
                "rows (a − 1 rows are separated above it, n − b below it); bold: the rows that no interval puts "
                "below another row (ranks from 1). Each interval is a single comparison's, not adjusted for the "
                "many in a table: among 20 rows that all tie, some pairs will look separated by chance.\n\n"
                ) if ranks else ""
    conv = convergence_line(st, rows, loss_rows)
    out = "\n".join(lines) + "\n\n" + key_line + note + conv
    if wall_time:
        out += (" " if conv else "") + _wall_time_text([r for row in rows for r in row.runs])
    return out + "\n"


_SCHEDULE_KEYS = ("lr_schedule", "lr_decay_epoch", "lr_decay_factor")


def _data_and_budget(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe without its learning rate and schedule: what an STL row must share to be borrowed."""
    return {k: v for k, v in recipe.items() if k not in _SCHEDULE_KEYS and k != "learning_rate"}


def _lr(rc: Mapping[str, Any]) -> Any:
    return rc.get("learning_rate")


def stl_donor(settings: Sequence[Setting], st: Setting) -> Optional[Setting]:
    """The setting whose STL row ``st`` borrows when it has none: the same benchmark, data and epochs
    (another optimizer, learning rate or schedule; preferred, in this order: the same recipe, the same
    optimizer, the same learning-rate schedule, the same learning rate); ``None`` if ``st`` has an STL row
    or no setting qualifies."""
    if st.stl is not None:
        return None
    donors = [o for o in settings if o.stl is not None and o.benchmark == st.benchmark and o.quick == st.quick
              and _data_and_budget(o.recipe) == _data_and_budget(st.recipe)]
    if not donors:
        return None
    return min(donors, key=lambda o: (o.recipe != st.recipe, o.optimizer != st.optimizer,
                                      schedule_text(o.recipe) != schedule_text(st.recipe),
                                      _lr(o.recipe) != _lr(st.recipe), o.key))


def reference_stl(settings: Sequence[Setting], st: Setting) -> Optional[Row]:
    """``st``'s STL row, or the one it borrows (:func:`stl_donor`)."""
    donor = stl_donor(settings, st)
    return st.stl if donor is None else donor.stl


def borrow_stl(settings: Sequence[Setting], split: str = "test") -> dict[str, str]:
    """Gives a setting without an STL row the STL row of :func:`stl_donor` and recomputes its Δp on
    ``split`` against it; returns ``{setting key: note}``."""
    notes = {}
    for st in settings:
        donor = stl_donor(settings, st)
        if donor is None:
            continue
        rebase_delta_p(st, donor.stl, split)
        sched = schedule_text(donor.recipe) or "a constant learning rate"
        differs = [w for w, d in (("optimizer", donor.optimizer != st.optimizer),
                                  ("learning rate", _lr(donor.recipe) != _lr(st.recipe)),
                                  ("learning-rate schedule", schedule_text(donor.recipe) != schedule_text(st.recipe)))
                   if d]
        rate = f" at learning rate {_lr(donor.recipe)}" if _lr(donor.recipe) != _lr(st.recipe) else ""
        notes[st.key] = (f"Δp against the STL row trained with {optimizer_text(donor.optimizer)}{rate} and {sched} "
                         f"(no STL was trained with this {' and '.join(differs)})")
    return notes


def check_split(split: str) -> None:
    """``split`` must be ``"test"`` or ``"val"`` (``ValueError`` naming it)."""
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}.")


def find_row(rows: Sequence[Row], name: str) -> Optional[Row]:
    """The row called ``name``: a row label as the tables print it (``"dbmtl (beta_sigma=0.0)"``), or a
    method name standing for its row with default hyperparameters (``"dbmtl"``).  A name that fits
    several rows (one label, several configs, e.g. with and without ``--grad-stats``) is an error."""
    cands = [r for r in rows if r.label == name]
    if not cands:
        cands = [r for r in rows if r.method == name and not (r.config.get("hparams") or {})]
    if len(cands) > 1:
        which = ", ".join(f"{r.config_hash} ({r.config.get('grad_path')})" for r in cands)
        raise ValueError(f"{name!r} fits {len(cands)} rows (configs {which}); "
                         "put one of them in a study folder of its own.")
    return cands[0] if cands else None


def paired_report(
    settings: Sequence[Setting], references: Optional[Sequence[str]] = None, baseline: str = "stl",
    split: str = "test",
) -> str:
    """One paired table per setting.

    ``references``: the rows every row is compared with (row labels or method names, see
    :func:`find_row`); ``None``: ``ew`` and ``dbmtl`` where a setting has them.  A reference or
    ``baseline`` given by name that no setting has is an error (``ValueError`` listing the rows).
    ``baseline``: the row Δp is measured against, ``"stl"`` (the paper's Eq. 3–4) or another row, for
    studies without STL runs.  ``split``: ``"test"`` (the reported result) or ``"val"`` (the selection
    split's Δp, for choosing a hyperparameter such as a learning rate).
    """
    check_split(split)
    explicit = references is not None
    references = tuple(references) if explicit else ("ew", "dbmtl")
    wanted = (list(references) if explicit else []) + ([baseline] if baseline != "stl" else [])
    missing = [n for n in wanted if not any(find_row(list(st.rows.values()), n) for st in settings)]
    if missing and settings:
        labels = sorted({r.label for st in settings for r in st.rows.values()})
        raise ValueError(f"no row {', '.join(map(repr, missing))} in these results; rows: {', '.join(labels)}.")
    if baseline == "stl" and split != "test":
        for st in settings:
            if st.stl is not None:
                rebase_delta_p(st, st.stl, split)
    notes = borrow_stl(settings, split) if baseline == "stl" else {}
    out, left_out = [], []
    for st in settings:
        rows = list(st.rows.values())
        if baseline == "stl" and not any(math.isfinite(d) for r in rows for d in r.delta_p):
            left_out.append(st)
            continue
        if baseline != "stl":
            base_row = find_row(rows, baseline)
            if base_row is None:
                left_out.append(st)
                continue
            rebase_delta_p(st, base_row, split)
            notes[st.key] = f"Δp is measured against {baseline} (mean over its seeds), not STL"
        refs = {m: r for m in references if (r := find_row(rows, m)) is not None}
        loss_rows = [r for r in (find_row(rows, "ew"), find_row(rows, "stl")) if r is not None]
        title = f"### {setting_title(st)}"  # the heading report.md gives the same setting
        note = f"\n\n{notes[st.key]}." if st.key in notes else ""
        out.append(title + note + "\n\n" + paired_table_markdown(st, rows, refs, loss_rows=loss_rows))
    if out and left_out:  # say what is not in the tables (with no table at all, the caller reports it)
        what = "an STL row" if baseline == "stl" else f"a {baseline} row"
        out.append(f"Not shown, for want of {what} to measure Δp against: "
                   + "; ".join(f"{st.benchmark} {st.key} ({sum(len(r.runs) for r in st.rows.values())} runs"
                               f"{_unusable_stl_text(settings, st, split) if baseline == 'stl' else ''})"
                               for st in left_out) + ".\n")
    return "\n".join(out)


def _unusable_stl_text(settings: Sequence[Setting], st: Setting, split: str) -> str:
    """Why a setting with an STL row (its own or borrowed) still has no finite Δp: ``"; its STL row has
    a non-finite <split> metric in 1 of 5 runs"`` (``""`` when it has no STL row)."""
    stl = reference_stl(settings, st)
    if stl is None:
        return ""
    bad = sum(not all(math.isfinite(float(v)) for ms in r["metrics"][split].values() for v in ms.values())
              for r in stl.runs)
    return f"; its STL row has a non-finite {split} metric in {bad} of {len(stl.runs)} runs"


def _reference_order(st: Setting) -> tuple:
    """Which of two settings is the "from" side: the default optimizer, a constant rate, fewer epochs, a smaller
    learning rate first."""
    return (bool(st.optimizer), schedule_text(st.recipe) != "", st.recipe.get("epochs") or 0,
            st.recipe.get("learning_rate") or 0.0, st.key)


def _changes(a: Setting, b: Setting) -> list[str]:
    """What differs between two settings of one benchmark, in words (``"optimizer X → Y"``)."""
    out = []
    if optimizer_text(a.optimizer) != optimizer_text(b.optimizer):
        out.append(f"optimizer {optimizer_text(a.optimizer)} → {optimizer_text(b.optimizer)}")
    if schedule_text(a.recipe) != schedule_text(b.recipe):
        out.append(f"schedule {schedule_text(a.recipe) or 'constant'} → {schedule_text(b.recipe) or 'constant'}")
    for k in sorted(set(a.recipe) | set(b.recipe)):
        if k not in _SCHEDULE_KEYS and a.recipe.get(k) != b.recipe.get(k):
            out.append(f"{k} {a.recipe.get(k)} → {b.recipe.get(k)}")
    if a.quick != b.quick:
        out.append(f"{'quick' if a.quick else 'full'} → {'quick' if b.quick else 'full'} recipe")
    return out


def _unique_labels(st: Setting) -> dict[str, Row]:
    """The setting's rows by label; a label that several configs share (e.g. ``--grad-stats``) is left out."""
    rows = list(st.rows.values())
    labels = [r.label for r in rows]
    return {r.label: r for r in rows if labels.count(r.label) == 1}


def across_settings_report(
    settings: Sequence[Setting], references: Optional[Sequence[str]] = None, baseline: str = "stl",
    split: str = "test",
) -> str:
    """One table per pair of settings of one benchmark (same tasks) that share rows: each shared row's
    per-seed gain (Δp in the second setting minus Δp in the first) with its 95 % interval, and its
    interaction with each reference row (its gain minus the reference's gain, paired over seeds).

    Both settings' Δp are measured against one row, so that a gain is a change of the row's own metrics:
    the first setting's ``baseline`` row (STL by default), else the second's, else that of another setting
    of the benchmark.
    The first setting is the one with the default optimizer, a constant learning rate, fewer epochs or a
    smaller learning rate.
    ``references``: row labels or method names (default: ``ew`` and ``dbmtl`` where both settings have
    them); a name that no pair of settings shares is an error (``ValueError`` listing the shared rows).
    ``split``: as in :func:`paired_report`.
    """
    check_split(split)
    settings = sorted(settings, key=_reference_order)
    pairs = [(a, b) for i, a in enumerate(settings) for b in settings[i + 1:]
             if a.benchmark == b.benchmark and a.higher_is_better == b.higher_is_better
             and set(_unique_labels(a)) & set(_unique_labels(b))]
    explicit = references is not None
    references = tuple(references) if explicit else ("ew", "dbmtl")

    def shared(a: Setting, b: Setting, name: str) -> Optional[str]:  # the label a name stands for in both
        ra, rb = find_row(list(a.rows.values()), name), find_row(list(b.rows.values()), name)
        return ra.label if ra is not None and rb is not None and ra.label == rb.label else None

    missing = [n for n in references if explicit and not any(shared(a, b, n) for a, b in pairs)]
    if missing and pairs:
        labels = sorted({lab for a, b in pairs for lab in set(_unique_labels(a)) & set(_unique_labels(b))})
        raise ValueError(f"no pair of settings shares the row {', '.join(map(repr, missing))}; "
                         f"rows shared: {', '.join(labels)}.")
    out, left_out = [], []
    for a, b in pairs:
        base = None  # the first setting's, else the second's, else that of the first other setting that has one
        others = [o for o in settings if o not in (a, b) and o.benchmark == a.benchmark
                  and o.higher_is_better == a.higher_is_better]
        for st in (a, b, *others):
            base = st.stl if baseline == "stl" else find_row(list(st.rows.values()), baseline)
            if base is not None:
                where = {id(a): "the first setting", id(b): "the second setting"}.get(id(st), f"setting {st.key}")
                base_text = f"the {base.label} row of {where}"
                break
        if base is None:
            left_out.append(f"{a.key} → {b.key}")
            continue
        hib = a.higher_is_better
        ref_metrics = base.mean_metrics(hib, split)
        la, lb = _unique_labels(a), _unique_labels(b)
        scores = {}  # label -> (Δp in a, Δp in b) by seed
        for lab in set(la) & set(lb):
            scores[lab] = tuple({int(s): d for s, d in zip(row.seeds, runs_delta_p(row, ref_metrics, hib, split))}
                                for row in (la[lab], lb[lab]))
        gains = {lab: {s: vb[s] - va[s] for s in set(va) & set(vb)} for lab, (va, vb) in scores.items()}
        refs = [lab for n in references if (lab := shared(a, b, n)) is not None]

        head = (["row", "seeds", "Δp, first", "Δp, second", "gain: second − first [95 % CI]"]
                + [f"gain − gain of {r} [95 % CI]" for r in refs] + ["selected in the last 20 % (first; second)"])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        order = sorted(gains, key=lambda k: (-_finite_mean(gains[k].values()), k))
        for lab in order:
            iv = paired_interval(gains[lab], {s: 0.0 for s in gains[lab]})
            pairs = [s for s, g in gains[lab].items() if math.isfinite(g)]  # the seeds the gain is over
            means = [_finite_mean(v[s] for s in pairs) for v in scores[lab]]  # so that second − first = gain
            cells = [lab, str(iv.n if iv else 0)] + [signed(m) if m > -math.inf else "—" for m in means]
            cells.append("—" if iv is None else iv.text())
            for r in refs:
                ix = None if r == lab else paired_interval(gains[lab], gains[r])
                # fewer seeds than both gains have: say how many, as the paired table does
                short = ix is not None and 2 <= ix.n < min(iv.n, sum(math.isfinite(g) for g in gains[r].values()))
                cells.append("—" if ix is None else ix.text() + (f" (n={ix.n})" if short else ""))
            cells.append(f"{_late_cell(la[lab])}; {_late_cell(lb[lab])}")
            lines.append("| " + " | ".join(cells) + " |")
        sides = ("first", "second")
        bad = [f"{lab} seed {s} ({side} setting)" for lab in order for side, v in zip(sides, scores[lab])
               for s in sorted(v) if not math.isfinite(v[s])]
        alone = [f"{lab} seed {s} ({side} setting)" for lab in order
                 for side, v, w in zip(sides, scores[lab], scores[lab][::-1]) for s in sorted(set(v) - set(w))]
        why = (("non-finite Δp: a diverged run or a missing metric", bad),
               ("no run of the seed in the other setting", alone))
        note = "".join(f"\n\nLeft out of means and intervals ({w}): {', '.join(xs)}." for w, xs in why if xs)
        changes = "; ".join(_changes(a, b)) or "the setting key only"
        out.append(f"### {a.benchmark}: {changes}\n\nFirst: {setting_title(a)}.\nSecond: {setting_title(b)}.\n\n"
                   f"Δp of both against {base_text} (its mean metrics), over the seeds both settings ran with a "
                   f"finite Δp; a gain is paired over those seeds, an interaction over the seeds all four runs "
                   f"share.\n\n"
                   + "\n".join(lines) + note + "\n")
    if out and left_out:
        what = "an STL row" if baseline == "stl" else f"a {baseline} row"
        out.append(f"Not shown, for want of {what} in any setting of the benchmark: {'; '.join(left_out)}.\n")
    return "\n".join(out)
