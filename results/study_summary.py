"""The paper's tables for one benchmark of ``results/run_study.sh``, side by side, from the committed run JSONs.

    python results/study_summary.py dense        # writes results/dense8_summary.md and prints it

Reads the main directory (``<bench>_quick<E>``) and the section directories (``<bench><E>_{beta,ablation,log,alpha,budget3x}``;
missing ones are skipped) and writes, each with Δp (Eq. 3-4, %, vs the STL row of the same directory, mean ± std
(ddof 1) over seeds):

* Tables 1-4: every row ranked, with each task's mean signed relative change (%) vs STL;
* Table 5: EW, EW + log, DB-MTL without log, DB-MTL (at the default β and at the validation-selected β);
* Fig. 1: the six gradient methods with and without the log transform;
* Fig. 5: DB-MTL's β grid with validation and test Δp (selection as in ``select_on_val.py``);
* Fig. 6: α ∈ {max, min, mean, median, constant} at the default and at the selected β;
* a budget diagnostic: STL, EW and DB-MTL at 3× the epochs (``<prefix>_budget3x``);

plus the versions, commits, device and summed run time of the runs behind them. Nothing is retrained.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import numpy as np

from dbmtl_jax.experiments.report import Row, Setting, load_results, summarize
from select_on_val import PAPER_GRID, beta_sigma_of, finite_mean, grid_best_row, mean_std, scored_rows  # results/ is the script's directory

STUDIES = {"multimnist": ("multimnist_quick12", "multimnist12", 12),
           "dense": ("dense_quick8", "dense8", 8),
           "qm9": ("qm9_quick10", "qm9_10", 10)}
FIG1 = ("pcgrad", "gradvac", "imtl_g", "cagrad", "nash_mtl", "aligned_mtl")
HERE = Path(__file__).resolve().parent


def _setting(directory: Path) -> Optional[Setting]:
    if not directory.is_dir():
        return None
    settings = [s for s in summarize(load_results(directory)) if s.stl is not None]
    return settings[0] if settings else None


def _hp(row: Row) -> dict[str, Any]:
    return dict(row.config.get("hparams") or {})


def _find(st: Setting, method: str, **hp: Any) -> Optional[Row]:
    """The row of ``method`` whose hyperparameters equal ``hp`` (defaults spelled out count as equal)."""
    defaults = {"beta": 0.9, "beta_sigma": 0.0, "alpha": "max"} if method.startswith("dbmtl") else {}
    want = {**defaults, **hp}
    for row in st.rows.values():
        if row.method == method and {**defaults, **_hp(row)} == want:
            return row
    return None


def _task_changes(st: Setting, row: Row) -> dict[str, float]:
    """Per task: mean over its metrics of the signed relative change (%) of the seed-mean metric vs STL."""
    out = {}
    for task, metrics in st.higher_is_better.items():
        vals = []
        for metric, hib in metrics.items():
            base = float(np.mean(st.stl.values(task, metric)))
            mean = float(np.nanmean(row.values(task, metric)))
            vals.append((1 if hib else -1) * 100.0 * (mean - base) / base)
        out[task] = float(np.mean(vals))
    return out


def main_table(st: Setting) -> list[str]:
    tasks = list(st.higher_is_better)
    rows = sorted((r for r in st.rows.values() if r.method != "stl"), key=lambda r: -finite_mean(r.delta_p))
    out = ["| rank | row | " + " | ".join(f"{t} (%)" for t in tasks) + " | Δp (%) | non-finite runs |",
           "|---" * (len(tasks) + 4) + "|",
           "| – | stl | " + " | ".join("0.00" for _ in tasks) + f" | {mean_std(st.stl.delta_p)} | "
           f"{sum(r['nonfinite_steps'] > 0 for r in st.stl.runs)} |"]
    for i, row in enumerate(rows, 1):
        ch = _task_changes(st, row)
        name = f"**{row.label}**" if row.method == "dbmtl" else row.label
        out.append(f"| {i} | {name} | " + " | ".join(f"{ch[t]:+.2f}" for t in tasks)
                   + f" | {mean_std(row.delta_p)} | {sum(r['nonfinite_steps'] > 0 for r in row.runs)} |")
    return out


def _row_cell(row: Optional[Row]) -> str:
    return mean_std(row.delta_p) if row is not None else "not run"


def _beta_hp(row: Optional[Row]) -> dict[str, Any]:
    if row is None:
        return {}
    b, s = beta_sigma_of(row)
    return {"beta": b} if s == 0.0 else {"beta": b, "beta_sigma": s}


def _beta_text(hp: dict[str, Any]) -> str:
    b = hp.get("beta", 0.9)
    s = hp.get("beta_sigma", 0.0)
    return f"β = {b}" if s == 0.0 else f"β = {b}/k^{s}"


def build(bench: str) -> str:
    main_dir, prefix, epochs = STUDIES[bench]
    sections = ("beta", "ablation", "log", "alpha", "budget3x")
    dirs = {"main": HERE / main_dir, **{s: HERE / f"{prefix}_{s}" for s in sections}}
    st = {k: _setting(d) for k, d in dirs.items()}
    if st["main"] is None:
        raise SystemExit(f"no runs with an STL row under {dirs['main']}")
    main = st["main"]
    recipe = main.recipe
    records = [r for s in st.values() if s is not None for row in s.rows.values() for r in row.runs]
    versions = sorted({tuple(sorted((k, v) for k, v in r["versions"].items() if k != "dbmtl_jax_git_commit"))
                       for r in records})
    commits = sorted({r["versions"].get("dbmtl_jax_git_commit", "?")[:7] for r in records})
    devices = sorted({str(r.get("device")) for r in records})
    seen, wall = set(), 0.0
    for r in records:
        if r["_path"].rsplit("/", 1)[-1] not in seen:
            seen.add(r["_path"].rsplit("/", 1)[-1])
            wall += float(r.get("wall_time_s") or 0.0)
    sel = grid_best_row(st["beta"]) if st["beta"] is not None else None
    sel_hp = _beta_hp(sel)
    lines = [f"# {bench}: the paper's tables at {epochs} quick epochs (CPU-scaled)", "",
             f"Budget: the `{bench}` quick recipe (lr {recipe['learning_rate']}, batch {recipe['batch_size']}) "
             f"for {epochs} epochs, 3 seeds. **Not the paper's setting** (see results/README.md). "
             f"Regenerate the runs with `bash results/run_study.sh {bench} [main beta ablation log alpha budget]` and this "
             f"page with `python results/study_summary.py {bench}`.", "",
             f"Runs: {len(seen)} distinct run files, {wall / 60:.1f} min of summed run wall time (one core of a "
             f"shared 2-core VM, compilation included); device {', '.join(devices)}; library commits "
             f"{', '.join(commits)}; versions " + "; ".join(", ".join(f"{k} {v}" for k, v in vs) for vs in versions)
             + ".", "",
             "Δp (%): Eq. 3-4 vs the STL row of the same directory, mean ± std (ddof 1) over seeds; positive is "
             "better than STL.", "",
             f"## Tables 1-4: main table (`{main_dir}/`)", ""]
    lines += main_table(main)
    lines += ["", "Per-task columns: mean over the task's metrics of the signed relative change (%) of the seed-mean "
                  "metric vs STL."]
    if st["beta"] is not None:
        lines += ["", f"## Fig. 5: β (`{prefix}_beta/`)", "",
                  "| β | row | val Δp (%) | test Δp (%) | in the paper's grid |", "|---|---|---|---|---|"]
        for val_mean, row, val in scored_rows(st["beta"], "dbmtl"):
            mark = " (selected)" if row is sel else ""
            lines.append(f"| {_beta_text(_beta_hp(row))}{mark} | `{row.label}` | {mean_std(val)} | {mean_std(row.delta_p)} | "
                         f"{'yes' if beta_sigma_of(row) in PAPER_GRID else 'no'} |")
        lines += ["", "Ranked by validation Δp; the selected row is the validation-best of the paper's grid "
                      "({0.1, 0.5, 0.9} × σ ∈ {0, 0.5}). The default is β = 0.9 (σ = 0); a setting run both with its "
                      "hyperparameters spelled out and as the default is two rows (same computation, separate runs)."]
    if st["ablation"] is not None:
        a = st["ablation"]
        lines += ["", f"## Table 5: ablation (`{prefix}_ablation/`)", "",
                  "| log | gradient balancing | row | Δp (%) at β = 0.9 (default) | Δp (%) at the selected "
                  f"{_beta_text(sel_hp) if sel else 'β'} |", "|---|---|---|---|---|",
                  f"| – | – | ew | {_row_cell(_find(a, 'ew'))} | (no β) |",
                  f"| ✓ | – | ew+log | {_row_cell(_find(a, 'ew+log'))} | (no β) |",
                  f"| – | ✓ | dbmtl+nolog | {_row_cell(_find(a, 'dbmtl+nolog'))} | "
                  f"{_row_cell(_find(a, 'dbmtl+nolog', **sel_hp)) if sel else 'not run'} |",
                  f"| ✓ | ✓ | dbmtl | {_row_cell(_find(a, 'dbmtl'))} | "
                  f"{_row_cell(_find(a, 'dbmtl', **sel_hp)) if sel else 'not run'} |"]
    if st["log"] is not None:
        lg = st["log"]
        lines += ["", f"## Fig. 1: the log transform for other methods (`{prefix}_log/`)", "",
                  "| method | raw losses | + log | change (points) |", "|---|---|---|---|"]
        for m in FIG1:
            raw, log = _find(lg, m), _find(lg, m + "+log")
            change = f"{finite_mean(log.delta_p) - finite_mean(raw.delta_p):+.2f}" if raw is not None and log is not None else "–"
            lines.append(f"| {m} | {_row_cell(raw)} | {_row_cell(log)} | {change} |")
    if st["alpha"] is not None:
        al = st["alpha"]
        alphas = [("max", "max"), ("min", "min"), ("mean", "mean"), ("median", "median"), (1.0, "constant 1.0")]
        lines += ["", f"## Fig. 6: α (`{prefix}_alpha/`)", "",
                  f"| α | Δp (%) at β = 0.9 (default) | Δp (%) at the selected {_beta_text(sel_hp) if sel else 'β'} |",
                  "|---|---|---|"]
        for a, name in alphas:
            lines.append(f"| {name} | {_row_cell(_find(al, 'dbmtl', alpha=a))} | "
                         f"{_row_cell(_find(al, 'dbmtl', alpha=a, **sel_hp)) if sel else 'not run'} |")
    if st["budget3x"] is not None:
        bu = st["budget3x"]
        lines += ["", f"## Budget diagnostic: 3× the epochs (`{prefix}_budget3x/`)", "",
                  f"| row | Δp (%) at {epochs} epochs | Δp (%) at {3 * epochs} epochs |", "|---|---|---|",
                  f"| stl | {_row_cell(main.stl)} | {_row_cell(bu.stl)} |",
                  f"| ew | {_row_cell(_find(main, 'ew'))} | {_row_cell(_find(bu, 'ew'))} |",
                  f"| dbmtl (default β = 0.9) | {_row_cell(_find(main, 'dbmtl'))} | {_row_cell(_find(bu, 'dbmtl'))} |"]
        if sel:
            lines.append(f"| dbmtl (selected {_beta_text(sel_hp)}) | {_row_cell(sel)} | "
                         f"{_row_cell(_find(bu, 'dbmtl', **sel_hp))} |")
        lines += ["", "Each column's Δp is against the STL row trained for the same number of epochs."]
    text = "\n".join(lines) + "\n"
    (HERE / f"{prefix}_summary.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("benchmark", choices=sorted(STUDIES))
    print(build(ap.parse_args().benchmark), end="")


if __name__ == "__main__":
    main()
