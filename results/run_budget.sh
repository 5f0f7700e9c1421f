#!/usr/bin/env bash
# Diagnostic (not a paper table): is the 16-epoch adult budget the reason MTL methods trail STL?
# Same recipe with 3x the epochs (48) for STL, EW, DB-MTL and the best gradient-balancing competitors.
set -u
cd "$(dirname "$0")/.."
dbmtl-jax run adult --methods stl,ew,dbmtl,mtadam,gradvac,pcgrad,cagrad --epochs 48 --seeds 3 \
  --out results/adult_budget48 --no-progress
dbmtl-jax report results/adult_budget48 > /dev/null
