#!/usr/bin/env bash
# dense's finished section (STL, EW, DB-MTL at the default β, LibMTL's β = 0.9 and β = 0; cosine decay; 5 seeds;
# at EPOCHS=60 the same runs as `bash results/run_study.sh dense60 finished`; ROWS=core: STL, EW and DB-MTL only; with
# SECTION=grid, strongest or table5, that script's dense60 section of that name instead) in
# one call of a lent GPU machine, STREAMS (10) runs at a time, stopping T seconds after the start (a run cut off
# leaves its checkpoint in results/runs/dense/.partial, which comes back too, so that a later call resumes it). On
# one CPU core a 60-epoch run takes 40-90 min; that is why.
# That machine reaches no network and has no Fashion-MNIST, so build the scenes here and carry them (8.8 MB):
#   apt-get install dataset-fashion-mnist && python -c "from dbmtl_jax.datasets import load_dense_fashion as f; f()"
#   python -c "import gzip,shutil,struct,os; from dbmtl_jax.datasets.multimnist import load_fashion_mnist as L, FASHION_FILES as F, FASHION_DIR as D
#   fm=L(); os.makedirs('.gpu/fashion-key',exist_ok=True)
#   for k,n in F.items():
#     if 'labels' in k: shutil.copy(D/n,'.gpu/fashion-key/'+n); continue
#     im=fm[k].copy(); im[64:]=0; f=gzip.open('.gpu/fashion-key/'+n,'wb'); f.write(struct.pack('>HBBIII',0,8,3,*im.shape)+im.tobytes()); f.close()"
#   echo /.gpu/ >> .git/info/exclude; for f in ~/.cache/dbmtl_jax/dense_fashion/*.npz; do xz -9 -c $f > .gpu/$(basename $f).xz; done
# then call the device tool with carry [".gpu"], timeout_s 580 and the command `T=470 bash results/dense_gpu.sh`.
# Back come records.tgz (the new records and one runs.txt per run), partial.tar.* (the checkpoints of runs cut
# off) and logs.tgz; from the folder A they come back to, with E the epochs:
#   tar xzf A/records.tgz; cat A/partial.tar.* | tar xf -
#   X=finished (or the SECTION run); mkdir -p results/dense_${E}ep_$X; cat results/dense_${E}ep_${X}_*/runs.txt | grep -v '^#' \
#     | sort -u >> results/dense_${E}ep_$X/runs.txt; rm -r results/dense_${E}ep_${X}_*   (then drop duplicate lines)
# (each run writes its own study file: processes appending to one are not safe). Records already in the repository
# travel with it, so finished runs are skipped; carry results/runs/dense/.partial when resuming cut-off runs.
# Measured on an H200 (2026-12-04), 10 runs at once: a 60-epoch run takes 100-130 s (EW) to 300-330 s (DB-MTL,
# STL), so the 25 runs need about 13 min of device time (one 8-min call and a resumed 3.5-min call).
# Not measured, estimated from those: SECTION=grid (20 DB-MTL runs) about 11 min, SECTION=strongest (45 runs of
# gradient and loss-weighting methods, per-task gradients like DB-MTL's) 25-30 min: two or three calls, resumed.
# The 120-epoch study (`run_study.sh dense120`: 1,000 validation and 1,000 test scenes, since 500 left STL's seed sd
# at 2.16) is EPOCHS=120 ROWS=core DATA_OPTS="num_val=1000 num_test=1000" (STL, EW, DB-MTL: 15 runs, roughly
# 20-25 min of device time: two sessions, resume as above); build and carry its scenes first (the loader call above
# with num_val=1000, num_test=1000, then the same xz line).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false DBMTL_JAX_CACHE=$PWD/.gpu/cache
mkdir -p $DBMTL_JAX_CACHE/dense_fashion $OUT/logs
for f in .gpu/dense_fashion-*.npz.xz; do xz -dc $f > $DBMTL_JAX_CACHE/dense_fashion/$(basename $f .xz); done
# The cache's key checks the Fashion-MNIST source (image counts, first 64 images); the real files do not fit the
# 64 MiB carry, so a key stand-in travels: real labels and first 64 images, the rest zeros (.gpu/fashion-key, 150 kB).
# It can only ever hit the carried cache: if it does not, the scenes would be built from zeros, so stop instead.
[ -d /usr/share/datasets/fashion-mnist ] || { mkdir -p /usr/share/datasets && cp -r .gpu/fashion-key /usr/share/datasets/fashion-mnist; }
# DATA_OPTS="num_val=1000 num_test=1000": the dense data options of the runs (their scenes must be carried too).
DATA_OPTS=${DATA_OPTS:-}; KW=$(echo $DATA_OPTS | tr ' ' ','); DATA=""; for o in $DATA_OPTS; do DATA="$DATA --data-option $o"; done
n0=$(ls $DBMTL_JAX_CACHE/dense_fashion | wc -l)
python3 -c "from dbmtl_jax.datasets import load_dense_fashion as f; f($KW)" > $OUT/logs/cache.txt 2>&1
if [ "$(ls $DBMTL_JAX_CACHE/dense_fashion | wc -l)" != "$n0" ]; then echo "the carried scene cache was not hit; stopping" | tee -a $OUT/logs/cache.txt; exit 3; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/logs/gpu.txt 2>&1
python3 -c "import jax, optax, flax, chex; print(jax.__version__, optax.__version__, flax.__version__, chex.__version__, jax.devices())" >> $OUT/logs/gpu.txt 2>&1
touch /tmp/marker
# SECTION (default finished): finished, or run_study.sh's grid (Fig. 5's four other β rows, 20 runs), strongest (the
# 9 strongest methods of the short-budget tables, 45 runs) or table5 (EW + log and DB-MTL without log, 10 runs); each
# also lists the finished section's rows it compares with (already in the store: skipped, listed).
E=${EPOCHS:-60}; SECTION=${SECTION:-finished}; S=results/dense_${E}ep_$SECTION; ROWS=${ROWS:-all}
case $SECTION in finished|grid|strongest|table5) ;; *) echo "unknown SECTION $SECTION (finished, grid, strongest or table5)" >&2; exit 2 ;; esac
R="python3 -m dbmtl_jax.experiments.cli run dense --epochs $E --no-progress --out results/runs --lr-schedule cosine --test-curve$DATA"
LIB="--hp dbmtl.beta=0.9 --hp dbmtl.beta_sigma=0.0"
T=${T:-480}
END=$(( $(date +%s) + T ))
left() { echo $(( END - $(date +%s) > 1 ? END - $(date +%s) : 1 )); }
jobs() {  # one run per line: a tag (its log and study file) and its arguments; long runs first, EW last
  case $SECTION in
  grid)
    for s in 0 1 2 3 4; do for hp in "0.1 0.0" "0.5 0.0" "0.1 0.5" "0.5 0.5"; do set -- $hp
      echo "b$1s$2_$s --seeds $s, --methods dbmtl --hp dbmtl.beta=$1 --hp dbmtl.beta_sigma=$2"; done; done
    for s in 0 1 2 3 4; do echo "fin$s --seeds $s, --methods dbmtl,stl,ew"; echo "lib$s --seeds $s, --methods dbmtl $LIB"
      echo "z$s --seeds $s, --methods dbmtl --hp dbmtl.beta=0.0"; done
    return ;;
  table5)
    for s in 0 1 2 3 4; do echo "nolog$s --seeds $s, --methods dbmtl+nolog"; echo "ewlog$s --seeds $s, --methods ew+log"; done
    for s in 0 1 2 3 4; do echo "fin$s --seeds $s, --methods stl,ew,dbmtl"; done
    return ;;
  strongest)
    for s in 0 1 2 3 4; do for m in metabalance gradvac cagrad pcgrad aligned_mtl stch imtl_l dwa gradnorm; do
      echo "$m$s --seeds $s, --methods $m"; done; done
    for s in 0 1 2 3 4; do echo "fin$s --seeds $s, --methods stl,ew,dbmtl"; done
    return ;;
  esac
  for s in 0 1 2 3 4; do echo "stl$s --seeds $s, --methods stl"; echo "db$s --seeds $s, --methods dbmtl"; done
  if [ "$ROWS" != core ]; then
    for s in 0 1 2 3 4; do echo "lib$s --seeds $s, --methods dbmtl $LIB"; echo "z$s --seeds $s, --methods dbmtl --hp dbmtl.beta=0.0"; done
  fi
  for s in 0 1 2 3 4; do echo "ew$s --seeds $s, --methods ew"; done
}
one() { tag=$1; shift; timeout $(left) $R "$@" --study ${S}_$tag >> $OUT/logs/$tag.txt 2>&1; }
export -f one left; export R S END OUT
( while sleep 60; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done ) >> $OUT/logs/gpu.txt 2>&1 &
SMI=$!
jobs | xargs -P ${STREAMS:-10} -L 1 bash -c 'one "$@"' _
kill $SMI
find results/runs/dense -name "*.json.gz" -newer /tmp/marker > /tmp/new.txt
# What comes back is at most 8 files of 16 MiB: the records and study lists in one archive, the checkpoints (3.7 MB
# each) in 15 MB pieces, the logs in one archive.
tar czf $OUT/records.tgz $(cat /tmp/new.txt) ${S}_*/runs.txt
[ -d results/runs/dense/.partial ] && tar cf - results/runs/dense/.partial | split -b 15M - $OUT/partial.tar.
tar czf $OUT/logs.tgz -C $OUT logs && rm -r $OUT/logs
ls -la $OUT; cat /tmp/new.txt; tar xzf $OUT/logs.tgz -O | grep -h " -> \|Error\|error" | tail -n 40
