#!/usr/bin/env bash
# Diagnostic: does DB-MTL's EMA rate beta explain its poor multimnist quick-recipe result (48 steps)?
# beta in {0, 0.5, 0.9 (default)} constant and 0.5/k^0.5, quick recipe, 3 seeds (STL/default DB-MTL reused).
set -u
cd "$(dirname "$0")/.."
O=results/multimnist_quick_beta
mkdir -p $O/multimnist
for f in results/multimnist_quick/multimnist/multimnist__{stl,dbmtl,ew}__seed*.json; do [ -e "$f" ] && cp -n "$f" $O/multimnist/; done
dbmtl-jax run multimnist --methods stl,ew,dbmtl --quick --seeds 3 --out $O --no-progress
for hp in "0.0 0.0" "0.5 0.0" "0.5 0.5"; do
  set -- $hp
  dbmtl-jax run multimnist --methods dbmtl,dbmtl+nolog --quick --seeds 3 --out $O --no-progress \
    --hp dbmtl.beta=$1 --hp dbmtl.beta_sigma=$2
done
dbmtl-jax run multimnist --methods dbmtl+nolog --quick --seeds 3 --out $O --no-progress
dbmtl-jax report $O > /dev/null
