"""Analyses of run records beyond ``report``: selection on validation, per-task breakdowns, study summaries,
training time per epoch and an index of study folders (the ``dbmtl-jax`` commands ``select``,
``breakdown``, ``summary``, ``time`` and ``index``).

Everything here reads records through :func:`~dbmtl_jax.experiments.report.load_results` and
groups them with :func:`~dbmtl_jax.experiments.report.summarize`, so a study folder (``runs.txt``
into a record store) and a plain directory of records work alike.  The functions are small and
composable: per-row numbers (``val_delta_p``, ``task_metric_changes``, ``time_rows``, ...) are
separate from the markdown that shows them, and per-seed lists are kept wherever a table shows a
mean, so paired per-seed statistics can be added next to them.

* :func:`val_selection_markdown` (``dbmtl-jax select DIR``): ranks the configurations of one method
  by their mean **validation** Δp against the STL row's validation metrics (a setting without STL
  borrows one as ``paired`` does; rows on different seeds are ranked on the seeds they share), as the
  paper tunes DB-MTL's β (Sec. 4.1); :func:`grid_best` is the validation-best row of the paper's grid
  (β ∈ {0.1, 0.5, 0.9} × σ ∈ {0, 0.5}).
* :func:`breakdown_markdown` (``dbmtl-jax breakdown DIR``): per row, the signed relative change (%)
  of each task metric's seed mean against STL's (positive = better), whose mean over each task's metrics,
  then over tasks, is the row's Δp.
* :func:`summary_markdown` (``dbmtl-jax summary PREFIX``): the tables of one study
  (``PREFIX_main``, ``PREFIX_beta``, ``PREFIX_ablation``, ``PREFIX_log``, ``PREFIX_alpha``,
  ``PREFIX_budget``) side by side, as ``results/run_study.sh`` makes them.
* :func:`time_rows` / :func:`time_markdown` (``dbmtl-jax time DIR``): the Fig. 7 analogue, training
  time per epoch per method and gradient path, of one setting and device (:func:`time_tables`: one
  table per setting and device).
* :func:`index_markdown` (``dbmtl-jax index DIR``): one row per study folder under ``DIR``.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from dbmtl_jax.experiments.paired import borrow_stl, paired_interval, reference_stl
from dbmtl_jax.experiments.report import (Row, Setting, device_text, load_results, optimizer_text, runs_delta_p,
                                          schedule_text, setting_title, signed, summarize, wall_time_by_device)
from dbmtl_jax.experiments.train import (RECORDED_DEFAULTS, _factory, _jsonable, _same_value, canonical_hparams,
                                         method_defaults, resolved_hparams)

__all__ = [
    "finite_mean", "mean_std", "load_settings",
    "PAPER_GRID", "varied_hparams", "in_paper_grid", "beta_sigma_of", "val_reference", "val_delta_p",
    "reference_stl", "ranking_seeds", "scored_rows", "grid_best_row", "grid_best", "restrict_rows",
    "val_selection_markdown",
    "task_metric_changes", "changes_delta_p", "task_changes", "breakdown_markdown",
    "SECTIONS", "study_settings", "summary_markdown",
    "time_tables", "time_rows", "time_markdown", "write_time",
    "study_folders", "index_rows", "index_markdown",
]


# --------------------------------------------------------------------------- helpers


def finite_mean(xs: Iterable[float]) -> float:
    """Mean of the finite values, ``-inf`` when there is none (ranks such rows last)."""
    xs = [x for x in xs if math.isfinite(x)]
    return float(np.mean(xs)) if xs else float("-inf")


def mean_std(xs: Iterable[float]) -> str:
    """``+1.23 ± 0.45`` (sample std, ddof 1) of the finite values, ``+1.23 ± 0.45 (4 of 5 finite)`` when
    some are not (a diverged seed is named, never silently left out); ``n/a`` when none is finite."""
    xs = list(xs)
    finite = [x for x in xs if math.isfinite(x)]
    if not finite:
        return "n/a"
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan")
    text = f"{signed(np.mean(finite))} ± {std:.2f}" if math.isfinite(std) else signed(np.mean(finite))
    return text if len(finite) == len(xs) else f"{text} ({len(finite)} of {len(xs)} finite)"


def load_settings(directory: os.PathLike, *, skipped: Optional[list] = None) -> list[Setting]:
    """:func:`summarize` of :func:`load_results` (unusable files go to ``skipped``, else warnings)."""
    return summarize(load_results(directory, skipped=skipped))


def _with_stl(directory: os.PathLike, skipped: Optional[list] = None) -> Optional[Setting]:
    """The setting of ``directory`` that has an STL row, or ``None`` (also for a missing directory).

    ``ValueError`` when several settings (benchmarks, recipes or optimizers) of the folder have one: which
    of them a table stands for would be a guess.
    """
    if not Path(directory).is_dir():
        return None
    settings = [s for s in load_settings(directory, skipped=skipped) if s.stl is not None]
    if len(settings) > 1:
        raise ValueError(f"{Path(directory).as_posix()} holds {len(settings)} settings with an STL row: "
                         + "; ".join(setting_title(s) for s in settings)
                         + ". A study section must hold one setting; move the other runs to their own folder.")
    return settings[0] if settings else None


# --------------------------------------------------------------------------- selection on validation

PAPER_GRID = frozenset((b, s) for b in (0.1, 0.5, 0.9) for s in (0.0, 0.5))
"""DB-MTL's β grid of the paper (Sec. 4.1, Fig. 5): β ∈ {0.1, 0.5, 0.9}, constant (σ = 0) or β/k^0.5."""


