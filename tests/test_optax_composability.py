"""dbmtl composes with optax wrappers: MultiSteps, apply_if_finite, partition, inject_hyperparams, x64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dbmtl_jax

T = 3


def _grads(seed, shape=(4, 5)):
    return {"w": jax.random.normal(jax.random.key(seed), (T,) + shape) * jnp.array([1.0, 1e2, 1e-2])[:, None, None]}


def test_task_multi_steps_accumulates_then_one_update():
    params = {"w": jnp.zeros((4, 5))}
    inner = optax.chain(dbmtl_jax.dbmtl(T), optax.adam(1e-2))
    tx = dbmtl_jax.TaskMultiSteps(inner, num_tasks=T, every_k_schedule=2)
    state = tx.init(params)
    assert state.acc_grads["w"].shape == (T, 4, 5)
    update = jax.jit(tx.update)
    ref_state = inner.init(params)
    for step in range(3):
        g1, g2 = _grads(2 * step), _grads(2 * step + 1)
        u1, state = update(g1, state, params)
        assert bool(jnp.all(u1["w"] == 0))  # first micro-batch: nothing emitted
        u2, state = update(g2, state, params)
        mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
        want, ref_state = inner.update(mean, ref_state, params)
        np.testing.assert_allclose(u2["w"], want["w"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(state.inner_opt_state[0].ema["w"], ref_state[0].ema["w"], rtol=1e-5)


def test_task_multi_steps_with_bfloat16_params_matches_optax_accumulator_dtype():
    """bf16 parameters: the accumulator takes the dtype optax.MultiSteps gives its own (float32), so the jitted
    update compiles (a bf16 accumulator made optax's lax.cond branches disagree) and emits the mean update."""
    params = {"w": jnp.zeros((4, 5), jnp.bfloat16)}
    inner = optax.chain(dbmtl_jax.dbmtl(T), optax.sgd(1.0))
    tx = dbmtl_jax.TaskMultiSteps(inner, num_tasks=T, every_k_schedule=2)
    state = tx.init(params)
    plain = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2).init(params)
    assert state.acc_grads["w"].shape == (T, 4, 5)
    assert state.acc_grads["w"].dtype == plain.acc_grads["w"].dtype
    g1, g2 = (jax.tree.map(lambda x: x.astype(jnp.bfloat16), _grads(s)) for s in (0, 1))
    update = jax.jit(tx.update)
    u1, state = update(g1, state, params)
    u2, state = update(g2, state, params)
    assert bool(jnp.all(u1["w"] == 0))
    mean = jax.tree.map(lambda a, b: ((a.astype(jnp.float32) + b.astype(jnp.float32)) / 2).astype(jnp.bfloat16), g1, g2)
    want, _ = inner.update(mean, inner.init(params), params)
    assert u2["w"].dtype == want["w"].dtype
    np.testing.assert_allclose(np.asarray(u2["w"], np.float32), np.asarray(want["w"], np.float32), rtol=2e-2, atol=1e-3)


def test_apply_if_finite_after_dbmtl_skips_nan_step_with_nothing_lost():
    """optax.apply_if_finite keeps shapes, so it wraps the optimizer after dbmtl;
    dbmtl itself never lets a non-finite gradient into its EMA."""
    params = {"w": jnp.zeros((4, 5))}
    tx = optax.chain(dbmtl_jax.dbmtl(T), optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=3))
    state = tx.init(params)
    _, state = tx.update(_grads(0), state, params)
    bad = {"w": _grads(1)["w"].at[0, 0, 0].set(jnp.nan)}
    u, new_state = jax.jit(tx.update)(bad, state, params)
    assert bool(jnp.all(u["w"] == 0)) and int(new_state[1].notfinite_count) == 1
    for a, b in zip(jax.tree.leaves(new_state[0]), jax.tree.leaves(state[0])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(new_state[1].inner_state), jax.tree.leaves(state[1].inner_state)):
        np.testing.assert_array_equal(a, b)


def test_partition_dbmtl_on_trunk_sum_on_heads():
    params = {"trunk": jnp.zeros((4, 5)), "head": jnp.zeros((5,))}
    g = {"trunk": _grads(3)["w"], "head": jax.random.normal(jax.random.key(9), (T, 5))}
    tx = optax.partition(
        {"db": dbmtl_jax.dbmtl(T), "sum": optax.stateless(lambda u, p: jax.tree.map(lambda x: x.sum(0), u))},
        {"trunk": "db", "head": "sum"},
    )
    u, _ = tx.update(g, tx.init(params), params)
    ref = dbmtl_jax.dbmtl(T, shared=lambda p: p == "trunk")
    v, _ = ref.update(g, ref.init(params), params)
    np.testing.assert_allclose(u["trunk"], v["trunk"], rtol=1e-6)
    np.testing.assert_allclose(u["head"], v["head"], rtol=1e-6)


def test_float64_under_x64():
    with jax.enable_x64(True):
        params = {"w": jnp.zeros((4, 5), jnp.float64)}
        tx = optax.chain(dbmtl_jax.dbmtl(T), optax.adam(1e-2))
        state = tx.init(params)
        g = jax.tree.map(lambda x: x.astype(jnp.float64), _grads(4))
        u, state = jax.jit(tx.update)(g, state, params)
        assert u["w"].dtype == jnp.float64 and state[0].ema["w"].dtype == jnp.float64
