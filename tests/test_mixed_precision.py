"""bf16 parameters and activations with float32 EMA, norms and ε."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dbmtl_jax
from numpy_reference import NumpyDBMTL

T = 3


def test_bf16_params_float32_state_matches_reference():
    k = jax.random.split(jax.random.key(0), 3)
    params = {"trunk": (jax.random.normal(k[0], (8, 16)) * 0.3).astype(jnp.bfloat16),
              "head": (jax.random.normal(k[1], (16, T)) * 0.3).astype(jnp.bfloat16)}
    x = jax.random.normal(k[2], (32, 8)).astype(jnp.bfloat16)
    y = jnp.stack([jnp.sin(x[:, 0]) * s for s in (1.0, 100.0, 0.01)], axis=1).astype(jnp.bfloat16)

    def losses(p):
        z = jnp.tanh(x @ p["trunk"])  # bf16 activations
        return jnp.mean(((z @ p["head"]) - y).astype(jnp.float32) ** 2, axis=0)

    tx = dbmtl_jax.dbmtl(T, shared=lambda p: p == "trunk")
    state = tx.init(params)
    assert state.ema["trunk"].dtype == jnp.float32
    ref = NumpyDBMTL(T, shared={"trunk"})
    step = jax.jit(lambda p, s: tx.update(dbmtl_jax.value_and_task_grads(losses)(p)[1], s, p))
    grads_fn = jax.jit(dbmtl_jax.value_and_task_grads(losses))
    for _ in range(4):
        _, g = grads_fn(params)
        assert g["trunk"].dtype == jnp.bfloat16
        u, state = step(params, state)
        assert u["trunk"].dtype == jnp.bfloat16 and u["head"].dtype == jnp.bfloat16
        assert all(bool(jnp.all(jnp.isfinite(v.astype(jnp.float32)))) for v in jax.tree.leaves(u))
        want = ref.step({n: np.asarray(v.astype(jnp.float32), np.float64) for n, v in g.items()})
        for n in ("trunk", "head"):
            np.testing.assert_allclose(np.asarray(u[n].astype(jnp.float32)), want[n], rtol=2e-2, atol=2e-2 * np.abs(want[n]).max())
        params = optax.apply_updates(params, jax.tree.map(lambda v: (-1e-2 * v).astype(jnp.bfloat16), u))
        assert params["trunk"].dtype == jnp.bfloat16
