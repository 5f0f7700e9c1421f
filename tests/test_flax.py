"""Flax integration: nnx.Optimizer (graph and tree mode) and Linen TrainState."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax import linen as nn
from flax.training import train_state

import dbmtl_jax

T = 3


class HPS(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.trunk = nnx.Linear(4, 8, rngs=rngs)
        self.heads = nnx.List([nnx.Linear(8, 1, rngs=rngs) for _ in range(T)])

    def __call__(self, x):
        z = jax.nn.relu(self.trunk(x))
        return jnp.concatenate([h(z) for h in self.heads], axis=-1)


def _data():
    x = jax.random.normal(jax.random.key(1), (32, 4))
    y = jax.random.normal(jax.random.key(2), (32, T)) * jnp.array([1.0, 100.0, 0.01])
    return x, y


def _task_losses(model, x, y):
    return jnp.mean((model(x) - y) ** 2, axis=0)


def _functional_reference(model, steps):
    """The same training with plain pytrees, to compare against nnx.Optimizer."""
    x, y = _data()
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.as_pure(params)
    tx = optax.chain(dbmtl_jax.dbmtl(T, shared=lambda p: p.startswith("trunk")), optax.adam(1e-2))
    state = tx.init(params)

    def losses(p):
        return _task_losses(nnx.merge(graphdef, p), x, y)

    for _ in range(steps):
        _, g = dbmtl_jax.value_and_task_grads(losses)(params)
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
    return params


@pytest.mark.parametrize("graph", [True, False])
def test_nnx_optimizer(graph):
    x, y = _data()
    model = HPS(nnx.Rngs(0))
    ref_params = _functional_reference(HPS(nnx.Rngs(0)), steps=5)
    tx = optax.chain(dbmtl_jax.dbmtl(T, shared=lambda p: p.startswith("trunk")), optax.adam(1e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param, graph=graph)
    ema = optimizer.opt_state[0].ema
    assert ema["trunk"]["kernel"].shape == (T, 4, 8)
    assert isinstance(ema["heads"][0]["kernel"], optax.MaskedNode)

    @nnx.jit(graph=graph)
    def step(model, optimizer):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def losses(p):
            return _task_losses(nnx.merge(graphdef, p, rest), x, y)

        l, grads = dbmtl_jax.value_and_task_grads(losses)(params)
        optimizer.update(model, grads)
        return l

    l0 = _task_losses(model, x, y)
    for _ in range(5):
        step(model, optimizer)
    got = nnx.as_pure(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for _ in range(100):
        step(model, optimizer)
    assert bool(jnp.all(_task_losses(model, x, y) < l0))


class LinenHPS(nn.Module):
    @nn.compact
    def __call__(self, x):
        z = nn.relu(nn.Dense(8, name="trunk")(x))
        return jnp.concatenate([nn.Dense(1, name=f"head_{t}")(z) for t in range(T)], axis=-1)


def test_linen_train_state():
    x, y = _data()
    model = LinenHPS()
    params = model.init(jax.random.key(0), x)["params"]
    tx = optax.chain(dbmtl_jax.dbmtl(T, shared=lambda p: p.startswith("trunk")), optax.adam(1e-2))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    def losses(p):
        return jnp.mean((model.apply({"params": p}, x) - y) ** 2, axis=0)

    @jax.jit
    def step(state):
        l, g = dbmtl_jax.value_and_task_grads(losses)(state.params)
        return state.apply_gradients(grads=g), l

    l0 = losses(state.params)
    for _ in range(100):
        state, _ = step(state)
    assert bool(jnp.all(losses(state.params) < l0))
    assert state.opt_state[0].ema["trunk"]["kernel"].shape == (T, 4, 8)
    assert int(state.opt_state[0].count) == 100


def test_nnx_sharding_metadata_gets_task_axis_prepended():
    class Sharded(nnx.Module):
        def __init__(self, rngs):
            init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
            self.trunk = nnx.Linear(4, 8, kernel_init=init, rngs=rngs)

    mesh = jax.make_mesh((1,), ("model",))
    with jax.set_mesh(mesh):
        model = Sharded(nnx.Rngs(0))
        opt = nnx.Optimizer(model, dbmtl_jax.dbmtl(T), wrt=nnx.Param)
    ema = opt.opt_state.ema["trunk"]["kernel"]
    assert ema.shape == (T, 4, 8)
    assert ema.get_value().sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
    assert tuple(ema.get_metadata()["out_sharding"]) == (None, None, "model")
    assert tuple(model.trunk.kernel.get_metadata()["out_sharding"]) == (None, "model")


def test_named_sharding_of_params_is_kept_with_task_axis_unsharded():
    mesh = jax.make_mesh((1,), ("model",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model", None))
    params = {"w": jax.device_put(jnp.ones((4, 3)), sharding)}
    state = dbmtl_jax.dbmtl(T).init(params)
    assert state.ema["w"].sharding.spec == jax.sharding.PartitionSpec(None, "model", None)
