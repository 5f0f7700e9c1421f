#!/usr/bin/env bash
# Diagnostic: multimnist quick recipe with 4x the epochs (12 epochs on the same 4,096-pair subset), 3 seeds.
set -u
cd "$(dirname "$0")/.."
dbmtl-jax run multimnist --methods stl,ew,dbmtl,pcgrad --quick --epochs 12 --seeds 3 \
  --out results/multimnist_quick12 --no-progress
dbmtl-jax report results/multimnist_quick12 > /dev/null
# and DB-MTL without the EMA (beta = 0) at the same 12-epoch budget
dbmtl-jax run multimnist --methods dbmtl --quick --epochs 12 --seeds 3 --out results/multimnist_quick12 \
  --no-progress --hp dbmtl.beta=0.0
dbmtl-jax report results/multimnist_quick12 > /dev/null
