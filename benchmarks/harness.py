"""Measurement helpers: compiled cost/memory analysis, interleaved timing, RSS.

The one timing harness of ``benchmarks/``: every script builds its subjects as
``Runner``s (``jit_runner`` for a ``(params, state, batch) -> (params, state,
losses)`` step, ``Runner(name, run)`` for anything else), times them with
``interleaved_times`` and reads ``median_ms`` / ``iqr_ms`` / ``paired_ratio``.
Nothing here asserts anything about speed; ``run.py`` collects the numbers and
writes ``RESULTS.md``.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from models import Problem

try:
    from jax_steps import build_step, grads_fn, to_jax, transform_only
except ImportError:  # an older ``dbmtl_jax`` on the path (bench_solvers.py's --baseline worker): timing helpers only
    build_step = grads_fn = to_jax = transform_only = None

__all__ = [
    "Runner", "jax_runner", "jit_runner", "compile_step", "step_runner", "transform_runner", "torch_runner",
    "interleaved_times", "median_ms", "iqr_ms", "paired_ratio", "flops_of", "memory_of", "has_while_loop", "head_backward_flops",
]

PyTree = Any


@dataclass
class Runner:
    """A benchmark subject: ``run(n)`` executes ``n`` steps and waits for them."""

    name: str
    run: Callable[[int], None]
    info: dict = field(default_factory=dict)
    times: list = field(default_factory=list)  # seconds per step, one entry per repetition


def flops_of(compiled: Any) -> Optional[float]:
    """``flops`` from XLA's compiled cost analysis (``None`` if unavailable)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    f = (ca or {}).get("flops")
    return None if f is None else float(f)


def has_while_loop(compiled: Any) -> bool:
    """Whether the optimized HLO has a ``while`` (cost analysis counts its body once)."""
    try:
        return " while(" in compiled.as_text()
    except Exception:  # noqa: BLE001
        return False


def memory_of(compiled: Any) -> dict:
    """XLA's compiled memory analysis in bytes; ``peak`` = arguments + temporaries + non-aliased outputs."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    out = {
        "argument": int(ma.argument_size_in_bytes),
        "output": int(ma.output_size_in_bytes),
        "alias": int(ma.alias_size_in_bytes),
        "temp": int(ma.temp_size_in_bytes),
    }
    out["peak"] = out["argument"] + out["temp"] + max(out["output"] - out["alias"], 0)
    return out


def _nbytes(tree: PyTree) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)))


def jax_runner(problem: Problem, variant: str, *, chunk_size: Optional[int] = None, analyse: bool = True) -> Runner:
    """Compiles ``variant``'s step with donated params/state; records compile time, FLOPs, memory."""
    fns = build_step(problem, variant, chunk_size=chunk_size)
    params = to_jax(problem.params)
    state = fns.init(params)
    batch = to_jax(problem.batch)
    compiled, compile_s = compile_step(fns.step, params, state, batch)
    info: dict = {"compile_s": compile_s}
    if analyse:
        info["flops"] = flops_of(compiled)
        info["while_loop"] = has_while_loop(compiled)
        info["memory"] = memory_of(compiled)
        info["state_bytes"] = _nbytes(params) + _nbytes(state)
        info["batch_bytes"] = _nbytes(batch)
    return step_runner(f"jax:{variant}", compiled, params, state, batch, info)


def compile_step(step: Callable, params: PyTree, state: PyTree, batch: Any) -> tuple:
    """``(compiled, seconds)``: ``step`` jitted with ``params`` and ``state`` donated, compiled ahead of time."""
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, batch).compile()
    return compiled, time.perf_counter() - t0


def jit_runner(name: str, step: Callable, params: PyTree, state: PyTree, batch: Any, info: Optional[dict] = None) -> Runner:
    """``step_runner`` over ``compile_step(step, ...)``; the compile time goes to ``info["compile_s"]``."""
    compiled, compile_s = compile_step(step, params, state, batch)
    return step_runner(name, compiled, params, state, batch, dict(info or {}, compile_s=compile_s))


def step_runner(name: str, compiled: Any, params: PyTree, state: PyTree, batch: Any, info: dict) -> Runner:
    """A runner over a compiled ``(params, state, batch) -> (params, state, losses)`` step with donated buffers."""
    holder = [params, state]

    def run(n: int) -> None:
        p, s = holder
        losses = None
        for _ in range(n):
            p, s, losses = compiled(p, s, batch)
        jax.block_until_ready(losses)
        holder[0], holder[1] = p, s

    return Runner(name, run, info)


def transform_runner(problem: Problem) -> Runner:
    """The DB-MTL transform alone (EMA, norms, scaling) on fixed random task gradients."""
    init, update, make_grads = transform_only(problem)
    grads = make_grads()
    state = init()
    compiled = jax.jit(update, donate_argnums=(1,)).lower(grads, state).compile()
    holder = [state]

    def run(n: int) -> None:
        s = holder[0]
        out = None
        for _ in range(n):
            out, s = compiled(grads, s)
        jax.block_until_ready(out)
        holder[0] = s

    return Runner("jax:transform-only", run, {})


