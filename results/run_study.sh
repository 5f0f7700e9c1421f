#!/usr/bin/env bash
# The paper's tables on one benchmark at a CPU-scaled budget, 3 seeds, one command per table:
#   bash results/run_study.sh BENCHMARK [SECTION ...]      (sections: main beta ablation log alpha budget; default: all)
# BENCHMARK and its budget (the quick data subset of each recipe, trained for more than the recipe's smoke epochs;
# NOT the paper's settings, see results/README.md):
#   multimnist  12 quick epochs = 192 steps   -> results/multimnist_12ep_<section>/
#   dense        8 quick epochs =  64 steps   -> results/dense_8ep_<section>/
#   qm9         10 quick epochs = 100 steps   -> results/qm9_10ep_<section>/
# Layout (results/README.md): every run's record is stored once, in results/runs/<benchmark>/; each table is a study
# folder results/<benchmark>_<E>ep_<section>/ whose runs.txt lists its runs (`dbmtl-jax run --study`). A run that a
# table shares with another (STL, EW, DB-MTL of the main table) is found in the store by its config hash and listed,
# not retrained or copied.
# Sections:
#   main      STL + all 26 registry methods (DB-MTL at LibMTL's β = 0.9, σ = 0), and DB-MTL with β = 0 (a diagnostic row)
#   beta      Fig. 5: DB-MTL β ∈ {0, 0.1, 0.5, 0.9} and {0.1, 0.5, 0.9}/k^0.5, with validation selection (val_selection.md)
#   ablation  Table 5: EW, EW + log, DB-MTL without log, DB-MTL; the DB-MTL rows also at the validation-selected β
#   log       Fig. 1: PCGrad, GradVac, IMTL-G, CAGrad, Nash-MTL, Aligned-MTL without and with the log transform
#   alpha     Fig. 6: α ∈ {max, min, mean, median, 1.0} at LibMTL's β = 0.9 and at the validation-selected β
#   budget    a diagnostic: STL, EW and DB-MTL (LibMTL's and the selected β) at 3× the epochs
#   betaopt   (multimnist80) β ∈ {0.9, 0.9/k^0.5, 0} × {Adam, Adam b1 = 0, SGD momentum}: paired.md
#   hurts     (multimnist_digits) EW, DB-MTL, EW + log, DB-MTL without log, β = 0, β/k^0.5, STL: paired.md vs EW
#   converged (multimnist160) 5 seeds at 160 quick epochs: STL, EW, DB-MTL (default, LibMTL's β, β = 0), nine other
#             methods, Table 5 and Fig. 1 rows: paired.md
#   finished  (qm9_2k, multifashion320, dense60, adult120, adult120_l1) STL, EW and DB-MTL with --lr-schedule cosine, then DB-MTL at β = 0.9 and
#             β = 0, 5 seeds: paired.md
#   optimizer (qm9_2k, multimnist320) the finished (cosine) section's DB-MTL β rows and EW again with Adam b1 = 0
#             (double momentum?): paired.md, across.md
#   table5    (qm9_2k, dense60) Table 5's EW + log and DB-MTL without log under the finished protocol, 5 seeds: paired.md
#   sgdlr     (qm9_2k, multimnist320) the SGD-with-momentum learning-rate pilot of item 4 (EW, DB-MTL; seed 0;
#             grids per benchmark)
#   sgd       (qm9_2k, multimnist320) EW and DB-MTL's three β rows with SGD with
#             momentum at the pilot's rates, 5 seeds, into the optimizer table: paired.md, across.md (Adam → SGD gains)
#   methods   (qm9_2k, multimnist320, adult120, adult120_l1) the 26-method main table under the finished protocol, 5 seeds: paired.md
#   paper     (adult120, adult120_l1, qm9_2k, multimnist320, multifashion320) the rest of the paper's tables under the finished protocol, 5 seeds: Table 5 (EW + log, DB-MTL
#             without log), Fig. 1 (six gradient methods + log), Fig. 6 (α), Fig. 5 (β grid): paired.md
#   grid      (multifashion320, dense60) Fig. 5's β grid under the finished protocol beside the finished section's
#             rows, 5 seeds: paired.md, `dbmtl-jax select` for the paper's validation choice
#   strongest (multifashion320, dense60) STL, EW, DB-MTL and the 9 methods with the best mean Δp rank over the four
#             short-budget main tables, under the finished protocol, 5 seeds: paired.md
#   stlcosine (multimnist320) STL with the cosine schedule, the same-protocol reference for the cosine section's rows: paired.md
#   cosine    (multimnist320) EW and DB-MTL with the learning rate decayed to 0 over the run (--lr-schedule cosine),
#             5 seeds, beside the constant-rate rows, then Nash-MTL, CAGrad, their log rows and Table 5's rows under
#             the same schedule, then Fig. 6's α rows and Fig. 5's β grid: paired.md (Δp of the cosine rows vs the
#             stlcosine section's STL, listed in the study once trained; of the constant rows vs the constant-rate STL)
# The beta, ablation and alpha tables also show the main table's STL, LibMTL-setting DB-MTL and DB-MTL β = 0 rows.
# "Validation-selected β" is the best row of the paper's grid ({0.1, 0.5, 0.9} × σ ∈ {0, 0.5}) on validation Δp
# (`dbmtl-jax select DIR --print-grid-best`), so run `beta` before `ablation`, `alpha` and `budget`.
# Each table gets report.md, summary.csv, runs.csv and plots (`dbmtl-jax report`) and breakdown.md
# (`dbmtl-jax breakdown`); `dbmtl-jax summary results/<benchmark>_<E>ep` puts the tables side by side.
# Seed-by-seed sections run seeds 0-4 in order; RUN_STUDY_SEEDS="4 3" runs only those (in that order), so that two
# cores can share one section: give them disjoint seeds (a process started from another copy of the repository does
# not see the other's records, so it would train an overlapping seed again). A section's all-seed lines (--seeds 5)
# still run in full.
# Resumable: finished runs are skipped. RUN_STUDY_DRY_RUN=1 lists what each table would train or reuse (nothing is
# written). Pin it to a core on a shared machine, e.g. `taskset -c 1 bash results/run_study.sh qm9 beta`.
# On CPU the runs use tcmalloc when it is installed (Debian `libtcmalloc-minimal4`; RUN_STUDY_MALLOC=glibc keeps
# glibc's allocator): the same numbers, 1.3-1.4x faster steps here (results/README.md, "Run time and the allocator"), as glibc's
# allocator page-faults on the large buffers each step frees and allocates again (benchmarks/README.md).
set -u
cd "$(dirname "$0")/.."
TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
if [ "${RUN_STUDY_MALLOC:-tcmalloc}" = tcmalloc ] && [ -f "$TCMALLOC" ]; then
  export LD_PRELOAD="$TCMALLOC${LD_PRELOAD:+:$LD_PRELOAD}"
