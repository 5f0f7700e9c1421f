"""Hyperparameter selection on the validation split, as the paper does for DB-MTL's β (Sec. 4.1).

For every setting (benchmark + recipe) in a results directory, the runs of one method with different
hyperparameters (one table row each) are ranked by their mean **validation** Δp against the STL row's
validation metrics; the chosen configuration's **test** Δp is what a tuned row of a main table reports.
Writes ``<dir>/val_selection.md`` and prints it.

    python results/select_on_val.py results/adult_beta            # DB-MTL's β grid
    python results/select_on_val.py results/adult_beta --method dbmtl
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from dbmtl_jax.experiments.report import load_results, summarize
from dbmtl_jax.metrics import delta_p


def _mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return "n/a"
    std = float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan")
    return f"{np.mean(xs):+.2f} ± {std:.2f}" if math.isfinite(std) else f"{np.mean(xs):+.2f}"


def select(directory: Path, method: str) -> str:
    lines = [f"# Validation selection of `{method}` hyperparameters: `{directory}`", ""]
    lines.append("Each configuration's mean validation Δp (%) against the STL row's validation metrics ranks it; "
                 "the test Δp of the best is the tuned result. Mean ± std over seeds.")
    for st in summarize(load_results(directory)):
        stl = st.stl
        rows = [r for r in st.rows.values() if r.method == method]
        if stl is None or not rows:
            continue
        hib = st.higher_is_better
        stl_val = {t: {m: float(np.mean([r["metrics"]["val"][t][m] for r in stl.runs])) for m in ms}
                   for t, ms in hib.items()}
        scored = []
        for row in rows:
            val = [delta_p(r["metrics"]["val"], stl_val, hib) for r in row.runs]
            scored.append((float(np.mean(val)), row, val))
        scored.sort(key=lambda x: -x[0])
        recipe = st.recipe
        lines += ["", f"## {st.benchmark} ({'quick' if st.quick else 'full'} recipe: lr {recipe['learning_rate']}, "
                      f"batch {recipe['batch_size']}, {recipe['epochs']} epochs)", "",
                  "| configuration | seeds | val Δp (%) | test Δp (%) |", "|---|---|---|---|"]
        for i, (_, row, val) in enumerate(scored):
            name = f"**{row.label}** (selected)" if i == 0 else row.label
            lines.append(f"| {name} | {len(row.runs)} | {_mean_std(val)} | {_mean_std(row.delta_p)} |")
        best = scored[0][1]
        lines += ["", f"Selected on validation: `{best.label}`, test Δp {_mean_std(best.delta_p)} "
                      f"(the best test Δp of the grid is {max(_mean_std_val(r.delta_p) for _, r, _ in scored):+.2f})."]
    text = "\n".join(lines) + "\n"
    (directory / "val_selection.md").write_text(text)
    return text


def _mean_std_val(xs: list[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return float(np.mean(xs)) if xs else float("-inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory", type=Path)
    ap.add_argument("--method", default="dbmtl")
    args = ap.parse_args()
    print(select(args.directory, args.method), end="")


if __name__ == "__main__":
    main()
