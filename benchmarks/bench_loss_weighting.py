"""Step time of the loss-weighting methods' cheap path against EW, on one HPS MLP.

Model: ``models.make_mlp(3, d_out=1)``, hard parameter sharing, trunk 512 →
1024 → 512 (ReLU), T = 3 linear regression heads 512 → 1, batch 256, MSE
losses scaled by (1, 10, 0.1) so that they are on three different scales.
Every subject is ``optax.chain(<method>(grads="weighted"), optax.adam(1e-3))``
driven by :func:`dbmtl_jax.loss_weighting.value_and_weighted_grad` (one
forward, one backward pass), jitted with the parameters and optimizer state
donated.  The baseline ``ew`` is the same with equal weights; ``sum (no
transform)`` is ``jax.grad`` of the summed losses into plain Adam.  ``famo
(exact, 2nd forward)`` adds the second forward pass of exact FAMO
(``observe_losses``) and is informational: the target applies to the
one-forward lagged variant.  (Until the port to ``models.py`` the script had
its own MLP of the same sizes, with the T heads as one ``512 × 3`` matrix and
normal initialisation; ``RESULTS_loss_weighting.md`` was measured with it.)

Timing (``harness.py``): the subjects are ``jit_runner``s (compiled ahead of
time, then 4 warm-up steps), run by ``interleaved_times`` in ``--reps`` rounds
(in each round every subject runs ``--steps`` steps and waits with
``block_until_ready``; the subject order rotates between rounds).  Reported:
the median over rounds of the per-step time, its ratio to ``ew``'s median, the
paired ratio (``paired_ratio``: median over rounds of subject / ``ew`` in the
same round, which cancels load drift; the target is judged on it), the minimum
and the mean (IGBv2 trains its agent every 50 steps, which the median skips and
the mean includes).  The step counter that seeds the methods' keys lives in the
donated state.

    python benchmarks/bench_loss_weighting.py [--reps 15] [--steps 10] [--methods gls,uw,...] [--tiny] [--out benchmarks/RESULTS_loss_weighting.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Runner, interleaved_times, jit_runner, median_ms, paired_ratio  # noqa: E402
from models import make_problem  # noqa: E402

from dbmtl_jax import loss_weighting as lw  # noqa: E402
from dbmtl_jax.methods import get_method  # noqa: E402

T = 3
SIZES = dict(batch_size=256, d_in=512, hidden=1024, d_feat=512, d_out=1)
TINY = dict(batch_size=16, d_in=8, hidden=16, d_feat=8, d_out=1)  # a smoke test of the script, not a benchmark
LOSS_SCALES = (1.0, 10.0, 0.1)
TARGET = 1.15
METHODS = ("gls", "rlw", "uw", "dwa", "imtl_l", "igbv2", "famo", "stch")
# An "epoch" of 50 steps for the epoch-based methods (see their docstrings).
SETTINGS: dict[str, dict] = {
    "dwa": dict(steps_per_epoch=50),
    "stch": dict(steps_per_epoch=50, warmup_epochs=0),
    "igbv2": dict(steps_per_epoch=50),
}


def subjects(methods: tuple = METHODS) -> tuple:
    """The baselines, ``methods`` and (with famo) exact FAMO, in table order."""
    return ("ew", "sum (no transform)", *methods) + (("famo (exact, 2nd forward)",) if "famo" in methods else ())


def make_runner(name: str, problem: Any) -> Runner:
    """A ``jit_runner`` over ``(params, (opt_state, i), batch) -> (params, (opt_state, i + 1), summed loss)``."""
    scales = jnp.asarray(LOSS_SCALES[: problem.num_tasks], jnp.float32)

    def loss_fn(params: dict, batch: tuple) -> jax.Array:
        return problem.loss_fn(params, batch) * scales

    params = jax.tree.map(jnp.asarray, problem.params)
    batch = jax.tree.map(jnp.asarray, problem.batch)
    if name == "sum (no transform)":
        tx = optax.adam(1e-3)

        def plain(p, s, b):
            opt_state, i = s
            total, grads = jax.value_and_grad(lambda q: jnp.sum(loss_fn(q, b)))(p)
            updates, opt_state = tx.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), (opt_state, i + 1), total

        return jit_runner(name, plain, params, (tx.init(params), jnp.int32(0)), batch)

    method = "famo" if name.startswith("famo") else name
    tx = optax.chain(get_method(method, problem.num_tasks, grads="weighted", **SETTINGS.get(method, {})),
                     optax.adam(1e-3))
    vg = lw.value_and_weighted_grad(loss_fn)
    exact = name == "famo (exact, 2nd forward)"

    def step(p, s, b):
        opt_state, i = s
        key = jax.random.fold_in(jax.random.PRNGKey(0), i)
        losses, grads = vg(opt_state, p, b, key=key)
        updates, opt_state = tx.update(grads, opt_state, p, losses=losses, key=key)
        p = optax.apply_updates(p, updates)
        if exact:
            opt_state = lw.observe_losses(opt_state, loss_fn(p, b))
        return p, (opt_state, i + 1), jnp.sum(losses)

    return jit_runner(name, step, params, (tx.init(params), jnp.int32(0)), batch)


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated loss-weighting methods")
    ap.add_argument("--tiny", action="store_true", help="tiny MLP (a smoke test of the script, not a benchmark)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_loss_weighting.md"))
    args = ap.parse_args(argv)

    sizes = TINY if args.tiny else SIZES
    problem = make_problem("mlp", T, **sizes)
    load_before = os.getloadavg()
    runners = []
    for name in subjects(tuple(args.methods.split(","))):
        runners.append(make_runner(name, problem))
        print(f"compiled {name}: {runners[-1].info['compile_s']:.1f} s", file=sys.stderr)
    # 4 warm-up steps (the old first call + 3), no early stop: every subject runs every round (paired ratios).
    interleaved_times(runners, reps=args.reps, steps=args.steps, warmup=4, max_config_s=float("inf"), pause_s=0.0)
    load_after = os.getloadavg()

    ew = runners[0]
    base = median_ms(ew)
    rows = []
    for r in runners:
        med, paired = median_ms(r), paired_ratio(r, ew)
        if r.name == "ew":
            target = "baseline"
        elif r.name in ("sum (no transform)", "famo (exact, 2nd forward)"):
            target = "—"
        else:
            target = "yes" if paired <= TARGET else "**no**"
        rows.append(f"| {r.name} | {med:.2f} | {med / base:.3f} | {paired:.3f} | {1e3 * min(r.times):.2f} | "
                    f"{1e3 * statistics.fmean(r.times):.2f} | {r.info['compile_s']:.1f} | {target} |")
        print(f"{r.name:28s} median {med:8.2f} ms  x{med / base:.3f}  paired x{paired:.3f}", file=sys.stderr)

    import jaxlib  # noqa: PLC0415

    versions = (f"python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
                f"optax {optax.__version__}, numpy {np.__version__}")
    cmd = "python " + " ".join(["benchmarks/bench_loss_weighting.py"] + (sys.argv[1:] if argv is None else argv))
    text = f"""# Loss-weighting methods: cheap-path step time vs EW

