"""Cost of the exact solvers of MGDA, CAGrad, UPGrad and IMTL-G (issue 13, item 5), old vs new code.

Two timings per configuration, each the median of ``--reps`` calls of a jitted
function after compilation (``harness.interleaved_times``, one call per block,
the configurations of one T interleaved):

* ``solver``: the ``[T, T]`` weight solver alone (``mgda_weights``,
  ``cagrad_weights``, ``upgrad_weights``, ``imtl_g_weights``; same signatures in
  both versions) on the Gram matrix of random task gradients whose norms are
  ``10^U(−3, 3)`` apart;
* ``update``: the whole ``update`` of the optax transform on task gradients of
  ``--params`` shared parameters (Gram matrix, solver, weighted sum), which is
  what a training step pays on top of the T backward passes.

``--baseline REV`` also times the code of a git revision: its ``dbmtl_jax``
package is extracted with ``git archive`` and every measurement runs in a
fresh subprocess importing one version or the other; the rounds alternate
between versions (``--rounds``) and the medians over rounds are reported.

    python benchmarks/bench_solvers.py [--baseline REV] [--tasks 3 10] [--params 1050112]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [
    ("mgda", {}),
    ("mgda", {"solver": "frank_wolfe"}),
    ("cagrad", {}),
    ("upgrad", {}),
    ("upgrad", {"reg_eps": 0.0}),
    ("imtl_g", {}),
]


def label(name: str, kw: dict) -> str:
    return name + "".join(f" {k}={v}" for k, v in kw.items())


def worker(tasks: list[int], params: int, reps: int) -> dict:
    """Times every configuration with the ``dbmtl_jax`` found on ``sys.path``; returns {label/T: (solver_ms, update_ms)}."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dbmtl_jax.methods import _qp, cagrad, imtl_g, mgda, upgrad
    from dbmtl_jax.methods.registry import get_method

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from harness import Runner, interleaved_times, median_ms

    def call_runner(name, fn, *args):
        def run(n):
            out = None
            for _ in range(n):
                out = fn(*args)
            jax.block_until_ready(out)

        return Runner(name, run)

    solvers = {
        "mgda": lambda g, kw: mgda.mgda_weights(g, **kw).x,
        "cagrad": lambda g, kw: cagrad.cagrad_weights(g, 0.5, **kw)[0],
        "upgrad": lambda g, kw: upgrad.upgrad_weights(g, jnp.full(g.shape[:1], 1.0 / g.shape[0]), **kw)[0],
        "imtl_g": lambda g, kw: imtl_g.imtl_g_weights(g)[0],
    }
    out = {}
    for t in tasks:
        rng = np.random.default_rng(t)
        j = rng.normal(size=(t, params)).astype(np.float32) * (10.0 ** rng.uniform(-3, 3, size=(t, 1))).astype(np.float32)
        grads = {"w": jnp.asarray(j)}
        p = {"w": jnp.zeros((params,), jnp.float32)}
        gram = jax.jit(lambda x: _qp.shared_gram([x], t)[0])(grads["w"])
        runners = []
        for name, kw in CONFIGS:
            solve = jax.jit(lambda g, name=name, kw=kw: solvers[name](g, kw))
            tx = get_method(name, t, **kw)
            runners.append(call_runner(f"{label(name, kw)}|{t}|solver", solve, gram))
            runners.append(call_runner(f"{label(name, kw)}|{t}|update", jax.jit(tx.update), grads, tx.init(p), p))
        # One call per block, every runner in every repetition (harness.interleaved_times).
        interleaved_times(runners, reps=reps, steps=1, warmup=1, max_config_s=float("inf"), pause_s=0.0)
        for k in range(0, len(runners), 2):
            out[runners[k].name.rsplit("|", 1)[0]] = (median_ms(runners[k]), median_ms(runners[k + 1]))
    return out


def run_version(path: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=path)
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", "--params", str(args.params), "--reps", str(args.reps),
           "--tasks", *map(str, args.tasks)]
    res = subprocess.run(cmd, cwd=path, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=None, help="git revision to compare with (e.g. HEAD~1)")
    ap.add_argument("--tasks", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--params", type=int, default=1_050_112)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        print(json.dumps(worker(args.tasks, args.params, args.reps)))
        return
    versions = {"new": ROOT}
    tmp = None
    if args.baseline:
        tmp = tempfile.TemporaryDirectory()
        arch = subprocess.run(["git", "archive", args.baseline, "dbmtl_jax"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp.name], input=arch.stdout, check=True)
        versions = {f"old ({args.baseline})": tmp.name, "new": ROOT}
    start = time.time()
    rounds = {v: [] for v in versions}
    for _ in range(args.rounds):
        for v, path in versions.items():
            rounds[v].append(run_version(path, args))
    keys = list(rounds["new"][0])
    table = {v: {k: tuple(statistics.median(r[k][i] for r in rs) for i in range(2)) for k in keys} for v, rs in rounds.items()}
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"Command: `python benchmarks/bench_solvers.py {' '.join(sys.argv[1:])}`  ")
    print(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; working tree at {rev} (+ changes)  ")
    print(f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores, CPU backend; load average at the end "
          f"{os.getloadavg()[0]:.1f} (shared machine); wall time {time.time() - start:.0f}s.  ")
    print(f"update: {args.params:,} shared parameters, float32; medians of {args.reps} calls, median over {args.rounds} rounds.\n")
    names = list(versions)
    head = " | ".join(f"{v} solver (ms) | {v} update (ms)" for v in names)
    print(f"| method | T | {head} |")
    print("|---|---|" + "---|" * (2 * len(names)))
    for k in keys:
        name, t = k.split("|")
        cells = " | ".join(f"{table[v][k][0]:.2f} | {table[v][k][1]:.1f}" for v in names)
        print(f"| {name} | {t} | {cells} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
