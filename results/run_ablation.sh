#!/usr/bin/env bash
# Table 5 analogue (ablation) on adult, full recipe, 3 seeds:
# neither = ew, loss-scale only = ew+log, gradient-magnitude only = dbmtl+nolog, both = dbmtl.
set -u
cd "$(dirname "$0")/.."
. results/_common.sh
reuse_from_main results/adult_ablation stl ew dbmtl
dbmtl-jax run adult --methods stl,ew,ew+log,dbmtl+nolog,dbmtl --seeds 3 --out results/adult_ablation --no-progress
dbmtl-jax report results/adult_ablation > /dev/null
