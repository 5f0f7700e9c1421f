"""Per-task contributions to Δp: for each row of a report's summary.csv, the signed relative change (%) of each
task metric's seed-mean against the STL row's mean (positive = better than STL), their mean (= Δp of the seed
means, equal to the report's mean Δp since Δp is linear in the metrics), and the rank by Δp.
Writes <dir>/breakdown.md.  Usage: python results/delta_breakdown.py results/adult_main [...]
"""
from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

for d in map(Path, sys.argv[1:]):
    rows = list(csv.DictReader(open(d / "summary.csv")))
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        rs = [r for r in rows if r["setting"] == setting and r["metric"] not in ("delta_p", "median_step_time_s",
                                                                                 "wall_time_s") and r["task"]]
        stl = {(r["task"], r["metric"]): float(r["mean"]) for r in rs if r["method"] == "stl"}
        if not stl:
            continue
        keys = list(stl)
        table = defaultdict(dict)
        for r in rs:
            k = (r["task"], r["metric"])
            if k in stl:
                sign = 1.0 if r["higher_is_better"] == "True" else -1.0
                label = r["method"] + (f" {r['hparams']}" if r["hparams"] not in ("{}", "") else "")
                table[label][k] = 100.0 * sign * (float(r["mean"]) - stl[k]) / stl[k]
        ranked = sorted(table.items(), key=lambda kv: -sum(kv[1].values()) / len(keys))
        out.append(f"## {setting}\n")
        out.append("| rank | row | " + " | ".join(f"{t} {m} (%)" for t, m in keys) + " | Δp (%) |")
        out.append("|---" * (len(keys) + 3) + "|")
        for i, (label, v) in enumerate(ranked, 1):
            out.append(f"| {i} | {label} | " + " | ".join(f"{v[k]:+.2f}" for k in keys)
                       + f" | {sum(v.values()) / len(keys):+.2f} |")
        out.append("")
    (d / "breakdown.md").write_text("\n".join(out) + "\n")
    print(d, "\n" + "\n".join(out))
