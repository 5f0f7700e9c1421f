"""dbmtl composes with optax wrappers: MultiSteps, apply_if_finite, partition, inject_hyperparams, x64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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


# ---- TaskMultiSteps accumulates the losses= of every micro-batch (audit 32, S4) ----

def _uw_micro_batches():
    params = {"w": jnp.zeros((4, 5))}
    gs = [_grads(s) for s in range(4)]
    ls = [jnp.array([100.0, 0.01, 5.0]), jnp.array([1.0, 1.0, 1.0]), jnp.array([3.0, 0.5, 2.0]),
          jnp.array([0.1, 7.0, 2.0])]
    return params, gs, ls


def test_task_multi_steps_passes_the_mean_losses_of_its_micro_batches():
    """UW learns its log-variances from the losses: each emitted step must see the mean of the k micro-batches'
    losses with the mean gradient (before, only the last micro-batch's losses reached it)."""
    params, gs, ls = _uw_micro_batches()
    inner = optax.chain(dbmtl_jax.get_method("uw", T, learning_rate=0.1), optax.sgd(1.0))
    tx = dbmtl_jax.TaskMultiSteps(inner, num_tasks=T, every_k_schedule=2)
    state, ref_state = tx.init(params), inner.init(params)
    update = jax.jit(tx.update)
    for i in (0, 2):
        _, state = update(gs[i], state, params, losses=ls[i])
        np.testing.assert_allclose(state.acc_losses, ls[i], rtol=1e-6)
        u, state = update(gs[i + 1], state, params, losses=ls[i + 1])
        mean = jax.tree.map(lambda a, b: (a + b) / 2, gs[i], gs[i + 1])
        want, ref_state = inner.update(mean, ref_state, params, losses=(ls[i] + ls[i + 1]) / 2)
        np.testing.assert_allclose(u["w"], want["w"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(state.inner_opt_state[0].log_var, ref_state[0].log_var, rtol=1e-6)
        assert int(state.loss_count) == 0 and bool(jnp.all(state.acc_losses == 0))  # restarted


def test_task_multi_steps_sums_the_losses_when_it_sums_the_gradients():
    params, gs, ls = _uw_micro_batches()
    inner = optax.chain(dbmtl_jax.get_method("uw", T, learning_rate=0.1), optax.sgd(1.0))
    tx = dbmtl_jax.TaskMultiSteps(inner, num_tasks=T, every_k_schedule=3, use_grad_mean=False)
    state = tx.init(params)
    for g, l in zip(gs[:3], ls[:3]):
        u, state = tx.update(g, state, params, losses=l)
    total = jax.tree.map(lambda a, b, c: a + b + c, *gs[:3])
    want, ref_state = inner.update(total, inner.init(params), params, losses=ls[0] + ls[1] + ls[2])
    np.testing.assert_allclose(u["w"], want["w"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state.inner_opt_state[0].log_var, ref_state[0].log_var, rtol=1e-6)


def test_task_multi_steps_without_task_axis_accumulates_a_weighted_gradient_and_the_losses():
    """grads="weighted" (one backward pass, plain gradients): task_axis=False gives a parameter-shaped
    accumulator, and DWA's loss history gets the mean losses (optax.MultiSteps gave it the last micro-batch's)."""
    params = {"w": jnp.zeros(4)}
    inner = optax.chain(dbmtl_jax.get_method("dwa", T, grads="weighted"), optax.sgd(1.0))
    tx = dbmtl_jax.TaskMultiSteps(inner, num_tasks=T, every_k_schedule=2, task_axis=False)
    state = tx.init(params)
    assert state.acc_grads["w"].shape == (4,)
    ref_state = inner.init(params)
    for step in range(3):
        l1, l2 = jnp.array([100.0, 1.0, 0.01]) * (step + 1), jnp.ones(T)
        g1, g2 = {"w": jnp.full(4, 1.0 + step)}, {"w": jnp.full(4, 3.0)}
        _, state = tx.update(g1, state, params, losses=l1)
        u, state = tx.update(g2, state, params, losses=l2)
        want, ref_state = inner.update({"w": (g1["w"] + g2["w"]) / 2}, ref_state, params, losses=(l1 + l2) / 2)
        np.testing.assert_allclose(u["w"], want["w"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(state.inner_opt_state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    with pytest.raises(ValueError, match="without the task axis.*task_axis=False"):
        dbmtl_jax.TaskMultiSteps(inner, T, 2).update({"w": jnp.ones((T, 4))[0]}, dbmtl_jax.TaskMultiSteps(
            inner, T, 2).init(params))


def _guarded_multi_steps(log_losses=True, debug=False):
    params = {"w": jnp.zeros(4)}
    guard = dbmtl_jax.skip_invalid_steps(optax.chain(dbmtl_jax.dbmtl(T), optax.sgd(1.0)), log_losses=log_losses,
                                         debug=debug)
    return params, dbmtl_jax.TaskMultiSteps(guard, num_tasks=T, every_k_schedule=2)


def _micro(seed):
    return {"w": jax.random.normal(jax.random.key(seed), (T, 4))}


@pytest.mark.parametrize("bad", ["nan_loss", "negative_loss", "nan_grad"])
def test_an_invalid_micro_batch_makes_the_emitted_step_invalid_for_a_guard_inside(bad):
    """A NaN loss or gradient in micro-batch 1 of 2, or a negative loss whose mean with micro-batch 2 is positive
    (-1 and 5): skip_invalid_steps inside TaskMultiSteps rejects the emitted step (zero update, inner state kept,
    counted), and the accumulator restarts clean, so the next emitted step is the one a fresh run makes."""
    params, tx = _guarded_multi_steps()
    update = jax.jit(tx.update)
    l1, l2, g1 = jnp.array([1.0, 2.0, 3.0]), jnp.array([5.0, 1.0, 1.0]), _micro(0)
    if bad == "nan_loss":
        l1 = l1.at[1].set(jnp.nan)
    elif bad == "negative_loss":
        l1 = l1.at[0].set(-1.0)
    else:
        g1 = {"w": g1["w"].at[2, 0].set(jnp.nan)}
    state0 = tx.init(params)
    _, state = update(g1, state0, params, losses=l1)
    u, state = update(_micro(1), state, params, losses=l2)
    assert bool(jnp.all(u["w"] == 0)) and int(state.inner_opt_state.num_skipped) == 1
    for a, b in zip(jax.tree.leaves(state.inner_opt_state.inner_state), jax.tree.leaves(state0.inner_opt_state.inner_state)):
        np.testing.assert_array_equal(a, b)
    assert bool(jnp.all(state.acc_grads["w"] == 0)) and bool(jnp.all(state.acc_losses == 0))
    # The next accumulation is unaffected (optax.MultiSteps multiplied its accumulator by 0, keeping a NaN).
    fresh = tx.init(params)
    for s in (2, 3):
        u, state = update(_micro(s), state, params, losses=l2)
        v, fresh = update(_micro(s), fresh, params, losses=l2)
    assert bool(jnp.all(u["w"] != 0))
    np.testing.assert_allclose(u["w"], v["w"], rtol=1e-6)


def test_a_negative_micro_batch_loss_is_valid_without_the_log_and_named_in_debug_mode():
    params, tx = _guarded_multi_steps(log_losses=False)
    _, state = tx.update(_micro(0), tx.init(params), params, losses=jnp.array([-1.0, 2.0, 3.0]))
    u, state = tx.update(_micro(1), state, params, losses=jnp.array([5.0, 1.0, 1.0]))
    assert int(state.inner_opt_state.num_skipped) == 0 and bool(jnp.all(u["w"] != 0))
    params, tx = _guarded_multi_steps(debug=True)
    _, state = tx.update(_micro(0), tx.init(params), params, losses=jnp.array([-1.0, 2.0, 3.0]))
    with pytest.raises(dbmtl_jax.InvalidStepError, match=r"task 0: 2\.0 on average, -1\.0 in an accumulated micro"):
        # the inner update runs inside a lax.cond, so the error arrives as under jit
        dbmtl_jax.reraise_invalid_step(tx.update)(_micro(1), state, params, losses=jnp.array([5.0, 1.0, 1.0]))


def test_task_multi_steps_forwards_the_key_of_the_emitting_micro_batch():
    """A randomised method draws once per emitted update, from the key passed with the last micro-batch."""
    params = {"w": jnp.zeros(4)}
    inner = optax.chain(dbmtl_jax.get_method("pcgrad", T), optax.sgd(1.0))
    tx = dbmtl_jax.TaskMultiSteps(inner, num_tasks=T, every_k_schedule=2)
    _, state = tx.update(_micro(0), tx.init(params), params, key=jax.random.key(1))
    u, _ = tx.update(_micro(1), state, params, key=jax.random.key(2))
    mean = jax.tree.map(lambda a, b: (a + b) / 2, _micro(0), _micro(1))
    want, _ = inner.update(mean, inner.init(params), params, key=jax.random.key(2))
    np.testing.assert_allclose(u["w"], want["w"], rtol=1e-6)


def test_task_multi_steps_rejects_bad_losses_and_an_optax_multi_steps_state():
    params = {"w": jnp.zeros(4)}
    tx = dbmtl_jax.TaskMultiSteps(optax.chain(dbmtl_jax.dbmtl(T), optax.sgd(1.0)), num_tasks=T, every_k_schedule=2)
    state = tx.init(params)
    for bad in (jnp.ones(8), jnp.ones((8, T)), jnp.asarray(1.0)):
        with pytest.raises(ValueError, match=r"TaskMultiSteps: losses has shape .*expected \(T,\) = \(3,\)"):
            tx.update(_micro(0), state, params, losses=bad)
    old = optax.MultiStepsState(*state[:5])
    with pytest.raises(TypeError, match="needs a TaskMultiStepsState"):
        tx.update(_micro(0), old, params)


def test_losses_reach_a_task_multi_steps_inside_skip_invalid_steps_or_a_chain():
    """skip_invalid_steps and optax.chain wrapped the TaskMultiSteps object with optax.with_extra_args_support,
    which drops losses=/key= (it is not a GradientTransformationExtraArgs): UW inside raised 'needs the raw task
    losses' although they were passed."""
    params, gs, ls = _uw_micro_batches()
    inner = optax.chain(dbmtl_jax.get_method("uw", T, learning_rate=0.1), optax.sgd(1.0))
    want, ref_state = inner.update(jax.tree.map(lambda a, b: (a + b) / 2, gs[0], gs[1]), inner.init(params), params,
                                   losses=(ls[0] + ls[1]) / 2)
    multi = dbmtl_jax.TaskMultiSteps(inner, num_tasks=T, every_k_schedule=2)
    for tx, get in ((dbmtl_jax.skip_invalid_steps(multi), lambda s: s.inner_state),
                    (optax.chain(optax.identity(), multi.gradient_transformation()), lambda s: s[1])):
        state = tx.init(params)
        _, state = tx.update(gs[0], state, params, losses=ls[0])
        u, state = tx.update(gs[1], state, params, losses=ls[1])
        np.testing.assert_allclose(u["w"], want["w"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(get(state).inner_opt_state[0].log_var, ref_state[0].log_var, rtol=1e-6)
