#!/usr/bin/env bash
# The paper's tables on one benchmark at a CPU-scaled budget, 3 seeds, one command per table:
#   bash results/run_study.sh BENCHMARK [SECTION ...]      (sections: main beta ablation log alpha budget; default: all)
# BENCHMARK and its budget (the quick data subset of each recipe, trained for more than the recipe's smoke epochs;
# NOT the paper's settings, see results/README.md):
#   multimnist  12 quick epochs = 192 steps   main -> results/multimnist_quick12/, the rest -> results/multimnist12_<section>/
#   dense        8 quick epochs =  64 steps   main -> results/dense_quick8/,        the rest -> results/dense8_<section>/
#   qm9         10 quick epochs = 100 steps   main -> results/qm9_quick10/,         the rest -> results/qm9_10_<section>/
# Sections:
#   main      STL + all 26 registry methods, and DB-MTL with β = 0 (a diagnostic row)
#   beta      Fig. 5: DB-MTL β ∈ {0, 0.1, 0.5, 0.9} and {0.1, 0.5, 0.9}/k^0.5, with validation selection (val_selection.md)
#   ablation  Table 5: EW, EW + log, DB-MTL without log, DB-MTL; the DB-MTL rows also at the validation-selected β
#   log       Fig. 1: PCGrad, GradVac, IMTL-G, CAGrad, Nash-MTL, Aligned-MTL without and with the log transform
#   alpha     Fig. 6: α ∈ {max, min, mean, median, 1.0} at the default β = 0.9 and at the validation-selected β
#   budget    a diagnostic: STL, EW and DB-MTL (default and selected β) at 3× the epochs -> <prefix>_budget3x/
# "Validation-selected β" is the best row of the paper's grid ({0.1, 0.5, 0.9} × σ ∈ {0, 0.5}) on validation Δp
# (results/select_on_val.py --print-grid-best), so run `beta` before `ablation` and `alpha`.
# Resumable: finished runs are skipped; identical runs (same config hash) are copied from the main directory.
# Pin it to a core on a shared machine, e.g. `taskset -c 1 bash results/run_study.sh qm9 beta`.
set -u
cd "$(dirname "$0")/.."
. results/_common.sh
B="${1:?usage: run_study.sh multimnist|dense|qm9 [main beta ablation log alpha]}"; shift
case $B in
  multimnist) EPOCHS=12; M=results/multimnist_quick12; P=results/multimnist12 ;;
  dense)      EPOCHS=8;  M=results/dense_quick8;       P=results/dense8 ;;
  qm9)        EPOCHS=10; M=results/qm9_quick10;        P=results/qm9_10 ;;
  *) echo "unknown benchmark $B (multimnist, dense or qm9)" >&2; exit 2 ;;
esac
SECTIONS="${*:-main beta ablation log alpha budget}"
run() { dbmtl-jax run "$B" --quick --epochs "$EPOCHS" --seeds 3 --no-progress "$@"; }
report() { dbmtl-jax report "$1" > /dev/null && python results/delta_breakdown.py "$1" > /dev/null; }
selected_beta() {  # "--hp dbmtl.beta=B --hp dbmtl.beta_sigma=S" of the validation-selected grid row
  local b s; read -r b s < <(python results/select_on_val.py "$P"_beta --print-grid-best) || return 1
  if [ "$s" = 0.0 ]; then echo "--hp dbmtl.beta=$b"; else echo "--hp dbmtl.beta=$b --hp dbmtl.beta_sigma=$s"; fi
}
for section in $SECTIONS; do
  case $section in
  main)
    run --methods all --out $M
    run --methods dbmtl --hp dbmtl.beta=0.0 --out $M
    report $M ;;
  beta)
    O="$P"_beta; reuse_runs $M $O $B stl dbmtl
    for hp in "0.0 0.0" "0.1 0.0" "0.5 0.0" "0.9 0.0" "0.1 0.5" "0.5 0.5" "0.9 0.5"; do
      set -- $hp; run --methods dbmtl --out $O --hp dbmtl.beta=$1 --hp dbmtl.beta_sigma=$2
    done
    run --methods stl --out $O
    report $O && python results/select_on_val.py $O > /dev/null ;;
  ablation)
    O="$P"_ablation; reuse_runs $M $O $B stl ew dbmtl; SEL=$(selected_beta) || exit 1
    run --methods stl,ew,ew+log,dbmtl+nolog,dbmtl --out $O
    run --methods dbmtl,dbmtl+nolog $SEL --out $O
    report $O ;;
  log)
    O="$P"_log; reuse_runs $M $O $B stl pcgrad gradvac imtl_g cagrad nash_mtl aligned_mtl
    run --methods stl,pcgrad,gradvac,imtl_g,cagrad,nash_mtl,aligned_mtl --out $O
    run --methods pcgrad+log,gradvac+log,imtl_g+log,cagrad+log,nash_mtl+log,aligned_mtl+log --out $O
    report $O ;;
  alpha)
    O="$P"_alpha; reuse_runs $M $O $B stl dbmtl; SEL=$(selected_beta) || exit 1
    for a in "'min'" "'mean'" "'median'" 1.0; do run --methods dbmtl --out $O --hp "dbmtl.alpha=$a"; done
    for a in "'max'" "'min'" "'mean'" "'median'" 1.0; do run --methods dbmtl $SEL --out $O --hp "dbmtl.alpha=$a"; done
    run --methods stl,dbmtl --out $O
    report $O ;;
  budget)
    O="$P"_budget3x; SEL=$(selected_beta) || exit 1
    run --methods stl,ew,dbmtl --epochs $((3 * EPOCHS)) --out $O
    run --methods dbmtl $SEL --epochs $((3 * EPOCHS)) --out $O
    report $O ;;
  *) echo "unknown section $section (main beta ablation log alpha budget)" >&2; exit 2 ;;
  esac
done
