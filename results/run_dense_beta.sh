#!/usr/bin/env bash
# DB-MTL's β on `dense` at the main table's budget (quick subset, 8 epochs = 64 steps, 3 seeds): the paper's grid
# points 0.1 and 0.5/k^0.5 plus β = 0, next to the default 0.9 and STL (copied from results/dense_quick8), and the
# validation selection of results/select_on_val.py. Resumable.
set -u
cd "$(dirname "$0")/.."
. results/_common.sh
O=results/dense8_beta
reuse_runs results/dense_quick8 $O dense stl dbmtl
for hp in "0.1 0.0" "0.5 0.5" "0.0 0.0"; do
  set -- $hp
  dbmtl-jax run dense --methods dbmtl --quick --epochs 8 --seeds 3 --out $O --no-progress \
    --hp dbmtl.beta=$1 --hp dbmtl.beta_sigma=$2
done
dbmtl-jax report $O > /dev/null && python results/select_on_val.py $O > /dev/null
