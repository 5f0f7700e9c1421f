#!/usr/bin/env bash
# dense60's finished section (STL, EW, DB-MTL at the default β, LibMTL's β = 0.9 and β = 0; cosine decay; 5 seeds;
# the same runs as `bash results/run_study.sh dense60 finished`) in one call of a lent GPU machine, as 10 parallel
# streams that stop T seconds after the start (a run cut off leaves its checkpoint in results/runs/dense/.partial,
# which comes back too, so that a later call resumes it). On one CPU core a run takes 40-90 min; that is why.
# That machine reaches no network and has no Fashion-MNIST, so build the scenes here and carry them (8.8 MB):
#   apt-get install dataset-fashion-mnist && python -c "from dbmtl_jax.datasets import load_dense_fashion as f; f()"
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu; for f in ~/.cache/dbmtl_jax/dense_fashion/*.npz; do xz -9 -c $f > .gpu/$(basename $f).xz; done
# then call the device tool with carry [".gpu"], timeout_s 580 and the command `T=470 bash results/dense_gpu.sh`.
# Back come $OUT/dense_runs.tgz (the new records, one runs.txt per stream, the checkpoints) and $OUT/logs.tgz:
#   mkdir -p results/dense_60ep_finished && tar xzf dense_runs.tgz && cat results/dense_60ep_finished_*/runs.txt | grep -v '^#' | sort -u \
#     >> results/dense_60ep_finished/runs.txt && rm -r results/dense_60ep_finished_*
# (each stream writes its own study file: ten processes appending to one are not safe).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false DBMTL_JAX_CACHE=$PWD/.gpu/cache
mkdir -p $DBMTL_JAX_CACHE/dense_fashion $OUT/logs
for f in .gpu/dense_fashion-*.npz.xz; do xz -dc $f > $DBMTL_JAX_CACHE/dense_fashion/$(basename $f .xz); done
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
tar czf $OUT/dense_runs.tgz -T /tmp/new.txt results/dense_60ep_finished_*/runs.txt results/runs/dense/.partial 2>/dev/null
tar czf $OUT/logs.tgz -C $OUT logs
ls -la $OUT; cat /tmp/new.txt; tail -n 3 $OUT/logs/*.txt
