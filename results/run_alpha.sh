#!/usr/bin/env bash
# Fig. 6 analogue on adult, full recipe, 3 seeds: DB-MTL's alpha_k = max (default) / min / mean / median of the
# EMA gradient norms, or the constant 1.0 (the paper does not give its constant).
set -u
cd "$(dirname "$0")/.."
. results/_common.sh
O=results/adult_alpha
reuse_from_main $O stl
dbmtl-jax run adult --methods stl --seeds 3 --out $O --no-progress
for a in "'max'" "'min'" "'mean'" "'median'" 1.0; do
  dbmtl-jax run adult --methods dbmtl --seeds 3 --out $O --no-progress --hp "dbmtl.alpha=$a"
done
dbmtl-jax report $O > /dev/null
