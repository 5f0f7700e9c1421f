#!/usr/bin/env bash
# MultiMNIST at 12 quick epochs (192 steps: lr 1e-3, batch 256, a fixed 4,096-pair training subset, 2,000 eval
# pairs), 3 seeds, CPU-scaled (the full recipe, 30 epochs x 54 steps, is out of reach here). Sections (all by default):
#   main     STL + all 26 methods                         -> results/multimnist_quick12/
#   beta     DB-MTL's beta grid (paper Sec. 4.1, + beta=0) -> results/multimnist12_beta/ (+ val_selection.md)
#   ablation Table 5: ew, ew+log, dbmtl+nolog, dbmtl (beta 0.9 and 0.1) -> results/multimnist12_ablation/
#   log      Fig. 1: six gradient methods with/without log -> results/multimnist12_log/
#   alpha    Fig. 6: alpha in {max, min, mean, median, 1.0} at beta 0.9 and 0.1 -> results/multimnist12_alpha/
# Runs are resumable (finished runs are skipped) and identical runs are copied between directories.
set -u
cd "$(dirname "$0")/.."
. results/_common.sh
SECTIONS="${*:-main beta ablation log alpha}"
B=multimnist
M=results/multimnist_quick12
run() { dbmtl-jax run $B --quick --epochs 12 --seeds 3 --no-progress "$@"; }
for s in $SECTIONS; do
  case $s in
  main)
    run --methods all --out $M && dbmtl-jax report $M > /dev/null ;;
  beta)
    O=results/multimnist12_beta; reuse_runs $M $O $B stl dbmtl
    for hp in "0.0 0.0" "0.1 0.0" "0.5 0.0" "0.9 0.0" "0.1 0.5" "0.5 0.5" "0.9 0.5"; do
      set -- $hp; run --methods dbmtl --out $O --hp dbmtl.beta=$1 --hp dbmtl.beta_sigma=$2
    done
    dbmtl-jax report $O > /dev/null && python results/select_on_val.py $O > /dev/null ;;
  ablation)
    O=results/multimnist12_ablation; reuse_runs $M $O $B stl ew dbmtl
    run --methods stl,ew,ew+log,dbmtl+nolog,dbmtl --out $O
    run --methods dbmtl,dbmtl+nolog --hp dbmtl.beta=0.1 --out $O   # the validation-selected beta (beta section)
    dbmtl-jax report $O > /dev/null ;;
  log)
    O=results/multimnist12_log; reuse_runs $M $O $B stl pcgrad gradvac imtl_g cagrad nash_mtl aligned_mtl
    run --methods stl,pcgrad,gradvac,imtl_g,cagrad,nash_mtl,aligned_mtl --out $O
    run --methods pcgrad+log,gradvac+log,imtl_g+log,cagrad+log,nash_mtl+log,aligned_mtl+log --out $O
    dbmtl-jax report $O > /dev/null ;;
  alpha)
    O=results/multimnist12_alpha; reuse_runs $M $O $B stl dbmtl
    for a in "'min'" "'mean'" "'median'" 1.0; do run --methods dbmtl --out $O --hp "dbmtl.alpha=$a"; done
    for a in "'max'" "'min'" "'mean'" "'median'" 1.0; do   # at the validation-selected beta = 0.1
      run --methods dbmtl --out $O --hp dbmtl.beta=0.1 --hp "dbmtl.alpha=$a"
    done
    run --methods stl,dbmtl --out $O && dbmtl-jax report $O > /dev/null ;;
  *) echo "unknown section $s" >&2; exit 2 ;;
  esac
done
