"""Hyperparameter selection on the validation split, as the paper does for DB-MTL's β (Sec. 4.1).

For every setting (benchmark + recipe) in a results directory, the runs of one method with different
hyperparameters (one table row each) are ranked by their mean **validation** Δp against the STL row's
validation metrics; the chosen configuration's **test** Δp is what a tuned row of a main table reports.
Writes ``<dir>/val_selection.md`` and prints it.

    python results/select_on_val.py results/adult_beta            # DB-MTL's β grid
    python results/select_on_val.py results/adult_beta --method dbmtl
    python results/select_on_val.py results/dense8_beta --print-grid-best   # prints "β σ", writes nothing

The paper tunes β over {0.1, 0.5, 0.9} × σ ∈ {0, 0.5} (Sec. 4.1, Fig. 5); ``β = 0`` rows (a diagnostic here)
are ranked too but the "paper grid" selection leaves them out.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from dbmtl_jax.experiments.report import load_results, summarize
from dbmtl_jax.metrics import delta_p


def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return "n/a"
    std = float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan")
    return f"{np.mean(xs):+.2f} ± {std:.2f}" if math.isfinite(std) else f"{np.mean(xs):+.2f}"


PAPER_GRID = {(b, s) for b in (0.1, 0.5, 0.9) for s in (0.0, 0.5)}


def beta_sigma_of(row) -> tuple[float, float]:
    hp = row.runs[0]["config"]["hparams"]
    return float(hp.get("beta", 0.9)), float(hp.get("beta_sigma", 0.0))


def scored_rows(st, method: str) -> list:
    """(mean val Δp, row, per-seed val Δp) of every row of ``method``, best first (val Δp vs STL's val metrics)."""
    hib = st.higher_is_better
    stl_val = {t: {m: float(np.mean([r["metrics"]["val"][t][m] for r in st.stl.runs])) for m in ms}
               for t, ms in hib.items()}
    scored = []
    for row in (r for r in st.rows.values() if r.method == method):
        val = [delta_p(r["metrics"]["val"], stl_val, hib) for r in row.runs]
        scored.append((float(np.mean(val)), row, val))
    return sorted(scored, key=lambda x: -x[0])


def grid_best_row(st, method: str = "dbmtl"):
    """The validation-best row of ``method`` within the paper's grid, or None."""
    rows = [x[1] for x in scored_rows(st, method) if beta_sigma_of(x[1]) in PAPER_GRID]
    return rows[0] if rows else None


def grid_best(directory: Path, method: str = "dbmtl") -> tuple[float, float]:
    """(β, σ) of the validation-best row within the paper's grid (first setting of the directory)."""
    for st in summarize(load_results(directory)):
        row = grid_best_row(st, method) if st.stl is not None else None
        if row is not None:
            return beta_sigma_of(row)
    raise SystemExit(f"{directory}: no {method} row of the paper's β grid next to an STL row")


def select(directory: Path, method: str) -> str:
    lines = [f"# Validation selection of `{method}` hyperparameters: `{directory}`", ""]
    lines.append("Each configuration's mean validation Δp (%) against the STL row's validation metrics ranks it; "
                 "the test Δp of the best is the tuned result. Mean ± std over seeds.")
    for st in summarize(load_results(directory)):
        if st.stl is None or not any(r.method == method for r in st.rows.values()):
            continue
        scored = scored_rows(st, method)
        recipe = st.recipe
        lines += ["", f"## {st.benchmark} ({'quick' if st.quick else 'full'} recipe: lr {recipe['learning_rate']}, "
                      f"batch {recipe['batch_size']}, {recipe['epochs']} epochs)", "",
                  "| configuration | seeds | val Δp (%) | test Δp (%) |", "|---|---|---|---|"]
        for i, (_, row, val) in enumerate(scored):
            name = f"**{row.label}** (selected)" if i == 0 else row.label
            lines.append(f"| {name} | {len(row.runs)} | {mean_std(val)} | {mean_std(row.delta_p)} |")
        best = scored[0][1]
        lines += ["", f"Selected on validation: `{best.label}`, test Δp {mean_std(best.delta_p)} "
                      f"(the best test Δp of the grid is {max(finite_mean(r.delta_p) for _, r, _ in scored):+.2f})."]
        grid = [x for x in scored if beta_sigma_of(x[1]) in PAPER_GRID] if method == "dbmtl" else []
        if grid and grid[0][1] is not best:
            lines += ["", f"Within the paper's grid (β ∈ {{0.1, 0.5, 0.9}}, σ ∈ {{0, 0.5}}): `{grid[0][1].label}`, "
                          f"test Δp {mean_std(grid[0][1].delta_p)}."]
    text = "\n".join(lines) + "\n"
    (directory / "val_selection.md").write_text(text)
    return text


def finite_mean(xs: list[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return float(np.mean(xs)) if xs else float("-inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory", type=Path)
    ap.add_argument("--method", default="dbmtl")
    ap.add_argument("--print-grid-best", action="store_true",
                    help="print 'beta sigma' of the validation-best row of the paper's grid and exit")
    args = ap.parse_args()
    if args.print_grid_best:
        print(*grid_best(args.directory, args.method))
        return
    print(select(args.directory, args.method), end="")


if __name__ == "__main__":
    main()
