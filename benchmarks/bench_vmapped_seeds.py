"""Would training several seeds as one vmapped program make the runner faster? (issue 12's speed-up idea)

For each benchmark, S runs of one method (seeds 0..S-1, each with its own initialisation and batch) are
stepped two ways in one process, timed interleaved: S calls of the runner's jitted train step
(``sequential``), and one call of ``jax.vmap`` of the same step over the stacked seeds (``vmapped``). Both
start from the same parameters and batches; the first step's outputs are compared seed by seed before timing.

    taskset -c 0 python benchmarks/bench_vmapped_seeds.py --benchmarks multimnist,multimnist_digits,qm9 \\
        --out benchmarks/RESULTS_vmapped_seeds.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import Runner, interleaved_times, median_ms  # noqa: E402

from dbmtl_jax.experiments import get_benchmark  # noqa: E402
from dbmtl_jax.experiments import train as runner_train  # noqa: E402


def _stack(trees: list) -> object:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def measure(name: str, method: str, seeds: int, reps: int) -> dict:
    bench = get_benchmark(name)
    recipe = bench.quick
    spec = runner_train.parse_method(method)
    data = bench.data(recipe)
    trainers = [runner_train._Trainer(bench, spec, recipe, {}, s, int(data.steps_per_epoch), False, None)
                for s in range(seeds)]
    batches = [next(iter(data.train_batches(np.random.default_rng(s)))) for s in range(seeds)]
    step = trainers[0]._make_train_step()  # the runner's step; the seed enters through its arguments only
    args = [(t.params, t.rest, t.opt_state, x, tuple(y), jax.random.PRNGKey(s), jnp.int32(0))
            for s, (t, (x, y)) in enumerate(zip(trainers, batches))]
    seq = jax.jit(step)
    vec = jax.jit(jax.vmap(step))
    stacked = _stack(args)

    # the same first step, seed by seed
    outs = [seq(*a) for a in args]
    vout = vec(*stacked)
    worst = 0.0
    for s, o in enumerate(outs):
        for a, b in zip(jax.tree_util.tree_leaves(o[0]), jax.tree_util.tree_leaves(vout[0])):
            a, b = np.asarray(a, np.float64), np.asarray(b[s], np.float64)
            worst = max(worst, float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30)))

    def run_seq(n: int) -> None:
        out = None
        for _ in range(n):
            out = [seq(*a) for a in args]
        jax.block_until_ready(out)

    def run_vec(n: int) -> None:
        out = None
        for _ in range(n):
            out = vec(*stacked)
        jax.block_until_ready(out)

    runners = [Runner("sequential", run_seq), Runner("vmapped", run_vec)]
    interleaved_times(runners, reps=reps, block_s=0.5, max_config_s=30.0)
    s_ms, v_ms = (median_ms(r) / seeds for r in runners)
    return dict(benchmark=name, method=method, seeds=seeds, seq_ms=s_ms, vmap_ms=v_ms,
                ratio=s_ms / v_ms, max_rel_diff=worst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmarks", default="multimnist,multimnist_digits,qm9")
    ap.add_argument("--method", default="dbmtl")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows, skipped = [], []
    for name in args.benchmarks.split(","):
        try:
            rows.append(measure(name, args.method, args.seeds, args.reps))
        except Exception as e:  # noqa: BLE001 - a data set that is not installed is reported, not fatal
            skipped.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0]}")
        print(rows[-1] if rows else skipped[-1], flush=True)
    lines = ["# Vmapped seeds vs sequential runs (issue 12's runner speed-up idea)", "",
             f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores (shared, loaded), "
             f"{jax.devices()[0].platform}; jax {jax.__version__}; {time.strftime('%Y-%m-%d')}. "
             f"Command: `{' '.join(['python', *sys.argv])}`.", "",
             f"Time per seed-step (ms, median of interleaved blocks) of the runner's `{args.method}` train step for "
             f"{args.seeds} seeds (quick recipe's batch), run as {args.seeds} jitted calls or as one "
             "`jax.vmap` over the stacked seeds. ratio > 1: vmapped is faster. `max rel diff`: the largest "
             "relative difference of the updated parameters after the first step, seed by seed.", "",
             "| benchmark | sequential (ms / seed-step) | vmapped (ms / seed-step) | ratio | max rel diff |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['benchmark']} | {r['seq_ms']:.1f} | {r['vmap_ms']:.1f} | {r['ratio']:.2f} | "
                     f"{r['max_rel_diff']:.1e} |")
    lines += [""] + [f"Not measured: {s}" for s in skipped]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
