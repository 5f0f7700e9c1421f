"""Bad inputs: invalid steps are skipped with nothing lost, or raise clearly."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dbmtl_jax

T = 3


def _setup(**guard_kwargs):
    x = jax.random.normal(jax.random.key(0), (16, 4))
    y = jax.random.normal(jax.random.key(1), (16, T))
    params = {"trunk": jax.random.normal(jax.random.key(2), (4, 6)) * 0.3, "head": jnp.ones((6, T)) * 0.1}

    def losses(p, corrupt):
        l = jnp.mean((jnp.tanh(x @ p["trunk"]) @ p["head"] - y) ** 2, axis=0)
        return l * corrupt[0] + corrupt[1]

    tx = dbmtl_jax.skip_invalid_steps(
        optax.chain(dbmtl_jax.dbmtl(T, shared=lambda p: p == "trunk"), optax.adam(1e-2)), **guard_kwargs
    )

    @jax.jit
    def step(p, s, corrupt):
        l, g = dbmtl_jax.value_and_task_grads(losses)(p, corrupt)
        u, s = tx.update(g, s, p, losses=l)
        return optax.apply_updates(p, u), s

    return params, tx, step


CLEAN = (jnp.ones(T), jnp.zeros(T))


def _corrupt(kind):
    mul, add = np.ones(T, np.float32), np.zeros(T, np.float32)
    if kind == "nan_loss":
        add[1] = np.nan
    elif kind == "inf_loss":
        mul[2] = np.inf
    elif kind == "negative_loss":
        add[0] = -100.0
    return jnp.asarray(mul), jnp.asarray(add)


def _trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True) for x, y in zip(la, lb))


@pytest.mark.parametrize("kind", ["nan_loss", "inf_loss", "negative_loss"])
def test_invalid_loss_step_is_skipped_and_nothing_lost(kind):
    params, tx, step = _setup()
    state = tx.init(params)
    params, state = step(params, state, CLEAN)
    before_p, before_s = params, state
    params, state = step(params, state, _corrupt(kind))
    assert _trees_equal(params, before_p)
    assert _trees_equal(state.inner_state, before_s.inner_state)
    assert int(state.num_skipped) == 1 and int(state.consecutive_skipped) == 1 and not bool(state.last_valid)
    # The run then continues exactly as if the bad batch had never been seen.
    p_ref, s_ref = step(before_p, before_s, CLEAN)
    params, state = step(params, state, CLEAN)
    assert _trees_equal(params, p_ref)
    assert _trees_equal(state.inner_state, s_ref.inner_state)
    assert int(state.consecutive_skipped) == 0 and int(state.num_skipped) == 1


def test_nan_gradient_of_one_task_is_skipped():
    params, tx, _ = _setup()
    state = tx.init(params)
    g = {"trunk": jnp.ones((T, 4, 6)), "head": jnp.ones((T, 6, T))}
    g["trunk"] = g["trunk"].at[2, 0, 0].set(jnp.nan)
    u, new_state = jax.jit(tx.update)(g, state, params)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
    assert _trees_equal(new_state.inner_state, state.inner_state)
    assert int(new_state.num_skipped) == 1


def test_zero_loss_is_a_valid_step():
    params, tx, step = _setup()
    state = tx.init(params)
    # A task whose loss is exactly zero (and so has zero gradient) is not an error.
    params2, state2 = step(params, state, (jnp.array([1.0, 0.0, 1.0]), jnp.zeros(T)))
    assert int(state2.num_skipped) == 0
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params2))
    assert not _trees_equal(params2, params)


def test_debug_mode_names_task_and_step():
    params, tx, step = _setup(debug=True)
    state = tx.init(params)
    params, state = step(params, state, CLEAN)
    with pytest.raises(Exception, match=r"step 2: task\(s\) \[1\] have a NaN/inf/negative loss \(task 1: nan\)"):
        out = step(params, state, _corrupt("nan_loss"))
        jax.block_until_ready(out)


def test_max_consecutive_skips_lets_problem_surface():
    params, tx, step = _setup(max_consecutive_skips=2)
    state = tx.init(params)
    for _ in range(2):
        params, state = step(params, state, _corrupt("nan_loss"))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    params, state = step(params, state, _corrupt("nan_loss"))
    # applied, so not counted as skipped (it was: 3); still invalid and consecutive
    assert int(state.num_skipped) == 2 and int(state.consecutive_skipped) == 3 and not bool(state.last_valid)
    # The third invalid step was applied: Adam counted it and the NaN reached the parameters,
    # while dbmtl still kept the NaN out of its EMA.
    assert int(state.inner_state[1][0].count) == 1
    assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    assert int(state.inner_state[0].count) == 0
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.inner_state[0].ema))


def test_changed_task_axis_is_a_trace_time_error():
    params, tx, _ = _setup()
    state = tx.init(params)
    g = {"trunk": jnp.ones((T + 1, 4, 6)), "head": jnp.ones((T + 1, 6, T))}
    with pytest.raises(ValueError, match=f"num_tasks={T}"):
        tx.update(g, state, params)


def test_without_task_axis_checks_whole_gradient():
    params = {"w": jnp.ones(3)}
    tx = dbmtl_jax.skip_invalid_steps(optax.sgd(0.1), task_axis=False)
    state = tx.init(params)
    u, state = tx.update({"w": jnp.array([1.0, jnp.nan, 0.0])}, state, params, losses=jnp.ones(2))
    assert int(state.num_skipped) == 1 and bool(jnp.all(u["w"] == 0))
    u, state = tx.update({"w": jnp.ones(3)}, state, params, losses=jnp.ones(2))
    assert int(state.num_skipped) == 1 and bool(jnp.all(u["w"] != 0))


# ---- skip_invalid_steps checks what it reads (audit 32, C5 and S6) ----

@pytest.mark.parametrize("shape", [(8,), (), (8, T), (T - 1,)])
def test_losses_that_are_not_one_per_task_raise(shape):
    """Per-example losses, a scalar total, [B, T] or T - 1 entries were accepted, and an entry 7 blamed on
    a 'task 7' of a 3-task model."""
    params, tx, _ = _setup()
    g = {"trunk": jnp.ones((T, 4, 6)), "head": jnp.ones((T, 6, T))}
    want = "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"
    with pytest.raises(ValueError, match=rf"losses has shape {re.escape(want)}, expected \(T,\) = \({T},\)"):
        tx.update(g, tx.init(params), params, losses=jnp.ones(shape))


def test_plain_gradients_with_task_axis_true_raise_naming_task_axis_false():
    """A grads='weighted' method (plain gradients) wrapped without task_axis=False: an IndexError (scalar leaf),
    a broadcasting TypeError (leaves of different leading sizes) or a NaN blamed on 'task 2' of a parameter row."""
    inner = optax.chain(dbmtl_jax.get_method("uw", T, grads="weighted"), optax.adam(1e-3))
    tx = dbmtl_jax.skip_invalid_steps(inner)
    for params, pattern in [({"w": jnp.ones((4, 5)), "s": jnp.ones(())}, r"no common task axis \(leaf 's' is a scalar\)"),
                            ({"w": jnp.ones((4, 5)), "v": jnp.ones(6)}, r"no common task axis \(leading sizes differ"),
                            ({"w": jnp.ones((4, 5))}, r"losses has shape \(3,\), expected \(T,\) = \(4,\): the updates "
                                                      r"have their parameters' shapes")]:
        with pytest.raises(ValueError, match=pattern + ".*pass task_axis=False"):
            tx.update(params, tx.init(params), params, losses=jnp.ones(T))
    tx = dbmtl_jax.skip_invalid_steps(inner, task_axis=False)
    params = {"w": jnp.ones((4, 5)), "s": jnp.ones(())}
    u, state = tx.update(params, tx.init(params), params, losses=jnp.ones(T))
    assert int(state.num_skipped) == 0
    with pytest.raises(ValueError, match=r"losses has shape \(8, 3\), expected a 1-D vector"):
        tx.update(params, tx.init(params), params, losses=jnp.ones((8, T)))


@pytest.mark.parametrize("wrapper", ["masked", "multi_transform"])
def test_an_update_that_kept_its_task_axis_raises_instead_of_growing_the_parameter(wrapper):
    """optax.masked / optax.multi_transform around dbmtl pass the head's [T, 5] per-task gradients through;
    Adam and apply_updates broadcast them, and the [5] head became [T, 5]. The guard compares shapes."""
    params = {"trunk": jnp.zeros((4, 5)), "head": jnp.zeros(5)}
    g = {"trunk": jnp.ones((T, 4, 5)), "head": jnp.ones((T, 5))}
    if wrapper == "masked":
        inner = optax.chain(optax.masked(dbmtl_jax.dbmtl(T), {"trunk": True, "head": False}), optax.adam(1e-2))
    else:
        inner = optax.multi_transform({"db": optax.chain(dbmtl_jax.dbmtl(T), optax.adam(1e-2)),
                                       "head": optax.adam(1e-2)}, {"trunk": "db", "head": "head"})
    tx = dbmtl_jax.skip_invalid_steps(inner)
    with pytest.raises(ValueError, match=r"update of leaf 'head' has shape \(3, 5\) but its parameter has shape "
                                         r"\(5,\).*shared="):
        jax.jit(tx.update)(g, tx.init(params), params)
    # the supported form: shared= marks the head, which gets the plain sum over tasks
    tx = dbmtl_jax.skip_invalid_steps(optax.chain(dbmtl_jax.dbmtl(T, shared={"trunk": True, "head": False}),
                                                  optax.adam(1e-2)))
    u, _ = jax.jit(tx.update)(g, tx.init(params), params)
    assert jax.tree.map(jnp.shape, u) == jax.tree.map(jnp.shape, params)
