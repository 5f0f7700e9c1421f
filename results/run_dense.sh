#!/usr/bin/env bash
# Main table on the `dense` benchmark (layered Fashion-MNIST scenes: segmentation, depth, normals; a synthetic
# NYUv2 stand-in), CPU-scaled: the quick data subset (128 training / 64 eval scenes, batch 16) trained for
# 8 epochs = 64 steps (the quick recipe's 2 epochs are a 16-step smoke run), lr 1e-3, weight decay 1e-5, 3 seeds.
# One step of the U-Net HPS costs ~0.4-0.6 s on one CPU core, so the first pass runs STL, EW, DB-MTL and the six
# gradient methods of Fig. 1; pass a method list as $1 to add rows (runs are resumable).
set -u
cd "$(dirname "$0")/.."
METHODS="${1:-stl,ew,dbmtl,pcgrad,gradvac,imtl_g,cagrad,nash_mtl,aligned_mtl}"
O=results/dense_quick8
dbmtl-jax run dense --methods "$METHODS" --quick --epochs 8 --seeds 3 --out $O --no-progress
dbmtl-jax report $O > /dev/null
python results/delta_breakdown.py $O > /dev/null
