#!/usr/bin/env bash
# Fig. 5 analogue on adult, full recipe, 3 seeds: DB-MTL's EMA rate beta in {0, 0.1, 0.5, 0.9} (constant)
# and {0.1, 0.5, 0.9}/k^0.5 (beta_sigma=0.5). Each setting is its own config (own files, own report row).
set -u
cd "$(dirname "$0")/.."
. results/_common.sh
O=results/adult_beta
reuse_from_main $O stl
dbmtl-jax run adult --methods stl --seeds 3 --out $O --no-progress
for b in 0.0 0.1 0.5 0.9; do
  dbmtl-jax run adult --methods dbmtl --seeds 3 --out $O --no-progress --hp dbmtl.beta=$b --hp dbmtl.beta_sigma=0.0
done
for b in 0.1 0.5 0.9; do
  dbmtl-jax run adult --methods dbmtl --seeds 3 --out $O --no-progress --hp dbmtl.beta=$b --hp dbmtl.beta_sigma=0.5
done
dbmtl-jax report $O > /dev/null
