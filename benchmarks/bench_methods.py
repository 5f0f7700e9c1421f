"""Step time of every registry method relative to EW, on one HPS MLP (issue 3).

Model: ``benchmarks.models.make_mlp`` (trunk 512 → 1024 → 512, T linear heads,
batch 256).  Every subject is one jitted step, parameters and optimizer state
donated: per-task gradients of the raw losses from
``dbmtl_jax.value_and_task_grads`` (default strategy), then
``optax.chain(get_method(name, T, shared=is_shared), optax.adam(1e-4))`` with
``losses=`` and ``key=``.  DB-MTL uses the log-loss gradients, as in the paper.
Two references: ``ew (one backward)``, ``jax.grad`` of the summed losses into
Adam, and ``ew`` through the same per-task path as the others.

Timing (``harness.py``): every subject is a ``jit_runner`` (compiled ahead of
time, two warm-up steps), then ``--reps`` rounds of ``interleaved_times`` (each
subject ``--steps`` steps per round, rotating order); reported are the median
per-step time and ``paired_ratio`` to ``ew (one backward)`` (median over rounds
of subject / reference in the same round, which cancels load drift).  The step
counter that seeds ``key=`` lives in the donated state.
Loss-weighting methods have a cheaper one-backward path; see
``RESULTS_loss_weighting.md``.

    python benchmarks/bench_methods.py [--tasks 3] [--reps 7] [--steps 5] [--methods ew,dbmtl,...] [--tiny] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dbmtl_jax  # noqa: E402
from harness import Runner, interleaved_times, jit_runner, median_ms, paired_ratio  # noqa: E402
from models import is_shared, make_problem  # noqa: E402

REFERENCE = "ew (one backward)"
TINY = dict(batch_size=16, d_in=8, hidden=16, d_feat=8, d_out=3)  # a smoke test of the script, not a benchmark


def make_runners(num_tasks: int, *, tiny: bool = False, methods: tuple = tuple(dbmtl_jax.METHODS)) -> tuple[list, int]:
    """One ``Runner`` per subject (the reference first) and the number of shared parameters."""
    prob = make_problem("mlp", num_tasks, **(TINY if tiny else {}))
    batch = jax.tree.map(jnp.asarray, prob.batch)
    key0 = jax.random.key(0)

    def one_backward():
        tx = optax.adam(1e-4)

        def step(p, s, b):
            losses, g = jax.value_and_grad(lambda q: jnp.sum(prob.loss_fn(q, b)))(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, losses

        return tx, step

    def per_task(name):
        tx = optax.chain(dbmtl_jax.get_method(name, num_tasks, shared=is_shared), optax.adam(1e-4))
        grads = dbmtl_jax.value_and_task_grads(prob.loss_fn, log=name == "dbmtl")

        def step(p, s, b):
            opt_state, i = s
            losses, g = grads(p, b)
            u, opt_state = tx.update(g, opt_state, p, losses=losses, key=jax.random.fold_in(key0, i))
            return optax.apply_updates(p, u), (opt_state, i + 1), losses

        return tx, step

    subjects = {REFERENCE: one_backward()}
    subjects.update({name: per_task(name) for name in methods})
    runners = []
    for name, (tx, step) in subjects.items():
        params = jax.tree.map(jnp.asarray, prob.params)
        state = tx.init(params) if name == REFERENCE else (tx.init(params), jnp.int32(0))
        runners.append(jit_runner(name, step, params, state, batch))
        print(f"compiled {name} in {runners[-1].info['compile_s']:.1f}s", flush=True)
    return runners, prob.n_shared


def time_runners(runners: list, *, reps: int, steps: int) -> None:
    """``--reps`` interleaved rounds of ``--steps`` steps per subject after two warm-up steps."""
    interleaved_times(runners, reps=reps, steps=steps, warmup=2, max_config_s=float("inf"), pause_s=0.0)


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--methods", default=",".join(dbmtl_jax.METHODS), help="comma-separated registry names")
    ap.add_argument("--tiny", action="store_true", help="tiny MLP (a smoke test of the script, not a benchmark)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_methods.md"))
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    runners, n_shared = make_runners(args.tasks, tiny=args.tiny, methods=tuple(args.methods.split(",")))
    time_runners(runners, reps=args.reps, steps=args.steps)

    ref: Runner = runners[0]
    rows = []
    for r in runners:
        group = "reference" if r.name == REFERENCE else dbmtl_jax.METHOD_GROUPS[r.name]
        rows.append((r.name, group, median_ms(r), paired_ratio(r, ref), r.info["compile_s"]))

    cmd = "python benchmarks/bench_methods.py " + " ".join(sys.argv[1:] if argv is None else argv)
    size = ("tiny MLP (smoke test) " + ", ".join(f"{k}={v}" for k, v in TINY.items()) if args.tiny else
            f"HPS MLP, trunk 512→1024→512 ({n_shared:,} shared parameters), T={args.tasks} heads, batch 256")
    lines = [
        "# Step time of every method relative to EW",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  ",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores, JAX backend {jax.default_backend()}; "
        f"load average at the end {os.getloadavg()[0]:.1f} (shared machine)  ",
        f"Versions: jax {jax.__version__}, optax {optax.__version__}, dbmtl_jax {dbmtl_jax.__version__}, "
        f"numpy {np.__version__}  ",
        f"Model: {size}, "
        f"float32; {args.reps} interleaved rounds × {args.steps} steps; wall time {time.perf_counter() - t0:.0f}s.",
        "",
        "Every method except the reference computes T per-task gradients (one forward, T pull-backs) and then",
        "aggregates; the ratio is the median over rounds of (method step / one-backward EW step) in the same round.",
        "Loss-weighting methods also have a one-backward path (within 1.15× of EW: `RESULTS_loss_weighting.md`).",
        "",
        "| method | group | median step (ms) | ratio to EW (one backward) | compile (s) |",
        "|---|---|---|---|---|",
    ]
    for name, group, med, paired, comp in rows:
        lines.append(f"| {name} | {group} | {med:.1f} | {paired:.2f}× | {comp:.1f} |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
