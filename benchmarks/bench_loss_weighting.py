"""Step time of the loss-weighting methods' cheap path against EW, on one HPS MLP.

Model: hard parameter sharing, trunk 512 → 1024 → 512 (ReLU), T = 3 linear
regression heads 512 → 1, batch 256, MSE losses on three different scales.
Every subject is ``optax.chain(<method>(grads="weighted"), optax.adam(1e-3))``
driven by :func:`dbmtl_jax.loss_weighting.value_and_weighted_grad` (one
forward, one backward pass), jitted with the parameters and optimizer state
donated.  The baseline ``ew`` is the same with equal weights; ``sum (no
transform)`` is ``jax.grad`` of the summed losses into plain Adam.  ``famo
(exact, 2nd forward)`` adds the second forward pass of exact FAMO
(``observe_losses``) and is informational: the target applies to the
one-forward lagged variant.

Timing: the subjects are compiled and warmed up, then run in interleaved
repetitions (``--reps`` rounds; in each round every subject runs ``--steps``
steps and waits with ``block_until_ready``; the subject order rotates between
rounds).  Reported: the median over rounds of the per-step time, its ratio to
``ew``'s median, the paired ratio (median over rounds of subject / ``ew`` in the
same round, which cancels load drift; the target is judged on it), the minimum
and the mean (IGBv2 trains its agent every 50 steps, which the median
skips and the mean includes).

    python benchmarks/bench_loss_weighting.py [--reps 15] [--steps 10] [--out benchmarks/RESULTS_loss_weighting.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dbmtl_jax import loss_weighting as lw
from dbmtl_jax.methods import get_method

T = 3
BATCH = 256
D_IN, D_HID, D_OUT = 512, 1024, 512
TARGET = 1.15
METHODS = ("gls", "rlw", "uw", "dwa", "imtl_l", "igbv2", "famo", "stch")
# An "epoch" of 50 steps for the epoch-based methods (see their docstrings).
SETTINGS: dict[str, dict] = {
    "dwa": dict(steps_per_epoch=50),
    "stch": dict(steps_per_epoch=50, warmup_epochs=0),
    "igbv2": dict(steps_per_epoch=50),
}


def init_params(key: jax.Array) -> dict:
    ks = jax.random.split(key, 3)

    def dense(k, a, b):
        return {"w": jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a), "b": jnp.zeros((b,), jnp.float32)}

    return {
        "trunk": [dense(ks[0], D_IN, D_HID), dense(ks[1], D_HID, D_OUT)],
        "heads": {"w": jax.random.normal(ks[2], (D_OUT, T), jnp.float32) / np.sqrt(D_OUT),
                  "b": jnp.zeros((T,), jnp.float32)},
    }


def loss_fn(params: dict, batch: tuple) -> jax.Array:
    x, y = batch
    h = x
    for layer in params["trunk"]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    pred = h @ params["heads"]["w"] + params["heads"]["b"]  # [B, T]
    return jnp.mean(jnp.square(pred - y), axis=0) * jnp.array([1.0, 10.0, 0.1])


def make_step(name: str) -> tuple[Callable, Any]:
    """A jitted step ``(params, opt_state, batch, i) -> (params, opt_state, losses)`` and its optimizer."""
    if name == "sum (no transform)":
        tx = optax.adam(1e-3)

        def step(params, opt_state, batch, i):
            del i
            total, grads = jax.value_and_grad(lambda p: jnp.sum(loss_fn(p, batch)))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, total

        return jax.jit(step, donate_argnums=(0, 1)), tx

    method = "famo" if name.startswith("famo") else name
    tx = optax.chain(get_method(method, T, grads="weighted", **SETTINGS.get(method, {})), optax.adam(1e-3))
    vg = lw.value_and_weighted_grad(loss_fn)
    exact = name == "famo (exact, 2nd forward)"

    def step(params, opt_state, batch, i):
        key = jax.random.fold_in(jax.random.PRNGKey(0), i)
        losses, grads = vg(opt_state, params, batch, key=key)
        updates, opt_state = tx.update(grads, opt_state, params, losses=losses, key=key)
        params = optax.apply_updates(params, updates)
        if exact:
            opt_state = lw.observe_losses(opt_state, loss_fn(params, batch))
        return params, opt_state, jnp.sum(losses)

    return jax.jit(step, donate_argnums=(0, 1)), tx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS_loss_weighting.md"))
    args = ap.parse_args()

    key = jax.random.PRNGKey(0)
    kx, ky, kp = jax.random.split(key, 3)
    batch = (jax.random.normal(kx, (BATCH, D_IN), jnp.float32), jax.random.normal(ky, (BATCH, T), jnp.float32))
    names = ["ew", "sum (no transform)", *METHODS, "famo (exact, 2nd forward)"]
    subjects = {}
    load_before = os.getloadavg()
    for name in names:
        step, tx = make_step(name)
        params = init_params(kp)
        opt_state = tx.init(params)
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, batch, jnp.int32(0))
        jax.block_until_ready(loss)
        compile_s = time.perf_counter() - t0
        for i in range(1, 4):  # warm-up
            params, opt_state, loss = step(params, opt_state, batch, jnp.int32(i))
        jax.block_until_ready((params, opt_state))
        subjects[name] = dict(step=step, params=params, opt_state=opt_state, i=4, times=[], compile_s=compile_s)
        print(f"compiled {name}: {compile_s:.1f} s", file=sys.stderr)

    for r in range(args.reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            s = subjects[name]
            params, opt_state = s["params"], s["opt_state"]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                params, opt_state, loss = s["step"](params, opt_state, batch, jnp.int32(s["i"]))
                s["i"] += 1
            jax.block_until_ready((params, opt_state, loss))
            s["times"].append((time.perf_counter() - t0) / args.steps)
            s["params"], s["opt_state"] = params, opt_state
    load_after = os.getloadavg()

    base = statistics.median(subjects["ew"]["times"])
    ew_t = subjects["ew"]["times"]
    rows = []
    for name in names:
        t = subjects[name]["times"]
        med = statistics.median(t)
        # Paired ratio: this subject's time over ew's in the same round, median over rounds (cancels the
        # drift of the machine's load between rounds).
        paired = statistics.median(a / b for a, b in zip(t, ew_t))
        if name == "ew":
            target = "baseline"
        elif name in ("sum (no transform)", "famo (exact, 2nd forward)"):
            target = "—"
        else:
            target = "yes" if paired <= TARGET else "**no**"
        rows.append(f"| {name} | {1e3 * med:.2f} | {med / base:.3f} | {paired:.3f} | {1e3 * min(t):.2f} | "
                    f"{1e3 * statistics.fmean(t):.2f} | {subjects[name]['compile_s']:.1f} | {target} |")
        print(f"{name:28s} median {1e3 * med:8.2f} ms  x{med / base:.3f}  paired x{paired:.3f}", file=sys.stderr)

    import jaxlib  # noqa: PLC0415

    versions = (f"python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
                f"optax {optax.__version__}, numpy {np.__version__}")
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    text = f"""# Loss-weighting methods: cheap-path step time vs EW

Generated by `benchmarks/bench_loss_weighting.py`.

- Date: {datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
- Command: `{cmd}`
- Machine: {platform.platform()}; processor `{platform.processor() or platform.machine()}`; {os.cpu_count()} CPU cores;
  JAX devices: {", ".join(str(d) for d in jax.devices())}
- Versions: {versions}
- Model: HPS MLP, trunk {D_IN}→{D_HID}→{D_OUT} (ReLU), {T} linear regression heads, batch {BATCH}, MSE losses
  scaled by (1, 10, 0.1); Adam(1e-3) after the method; parameters and optimizer state donated.
- Timing: {args.reps} interleaved rounds of {args.steps} steps per subject (rotating order), after compile and 3
  warm-up steps; median over rounds of the time per step. Target: each method within {TARGET}× of `ew`, judged
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


if __name__ == "__main__":
    main()
