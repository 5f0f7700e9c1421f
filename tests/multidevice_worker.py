"""Run by tests/test_distributed.py in a subprocess with 8 simulated CPU devices.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX starts,
so this cannot run inside the main pytest process.  Exits non-zero on failure.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dbmtl_jax

T = 3


def problem():
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (64, 16))
    y = jax.random.normal(k[1], (64, T)) * jnp.array([1.0, 50.0, 0.02])
    params = {
        "trunk": {"w": jax.random.normal(k[2], (16, 32)) * 0.2, "b": jnp.zeros(32)},
        "head": {"w": jax.random.normal(k[3], (32, T)) * 0.2},
    }

    def losses(p, x, y):
        z = jnp.tanh(x @ p["trunk"]["w"] + p["trunk"]["b"])
        return jnp.mean((z @ p["head"]["w"] - y) ** 2, axis=0)

    return params, x, y, losses


def make_tx():
    return optax.chain(dbmtl_jax.dbmtl(T, shared=lambda p: p.startswith("trunk")), optax.adam(1e-2))


def run(params, x, y, losses, steps=4, out_shardings=None):
    tx = make_tx()
    state = tx.init(params)

    def step(p, s, x, y):
        _, g = dbmtl_jax.value_and_task_grads(losses)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    jstep = jax.jit(step) if out_shardings is None else jax.jit(step, out_shardings=out_shardings)
    for _ in range(steps):
        params, state = jstep(params, state, x, y)
    return params, state


def assert_close(a, b, what):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6, err_msg=what)


def spec_of(x):
    return tuple(x.sharding.spec) if isinstance(x.sharding, NamedSharding) else None


def norm_spec(spec, ndim):
    spec = tuple(spec) + (None,) * (ndim - len(spec))
    return spec


def main() -> int:
    assert jax.device_count() == 8, jax.devices()
    params, x, y, losses = problem()
    ref_params, ref_state = run(params, x, y, losses)

    # --- data parallel: batch sharded over 8 devices, parameters replicated.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rep = NamedSharding(mesh, P())
    dp_params = jax.device_put(params, rep)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    ys = jax.device_put(y, NamedSharding(mesh, P("data", None)))
    p_dp, s_dp = run(dp_params, xs, ys, losses)
    assert_close(p_dp, ref_params, "data parallel params")
    assert_close(s_dp, ref_state, "data parallel state")
    for leaf in jax.tree.leaves(s_dp[0].ema):
        assert leaf.sharding.is_fully_replicated, leaf.sharding

    # --- FSDP-style: parameters sharded along a parameter axis; Adam state and the
    # T-stacked EMA follow, with the task axis unsharded.
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    param_specs = {"trunk": {"w": P(None, "fsdp"), "b": P("fsdp")}, "head": {"w": P("fsdp", None)}}
    shard = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs, is_leaf=lambda s: isinstance(s, P))
    f_params = jax.device_put(params, shard)
    tx = make_tx()
    state0 = tx.init(f_params)
    ema = state0[0].ema
    assert norm_spec(spec_of(ema["trunk"]["w"]), 3) == (None, None, "fsdp"), ema["trunk"]["w"].sharding
    assert norm_spec(spec_of(ema["trunk"]["b"]), 2) == (None, "fsdp"), ema["trunk"]["b"].sharding
    # Scalars (counts) live on one device after init; replicate them over the mesh.
    state_shardings = jax.tree.map(
        lambda a: a.sharding if isinstance(a.sharding, NamedSharding) else NamedSharding(mesh, P()), state0
    )
    xr, yr = jax.device_put(x, NamedSharding(mesh, P())), jax.device_put(y, NamedSharding(mesh, P()))
    p_f, s_f = run(f_params, xr, yr, losses, out_shardings=(shard, state_shardings))
    assert_close(p_f, ref_params, "fsdp params")
    assert_close(s_f, ref_state, "fsdp state")
    # Every state leaf has the intended sharding.
    adam = s_f[1][0]
    for name, spec in (("mu", adam.mu), ("nu", adam.nu)):
        got = jax.tree.map(lambda a: norm_spec(spec_of(a), a.ndim), spec)
        want = jax.tree.map(lambda s, a: norm_spec(tuple(s), a.ndim), param_specs, params, is_leaf=lambda s: isinstance(s, P))
        assert got == want, (name, got, want)
    got_ema = jax.tree.map(lambda a: norm_spec(spec_of(a), a.ndim), s_f[0].ema)
    assert got_ema["trunk"]["w"] == (None, None, "fsdp") and got_ema["trunk"]["b"] == (None, "fsdp"), got_ema
    assert s_f[0].count.sharding.is_fully_replicated
    for p, s in zip(jax.tree.leaves(p_f), jax.tree.leaves(shard)):
        assert p.sharding == s, (p.sharding, s)
    print("multidevice OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
