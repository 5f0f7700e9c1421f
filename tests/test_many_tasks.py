"""Many tasks: T = 40 against the NumPy oracle; T = 100 with a ~1M-parameter trunk within memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dbmtl_jax
from numpy_reference import NumpyDBMTL


def _mlp(T, d_in, d_hidden, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "trunk": {"w1": jax.random.normal(k[0], (d_in, d_hidden)) / np.sqrt(d_in), "b1": jnp.zeros(d_hidden)},
        "heads": {"w": jax.random.normal(k[1], (d_hidden, T)) / np.sqrt(d_hidden)},
    }
    x = jax.random.normal(k[2], (32, d_in))
    y = jax.random.normal(k[3], (32, T)) * jnp.logspace(-2, 2, T)

    def losses(p):
        z = jax.nn.relu(x @ p["trunk"]["w1"] + p["trunk"]["b1"])
        return jnp.mean((z @ p["heads"]["w"] - y) ** 2, axis=0)

    return params, losses


def test_T40_matches_oracle_with_chunked_gradients():
    T = 40
    with jax.enable_x64(True):
        params, losses = _mlp(T, 12, 16)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        tx = dbmtl_jax.dbmtl(T, beta=0.5, beta_sigma=0.5, shared=lambda p: p.startswith("trunk"))
        state = tx.init(params)
        ref = NumpyDBMTL(T, beta=0.5, beta_sigma=0.5, shared={"trunk/w1", "trunk/b1"})
        grads_fn = jax.jit(dbmtl_jax.value_and_task_grads(losses, chunk_size=8))
        for _ in range(3):
            _, g = grads_fn(params)
            u, state = jax.jit(tx.update)(g, state, params)
            flat_g = {"trunk/w1": g["trunk"]["w1"], "trunk/b1": g["trunk"]["b1"], "heads/w": g["heads"]["w"]}
            want = ref.step({k: np.asarray(v) for k, v in flat_g.items()})
            np.testing.assert_allclose(u["trunk"]["w1"], want["trunk/w1"], rtol=1e-6)
            np.testing.assert_allclose(u["trunk"]["b1"], want["trunk/b1"], rtol=1e-6)
            np.testing.assert_allclose(u["heads"]["w"], want["heads/w"], rtol=1e-6)
            params = jax.tree.map(lambda p, d: p - 1e-3 * d, params, u)


@pytest.mark.slow
def test_T100_one_million_parameter_trunk_chunked_fits_in_memory():
    T, chunk = 100, 10
    params, losses = _mlp(T, 1000, 1000)  # ~1.0M shared parameters
    P = sum(x.size for x in jax.tree.leaves(params["trunk"]))
    assert P > 1_000_000
    tx = optax.chain(dbmtl_jax.dbmtl(T, shared=lambda p: p.startswith("trunk")), optax.adam(1e-3))
    state = tx.init(params)

    def step(p, s):
        l, g = dbmtl_jax.value_and_task_grads(losses, chunk_size=chunk)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, l

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state).compile()
    mem = compiled.memory_analysis()
    # The transient buffers hold the T×P per-task gradients plus at most a few chunks, not T×P more.
    assert mem.temp_size_in_bytes < (T + 4 * chunk) * P * 4, mem
    l0 = losses(params)
    for _ in range(3):
        params, state, _ = compiled(params, state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    assert float(jnp.mean(losses(params) / l0)) < 1.0
