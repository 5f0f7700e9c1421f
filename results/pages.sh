#!/usr/bin/env bash
# Regenerate every paired page from the committed records: one line per results/*/paired*.md page (and multimnist's across
# pages, the curves.md pages of `dbmtl-jax curves`), with the command and flags it was made with, qm9's and multimnist's per-task breakdowns and the val_selection.md pages (`dbmtl-jax paired`; see results/run_study.sh and results/README.md).
#   bash results/pages.sh        (from any directory; reads results/runs/, writes the pages in place)
# Each page is read-only arithmetic over the run records (seconds each; nothing is trained). On a shared machine
# run it as `nice -n 10 bash results/pages.sh`.
set -eu
cd "$(dirname "$0")/.."
P="python -m dbmtl_jax.experiments paired"
R=results
$P $R/adult_120ep_finished --out $R/adult_120ep_finished/paired.md
$P $R/adult_120ep_methods --out $R/adult_120ep_methods/paired.md
python -m dbmtl_jax.experiments curves $R/adult_120ep_methods --out $R/adult_120ep_methods/curves.md
$P $R/adult_120ep_paper --out $R/adult_120ep_paper/paired.md
$P $R/adult_120ep_paper --ref pcgrad --ref gradvac --ref imtl_g --ref cagrad --ref nash_mtl --ref aligned_mtl --out $R/adult_120ep_paper/fig1_paired.md
$P $R/adult_120ep_paper --ref pcgrad --ref gradvac --ref imtl_g --ref cagrad --ref nash_mtl --ref aligned_mtl --average-last 0.2 --out $R/adult_120ep_paper/fig1_paired_no_selection.md
python -m dbmtl_jax.experiments curves $R/adult_120ep_paper --out $R/adult_120ep_paper/curves.md
$P $R/adult_16ep_budget --ref ew --ref 'dbmtl (beta_sigma=0.0)' --ref gradvac --ref stl --out $R/adult_16ep_budget/paired.md
$P $R/adult_l1_120ep_finished --out $R/adult_l1_120ep_finished/paired.md
$P $R/adult_l1_120ep_methods --out $R/adult_l1_120ep_methods/paired.md
python -m dbmtl_jax.experiments curves $R/adult_l1_120ep_methods --out $R/adult_l1_120ep_methods/curves.md
$P $R/adult_l1_120ep_paper --out $R/adult_l1_120ep_paper/paired.md
$P $R/adult_l1_120ep_paper --ref pcgrad --ref gradvac --ref imtl_g --ref cagrad --ref nash_mtl --ref aligned_mtl --out $R/adult_l1_120ep_paper/fig1_paired.md
$P $R/adult_l1_120ep_paper --ref pcgrad --ref gradvac --ref imtl_g --ref cagrad --ref nash_mtl --ref aligned_mtl --average-last 0.2 --out $R/adult_l1_120ep_paper/fig1_paired_no_selection.md
python -m dbmtl_jax.experiments curves $R/adult_l1_120ep_paper --out $R/adult_l1_120ep_paper/curves.md
$P $R/dense_60ep_finished --out $R/dense_60ep_finished/paired.md
$P $R/dense_60ep_finished --average-last 0.2 --out $R/dense_60ep_finished/paired_no_selection.md
python -m dbmtl_jax.experiments curves $R/dense_60ep_finished --out $R/dense_60ep_finished/curves.md
python -m dbmtl_jax.experiments breakdown $R/dense_60ep_finished > /dev/null  # writes breakdown.md itself
$P $R/dense_60ep_table5 --out $R/dense_60ep_table5/paired.md
$P $R/dense_60ep_table5 --average-last 0.2 --out $R/dense_60ep_table5/paired_no_selection.md
python -m dbmtl_jax.experiments curves $R/dense_60ep_table5 --out $R/dense_60ep_table5/curves.md
python -m dbmtl_jax.experiments breakdown $R/dense_60ep_table5 > /dev/null
$P $R/multifashion_320ep_finished --out $R/multifashion_320ep_finished/paired.md
$P $R/multifashion_320ep_finished --average-last 0.2 --out $R/multifashion_320ep_finished/paired_no_selection.md
python -m dbmtl_jax.experiments curves $R/multifashion_320ep_finished --out $R/multifashion_320ep_finished/curves.md
$P $R/multifashion_320ep_grid --ref dbmtl --ref 'dbmtl (beta=0.0)' --out $R/multifashion_320ep_grid/paired.md
$P $R/multifashion_320ep_grid --ref dbmtl --ref 'dbmtl (beta=0.0)' --average-last 0.2 --out $R/multifashion_320ep_grid/paired_no_selection.md
python -m dbmtl_jax.experiments curves $R/multifashion_320ep_grid --ref dbmtl --out $R/multifashion_320ep_grid/curves.md
$P $R/multifashion_320ep_paper --ref ew --ref dbmtl --out $R/multifashion_320ep_paper/paired.md
$P $R/multifashion_320ep_paper --ref ew --ref dbmtl --average-last 0.2 --out $R/multifashion_320ep_paper/paired_no_selection.md
$P $R/multifashion_320ep_paper --ref pcgrad --ref gradvac --ref imtl_g --ref cagrad --ref nash_mtl --ref aligned_mtl --out $R/multifashion_320ep_paper/fig1_paired.md
$P $R/multifashion_320ep_paper --ref pcgrad --ref gradvac --ref imtl_g --ref cagrad --ref nash_mtl --ref aligned_mtl --average-last 0.2 --out $R/multifashion_320ep_paper/fig1_paired_no_selection.md
python -m dbmtl_jax.experiments breakdown $R/multifashion_320ep_paper > /dev/null  # writes breakdown.md itself
python -m dbmtl_jax.experiments curves $R/multifashion_320ep_paper --out $R/multifashion_320ep_paper/curves.md
$P $R/multifashion_320ep_strongest --ref ew --ref dbmtl --out $R/multifashion_320ep_strongest/paired.md
$P $R/multifashion_320ep_strongest --ref ew --ref dbmtl --average-last 0.2 --out $R/multifashion_320ep_strongest/paired_no_selection.md
python -m dbmtl_jax.experiments breakdown $R/multifashion_320ep_strongest > /dev/null
python -m dbmtl_jax.experiments curves $R/multifashion_320ep_strongest --out $R/multifashion_320ep_strongest/curves.md
$P $R/multimnist_12ep_betaopt --out $R/multimnist_12ep_betaopt/paired.md
$P $R/multimnist_12ep_betaopt --baseline ew --out $R/multimnist_12ep_betaopt/paired_vs_ew.md
$P $R/multimnist_160ep_converged --out $R/multimnist_160ep_converged/paired.md
$P $R/multimnist_160ep_converged --baseline ew --out $R/multimnist_160ep_converged/paired_vs_ew.md
$P $R/multimnist_320ep_cosine $R/multimnist_320ep_adam_b2 --ref ew --ref dbmtl --out $R/multimnist_320ep_adam_b2/paired.md
$P $R/multimnist_320ep_cosine $R/multimnist_320ep_adam_b2 --ref ew --ref dbmtl --average-last 0.2 --out $R/multimnist_320ep_adam_b2/paired_no_selection.md
$P $R/multimnist_320ep_converged --out $R/multimnist_320ep_converged/paired.md
$P $R/multimnist_320ep_converged --average-last 0.2 --out $R/multimnist_320ep_converged/paired_last_fifth.md
$P $R/multimnist_320ep_converged --smooth 21 --out $R/multimnist_320ep_converged/paired_smooth21.md
$P $R/multimnist_320ep_converged --smooth 9 --out $R/multimnist_320ep_converged/paired_smooth9.md
$P $R/multimnist_320ep_cosine --ref ew --ref dbmtl --ref 'dbmtl (beta=0.0)' --out $R/multimnist_320ep_cosine/paired.md
$P $R/multimnist_320ep_cosine --ref ew --ref dbmtl --ref 'dbmtl (beta=0.0)' --average-last 0.2 --out $R/multimnist_320ep_cosine/paired_no_selection.md
$P $R/multimnist_320ep_cosine --ref stl --out $R/multimnist_320ep_cosine/paired_vs_stl.md
$P $R/multimnist_320ep_cosine --ref stl --average-last 0.2 --out $R/multimnist_320ep_cosine/paired_vs_stl_no_selection.md
$P $R/multimnist_320ep_stlcosine --out $R/multimnist_320ep_stlcosine/paired.md
$P $R/multimnist_320ep_stlcosine --average-last 0.2 --out $R/multimnist_320ep_stlcosine/paired_no_selection.md
$P $R/multimnist_320ep_converged $R/multimnist_320ep_stlcosine --across --out $R/multimnist_320ep_stlcosine/across.md
$P $R/multimnist_320ep_optimizer $R/multimnist_320ep_stlcosine --out $R/multimnist_320ep_optimizer/paired.md
$P $R/multimnist_320ep_sgdlr $R/multimnist_320ep_stlcosine --out $R/multimnist_320ep_sgdlr/paired.md
$P $R/multimnist_320ep_sgdlr $R/multimnist_320ep_stlcosine --split val --out $R/multimnist_320ep_sgdlr/paired_val.md
$P $R/multimnist_80ep_betaopt --out $R/multimnist_80ep_betaopt/paired.md
$P $R/multimnist_80ep_betaopt --baseline ew --out $R/multimnist_80ep_betaopt/paired_vs_ew.md
$P $R/multimnist_digits_100ep_hurts --baseline ew --out $R/multimnist_digits_100ep_hurts/paired.md
$P $R/multimnist_digits_100ep_hurts --ref ew --ref dbmtl --ref stl --ref 'dbmtl (beta_sigma=0.0)' --out $R/multimnist_digits_100ep_hurts/paired_vs_stl.md
$P $R/qm9_150ep_table5 $R/qm9_150ep_adam_b2 --ref ew --ref dbmtl --out $R/qm9_150ep_adam_b2/paired.md
$P $R/qm9_150ep_table5 $R/qm9_150ep_adam_b2 --ref ew --ref dbmtl --average-last 0.2 --out $R/qm9_150ep_adam_b2/paired_no_selection.md
$P $R/qm9_150ep_finished --out $R/qm9_150ep_finished/paired.md
$P $R/qm9_150ep_finished --average-last 0.2 --out $R/qm9_150ep_finished/paired_no_selection.md
$P $R/qm9_150ep_optimizer --out $R/qm9_150ep_optimizer/paired.md
$P $R/qm9_150ep_sgdlr --split val --out $R/qm9_150ep_sgdlr/paired_val.md
$P $R/qm9_150ep_table5 --out $R/qm9_150ep_table5/paired.md
$P $R/qm9_150ep_table5 --average-last 0.2 --out $R/qm9_150ep_table5/paired_no_selection.md
$P $R/multimnist_320ep_methods $R/multimnist_320ep_stlcosine --out $R/multimnist_320ep_methods/paired.md
$P $R/multimnist_320ep_methods $R/multimnist_320ep_stlcosine --average-last 0.2 --out $R/multimnist_320ep_methods/paired_no_selection.md
python -m dbmtl_jax.experiments curves $R/multimnist_320ep_methods --out $R/multimnist_320ep_methods/curves.md
$P $R/multimnist_320ep_paper --out $R/multimnist_320ep_paper/paired.md
$P $R/multimnist_320ep_paper --ref pcgrad --ref gradvac --ref imtl_g --ref cagrad --ref nash_mtl --ref aligned_mtl --out $R/multimnist_320ep_paper/fig1_paired.md
$P $R/multimnist_320ep_paper --ref pcgrad --ref gradvac --ref imtl_g --ref cagrad --ref nash_mtl --ref aligned_mtl --average-last 0.2 --out $R/multimnist_320ep_paper/fig1_paired_no_selection.md
$P $R/qm9_150ep_methods --out $R/qm9_150ep_methods/paired.md
$P $R/qm9_150ep_methods --average-last 0.2 --out $R/qm9_150ep_methods/paired_no_selection.md
python -m dbmtl_jax.experiments breakdown $R/qm9_150ep_methods > /dev/null  # writes breakdown.md itself
python -m dbmtl_jax.experiments curves $R/qm9_150ep_methods --out $R/qm9_150ep_methods/curves.md
$P $R/qm9_150ep_mtadam_chain --ref 'mtadam → adam' --out $R/qm9_150ep_mtadam_chain/paired.md
# qm9's paper study (§32): Fig. 5's β grid with the default and β = 0 as references, then Fig. 1's and Fig. 6's rows
$P $R/qm9_150ep_paper --ref dbmtl --ref 'dbmtl (beta=0.0)' --ref ew --out $R/qm9_150ep_paper/paired.md
$P $R/qm9_150ep_paper --ref dbmtl --ref 'dbmtl (beta=0.0)' --ref ew --average-last 0.2 --out $R/qm9_150ep_paper/paired_no_selection.md
$P $R/qm9_150ep_paper --ref pcgrad --ref gradvac --ref imtl_g --ref cagrad --ref nash_mtl --ref aligned_mtl --out $R/qm9_150ep_paper/fig1_paired.md
$P $R/qm9_150ep_paper --ref pcgrad --ref gradvac --ref imtl_g --ref cagrad --ref nash_mtl --ref aligned_mtl --average-last 0.2 --out $R/qm9_150ep_paper/fig1_paired_no_selection.md
$P $R/qm9_150ep_paper --ref 'dbmtl (beta=0.5, beta_sigma=0.0)' --ref 'dbmtl (beta_sigma=0.0)' --out $R/qm9_150ep_paper/fig5_paired.md
$P $R/qm9_150ep_paper --ref 'dbmtl (beta=0.5, beta_sigma=0.0)' --ref 'dbmtl (beta_sigma=0.0)' --average-last 0.2 --out $R/qm9_150ep_paper/fig5_paired_no_selection.md
python -m dbmtl_jax.experiments breakdown $R/qm9_150ep_paper > /dev/null  # writes breakdown.md itself
# multimnist's cross-setting pages (each row's gain from one optimizer or schedule to another) and per-task breakdown
$P $R/multimnist_320ep_cosine $R/multimnist_320ep_adam_b2 --across --ref ew --ref dbmtl --out $R/multimnist_320ep_adam_b2/across.md
$P $R/multimnist_320ep_cosine $R/multimnist_320ep_adam_b2 --across --ref ew --ref dbmtl --average-last 0.2 --out $R/multimnist_320ep_adam_b2/across_no_selection.md
$P $R/multimnist_320ep_optimizer $R/multimnist_320ep_stlcosine --across --ref ew --ref dbmtl --ref 'dbmtl (beta=0.0)' --out $R/multimnist_320ep_optimizer/across.md
$P $R/multimnist_320ep_cosine --across --ref ew --ref dbmtl --out $R/multimnist_320ep_cosine/across.md
python -m dbmtl_jax.experiments breakdown $R/multimnist_320ep_cosine > /dev/null  # writes breakdown.md itself
python -m dbmtl_jax.experiments breakdown $R/multimnist_320ep_paper > /dev/null
python -m dbmtl_jax.experiments curves $R/multimnist_320ep_paper --out $R/multimnist_320ep_paper/curves.md
# the other cross-setting pages: qm9's Adam b2 (§30) and optimizer (§21) studies, multimnist's short-budget optimizer study (§11)
$P $R/qm9_150ep_table5 $R/qm9_150ep_adam_b2 --across --ref ew --ref dbmtl --out $R/qm9_150ep_adam_b2/across.md
$P $R/qm9_150ep_table5 $R/qm9_150ep_adam_b2 --across --ref ew --ref dbmtl --average-last 0.2 --out $R/qm9_150ep_adam_b2/across_no_selection.md
$P $R/qm9_150ep_optimizer --across --ref ew --ref dbmtl --ref 'dbmtl (beta=0.0)' --out $R/qm9_150ep_optimizer/across.md
$P $R/multimnist_12ep_betaopt --across --out $R/multimnist_12ep_betaopt/across.md
$P $R/multimnist_80ep_betaopt --across --out $R/multimnist_80ep_betaopt/across.md
# the short-budget β grids against the default β/√k (§13's table: the `Δp − dbmtl` column)
for d in adult_16ep_beta dense_8ep_beta multimnist_12ep_beta qm9_10ep_beta; do
  $P $R/$d --ref dbmtl --out $R/$d/paired.md
done
# validation selection of DB-MTL's β (Fig. 5's protocol): the β-grid folders, and the multimnist cosine study's β rows
# (that folder also holds Fig. 6's α rows, which --vary leaves out)
for d in adult_16ep_beta dense_8ep_beta multimnist_3ep_beta multimnist_12ep_beta qm9_10ep_beta; do
  python -m dbmtl_jax.experiments select $R/$d > /dev/null  # writes val_selection.md itself
done
python -m dbmtl_jax.experiments select $R/multimnist_320ep_cosine --vary beta,beta_sigma > /dev/null
python -m dbmtl_jax.experiments select $R/qm9_150ep_paper --vary beta,beta_sigma > /dev/null
python -m dbmtl_jax.experiments curves $R/qm9_150ep_paper --out $R/qm9_150ep_paper/curves.md
python -m dbmtl_jax.experiments select $R/multifashion_320ep_grid --vary beta,beta_sigma > /dev/null
