"""Step time of every registry method relative to EW, on one HPS MLP (issue 3).

Model: ``benchmarks.models.make_mlp`` (trunk 512 → 1024 → 512, T linear heads,
batch 256).  Every subject is one jitted step, parameters and optimizer state
donated: per-task gradients of the raw losses from
``dbmtl_jax.value_and_task_grads`` (default strategy), then
``optax.chain(get_method(name, T, shared=is_shared), optax.adam(1e-4))`` with
``losses=`` and ``key=``.  DB-MTL uses the log-loss gradients, as in the paper.
Two references: ``ew (one backward)``, ``jax.grad`` of the summed losses into
Adam, and ``ew`` through the same per-task path as the others.

Timing: all subjects compiled and warmed up, then ``--reps`` interleaved rounds
(each subject ``--steps`` steps per round, rotating order); reported are the
median per-step time and the paired ratio to ``ew (one backward)`` (median over
rounds of subject / reference in the same round, which cancels load drift).
Loss-weighting methods have a cheaper one-backward path; see
``RESULTS_loss_weighting.md``.

    python benchmarks/bench_methods.py [--tasks 3] [--reps 7] [--steps 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dbmtl_jax  # noqa: E402
from models import is_shared, make_problem  # noqa: E402

REFERENCE = "ew (one backward)"


def make_steps(num_tasks: int) -> tuple[dict, tuple]:
    prob = make_problem("mlp", num_tasks)
    params = jax.tree.map(jnp.asarray, prob.params)
    batch = jax.tree.map(jnp.asarray, prob.batch)
    steps = {}

    def one_backward():
        tx = optax.adam(1e-4)

        def step(p, s, key):
            del key
            g = jax.grad(lambda q: jnp.sum(prob.loss_fn(q, batch)))(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return tx, step

    def per_task(name):
        tx = optax.chain(dbmtl_jax.get_method(name, num_tasks, shared=is_shared), optax.adam(1e-4))
        grads = dbmtl_jax.value_and_task_grads(prob.loss_fn, log=name == "dbmtl")

        def step(p, s, key):
            losses, g = grads(p, batch)
            u, s = tx.update(g, s, p, losses=losses, key=key)
            return optax.apply_updates(p, u), s

        return tx, step

    subjects = {REFERENCE: one_backward()}
    subjects.update({name: per_task(name) for name in dbmtl_jax.METHODS})
    for name, (tx, step) in subjects.items():
        steps[name] = (tx, jax.jit(step, donate_argnums=(0, 1)))
    return steps, (params, prob.n_shared)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_methods.md"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    steps, (params0, n_shared) = make_steps(args.tasks)
    state = {}
    compile_s = {}
    key = jax.random.key(0)
    for name, (tx, step) in steps.items():
        p = jax.tree.map(jnp.copy, params0)
        s = tx.init(p)
        c0 = time.perf_counter()
        p, s = step(p, s, key)
        jax.block_until_ready(p)
        compile_s[name] = time.perf_counter() - c0
        p, s = step(p, s, key)  # warm-up
        jax.block_until_ready(p)
        state[name] = (p, s)
        print(f"compiled {name} in {compile_s[name]:.1f}s", flush=True)

    names = list(steps)
    times = {n: [] for n in names}
    for r in range(args.reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            p, s = state[name]
            step = steps[name][1]
            t = time.perf_counter()
            for i in range(args.steps):
                p, s = step(p, s, jax.random.fold_in(key, i))
            jax.block_until_ready(p)
            times[name].append((time.perf_counter() - t) / args.steps * 1e3)
            state[name] = (p, s)
        print(f"round {r + 1}/{args.reps}", flush=True)

    ref = times[REFERENCE]
    rows = []
    for name in names:
        med = statistics.median(times[name])
        paired = statistics.median([a / b for a, b in zip(times[name], ref)])
        group = "reference" if name == REFERENCE else dbmtl_jax.METHOD_GROUPS[name]
        rows.append((name, group, med, paired, compile_s[name]))

    cmd = "python benchmarks/bench_methods.py " + " ".join(sys.argv[1:])
    lines = [
        "# Step time of every method relative to EW",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  ",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores, JAX backend {jax.default_backend()}; "
        f"load average at the end {os.getloadavg()[0]:.1f} (shared machine)  ",
        f"Versions: jax {jax.__version__}, optax {optax.__version__}, dbmtl_jax {dbmtl_jax.__version__}, "
        f"numpy {np.__version__}  ",
        f"Model: HPS MLP, trunk 512→1024→512 ({n_shared:,} shared parameters), T={args.tasks} heads, batch 256, "
        f"float32; {args.reps} interleaved rounds × {args.steps} steps; wall time {time.perf_counter() - t0:.0f}s.",
        "",
        "Every method except the reference computes T per-task gradients (one forward, T pull-backs) and then",
        "aggregates; the ratio is the median over rounds of (method step / one-backward EW step) in the same round.",
        "Loss-weighting methods also have a one-backward path (within 1.15× of EW: `RESULTS_loss_weighting.md`).",
        "",
        "| method | group | median step (ms) | ratio to EW (one backward) | first call incl. compile (s) |",
        "|---|---|---|---|---|",
    ]
    for name, group, med, paired, comp in rows:
        lines.append(f"| {name} | {group} | {med:.1f} | {paired:.2f}× | {comp:.1f} |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
