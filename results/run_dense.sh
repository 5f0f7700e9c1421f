#!/usr/bin/env bash
# Main table (paper Tables 1-4 analogue) on the `dense` benchmark (layered Fashion-MNIST scenes: segmentation,
# depth, surface normals; a synthetic NYUv2 stand-in, not in the paper), STL + all 26 registry methods, 3 seeds.
# Budget (CPU-scaled, NOT the paper's NYUv2 setting of 200 epochs at 288x384): the quick data subset
# (128 training / 64 eval scenes, batch 16, lr 1e-3, weight decay 1e-5) trained for 8 epochs = 64 steps
# (`--quick --epochs 8`; the quick recipe's own 2 epochs are a 16-step smoke run). Measured on one core of the
# loaded 2-core VM: a U-Net HPS step costs ~0.3 s (EW) / ~0.65 s (per-task-gradient methods), i.e. ~27 s per
# loss-weighting run, ~50 s per gradient run, ~65 s per STL run, compilation included (81 runs ~ 55 min).
# Resumable (finished runs are skipped). $1: comma-separated method list (default: all); the first pass ran
# stl,ew,dbmtl,pcgrad,gradvac,imtl_g,cagrad,nash_mtl,aligned_mtl. Run pinned, e.g. `taskset -c 1 bash results/run_dense.sh`.
set -u
cd "$(dirname "$0")/.."
METHODS="${1:-all}"
O=results/dense_quick8
dbmtl-jax run dense --methods "$METHODS" --quick --epochs 8 --seeds 3 --out $O --no-progress
# DB-MTL with β = 0 (no gradient EMA), the README's diagnostic row for the default β = 0.9
dbmtl-jax run dense --methods dbmtl --hp dbmtl.beta=0.0 --quick --epochs 8 --seeds 3 --out $O --no-progress
dbmtl-jax report $O > /dev/null
python results/delta_breakdown.py $O > /dev/null
# STL seed 2 of this directory trained its normal member on non-finite gradients (see results/README.md §9), so
# also write $O/delta_stl_finite.md: Δp against the STL seeds without non-finite steps, with per-task columns.
python - "$O" > /dev/null <<'PY'
# Δp against the STL runs that trained without non-finite steps (the report's Δp uses every STL seed).
import glob, json, statistics as st, sys
from collections import defaultdict
d = sys.argv[1]
runs = [json.load(open(f)) for f in sorted(glob.glob(f"{d}/*/*.json"))]
runs = [r for r in runs if r.get("status") == "done"]
tasks = runs[0]["tasks"]
keys = [(t, m, hib) for t, v in tasks.items() for m, hib in v["metrics"].items()]
ok = [r for r in runs if r["method"] == "stl" and r["nonfinite_steps"] == 0]
bad = [r["seed"] for r in runs if r["method"] == "stl" and r["nonfinite_steps"] > 0]
base = {(t, m): st.mean(r["metrics"]["test"][t][m] for r in ok) for t, m, _ in keys}
rows = defaultdict(list)
per = defaultdict(lambda: defaultdict(list))
for r in runs:
    if r["method"] == "stl" and r["nonfinite_steps"] > 0:
        continue
    hp = r["config"]["hparams"]
    label = r["config"]["method"] + (" " + json.dumps(hp, sort_keys=True) if hp else "")
    dp = 100 * st.mean((1 if hib else -1) * (r["metrics"]["test"][t][m] - base[t, m]) / base[t, m] for t, m, hib in keys)
    rows[label].append((dp, r["seed"], r["nonfinite_steps"]))
    for t in tasks:
        ks = [(m, hib) for tt, m, hib in keys if tt == t]
        per[label][t].append(100 * st.mean((1 if hib else -1) * (r["metrics"]["test"][t][m] - base[t, m]) / base[t, m]
                                           for m, hib in ks))
out = [f"# Δp (%) vs STL without its non-finite seeds\n",
       f"Baseline: STL seeds {sorted(r['seed'] for r in ok)} (excluded: STL seeds {bad}, which had non-finite "
       "training losses). Mean ± std (ddof 1) over seeds; `nonfinite` = runs of the row with non-finite steps.\n",
       "Per-task columns: the mean over that task's metrics of the signed relative change (%), mean over seeds.\n",
       "| rank | row | " + " | ".join(f"{t} (%)" for t in tasks) + " | Δp (%) | seeds | nonfinite |",
       "|---" * (len(tasks) + 5) + "|"]
ranked = sorted(rows.items(), key=lambda kv: -st.mean(x[0] for x in kv[1]))
for i, (label, v) in enumerate(ranked, 1):
    dps = [x[0] for x in v]
    sd = f" ± {st.stdev(dps):.2f}" if len(dps) > 1 else ""
    out.append(f"| {i} | {label} | " + " | ".join(f"{st.mean(per[label][t]):+.2f}" for t in tasks) + f" | {st.mean(dps):+.2f}{sd} | {','.join(str(x[1]) for x in sorted(v, key=lambda x: x[1]))} "
               f"| {sum(1 for x in v if x[2] > 0)} |")
open(f"{d}/delta_stl_finite.md", "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
