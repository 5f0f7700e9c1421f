#!/usr/bin/env bash
# Fig. 1 analogue on adult, full recipe, 3 seeds: six gradient-balancing methods with and without the log transform
# (plus EW / EW+log for reference).
set -u
cd "$(dirname "$0")/.."
. results/_common.sh
M="pcgrad gradvac imtl_g cagrad nash_mtl aligned_mtl ew"
reuse_from_main results/adult_log stl $M
L=stl; for m in $M; do L="$L,$m,$m+log"; done
dbmtl-jax run adult --methods "$L" --seeds 3 --out results/adult_log --no-progress
dbmtl-jax report results/adult_log > /dev/null
