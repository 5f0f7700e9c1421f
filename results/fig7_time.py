"""Fig. 7 analogue: training time per epoch per method, from the run JSONs of results/adult_main.

Per run: (i) training time per epoch = ``median_step_time_s`` x ``steps_per_epoch`` (each step timed to
completion, compilation excluded; the primary measure), and (ii) the mean of ``history.epoch_time_s`` over
epochs 2..E (epoch 1 includes JIT compilation), which also includes the validation pass, the best-epoch
snapshot and the host copy of the per-task gradient statistics; then mean and std over seeds. Loss-weighting methods run the cheap weighted-loss path (one backward pass), every other method the
per-task path (T = 4 backward passes through the shared trunk). Writes time_per_epoch.{csv,md,png} into
results/adult_time/.  Usage: python results/fig7_time.py [RUN_DIR] [OUT_DIR]
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from dbmtl_jax import METHOD_GROUPS

src = Path(sys.argv[1] if len(sys.argv) > 1 else "results/adult_main")
out = Path(sys.argv[2] if len(sys.argv) > 2 else "results/adult_time")
out.mkdir(parents=True, exist_ok=True)

per_method: dict[str, list[float]] = defaultdict(list)
step: dict[str, list[float]] = defaultdict(list)
train: dict[str, list[float]] = defaultdict(list)
paths: dict[str, str] = {}
for p in sorted(src.rglob("*.json")):
    r = json.loads(p.read_text())
    if r.get("status") != "done" or r["config"].get("hparams"):
        continue
    ep = r["history"]["epoch_time_s"][1:]
    per_method[r["method"]].append(sum(ep) / len(ep))
    step[r["method"]].append(r["median_step_time_s"])
    train[r["method"]].append(r["median_step_time_s"] * r["steps_per_epoch"])
    paths[r["method"]] = r["config"]["grad_path"]


def group(m: str) -> str:
    return "stl" if m == "stl" else METHOD_GROUPS.get(m.split("+")[0], "?")


rows = []
for m, v in per_method.items():
    rows.append(dict(method=m, group=group(m), grad_path=paths[m], seeds=len(v),
                     train_time_per_epoch_s=statistics.mean(train[m]),
                     train_time_std=statistics.stdev(train[m]) if len(v) > 1 else 0.0,
                     epoch_time_s=statistics.mean(v), epoch_time_std=statistics.stdev(v) if len(v) > 1 else 0.0,
                     median_step_ms=1e3 * statistics.mean(step[m])))
order = {"stl": 0, "loss": 1, "gradient": 2, "hybrid": 3, "dbmtl": 4}
rows.sort(key=lambda r: (order.get(r["group"], 9), r["train_time_per_epoch_s"]))

with open(out / "time_per_epoch.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
lines = ["| method | group | gradient path | seeds | training time / epoch (s) | median step (ms) "
         "| epoch wall incl. validation (s) |", "|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['method']} | {r['group']} | {r['grad_path']} | {r['seeds']} | "
                 f"{r['train_time_per_epoch_s']:.3f} ± {r['train_time_std']:.3f} | {r['median_step_ms']:.2f} | "
                 f"{r['epoch_time_s']:.3f} ± {r['epoch_time_std']:.3f} |")
(out / "time_per_epoch.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

colors = {"stl": "grey", "loss": "tab:cyan", "gradient": "tab:red", "hybrid": "gold", "dbmtl": "tab:blue"}
fig, ax = plt.subplots(figsize=(10, 3.8))
ax.bar(range(len(rows)), [r["train_time_per_epoch_s"] for r in rows], yerr=[r["train_time_std"] for r in rows],
       color=[colors.get(r["group"], "k") for r in rows])
ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=60, ha="right")
ax.set_ylabel("median step x steps/epoch (s)")
ax.set_title("adult, 2-core CPU (shared): cyan loss, red gradient, yellow hybrid, blue DB-MTL")
fig.tight_layout()
fig.savefig(out / "time_per_epoch.png", dpi=110)
