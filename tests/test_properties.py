"""Property-based tests (hypothesis) for dbmtl and every registry method.

Random pytree shapes, task counts, gradient scales from 1e-10 to 1e10 and
hyperparameters: outputs are finite, keep shapes and dtypes, and the state keeps
its structure, including under ``lax.cond``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dbmtl_jax

SETTINGS = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    T = draw(st.integers(1, 5))
    n_leaves = draw(st.integers(1, 3))
    shapes = [tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))) for _ in range(n_leaves)]
    log_scales = draw(st.lists(st.floats(-10, 10), min_size=T, max_size=T))
    zero_task = draw(st.one_of(st.none(), st.integers(0, T - 1)))
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    rng = np.random.default_rng(seed)
    scales = 10.0 ** np.asarray(log_scales)
    if zero_task is not None:
        scales[zero_task] = 0.0
    params = {f"p{i}": jnp.zeros(s, dtype) for i, s in enumerate(shapes)}
    grads = {
        f"p{i}": jnp.asarray(rng.standard_normal((T,) + s) * scales.reshape((T,) + (1,) * len(s)), jnp.float32).astype(dtype)
        for i, s in enumerate(shapes)
    }
    losses = jnp.asarray(rng.uniform(0.1, 10.0, T) * np.where(scales > 0, 1.0, 0.5), jnp.float32)
    return T, params, grads, losses, seed


def _check(tx, T, params, grads, losses, seed):
    state = tx.init(params)

    @jax.jit
    def step(g, s, pred):
        # lax.cond between the update and a no-op needs identical state structure, shapes and dtypes.
        def apply(_):
            return tx.update(g, s, params, losses=losses, key=jax.random.key(seed))

        def keep(_):
            return jax.tree.map(jnp.zeros_like, jax.eval_shape(apply, None)[0]), s

        return jax.lax.cond(pred, apply, keep, None)

    for i in range(2):
        u, new_state = step(grads, state, jnp.asarray(True))
        assert jax.tree.structure(u) == jax.tree.structure(params)
        for a, p in zip(jax.tree.leaves(u), jax.tree.leaves(params)):
            assert a.shape == p.shape and a.dtype == p.dtype
            assert bool(jnp.all(jnp.isfinite(a.astype(jnp.float32)))), a
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
            assert a.shape == b.shape and a.dtype == b.dtype
        state = new_state
    _, same = step(grads, state, jnp.asarray(False))
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@SETTINGS
@given(
    problems(),
    st.floats(0.0, 0.99),
    st.sampled_from([0.0, 0.5]),
    st.one_of(st.sampled_from(["max", "min", "mean", "median"]), st.floats(1e-3, 1e3)),
)
def test_dbmtl_properties(problem, beta, beta_sigma, alpha):
    T, params, grads, losses, seed = problem
    _check(dbmtl_jax.dbmtl(T, beta=beta, beta_sigma=beta_sigma, alpha=alpha), T, params, grads, losses, seed)


@pytest.mark.parametrize("name", [m for m in dbmtl_jax.METHODS if m != "dbmtl"])
def test_registry_method_properties(name):
    @SETTINGS
    @given(problems())
    def run(problem):
        T, params, grads, losses, seed = problem
        _check(dbmtl_jax.get_method(name, T), T, params, grads, losses, seed)

    run()