Generated by `benchmarks/bench_loss_weighting.py`.

- Date: {datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
- Command: `{cmd}`
- Machine: {platform.platform()}; processor `{platform.processor() or platform.machine()}`; {os.cpu_count()} CPU cores;
  JAX devices: {", ".join(str(d) for d in jax.devices())}
- Versions: {versions}
- Model: HPS MLP (`models.make_mlp`{", tiny: a smoke test" if args.tiny else ""}), trunk {sizes["d_in"]}→{sizes["hidden"]}→{sizes["d_feat"]} (ReLU), {T} linear regression heads, batch {sizes["batch_size"]}, MSE losses
  scaled by {LOSS_SCALES}; Adam(1e-3) after the method; parameters and optimizer state donated.
- Timing: `harness.interleaved_times`, {args.reps} interleaved rounds of {args.steps} steps per subject (rotating order),
  after an ahead-of-time compile and 4 warm-up steps; median over rounds of the time per step. Target: each method within {TARGET}× of `ew`, judged
  on the paired ratio (median over rounds of the subject's time divided by `ew`'s time in the same round).
- Settings: `steps_per_epoch=50` for dwa, stch (`warmup_epochs=0`) and igbv2; other hyperparameters at their
  defaults; famo is the one-forward lagged variant (the exact variant is shown for information).
- **Load caveat**: this machine is shared with other jobs running at the same time (load average
  {load_before[0]:.1f} before and {load_after[0]:.1f} after the run, on {os.cpu_count()} cores); absolute times are
  noisy and inflated; the interleaving keeps the ratios comparable, not exact.

| subject | median ms/step | median / ew median | paired ratio to ew | min ms/step | mean ms/step | compile s | within {TARGET}× (paired) |
|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