fi
B="${1:?usage: run_study.sh multimnist|dense|qm9 [main beta ablation log alpha budget]}"; shift
QUICK=--quick
DATA=
case $B in
  multimnist) EPOCHS=12 ;;
  dense)      EPOCHS=8 ;;
  qm9)        EPOCHS=10 ;;
  # The evidence studies of issue 12 (results/README.md §11-12), at budgets where validation selection plateaus:
  multimnist80)      B=multimnist; EPOCHS=80 ;;                 # 80 quick epochs = 1,280 steps; section betaopt
  multimnist_digits) EPOCHS=100; QUICK= ;;                      # the full recipe's 2,000 pairs; section hurts
  multimnist160)     B=multimnist; EPOCHS=160 ;;                # 2,560 steps, 5 seeds; section converged
  multimnist320)     B=multimnist; EPOCHS=320 ;;                # 5,120 steps, 5 seeds; sections converged, cosine
  multifashion320)   B=multifashion; EPOCHS=320 ;;              # the same 5,120 steps on MultiFashion; section finished
  adult120)          B=adult; EPOCHS=120; QUICK= ;;              # 120 epochs = 13,680 steps; sections methods, finished
  adult120_l1)       B=adult_l1; EPOCHS=120; QUICK= ;;           # the same with L1-trained regressions (§22); finished, methods
  # dense at its full recipe (2,000 / 500 / 500 scenes, batch 32): 60 epochs = 3,720 steps; section finished. On one
  # CPU core ≈ 40 min (EW) to 90 min (STL) per run: meant for a GPU session (results/dense_gpu.sh runs it there)
  dense60)           B=dense; EPOCHS=60; QUICK= ;;
  # §25's 60 epochs still rose at the end: twice the steps, and 1,000 validation / 1,000 test scenes (500 left STL's
  # Δp seed sd at 2.16, above the issue's 2); on a GPU: EPOCHS=120 ROWS=core DATA_OPTS=... results/dense_gpu.sh
  dense120)          B=dense; EPOCHS=120; QUICK=; DATA="--data-option num_val=1000 --data-option num_test=1000" ;;
  # qm9 at a size two cores can finish (results/README.md §18): the full recipe's random split of all 130,831
  # molecules, a fixed random 2,000 training molecules, 2,000 validation and 2,000 test, batch 64
  qm9_2k)            B=qm9; EPOCHS=150; QUICK=; DATA="--batch-size 64 --max-train-examples 2000 --max-eval-examples 2000" ;;
  *) echo "unknown benchmark $B (multimnist, dense, qm9, multimnist80, multimnist160, multimnist320, multifashion320," \
          "dense60, dense120, multimnist_digits, qm9_2k, adult120 or adult120_l1)" >&2
     exit 2 ;;