def torch_runner(problem: Problem, kind: str, threads: int) -> Runner:
    """The LibMTL-style PyTorch step (``kind`` ``"dbmtl"`` or ``"ew"``)."""
    import torch

    from torch_steps import build_torch

    torch.set_num_threads(threads)
    stepper = build_torch(kind, problem.config, problem.params, problem.batch)

    def run(n: int) -> None:
        for _ in range(n):
            stepper.step()

    return Runner(f"torch:{kind}", run, {})


def interleaved_times(
    runners: list,
    *,
    reps: int,
    block_s: float = 0.1,
    max_config_s: float = 8.0,
    min_reps: int = 3,
    warmup: int = 2,
    pause_s: float = 0.005,
    steps: Optional[int] = None,
) -> None:
    """Round-robin timing: every repetition times one block of each runner.

    Each runner is warmed up (``warmup`` steps), then ``n`` steps per block are
    chosen so that a block lasts about ``block_s`` (or ``n = steps`` for every
    runner when ``steps`` is given).  The order is rotated every repetition.  A
    runner whose measured time reaches ``max_config_s`` stops after
    ``min_reps`` repetitions (slow naive variants; ``max_config_s=math.inf``
    keeps every runner in every repetition, as ``paired_ratio`` wants).
    Per-step times (seconds) are appended to ``runner.times``.
    """
    inner = {}
    spent = {}
    for r in runners:
        t0 = time.perf_counter()
        r.run(1)
        first = time.perf_counter() - t0
        if warmup > 1 and first < max_config_s / 4:
            t0 = time.perf_counter()
            r.run(warmup - 1)
            first = (time.perf_counter() - t0) / (warmup - 1)
        inner[r.name] = steps if steps is not None else max(1, int(block_s / max(first, 1e-6)))
        spent[r.name] = 0.0
    for rep in range(reps):
        k = rep % len(runners)
        for r in runners[k:] + runners[:k]:
            if len(r.times) >= min_reps and spent[r.name] >= max_config_s:
                continue
            n = inner[r.name]
            time.sleep(pause_s)
            t0 = time.perf_counter()
            r.run(n)
            dt = time.perf_counter() - t0
            spent[r.name] += dt
            r.times.append(dt / n)


def median_ms(r: Runner) -> float:
    return 1e3 * statistics.median(r.times) if r.times else math.nan


def paired_ratio(r: Runner, ref: Runner) -> float:
    """Median over repetitions of ``r``'s time / ``ref``'s time in the same repetition (cancels load drift)."""
    pairs = [a / b for a, b in zip(r.times, ref.times)]
    return statistics.median(pairs) if pairs else math.nan


def iqr_ms(r: Runner) -> tuple:
    if len(r.times) < 2:
        return (math.nan, math.nan)
    q = np.percentile(np.asarray(r.times) * 1e3, [25, 75])
    return float(q[0]), float(q[1])


def _cost(fn: Callable, *args: Any) -> Optional[float]:
    return flops_of(jax.jit(fn).lower(*args).compile())


def head_backward_flops(problem: Problem, bases: list) -> dict:
    """FLOPs spent back-propagating through the heads, per gradient strategy.

    From compiled cost analyses: ``head_bwd(S) = cost(S grads) − cost(trunk fwd)
    − T·cost(one trunk backward) − cost(heads fwd)``, against the baseline
    ``cost(one fwd+bwd of every head) − cost(heads fwd)``.  Returns
    ``{"baseline": flops, base: (flops, ratio)}``; ``None`` entries where the
    strategy runs in a while loop (cost analysis counts the body once).
    """
    from dbmtl_jax.task_gradients import transform_losses

    params = to_jax(problem.params)
    batch = to_jax(problem.batch)
    tp, hps = params["trunk"], params["heads"]
    z = problem.trunk_fn(tp, batch)
    t = problem.num_tasks

    c_trunk_fwd = _cost(lambda p, b: problem.trunk_fn(p, b), tp, batch)
    c_trunk_vjp = _cost(lambda p, b, c: jax.vjp(lambda q: problem.trunk_fn(q, b), p)[1](c), tp, batch, jnp.ones_like(z))
    bt = c_trunk_vjp - c_trunk_fwd

    def heads_fwd(h: PyTree, zz: jax.Array, b: Any) -> jax.Array:
        return transform_losses(jnp.stack([f(hp, zz, b) for f, hp in zip(problem.head_loss_fns, h)]))

    c_heads_fwd = _cost(heads_fwd, hps, z, batch)
    c_heads_once = _cost(lambda h, zz, b: jax.grad(lambda a, c: jnp.sum(heads_fwd(a, c, b)), argnums=(0, 1))(h, zz), hps, z, batch)
    baseline = c_heads_once - c_heads_fwd
    out: dict = {"baseline": baseline}
    for base in bases:
        fn = grads_fn(problem, base, chunk_size=None)
        compiled = jax.jit(fn).lower(params, batch).compile()
        if has_while_loop(compiled):
            out[base] = None
            continue
        hb = flops_of(compiled) - c_trunk_fwd - t * bt - c_heads_fwd
        out[base] = (hb, hb / baseline if baseline else math.nan)
    return out