def beta_sigma_of(row: Row) -> tuple[float, float]:
    """``(β, σ)`` a DB-MTL row ran with (its explicit values over the defaults in force then)."""
    hp = resolved_hparams(row.runs[0]["config"])
    return float(hp.get("beta", 0.9)), float(hp.get("beta_sigma", 0.0))


def varied_hparams(row: Row) -> set[str]:
    """The hyperparameters a row sets to other than its method's default (an explicit value equal to the
    factory's default, e.g. ``alpha="max"``, does not count)."""
    factory = _factory(row.config.get("base_method") or row.method)
    params = inspect.signature(factory).parameters if factory is not None else {}
    return {k for k, v in (row.config.get("hparams") or {}).items()
            if k not in params or not _same_value(v, _jsonable(params[k].default))}


def in_paper_grid(row: Row) -> bool:
    """Whether a DB-MTL row is one of :data:`PAPER_GRID`: its (β, σ) is in the grid and it varies no other
    hyperparameter (an α or ε row at a grid β is not a grid point)."""
    return varied_hparams(row) <= {"beta", "beta_sigma"} and beta_sigma_of(row) in PAPER_GRID


def val_reference(st: Setting, stl: Optional[Row] = None) -> dict[str, dict[str, float]]:
    """The STL row's mean **validation** metrics (the reference of validation Δp); ``stl`` defaults
    to the setting's own STL row."""
    return (st.stl if stl is None else stl).mean_metrics(st.higher_is_better, "val")


def val_delta_p(st: Setting, row: Row, reference: Optional[Mapping] = None) -> list[float]:
    """Per seed (the row's run order): validation Δp (%) against :func:`val_reference` (NaN where it is
    undefined, e.g. a diverged run's NaN metric)."""
    ref = val_reference(st) if reference is None else reference
    return runs_delta_p(row, ref, st.higher_is_better, "val")


def ranking_seeds(st: Setting, method: str) -> list[int]:
    """The seeds every row of ``method`` ran (empty if none is shared or there is no row)."""
    rows = [r for r in st.rows.values() if r.method == method]
    return sorted(set.intersection(*(set(r.seeds) for r in rows))) if rows else []


def scored_rows(st: Setting, method: str, stl: Optional[Row] = None) -> list[tuple[float, Row, list[float]]]:
    """``(score, row, per-seed val Δp)`` of every row of ``method``, best score first.

    Validation Δp against ``stl`` (by default the setting's own STL row); the score is its mean over
    :func:`ranking_seeds`, so rows run on more seeds are ranked on the same seeds as the others
    (over each row's own seeds when the rows share none).  A NaN score (a diverged seed) ranks last.
    """
    ref = val_reference(st, stl)
    shared = set(ranking_seeds(st, method))
    scored = []
    for row in (r for r in st.rows.values() if r.method == method):
        val = val_delta_p(st, row, ref)
        on = [v for v, run in zip(val, row.runs) if run["seed"] in shared] or val
        scored.append((float(np.mean(on)), row, val))
    return sorted(scored, key=lambda x: (math.isnan(x[0]), -x[0] if not math.isnan(x[0]) else 0.0))


def grid_best_row(st: Setting, method: str = "dbmtl", stl: Optional[Row] = None) -> Optional[Row]:
    """The validation-best row of ``method`` within :data:`PAPER_GRID`, or ``None``."""
    rows = [x[1] for x in scored_rows(st, method, stl) if in_paper_grid(x[1])]
    return rows[0] if rows else None


def grid_best(settings: Sequence[Setting], method: str = "dbmtl") -> Optional[tuple[float, float]]:
    """``(β, σ)`` of :func:`grid_best_row` in the first setting that has one next to an STL row (its own
    or a borrowed one, :func:`reference_stl`)."""
    for st in settings:
        stl = reference_stl(settings, st)
        row = grid_best_row(st, method, stl) if stl is not None else None
        if row is not None:
            return beta_sigma_of(row)
    return None