esac
P=results/${B}_${EPOCHS}ep   # study prefix: the tables are $P_<section>/
STORE=results/runs           # the record store
SECTIONS="${*:-main beta ablation log alpha budget}"
DRY=${RUN_STUDY_DRY_RUN:+--dry-run}
SEEDS=${RUN_STUDY_SEEDS:-0 1 2 3 4}
# EW + log (the paper and table5 sections): the committed rows of adult120(_l1) and qm9_2k ran on the per-task path
# (before +log had the weighted-loss path: the same update, another config hash, CHANGELOG 0.2.0), so --grad-stats
# finds them instead of retraining them; multimnist320's, multifashion320's and dense60's ran on the weighted one.
EWLOG_PATH=--grad-stats; case $B in multimnist|multifashion|dense) EWLOG_PATH= ;; esac
run() { dbmtl-jax run "$B" $QUICK $DATA --epochs "$EPOCHS" --seeds 3 --no-progress --out "$STORE" $DRY "$@"; }
report() { [ -n "$DRY" ] || { dbmtl-jax report "$1" > /dev/null && dbmtl-jax breakdown "$1" > /dev/null; }; }
selected_beta() {  # "--hp dbmtl.beta=B --hp dbmtl.beta_sigma=S" of the validation-selected grid row
  local b s; read -r b s < <(dbmtl-jax select "$P"_beta --print-grid-best) || return 1
  echo "--hp dbmtl.beta=$b --hp dbmtl.beta_sigma=$s"
}
# The committed tables ran DB-MTL at LibMTL's β = 0.9, σ = 0 (the library's default before 0.2.0, now 0.9/k^0.5):
# rows that stand for "DB-MTL as LibMTL runs it" spell it out, so these commands still regenerate those tables.
LIBMTL="--hp dbmtl.beta=0.9 --hp dbmtl.beta_sigma=0.0"
main_rows() {  # the main table's STL, LibMTL-setting DB-MTL and DB-MTL β = 0 rows, listed in table $1
  run --methods stl,dbmtl $LIBMTL --study "$1"
  run --methods dbmtl --hp dbmtl.beta=0.0 --study "$1"
}
finished_rows() {  # the finished section's rows into $O, seed by seed: STL, EW and DB-MTL, then DB-MTL at LibMTL's
  # constant β = 0.9 and with β = 0 (no EMA), the other two β of issue 12 item 4
  local s
  for s in $SEEDS; do run --methods dbmtl,stl,ew --lr-schedule cosine --seeds $s, --test-curve --study $O; done
  for s in $SEEDS; do
    run --methods dbmtl $LIBMTL --lr-schedule cosine --seeds $s, --test-curve --study $O
    run --methods dbmtl --hp dbmtl.beta=0.0 --lr-schedule cosine --seeds $s, --test-curve --study $O
  done
}
fig5_grid() {  # Fig. 5's grid rows beyond default, LibMTL's β and β = 0, finished protocol, seed by seed, into $O
  local s hp
  for s in $SEEDS; do
    for hp in "0.1 0.0" "0.5 0.0" "0.1 0.5" "0.5 0.5"; do
      set -- $hp; run --methods dbmtl --hp dbmtl.beta=$1 --hp dbmtl.beta_sigma=$2 --lr-schedule cosine --seeds $s, \
        --test-curve --study $O
    done
  done
}
for section in $SECTIONS; do
  O="$P"_$section
  case $section in
  main)
    run --methods all $LIBMTL --study $O
    run --methods dbmtl --hp dbmtl.beta=0.0 --study $O
    report $O ;;
  beta)
    main_rows $O
    for hp in "0.0 0.0" "0.1 0.0" "0.5 0.0" "0.9 0.0" "0.1 0.5" "0.5 0.5" "0.9 0.5"; do
      set -- $hp; run --methods dbmtl --study $O --hp dbmtl.beta=$1 --hp dbmtl.beta_sigma=$2
    done
    report $O && { [ -n "$DRY" ] || dbmtl-jax select $O > /dev/null; } ;;
  ablation)
    SEL=$(selected_beta) || exit 1
    main_rows $O
    run --methods stl,ew,ew+log,dbmtl+nolog,dbmtl $LIBMTL --study $O
    run --methods dbmtl,dbmtl+nolog $SEL --study $O
    report $O ;;
  log)
    run --methods stl,pcgrad,gradvac,imtl_g,cagrad,nash_mtl,aligned_mtl --study $O
    run --methods pcgrad+log,gradvac+log,imtl_g+log,cagrad+log,nash_mtl+log,aligned_mtl+log --study $O
    report $O ;;
  alpha)
    SEL=$(selected_beta) || exit 1
    main_rows $O
    for a in "'min'" "'mean'" "'median'" 1.0; do run --methods dbmtl $LIBMTL --study $O --hp "dbmtl.alpha=$a"; done
    for a in "'max'" "'min'" "'mean'" "'median'" 1.0; do run --methods dbmtl $SEL --study $O --hp "dbmtl.alpha=$a"; done
    report $O ;;
  budget)
    SEL=$(selected_beta) || exit 1
    run --methods stl,ew,dbmtl $LIBMTL --epochs $((3 * EPOCHS)) --study $O
    run --methods dbmtl $SEL --epochs $((3 * EPOCHS)) --study $O
    report $O ;;
  betaopt)  # issue 12 item 4: why constant β fails — β ∈ {0.9, 0.9/k^0.5, 0} × optimizer
    run --methods stl,ew,dbmtl $LIBMTL --study $O
    run --methods dbmtl --hp dbmtl.beta=0.0 --study $O
    run --optimizer adam --b1 0.0 --methods dbmtl $LIBMTL --study $O
    run --methods dbmtl --hp dbmtl.beta_sigma=0.5 --study $O
    run --optimizer adam --b1 0.0 --methods ew --study $O
    run --optimizer adam --b1 0.0 --methods dbmtl --hp dbmtl.beta=0.0 --study $O
    run --optimizer adam --b1 0.0 --methods dbmtl --hp dbmtl.beta_sigma=0.5 --study $O
    run --optimizer sgdm --lr 0.01 --methods ew,dbmtl $LIBMTL --study $O
    run --optimizer sgdm --lr 0.01 --methods dbmtl --hp dbmtl.beta_sigma=0.5 --study $O
    run --optimizer sgdm --lr 0.01 --methods dbmtl --hp dbmtl.beta=0.0 --study $O
    [ -n "$DRY" ] || { dbmtl-jax paired $O --out $O/paired.md && dbmtl-jax paired $O --baseline ew --out $O/paired_vs_ew.md \
      && dbmtl-jax paired $O --across --out $O/across.md; } ;;   # across.md: each row's gain from one optimizer to another
  hurts)  # issue 12 item 5: which part of DB-MTL hurts on many binary tasks with little data
    run --methods ew,dbmtl $LIBMTL --study $O
    run --methods dbmtl+nolog,ew+log $LIBMTL --study $O
    run --methods dbmtl --hp dbmtl.beta=0.0 --study $O
    run --methods dbmtl --hp dbmtl.beta_sigma=0.5 --study $O
    run --methods stl --study $O
    # seeds 3-4 of the rows that decide DB-MTL's default β (results/README.md §13)
    run --methods ew,dbmtl $LIBMTL --seeds 5 --study $O
    run --methods dbmtl --seeds 5 --study $O
    [ -n "$DRY" ] || dbmtl-jax paired $O --baseline ew --out $O/paired.md ;;
  converged)  # issue 12 items 1-3: 5 paired seeds at a budget where validation selection has plateaued
    # (at 80 epochs EW selected epochs 47-53 but DB-MTL rows 61-80; at 160 DB-MTL still 107-149). Rows: the decisive
    # ones first, seed by seed (so a partial study is already a paired table), then STL, then the strongest methods
    # of the 12-epoch main table, Table 5 and Fig. 1 rows. --test-curve records test after every epoch (never used
    # for selection) so that other selection rules can be compared afterwards (`dbmtl-jax paired --smooth`).
    # Cost per run on one core of the 2-core VM at 160 epochs: ≈ 5 min (EW), 7 min (DB-MTL), 10-17 min (STL).
    for s in $SEEDS; do
      run --methods ew,dbmtl --seeds $s, --test-curve --study $O   # "3," is the one seed 3
      run --methods dbmtl $LIBMTL --seeds $s, --test-curve --study $O
    done
    run --methods stl --seeds 5 --test-curve --study $O
    run --methods dbmtl --hp dbmtl.beta=0.0 --seeds 5 --test-curve --study $O
    run --methods stch,pcgrad,gradnorm,uw,imtl_l,gradvac,upgrad,nash_mtl,cagrad --seeds 5 --test-curve --study $O
    run --methods dbmtl+nolog,ew+log --seeds 5 --test-curve --study $O
    [ -n "$DRY" ] || { dbmtl-jax paired $O --out $O/paired.md && dbmtl-jax paired $O --baseline ew --out $O/paired_vs_ew.md; } ;;
  cosine)  # is DB-MTL's lead at a constant learning rate still there when training ends by decaying it to 0?
    # The constant-rate rows of the converged section are listed too (found in the store, not rerun): their STL is
    # the Δp reference of both schedules (no STL is trained with the cosine schedule), so the tables compare.
    run --methods stl --seeds 5 --test-curve --study $O
    run --methods ew,dbmtl --seeds 5 --test-curve --study $O
    for s in $SEEDS; do run --methods ew,dbmtl --lr-schedule cosine --seeds $s, --test-curve --study $O; done
    # the other methods under the same protocol, two rows at a time, seed by seed (a partial block is still paired):
    # the paper's two strongest gradient methods, then them with the log transform (Fig. 1), then Table 5's rows
    for rows in nash_mtl,cagrad nash_mtl+log,cagrad+log ew+log,dbmtl+nolog; do
      for s in $SEEDS; do run --methods $rows --lr-schedule cosine --seeds $s, --test-curve --study $O; done
    done
    # Fig. 6 (α ∈ {min, mean, median, 1.0} beside the default max) and Fig. 5 (the paper's β grid and β = 0) at the
    # default β = 0.9/√k resp. the default α, seed by seed
    for s in $SEEDS; do
      for a in "'min'" "'mean'" "'median'" 1.0; do
        run --methods dbmtl --hp "dbmtl.alpha=$a" --lr-schedule cosine --seeds $s, --test-curve --study $O
      done
    done
    for s in $SEEDS; do
      for hp in "0.0 0.0" "0.1 0.0" "0.5 0.0" "0.9 0.0" "0.1 0.5" "0.5 0.5"; do
        set -- $hp; run --methods dbmtl --hp dbmtl.beta=$1 --hp dbmtl.beta_sigma=$2 --lr-schedule cosine --seeds $s, \
          --test-curve --study $O
      done
    done
    [ -n "$DRY" ] || { dbmtl-jax paired $O --out $O/paired.md && dbmtl-jax paired $O --across --out $O/across.md; } ;;
  stlcosine)  # (multimnist320) STL trained with the cosine schedule too, so that the cosine section's rows are measured
    # against a same-protocol STL (as qm9_2k and multifashion320 have in their finished sections) instead of the
    # constant-rate one; the cosine EW and DB-MTL rows are listed from the store, and the STL in the cosine section
    for s in $SEEDS; do run --methods stl --lr-schedule cosine --seeds $s, --test-curve --study $O; done
    run --methods ew,dbmtl --lr-schedule cosine --seeds 5 --test-curve --study $O
    run --methods stl --lr-schedule cosine --seeds 5 --test-curve --study "$P"_cosine   # the cosine section's reference
    [ -n "$DRY" ] || { dbmtl-jax paired $O --out $O/paired.md \
      && dbmtl-jax paired $O --average-last 0.2 --out $O/paired_no_selection.md \
      && dbmtl-jax paired "$P"_converged $O --across --out $O/across.md; } ;;
  finished)  # (qm9_2k, multifashion320, dense60) STL, EW and DB-MTL with the learning rate decayed to 0, seed by seed (a partial study is paired)
    finished_rows
    [ -n "$DRY" ] || dbmtl-jax paired $O --out $O/paired.md ;;
  optimizer)  # (qm9_2k, multimnist320) issue 12 item 4 under the finished protocol: is the constant β's deficit
    # double momentum? The finished (qm9) or cosine (multimnist) section's Adam (b1 = 0.9) rows (found in the store,
    # not rerun; on multimnist the constant-rate STL is the Δp reference, as in cosine), then the same β rows and EW
    # with Adam's momentum removed (b1 = 0), seed by seed, the decisive row (constant β) first. β = 0 is spelled as
    # the section that ran it first spelled it (the spelling is part of the row's label and config hash).
    ROWS=stl,ew,dbmtl; ZERO="--hp dbmtl.beta=0.0"
    [ "$B" = multimnist ] && { ROWS=ew,dbmtl; ZERO="--hp dbmtl.beta=0.0 --hp dbmtl.beta_sigma=0.0"
                              run --methods stl --seeds 5 --test-curve --study $O; }
    for s in $SEEDS; do
      run --methods $ROWS --lr-schedule cosine --seeds $s, --test-curve --study $O  # STL: the Δp reference
      run --methods dbmtl $LIBMTL --lr-schedule cosine --seeds $s, --test-curve --study $O
      run --methods dbmtl $ZERO --lr-schedule cosine --seeds $s, --test-curve --study $O
    done
    for s in $SEEDS; do
      run --optimizer adam --b1 0.0 --methods dbmtl $LIBMTL --lr-schedule cosine --seeds $s, --test-curve --study $O
      run --optimizer adam --b1 0.0 --methods dbmtl,ew --lr-schedule cosine --seeds $s, --test-curve --study $O
      run --optimizer adam --b1 0.0 --methods dbmtl $ZERO --lr-schedule cosine --seeds $s, --test-curve --study $O
    done
    [ -n "$DRY" ] || { dbmtl-jax paired $O --out $O/paired.md && dbmtl-jax paired $O --across --out $O/across.md; } ;;
  methods)  # (qm9_2k, multimnist320) issue 12 item 3: the 26-method main table under the finished protocol (cosine
    # decay to 0, 5 paired seeds, test curves), seed by seed so that a partial table is already paired; the cheap
    # loss-weighting methods first, then the gradient methods. STL, EW and DB-MTL come from the finished / cosine
    # sections (listed from the store; on multimnist320 the constant-rate STL is the Δp reference, as in cosine).
    ROWS=stl,ew,dbmtl
    [ "$B" = multimnist ] && { ROWS=ew,dbmtl; run --methods stl --seeds 5 --test-curve --study $O; }
    for s in $SEEDS; do
      run --methods $ROWS --lr-schedule cosine --seeds $s, --test-curve --study $O
      run --methods gls,rlw,uw,dwa,imtl_l,igbv2,famo,stch --lr-schedule cosine --seeds $s, --test-curve --study $O
    done
    for s in $SEEDS; do
      run --methods nash_mtl,cagrad,pcgrad,gradvac,upgrad,fairgrad,imtl,imtl_g,aligned_mtl,metabalance,gradnorm,mgda \
        --lr-schedule cosine --seeds $s, --test-curve --study $O
      run --methods graddrop,mtadam,moco,excessmtl --lr-schedule cosine --seeds $s, --test-curve --study $O
    done
    [ -n "$DRY" ] || dbmtl-jax paired $O --out $O/paired.md ;;
  paper)  # (adult120, adult120_l1, qm9_2k, multimnist320, multifashion320) issue 12 item 3: Table 5, Fig. 1, Fig. 6 and Fig. 5 under
    # the finished protocol (cosine decay, 5 paired seeds, test curves). The base rows (STL, EW, DB-MTL at the default β,
    # LibMTL's β, β = 0, the six gradient methods without log, and Table 5's EW + log and DB-MTL without log) come from
    # the methods, finished, table5 and (multimnist320) cosine and stlcosine sections where those ran (listed, not
    # rerun; on multimnist320 the β grid, α rows and Nash-MTL/CAGrad + log too). Then, each block seed by seed (a
    # partial block is still paired): Fig. 5's β grid first ("which β" comes first), then Fig. 1, then Fig. 6.
    for s in $SEEDS; do
      run --methods stl,ew,dbmtl,pcgrad,gradvac,imtl_g,cagrad,nash_mtl,aligned_mtl --lr-schedule cosine --seeds $s, \
        --test-curve --study $O
      run --methods dbmtl $LIBMTL --lr-schedule cosine --seeds $s, --test-curve --study $O
      run --methods dbmtl --hp dbmtl.beta=0.0 --lr-schedule cosine --seeds $s, --test-curve --study $O
      run --methods ew+log $EWLOG_PATH --lr-schedule cosine --seeds $s, --test-curve --study $O     # Table 5
      run --methods dbmtl+nolog --lr-schedule cosine --seeds $s, --test-curve --study $O
    done
    fig5_grid                                                                                      # Fig. 5
    for s in $SEEDS; do
      run --methods pcgrad+log,gradvac+log,imtl_g+log,cagrad+log,nash_mtl+log,aligned_mtl+log --lr-schedule cosine \
        --seeds $s, --test-curve --study $O                                                       # Fig. 1
    done
    for s in $SEEDS; do
      for a in "'min'" "'mean'" "'median'" 1.0; do                                                 # Fig. 6
        # with two tasks the median of the norms is their mean: multifashion's median row is seed 0 only (its record
        # equals the mean row's, results/README.md §39)
        [ "$B" = multifashion ] && [ "$a" = "'median'" ] && [ "$s" != 0 ] && continue
        run --methods dbmtl --hp "dbmtl.alpha=$a" --lr-schedule cosine --seeds $s, --test-curve --study $O
      done
    done
    [ -n "$DRY" ] || dbmtl-jax paired $O --out $O/paired.md ;;
  grid)  # (multifashion320, dense60) issue 12 item 6, "which β": Fig. 5's grid under the finished protocol. The
    # finished section's STL, EW, DB-MTL (default), LibMTL's β and β = 0 (listed from the store), then the grid's
    # other four rows seed by seed. `dbmtl-jax select $O --vary beta,beta_sigma` is the paper's choice on validation.
    finished_rows
    fig5_grid
    [ -n "$DRY" ] || dbmtl-jax paired $O --out $O/paired.md ;;
  strongest)  # (multifashion320, dense60) issue 12 item 3: "at least the 8 strongest methods of the short-budget
    # tables". Strongest = best mean rank by Δp over the four short-budget main tables (adult_16ep_main,
    # multimnist_12ep_main, dense_8ep_main, qm9_10ep_main; EW and DB-MTL excluded as they are rows anyway):
    # MetaBalance 5.8, STCH 5.8, GradVac 7.5, CAGrad 8.2, IMTL-L 9.2, DWA 9.5, PCGrad 9.8, Aligned-MTL and GradNorm 10.0
    # (tied for 8th, both kept). STL, EW and DB-MTL come from the finished section. Seed by seed, cheap rows first.
    for s in $SEEDS; do
      run --methods stl,ew,dbmtl --lr-schedule cosine --seeds $s, --test-curve --study $O
      run --methods stch,imtl_l,dwa,gradnorm --lr-schedule cosine --seeds $s, --test-curve --study $O
      run --methods metabalance,gradvac,cagrad,pcgrad,aligned_mtl --lr-schedule cosine --seeds $s, --test-curve \
        --study $O
    done
    [ -n "$DRY" ] || dbmtl-jax paired $O --out $O/paired.md ;;
  table5)  # (qm9_2k, dense60) Table 5 under the finished protocol: is DB-MTL's lead over EW on qm9 (§18) or dense
    # (§25) the log transform, the gradient balancing, or both? EW + log and DB-MTL without log beside the finished
    # section's STL, EW and DB-MTL (listed from the store), 5 seeds, the cheap EW + log rows first
    # (EW + log's path: EWLOG_PATH above)
    run --methods stl,ew,dbmtl --lr-schedule cosine --seeds 5 --test-curve --study $O
    run --methods ew+log $EWLOG_PATH --lr-schedule cosine --seeds 5 --test-curve --study $O
    for s in $SEEDS; do run --methods dbmtl+nolog --lr-schedule cosine --seeds $s, --test-curve --study $O; done
    [ -n "$DRY" ] || dbmtl-jax paired $O --out $O/paired.md ;;
  sgdlr)  # (qm9_2k, multimnist320) the learning-rate pilot of item 4's third optimizer, SGD with momentum 0.9
    # (optax.sgd, PyTorch's convention), under the finished protocol (cosine decay), seed 0. SGD is not
    # scale-invariant and the rows' updates differ in scale (EW: the summed gradient; DB-MTL: α times a sum of unit
    # vectors of log-loss gradients), so EW and DB-MTL each get the rate best on validation Δp (vs the Adam STL;
    # `dbmtl-jax paired DIR --split val`); the sgd section then runs every row at its rate. On qm9 DB-MTL did not
    # train at all at 0.003 (summed loss flat at 11 from epoch 1) while EW did, hence its lower grid.
    # On multimnist the grids are centred on 0.01, the rate of the 192-step SGD rows (§11), each extended by one rate
    # where its best was at the grid's edge (EW 0.1, DB-MTL 0.001), and the constant-rate Adam STL is the reference.
    DB_LRS="0.0003 0.001 0.0001 0.003"; EW_LRS="0.001 0.003 0.01"; STL_SCHEDULE="--lr-schedule cosine"
    [ "$B" = multimnist ] && { DB_LRS="0.01 0.003 0.03 0.001"; EW_LRS="0.01 0.003 0.03 0.1"; STL_SCHEDULE=; }
    run --methods stl $STL_SCHEDULE --seeds 0, --test-curve --study $O   # the Δp reference (Adam; listed)
    for lr in $DB_LRS; do
      run --optimizer sgdm --lr $lr --methods dbmtl --lr-schedule cosine --seeds 0, --test-curve --study $O
    done
    for lr in $EW_LRS; do
      run --optimizer sgdm --lr $lr --methods ew --lr-schedule cosine --seeds 0, --test-curve --study $O
    done
    [ -n "$DRY" ] || dbmtl-jax paired $O --out $O/paired.md ;;
  sgd)  # (qm9_2k, multimnist320) item 4's third optimizer at the finished protocol: SGD with momentum 0.9 (a momentum of its own,
    # unlike Adam b1 = 0) for EW and DB-MTL's three β rows, each at the rate the sgdlr pilot chose on validation
    # (qm9: EW 0.001, DB-MTL 0.0003), plus EW at DB-MTL's rate so that the DB-MTL rows have an EW in their own setting;
    # written into the optimizer table, so that its across.md gives each row's Adam → SGD gain. Seed by seed, the
    # decisive row (constant β) first among the DB-MTL rows.
    O="$P"_optimizer
    EW_LR=0.001; DB_LR=0.0003; ZERO="--hp dbmtl.beta=0.0"
    # multimnist320: the rates its sgdlr pilot chose on validation (EW 0.03; DB-MTL 0.001, level with 0.003 and far
    # ahead of 0.01 and 0.03, where DB-MTL's training loss stalls at 0.08-0.25); β = 0 spelled as the optimizer
    # section spells it there.
    [ "$B" = multimnist ] && { EW_LR=0.03; DB_LR=0.001; ZERO="--hp dbmtl.beta=0.0 --hp dbmtl.beta_sigma=0.0"; }
    for s in $SEEDS; do
      run --optimizer sgdm --lr $EW_LR --methods ew --lr-schedule cosine --seeds $s, --test-curve --study $O
      run --optimizer sgdm --lr $DB_LR --methods ew --lr-schedule cosine --seeds $s, --test-curve --study $O
      run --optimizer sgdm --lr $DB_LR --methods dbmtl $LIBMTL --lr-schedule cosine --seeds $s, --test-curve --study $O
      run --optimizer sgdm --lr $DB_LR --methods dbmtl --lr-schedule cosine --seeds $s, --test-curve --study $O
      run --optimizer sgdm --lr $DB_LR --methods dbmtl $ZERO --lr-schedule cosine --seeds $s, --test-curve --study $O
    done
    [ -n "$DRY" ] || { dbmtl-jax paired $O --out $O/paired.md && dbmtl-jax paired $O --across --out $O/across.md; } ;;
  *) echo "unknown section $section (main beta ablation log alpha budget betaopt hurts converged cosine finished optimizer" \
          "methods paper grid strongest table5 sgdlr sgd stlcosine)" >&2
     exit 2 ;;
  esac
done
# the side-by-side summary of the paper's short-budget tables, when one of them ran (e.g. not for "methods finished")
case " $SECTIONS " in
  *" main "*|*" beta "*|*" ablation "*|*" log "*|*" alpha "*|*" budget "*) [ -n "$DRY" ] || dbmtl-jax summary "$P" > /dev/null ;;
esac
