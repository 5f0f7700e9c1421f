"""Is any step slower than at an earlier revision? This tree against ``--base``, side by side in one process.

Issue 14 item 8 ("no step slower") after the refactors of 0.2.0. Both packages build the same steps on the
MLP problem of ``models.py`` from names that exist in both revisions: the DB-MTL chain
(``value_and_task_grads(loss_fn)`` + ``dbmtl`` + Adam, with LibMTL's constant β), the fused step
(``fused_dbmtl(loss_fn)``), and the chain of a few gradient methods of the registry (``get_method``) + Adam.
The base revision is extracted with ``git archive`` and imported as ``dbmtl_jax_base`` (``bench_guard.py``).

    taskset -c 0 python benchmarks/bench_revisions.py --base 9ae1b3b --tasks 3,10 --out benchmarks/RESULTS_revisions.md
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_guard import extract_base  # noqa: E402
from harness import interleaved_times, jit_runner, median_ms  # noqa: E402
from models import is_shared, make_problem  # noqa: E402

METHODS = ("pcgrad", "mgda", "upgrad", "nash_mtl")


def _jax(tree: Any) -> Any:
    return jax.tree_util.tree_map(jnp.asarray, tree)


def runners_for(pkg: Any, tag: str, problem: Any) -> list:
    params, batch = _jax(problem.params), _jax(problem.batch)
    T = problem.num_tasks
    out = []

    def chain_runner(name: str, tx: Any) -> Any:
        grads = pkg.value_and_task_grads(problem.loss_fn)

        def step(p, s, b):
            losses, g = grads(p, b)
            u, s = tx.update(g, s, p, losses=losses, key=jax.random.key(0))
            return optax.apply_updates(p, u), s, losses

        p0 = jax.tree_util.tree_map(jnp.copy, params)
        s0 = jax.tree_util.tree_map(jnp.copy, tx.init(p0))
        return jit_runner(f"{tag}:{name}", step, p0, s0, batch)

    out.append(chain_runner("dbmtl chain", optax.chain(
        pkg.dbmtl(T, beta=0.9, beta_sigma=0.0, shared=is_shared), optax.adam(1e-4))))
    fused = pkg.fused_dbmtl(problem.loss_fn, T, optax.adam(1e-4), beta=0.9, beta_sigma=0.0, shared=is_shared)

    def fused_step(p, s, b):
        losses, u, s = fused.update(s, p, b)
        return optax.apply_updates(p, u), s, losses

    p0 = jax.tree_util.tree_map(jnp.copy, params)
    s0 = jax.tree_util.tree_map(jnp.copy, fused.init(p0))
    out.append(jit_runner(f"{tag}:fused", fused_step, p0, s0, batch))
    for m in METHODS:
        out.append(chain_runner(f"{m} chain", optax.chain(pkg.get_method(m, T, shared=is_shared), optax.adam(1e-4))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="9ae1b3b")
    ap.add_argument("--tasks", default="3,10")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=str(HERE / "RESULTS_revisions.md"))
    args = ap.parse_args()
    base_rev = extract_base(args.base, Path(tempfile.mkdtemp()))
    head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, check=True,
                              capture_output=True, text=True).stdout.strip()
    import dbmtl_jax
    import dbmtl_jax_base

    load0, t0 = os.getloadavg(), time.time()
    lines = ["# This tree against an earlier revision: step times side by side", "",
             f"Command: `python {' '.join(sys.argv)}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared: a training run used the "
             f"other core); jax {jax.__version__}; load average at start {' '.join(f'{x:.2f}' for x in load0)}.", "",
             f"Base `{base_rev}` (before this session's refactors) vs this tree `{head_rev}` (uncommitted changes "
             "included). Median ms per step over interleaved repetitions (`harness.interleaved_times`); ratio = "
             "this / base (above 1: slower). Steps: MLP problem of `models.py`, Adam, DB-MTL at LibMTL's "
             "constant β in both (the default changed in 0.2.0), donated buffers.", ""]
    worst = 0.0
    for T in (int(x) for x in args.tasks.split(",")):
        problem = make_problem("mlp", T)
        runners = runners_for(dbmtl_jax_base, "base", problem) + runners_for(dbmtl_jax, "this", problem)
        interleaved_times(runners, reps=args.reps)
        by = {r.name: r for r in runners}
        lines += [f"### MLP, T = {T} (P shared = {problem.n_shared:,})", "",
                  f"| step | {base_rev} (ms) | {head_rev} (ms) | ratio |", "|---|---|---|---|"]
        for name in ("dbmtl chain", "fused", *(f"{m} chain" for m in METHODS)):
            a, b = median_ms(by[f"base:{name}"]), median_ms(by[f"this:{name}"])
            worst = max(worst, b / a)
            lines.append(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.3f} |")
        lines.append("")
        print("\n".join(lines[-len(METHODS) - 5:]), flush=True)
    lines += [f"Largest ratio: {worst:.3f}. Wall time {time.time() - t0:.0f} s; load average at the end "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}.", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