def restrict_rows(settings: Sequence[Setting], method: str, keys: Iterable[str]) -> list[Setting]:
    """Copies of ``settings`` whose ``method`` rows are only those whose :func:`varied_hparams` are all
    among ``keys`` (the default configuration stays); other methods' rows are kept.

    ``keys = ("beta", "beta_sigma")`` leaves a study's β grid when the folder also holds Fig. 6's α rows.
    """
    allowed = set(keys)
    out = []
    for st in settings:
        copy = Setting(st.key, st.benchmark, st.recipe, st.quick, st.tasks, st.optimizer)
        copy.rows = {k: r for k, r in st.rows.items()
                     if r.method != method or varied_hparams(r) <= allowed}
        out.append(copy)
    return out


def val_selection_markdown(settings: Sequence[Setting], method: str = "dbmtl", title: str = "") -> str:
    """The ``val_selection.md`` page: every setting's rows of ``method`` ranked by validation Δp."""
    lines = [f"# Validation selection of `{method}` hyperparameters: `{title}`", ""]
    lines.append("Each configuration's mean validation Δp (%) against the STL row's validation metrics ranks it; "
                 "the test Δp of the best is the tuned result. Mean ± std over seeds.")
    notes = borrow_stl(settings, "test")  # a setting without STL: test Δp against the borrowed row
    for st in settings:
        stl = reference_stl(settings, st)
        if stl is None or not any(r.method == method for r in st.rows.values()):
            continue
        scored = scored_rows(st, method, stl)
        lines += ["", f"## {setting_title(st)}", ""]
        if st.key in notes:
            lines += [notes[st.key].replace("Δp against", "Validation and test Δp against", 1) + ".", ""]
        shared = ranking_seeds(st, method)
        if any(sorted(r.seeds) != shared for _, r, _ in scored):
            lines += [(f"The rows ran on different seeds: ranked on the mean validation Δp over the seeds they all "
                       f"share ({', '.join(map(str, shared))}); the columns show every seed of a row."
                       if shared else "The rows share no seed: each is ranked on its own seeds (not paired)."), ""]
        lines += ["| configuration | seeds | val Δp (%) | test Δp (%) |", "|---|---|---|---|"]
        for i, (_, row, val) in enumerate(scored):
            name = f"**{row.label}** (selected)" if i == 0 else row.label
            lines.append(f"| {name} | {len(row.runs)} | {mean_std(val)} | {mean_std(row.delta_p)} |")
        best = scored[0][1]
        lines += ["", f"Selected on validation: `{best.label}`, test Δp {mean_std(best.delta_p)} "
                      f"(the best test Δp of the grid is {max(finite_mean(r.delta_p) for _, r, _ in scored):+.2f})."]
        grid = [x for x in scored if in_paper_grid(x[1])] if method == "dbmtl" else []
        if grid and grid[0][1] is not best:
            lines += ["", f"Within the paper's grid (β ∈ {{0.1, 0.5, 0.9}}, σ ∈ {{0, 0.5}}): `{grid[0][1].label}`, "
                          f"test Δp {mean_std(grid[0][1].delta_p)}."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- per-task breakdown


def task_metric_changes(st: Setting, row: Row, stl: Optional[Row] = None,
                        runs: Optional[Sequence[int]] = None) -> dict[tuple[str, str], float]:
    """``(task, metric) -> signed relative change (%)`` of the row's seed-mean metric vs the STL row's mean
    (``stl``, by default the setting's own); ``runs``: average only those of the row's runs (indices).

    Positive is better than STL.  Their mean over each task's metrics, then over
    the tasks (Eq. 3-4, :func:`changes_delta_p`), is the Δp of the seed means,
    equal to the row's mean Δp (Δp is linear in the metrics).
    """
    out = {}
    for task, metrics in st.higher_is_better.items():
        for metric, hib in metrics.items():
            base = _seed_mean((st.stl if stl is None else stl).values(task, metric))
            xs = row.values(task, metric)
            mean = _seed_mean(xs if runs is None else [xs[i] for i in runs])
            out[(task, metric)] = 100.0 * (1.0 if hib else -1.0) * (mean - base) / abs(base)
    return out


def changes_delta_p(changes: Mapping[tuple[str, str], float], hib: Mapping[str, Mapping[str, bool]]) -> float:
    """Δp (Eq. 3-4) of :func:`task_metric_changes`: the mean over tasks of the mean over each task's metrics
    (not the mean over all metrics, which weights a task by its number of metrics)."""
    return float(np.mean([np.mean([changes[(t, m)] for m in ms]) for t, ms in hib.items()]))


def _seed_mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def task_changes(st: Setting, row: Row) -> dict[str, float]:
    """Per task: the mean over its metrics of :func:`task_metric_changes`, averaged over the seeds whose Δp is
    finite (those :func:`mean_std` of ``row.delta_p`` averages), so that the columns average to the Δp column
    also when a seed diverged; NaN when no seed has a finite Δp."""
    keep = [i for i, d in enumerate(row.delta_p) if math.isfinite(d)]
    changes = task_metric_changes(st, row, runs=keep)
    return {task: float(np.mean([changes[(task, m)] for m in ms])) for task, ms in st.higher_is_better.items()}


def _paired_change_cell(first: Row, second: Row) -> str:
    """Fig. 1's change cell: the mean per-seed Δp difference ``second − first`` over the seeds both rows ran
    with a finite Δp (:func:`~dbmtl_jax.experiments.paired.paired_interval`), with their number."""
    iv = paired_interval(dict(zip(second.seeds, second.delta_p)), dict(zip(first.seeds, first.delta_p)))
    return "no shared seed" if iv is None else f"{iv.mean:+.2f} ({iv.n} paired seeds)"


def _row_label(row: Row) -> str:
    hp = json.dumps(row.config.get("hparams") or {}, sort_keys=True)
    return row.method + (f" {hp}" if hp != "{}" else "")


def breakdown_markdown(settings: Sequence[Setting]) -> str:
    """The ``breakdown.md`` page: per setting, every row ranked by Δp with its per-metric changes vs STL
    (a setting without STL against the row it borrows, :func:`reference_stl`, saying so)."""
    out = []
    notes = borrow_stl(settings)
    for st in settings:
        stl = reference_stl(settings, st)
        if stl is None:
            continue
        rows = list(st.rows.values())
        labels = [_row_label(r) for r in rows]
        changes = {}
        for r, label in zip(rows, labels):
            if labels.count(label) > 1:  # same method and hyperparameters, other settings (e.g. --grad-stats)
                label += f" [{r.config.get('grad_path', '')} {r.config_hash}]"
            changes[label] = task_metric_changes(st, r, stl)
        keys = [(t, m) for t, ms in st.higher_is_better.items() for m in ms]
        dp = {label: changes_delta_p(v, st.higher_is_better) for label, v in changes.items()}
        ranked = sorted(changes.items(), key=lambda kv: -finite_mean([dp[kv[0]]]))
        out.append(f"## {st.key}\n")
        if st.key in notes:
            out.append(f"{notes[st.key]}.\n")
        out.append("| rank | row | " + " | ".join(f"{t} {m} (%)" for t, m in keys) + " | Δp (%) |")
        out.append("|---" * (len(keys) + 3) + "|")
        for i, (label, v) in enumerate(ranked, 1):
            out.append(f"| {i} | {label} | " + " | ".join(signed(v[k]) for k in keys)
                       + f" | {signed(dp[label])} |")
        out.append("")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- study summary

SECTIONS = ("beta", "ablation", "log", "alpha", "budget")
"""The sections of a study besides ``main`` (``results/run_study.sh``), folder ``<prefix>_<section>``."""
FIG1 = ("pcgrad", "gradvac", "imtl_g", "cagrad", "nash_mtl", "aligned_mtl")


def study_settings(prefix: os.PathLike, *, skipped: Optional[list] = None) -> dict[str, Optional[Setting]]:
    """``section -> setting`` (with an STL row) of ``<prefix>_main`` and ``<prefix>_<section>``; missing ones ``None``.

    ``ValueError`` when a section folder holds several settings with an STL row (see :func:`_with_stl`).
    """
    prefix = Path(prefix)
    return {s: _with_stl(prefix.with_name(f"{prefix.name}_{s}"), skipped) for s in ("main", *SECTIONS)}


LIBMTL = {"beta": 0.9, "beta_sigma": 0.0}
"""DB-MTL's setting in LibMTL (its command-line default; this library's default before 0.2.0)."""


def _find(st: Setting, method: str, **hp: Any) -> Optional[Row]:
    """The row of ``method`` that ran with ``hp`` over today's defaults (spelled out or not, see
    :func:`~dbmtl_jax.experiments.train.resolved_hparams`)."""
    base = method.split("+")[0]
    fixed = {"alpha": "max"} if base == "dbmtl" else {}
    want = canonical_hparams(base, {**fixed, **method_defaults(base), **hp}, {})
    for row in st.rows.values():
        if row.method == method and canonical_hparams(base, {**fixed, **resolved_hparams(row.config)}, {}) == want:
            return row
    return None


def _nonfinite_runs(row: Row) -> int:
    return sum(r.get("nonfinite_steps", 0) > 0 for r in row.runs)


def main_table(st: Setting) -> list[str]:
    """Tables 1-4: every MTL row ranked by Δp, with each task's :func:`task_changes`."""
    tasks = list(st.higher_is_better)
    rows = sorted((r for r in st.rows.values() if r.method != "stl"), key=lambda r: -finite_mean(r.delta_p))
    out = ["| rank | row | " + " | ".join(f"{t} (%)" for t in tasks) + " | Δp (%) | non-finite runs |",
           "|---" * (len(tasks) + 4) + "|",
           "| – | stl | " + " | ".join("0.00" for _ in tasks) + f" | {mean_std(st.stl.delta_p)} | "
           f"{_nonfinite_runs(st.stl)} |"]
    for i, row in enumerate(rows, 1):
        ch = task_changes(st, row)
        name = f"**{row.label}**" if row.method == "dbmtl" else row.label
        out.append(f"| {i} | {name} | " + " | ".join(signed(ch[t]) for t in tasks)
                   + f" | {mean_std(row.delta_p)} | {_nonfinite_runs(row)} |")
    return out


def _row_cell(row: Optional[Row]) -> str:
    return mean_std(row.delta_p) if row is not None else "not run"


def _beta_hp(row: Optional[Row]) -> dict[str, Any]:
    if row is None:
        return {}
    b, s = beta_sigma_of(row)
    return {"beta": b, "beta_sigma": s}


def _beta_text(hp: Mapping[str, Any]) -> str:
    b, s = hp["beta"], hp["beta_sigma"]
    return f"β = {b}" if s == 0.0 or b == 0.0 else f"β = {b}/k^{s}"


def _provenance(records: Sequence[Mapping[str, Any]]) -> tuple[list, list, list]:
    """Versions, commits and devices of the records and of their merged ``reruns``."""
    entries = [e for r in records for e in (r, *(r.get("reruns") or []))]
    versions = sorted({tuple(sorted((k, v) for k, v in (e.get("versions") or {}).items()
                                    if k != "dbmtl_jax_git_commit")) for e in entries})
    commits = sorted({(e.get("versions") or {}).get("dbmtl_jax_git_commit", "?")[:7] for e in entries})
    devices = sorted({str(e.get("device")) for e in entries})
    return versions, commits, devices


def _seeds_text(settings: Iterable[Setting]) -> str:
    """``3 seeds`` when every row of ``settings`` has 3 seeds, else ``3–5 seeds per row``."""
    counts = sorted({len({r["seed"] for r in row.runs}) for st in settings for row in st.rows.values()})
    if not counts:
        return "no seeds"
    if len(counts) == 1:
        return f"{counts[0]} seed{'s' if counts[0] != 1 else ''}"
    return f"{counts[0]}–{counts[-1]} seeds per row"


def summary_markdown(prefix: os.PathLike, *, skipped: Optional[list] = None) -> str:
    """The ``<prefix>_summary.md`` page of a study (see the module docstring); ``ValueError`` without a main table."""
    prefix = Path(prefix)
    name = prefix.name
    st = study_settings(prefix, skipped=skipped)
    main = st["main"]
    if main is None:
        raise ValueError(f"no runs with an STL row in {prefix.with_name(name + '_main')}")
    bench, recipe, epochs = main.benchmark, main.recipe, main.recipe["epochs"]
    kind = "quick " if main.quick else ""
    records = {r["_path"]: r for s in st.values() if s is not None for row in s.rows.values() for r in row.runs}
    runs = {Path(p).name.split(".")[0]: r for p, r in records.items()}  # each run once (its id)
    wall = sum(float(r.get("wall_time_s") or 0.0) for r in runs.values())
    versions, commits, devices = _provenance(list(runs.values()))
    seeds = _seeds_text(s for s in st.values() if s is not None)
    sel = grid_best_row(st["beta"]) if st["beta"] is not None else None
    sel_hp = _beta_hp(sel)
    lines = [f"# {bench}: the paper's tables at {epochs} {kind}epochs (CPU-scaled)", "",
             f"Budget: the `{bench}` {kind}recipe (lr {recipe['learning_rate']}, batch {recipe['batch_size']}) "
             f"for {epochs} epochs, {seeds}. **Not the paper's setting** (see results/README.md). "
             f"Regenerate the runs with `bash results/run_study.sh {bench} [main beta ablation log alpha budget]` and "
             f"this page with `dbmtl-jax summary {prefix.as_posix()}`.", "",
             f"Runs: {len(runs)} distinct run files, {wall / 60:.1f} min of summed run wall time (one core of a "
             f"shared 2-core VM, compilation included); device {', '.join(devices)}; library commits "
             f"{', '.join(commits)}; versions " + "; ".join(", ".join(f"{k} {v}" for k, v in vs) for vs in versions)
             + ".", "",
             "Δp (%): Eq. 3-4 vs the STL row of the same directory, mean ± std (ddof 1) over seeds; positive is "
             "better than STL.", "",
             f"## Tables 1-4: main table (`{name}_main/`)", ""]
    lines += main_table(main)
    lines += ["", "Per-task columns: mean over the task's metrics of the signed relative change (%) of the seed-mean "
                  "metric vs STL."]
    if st["beta"] is not None:
        lines += ["", f"## Fig. 5: β (`{name}_beta/`)", "",
                  "| β | row | val Δp (%) | test Δp (%) | in the paper's grid |", "|---|---|---|---|---|"]
        for _, row, val in scored_rows(st["beta"], "dbmtl"):
            mark = " (selected)" if row is sel else ""
            lines.append(f"| {_beta_text(_beta_hp(row))}{mark} | `{row.label}` | {mean_std(val)} | "
                         f"{mean_std(row.delta_p)} | {'yes' if in_paper_grid(row) else 'no'} |")
        lines += ["", "Ranked by validation Δp; the selected row is the validation-best of the paper's grid "
                      "({0.1, 0.5, 0.9} × σ ∈ {0, 0.5}). LibMTL's setting is β = 0.9, σ = 0; the library's default "
                      f"is {_beta_text(method_defaults('dbmtl'))}."]
    if st["ablation"] is not None:
        a = st["ablation"]
        sel_cell = (lambda m: _row_cell(_find(a, m, **sel_hp)) if sel else "not run")
        lines += ["", f"## Table 5: ablation (`{name}_ablation/`)", "",
                  "| log | gradient balancing | row | Δp (%) at LibMTL's β = 0.9 | Δp (%) at the selected "
                  f"{_beta_text(sel_hp) if sel else 'β'} |", "|---|---|---|---|---|",
                  f"| – | – | ew | {_row_cell(_find(a, 'ew'))} | (no β) |",
                  f"| ✓ | – | ew+log | {_row_cell(_find(a, 'ew+log'))} | (no β) |",
                  f"| – | ✓ | dbmtl+nolog | {_row_cell(_find(a, 'dbmtl+nolog', **LIBMTL))} | {sel_cell('dbmtl+nolog')} |",
                  f"| ✓ | ✓ | dbmtl | {_row_cell(_find(a, 'dbmtl', **LIBMTL))} | {sel_cell('dbmtl')} |"]
    if st["log"] is not None:
        lg = st["log"]
        lines += ["", f"## Fig. 1: the log transform for other methods (`{name}_log/`)", "",
                  "| method | raw losses | + log | change (points, paired) |", "|---|---|---|---|"]
        for m in FIG1:
            raw, log = _find(lg, m), _find(lg, m + "+log")
            change = _paired_change_cell(raw, log) if raw is not None and log is not None else "–"
            lines.append(f"| {m} | {_row_cell(raw)} | {_row_cell(log)} | {change} |")
    if st["alpha"] is not None:
        al = st["alpha"]
        alphas = [("max", "max"), ("min", "min"), ("mean", "mean"), ("median", "median"), (1.0, "constant 1.0")]
        lines += ["", f"## Fig. 6: α (`{name}_alpha/`)", "",
                  f"| α | Δp (%) at LibMTL's β = 0.9 | Δp (%) at the selected {_beta_text(sel_hp) if sel else 'β'} |",
                  "|---|---|---|"]
        for a, label in alphas:
            lines.append(f"| {label} | {_row_cell(_find(al, 'dbmtl', alpha=a, **LIBMTL))} | "
                         f"{_row_cell(_find(al, 'dbmtl', alpha=a, **sel_hp)) if sel else 'not run'} |")
    if st["budget"] is not None:
        bu = st["budget"]
        lines += ["", f"## Budget diagnostic: {bu.recipe['epochs'] / epochs:g}× the epochs (`{name}_budget/`)", "",
                  f"| row | Δp (%) at {epochs} epochs | Δp (%) at {bu.recipe['epochs']} epochs |", "|---|---|---|",
                  f"| stl | {_row_cell(main.stl)} | {_row_cell(bu.stl)} |",
                  f"| ew | {_row_cell(_find(main, 'ew'))} | {_row_cell(_find(bu, 'ew'))} |",
                  f"| dbmtl (LibMTL's β = 0.9) | {_row_cell(_find(main, 'dbmtl', **LIBMTL))} | "
                  f"{_row_cell(_find(bu, 'dbmtl', **LIBMTL))} |"]
        if sel:
            lines.append(f"| dbmtl (selected {_beta_text(sel_hp)}) | {_row_cell(sel)} | "
                         f"{_row_cell(_find(bu, 'dbmtl', **sel_hp))} |")
        lines += ["", "Each column's Δp is against the STL row trained for the same number of epochs."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- training time (Fig. 7)

_GROUP_ORDER = {"stl": 0, "loss": 1, "gradient": 2, "hybrid": 3, "dbmtl": 4}


def _group(method: str) -> str:
    from dbmtl_jax import METHOD_GROUPS

    return "stl" if method == "stl" else METHOD_GROUPS.get(method.split("+")[0], "?")


def _timed(r: Mapping[str, Any]) -> bool:
    """A finished run with its method's default hyperparameters (the runs a time table uses)."""
    # The EMA's β and σ do not change the cost of a step: such runs count as the method's default.
    recorded = RECORDED_DEFAULTS.get(r["config"].get("base_method", ""), ())
    return r.get("status") == "done" and not set(r["config"].get("hparams") or {}) - set(recorded)


def time_tables(records: Iterable[Mapping[str, Any]]) -> list[tuple[Setting, str, list[dict[str, Any]]]]:
    """``(setting, device, rows)`` per setting (benchmark, recipe and optimizer, as :func:`summarize` separates
    them) and device, in that order: the :func:`time_rows` of each, as times are comparable only within one."""
    out = []
    for st in summarize([r for r in records if _timed(r)]):
        runs = [r for row in st.rows.values() for r in row.runs]
        for device in sorted({str(r.get("device")) for r in runs}):
            out.append((st, device, _time_rows([r for r in runs if str(r.get("device")) == device])))
    return out


def time_rows(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per method and gradient path (runs with the method's default hyperparameters only): training time per epoch.

    ``train_time_per_epoch_s`` = ``median_step_time_s`` × ``steps_per_epoch``
    (each step timed to completion, compilation excluded; the primary
    measure) and ``epoch_time_s`` = the mean of ``history.epoch_time_s`` over
    epochs 2..E (epoch 1 includes compilation; this one also includes the
    validation pass and the best-epoch snapshot), each as mean and std over
    seeds; ordered by group (stl, loss, gradient, hybrid, dbmtl), then time.
    A method run on two gradient paths (``config["grad_path"]``) gets a row per path.
    The per-run values are under ``per_seed``; ``seeds`` counts the runs, which for DB-MTL pools its β/σ
    variants (the EMA's β does not change a step's cost), so it can exceed the number of seeds.

    ``ValueError`` when those runs span several settings (benchmarks, recipes, optimizers) or devices, whose
    times are not comparable: :func:`time_tables` gives one table per setting and device.
    """
    tables = time_tables(records)
    if len(tables) > 1:
        raise ValueError(f"the runs span {len(tables)} settings or devices, whose times do not pool into one table: "
                         + "; ".join(f"{setting_title(st)} on {device}" for st, device, _ in tables)
                         + ". Give one study folder (one setting), e.g. `dbmtl-jax time results/<study>_main`.")
    return tables[0][2] if tables else []


def _time_rows(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """:func:`time_rows` of the runs of one setting and device."""
    epoch: dict[tuple[str, str], list[float]] = defaultdict(list)
    step: dict[tuple[str, str], list[float]] = defaultdict(list)
    train: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        ep = r["history"]["epoch_time_s"][1:]
        k = (r["method"], r["config"]["grad_path"])
        epoch[k].append(sum(ep) / len(ep))
        step[k].append(r["median_step_time_s"])
        train[k].append(r["median_step_time_s"] * r["steps_per_epoch"])
    rows = []
    for (m, path), v in epoch.items():
        tr = train[(m, path)]
        rows.append(dict(method=m, group=_group(m), grad_path=path, seeds=len(v),
                         train_time_per_epoch_s=statistics.mean(tr),
                         train_time_std=statistics.stdev(tr) if len(v) > 1 else 0.0,
                         epoch_time_s=statistics.mean(v), epoch_time_std=statistics.stdev(v) if len(v) > 1 else 0.0,
                         median_step_ms=1e3 * statistics.mean(step[(m, path)]),
                         per_seed={"train_time_per_epoch_s": list(tr), "epoch_time_s": list(v)}))
    rows.sort(key=lambda r: (_GROUP_ORDER.get(r["group"], 9), r["train_time_per_epoch_s"]))
    return rows


def time_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| method | group | gradient path | runs | training time / epoch (s) | median step (ms) "
             "| epoch wall incl. validation (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['group']} | {r['grad_path']} | {r['seeds']} | "
                     f"{r['train_time_per_epoch_s']:.3f} ± {r['train_time_std']:.3f} | {r['median_step_ms']:.2f} | "
                     f"{r['epoch_time_s']:.3f} ± {r['epoch_time_std']:.3f} |")
    return "\n".join(lines) + "\n"


def write_time(rows: Sequence[Mapping[str, Any]], out: os.PathLike, *, plot: bool = True,
               title: str = "training time per epoch") -> list[Path]:
    """Writes ``time_per_epoch.csv``, ``.md`` and (``plot``) ``.png`` into ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fields = [k for k in rows[0] if k != "per_seed"] if rows else []
    paths = [out / "time_per_epoch.csv", out / "time_per_epoch.md"]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    paths[1].write_text(time_markdown(rows))
    if plot and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        colors = {"stl": "grey", "loss": "tab:cyan", "gradient": "tab:red", "hybrid": "gold", "dbmtl": "tab:blue"}
        fig, ax = plt.subplots(figsize=(10, 3.8))
        ax.bar(range(len(rows)), [r["train_time_per_epoch_s"] for r in rows],
               yerr=[r["train_time_std"] for r in rows], color=[colors.get(r["group"], "k") for r in rows])
        methods = [r["method"] for r in rows]
        ax.set_xticks(range(len(rows)), [f"{m} ({r['grad_path']})" if methods.count(m) > 1 else m
                                         for m, r in zip(methods, rows)], rotation=60, ha="right")
        ax.set_ylabel("median step x steps/epoch (s)")
        ax.set_title(f"{title}: cyan loss, red gradient, yellow hybrid, blue DB-MTL")
        fig.tight_layout()
        paths.append(out / "time_per_epoch.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# --------------------------------------------------------------------------- index of studies


def study_folders(root: os.PathLike) -> list[Path]:
    """The study folders under ``root`` (folders with a ``runs.txt``), sorted."""
    from dbmtl_jax.experiments.train import STUDY_INDEX

    return sorted(p.parent for p in Path(root).rglob(STUDY_INDEX))


def _recipe_text(rc: Mapping[str, Any], quick: bool) -> str:
    parts = [f"{'quick' if quick else 'full'}, {rc.get('epochs')} epochs", f"lr {rc.get('learning_rate')}",
             f"batch {rc.get('batch_size')}"]
    return ", ".join(parts + ([schedule_text(rc)] if schedule_text(rc) else []))


def index_rows(root: os.PathLike, *, skipped: Optional[list] = None) -> list[dict[str, Any]]:
    """One entry per study folder: benchmark(s), recipes, rows, methods, seeds, runs, summed run time."""
    out = []
    for folder in study_folders(root):
        records = load_results(folder, skipped=skipped)
        settings = summarize(records)
        methods = sorted({r["method"] for r in records}, key=lambda m: (m != "stl", m))
        out.append({
            "study": Path(os.path.relpath(folder, root)).as_posix(),
            "benchmarks": sorted({r["benchmark"] for r in records}),
            "recipes": [_recipe_text(st.recipe, st.quick) + (f", optimizer {optimizer_text(st.optimizer)}"
                                                             if st.optimizer else "") for st in settings],
            "rows": sum(len(st.rows) for st in settings),
            "methods": methods,
            "seeds": sorted({r["seed"] for r in records}),
            "runs": len(records),
            "wall_time_s": sum(float(r.get("wall_time_s") or 0.0) for r in records),
            "wall_time_by_device": wall_time_by_device(records),
            "files": sorted(p.name for p in folder.glob("*.md")),
            "paths": {r["_path"] for r in records},
        })
    return out


def _methods_text(methods: Sequence[str], limit: int = 8) -> str:
    if len(methods) <= limit:
        return ", ".join(methods)
    return f"{len(methods)} labels: " + ", ".join(methods[:limit - 2]) + ", …"


def _run_time_text(per: Mapping[str, tuple[int, float]]) -> str:
    """Minutes of one study: ``"63.3"`` on CPU cores alone, else per device (``"12.0 CPU + 63.3 NVIDIA H200"``)."""
    if set(per) <= {"cpu:cpu"}:
        return f"{sum(t for _, t in per.values()) / 60:.1f}"
    return " + ".join(f"{t / 60:.1f} {device_text(dev)}" for dev, (_, t) in per.items())


def index_markdown(root: os.PathLike, *, skipped: Optional[list] = None) -> str:
    """``INDEX.md``: a table of the study folders under ``root``, generated from their records."""
    from dbmtl_jax.experiments.report import record_paths

    root = Path(root)
    rows = index_rows(root, skipped=skipped)
    lines = ["# Index of studies", "",
             f"Generated from the run records by `dbmtl-jax index {root.as_posix()}`; one row per study folder "
             "(a folder with a `runs.txt`). *Rows*: table rows (method and hyperparameter configuration); "
             "*run time*: the summed `wall_time_s` of the study's runs, per device when not all ran on CPU "
             "(a run shared by several studies counts in each).", "",
             "| study | benchmark | recipe | rows | methods | seeds | runs | run time (min) | pages |",
             "|---|---|---|---:|---|---|---:|---:|---|"]
    for r in rows:
        pages = ", ".join(f"[{p[:-3]}]({r['study']}/{p})" for p in r["files"]) or "—"
        lines.append(f"| `{r['study']}/` | {', '.join(r['benchmarks'])} | {'; '.join(r['recipes'])} | {r['rows']} | "
                     f"{_methods_text(r['methods'])} | {','.join(map(str, r['seeds']))} | {r['runs']} | "
                     f"{_run_time_text(r['wall_time_by_device'])} | {pages} |")
    listed = {os.path.abspath(p) for r in rows for p in r["paths"]}
    stored = record_paths(root)
    unlisted = [p for p in stored if os.path.abspath(p) not in listed]
    per_bench: dict[str, int] = defaultdict(int)
    for p in stored:
        per_bench[p.name.split("__")[0]] += 1
    lines += ["", f"Records under `{root.as_posix()}`: {len(stored)} ("
              + ", ".join(f"{b} {n}" for b, n in sorted(per_bench.items())) + f"); listed by no study: {len(unlisted)}"
              + (" (" + ", ".join(Path(os.path.relpath(p, root)).as_posix() for p in unlisted[:10])
                 + (", …" if len(unlisted) > 10 else "") + ")" if unlisted else "") + "."]
    return "\n".join(lines) + "\n"
