#!/usr/bin/env bash
# dense60's finished section (STL, EW, DB-MTL at the default β, LibMTL's β = 0.9 and β = 0; cosine decay; 5 seeds;
# the same runs as `bash results/run_study.sh dense60 finished`) in one call of a lent GPU machine, as 10 parallel
# streams that stop T seconds after the start (a run cut off leaves its checkpoint in results/runs/dense/.partial,
# which comes back too, so that a later call resumes it). On one CPU core a run takes 40-90 min; that is why.
# That machine reaches no network and has no Fashion-MNIST, so build the scenes here and carry them (8.8 MB):
#   apt-get install dataset-fashion-mnist && python -c "from dbmtl_jax.datasets import load_dense_fashion as f; f()"
#   python -c "import gzip,shutil,struct,os; from dbmtl_jax.datasets.multimnist import load_fashion_mnist as L, FASHION_FILES as F, FASHION_DIR as D
#   fm=L(); os.makedirs('.gpu/fashion-key',exist_ok=True)
#   for k,n in F.items():
#     if 'labels' in k: shutil.copy(D/n,'.gpu/fashion-key/'+n); continue
#     im=fm[k].copy(); im[64:]=0; f=gzip.open('.gpu/fashion-key/'+n,'wb'); f.write(struct.pack('>HBBIII',0,8,3,*im.shape)+im.tobytes()); f.close()"
#   echo /.gpu/ >> .git/info/exclude; for f in ~/.cache/dbmtl_jax/dense_fashion/*.npz; do xz -9 -c $f > .gpu/$(basename $f).xz; done
# then call the device tool with carry [".gpu"], timeout_s 580 and the command `T=470 bash results/dense_gpu.sh`.
# Back come $OUT/records (the new records), $OUT/partial (the checkpoints of runs cut off), $OUT/studies (one runs.txt
# per stream) and $OUT/logs.tgz; from the folder they come back to (A):
#   cp A/records/* results/runs/dense/; cp A/partial/* results/runs/dense/.partial/
#   cat A/studies/*.txt | grep -v '^#' | sort -u >> results/dense_60ep_finished/runs.txt   (then drop duplicate lines)
# Carry results/runs/dense/.partial too when resuming: the checkpoints are how a cut-off run continues.
# Measured on an H200 (2026-12-04): 10 streams at once, a 60-epoch run takes 100-130 s (EW) to 300-330 s (DB-MTL,
# STL), so the 25 runs need about 13 min of device time; the 15-minute budget fits them with a resumed second call.
# (each stream writes its own study file: ten processes appending to one are not safe).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false DBMTL_JAX_CACHE=$PWD/.gpu/cache
mkdir -p $DBMTL_JAX_CACHE/dense_fashion $OUT/logs
for f in .gpu/dense_fashion-*.npz.xz; do xz -dc $f > $DBMTL_JAX_CACHE/dense_fashion/$(basename $f .xz); done
# The cache's key checks the Fashion-MNIST source (image counts, first 64 images); the real files do not fit the
# 64 MiB carry, so a key stand-in travels: real labels and first 64 images, the rest zeros (.gpu/fashion-key, 150 kB).
# It can only ever hit the carried cache: if it does not, the scenes would be built from zeros, so stop instead.
[ -d /usr/share/datasets/fashion-mnist ] || { mkdir -p /usr/share/datasets && cp -r .gpu/fashion-key /usr/share/datasets/fashion-mnist; }
python3 -c "from dbmtl_jax.datasets import load_dense_fashion as f; f()" > $OUT/logs/cache.txt 2>&1
if [ "$(ls $DBMTL_JAX_CACHE/dense_fashion | wc -l)" != 1 ]; then echo "the carried scene cache was not hit; stopping" | tee -a $OUT/logs/cache.txt; exit 3; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/logs/gpu.txt 2>&1
python3 -c "import jax, optax, flax, chex; print(jax.__version__, optax.__version__, flax.__version__, chex.__version__, jax.devices())" >> $OUT/logs/gpu.txt 2>&1
touch /tmp/marker
R="python3 -m dbmtl_jax.experiments.cli run dense --epochs ${EPOCHS:-60} --no-progress --out results/runs --lr-schedule cosine --test-curve"
LIB="--hp dbmtl.beta=0.9 --hp dbmtl.beta_sigma=0.0"
T=${T:-480}; PIDS=()
END=$(( $(date +%s) + T ))
left() { echo $(( END - $(date +%s) > 1 ? END - $(date +%s) : 1 )); }
for s in 0 1 2 3 4; do
  ( timeout $(left) $R --seeds $s, --study results/dense_60ep_finished_s$s --methods stl
    timeout $(left) $R --seeds $s, --study results/dense_60ep_finished_l$s --methods dbmtl $LIB ) > $OUT/logs/s$s.txt 2>&1 &
  PIDS+=($!)
  ( timeout $(left) $R --seeds $s, --study results/dense_60ep_finished_d$s --methods dbmtl,ew
    timeout $(left) $R --seeds $s, --study results/dense_60ep_finished_z$s --methods dbmtl --hp dbmtl.beta=0.0 ) > $OUT/logs/d$s.txt 2>&1 &
  PIDS+=($!)
done
( while sleep 60; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done ) >> $OUT/logs/gpu.txt 2>&1 &
SMI=$!
wait "${PIDS[@]}"
kill $SMI
find results/runs/dense -name "*.json.gz" -newer /tmp/marker > /tmp/new.txt
# One file each, not one archive: a file over the device tool's size limit (about 20 MB) does not come back at all.
mkdir -p $OUT/records $OUT/partial $OUT/studies
cp $(cat /tmp/new.txt) $OUT/records/ 2>/dev/null
cp results/runs/dense/.partial/*.ckpt.npz $OUT/partial/ 2>/dev/null
for d in results/dense_60ep_finished_*; do cp $d/runs.txt $OUT/studies/$(basename $d).txt; done
tar czf $OUT/logs.tgz -C $OUT logs
ls -la $OUT; cat /tmp/new.txt; tail -n 3 $OUT/logs/*.txt
