"""Per-task-gradient names deprecated in 0.2.0 still work for one version, warn naming the replacement, and give
bit for bit what the new API gives (``value_and_task_grads`` / ``fused_dbmtl`` of a ``TrunkHeads`` spec)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dbmtl_jax
from dbmtl_jax import task_gradients as tg

T = 3


def _problem():
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (16, 5))
    ys = jax.random.normal(k[1], (T, 16, 2)) * jnp.asarray([1.0, 30.0, 0.01])[:, None, None]
    trunk = {"w": jax.random.normal(k[2], (5, 7)) * 0.5, "b": jnp.zeros(7)}
    heads = tuple({"w": jax.random.normal(kk, (7, 2)) * 0.5} for kk in jax.random.split(k[3], T))

    def trunk_fn(p, batch):
        return jnp.tanh(batch[0] @ p["w"] + p["b"])

    head_fns = [(lambda t: lambda hp, z, batch: jnp.mean((z @ hp["w"] - batch[1][t]) ** 2))(t) for t in range(T)]
    return (trunk, heads), (x, ys), trunk_fn, head_fns


def _equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("strategy,chunk", [("loop", None), ("vmap", None), ("vmap", 2)])
def test_trunk_heads_task_grads_and_heads_to_task_axis(strategy, chunk):
    params, batch, trunk_fn, head_fns = _problem()
    new = jax.jit(dbmtl_jax.value_and_task_grads(dbmtl_jax.TrunkHeads(trunk_fn, head_fns), strategy=strategy,
                                                 chunk_size=chunk))
    want_l, (want_t, want_h) = new(params, batch)
    with pytest.warns(DeprecationWarning, match=r"trunk_heads_task_grads is deprecated.*value_and_task_grads"):
        old = dbmtl_jax.trunk_heads_task_grads(trunk_fn, head_fns, strategy=strategy, chunk_size=chunk)
    l, (g_t, g_h) = jax.jit(old)(params[0], params[1], batch)
    _equal((l, g_t), (want_l, want_t))
    assert [jax.tree.leaves(h)[0].shape for h in g_h] == [(7, 2)] * T  # old: no task axis on the heads
    with pytest.warns(DeprecationWarning, match="heads_to_task_axis is deprecated"):
        _equal(tuple(dbmtl_jax.heads_to_task_axis(g_h)), want_h)


@pytest.mark.parametrize("in_place", [False, True])
def test_fused_trunk_heads_dbmtl(in_place):
    params, batch, trunk_fn, head_fns = _problem()
    new = dbmtl_jax.fused_dbmtl(dbmtl_jax.TrunkHeads(trunk_fn, head_fns), T, optax.adam(1e-2), in_place=in_place,
                                chunk_size=2)
    with pytest.warns(DeprecationWarning, match=r"fused_trunk_heads_dbmtl is deprecated.*fused_dbmtl"):
        old = dbmtl_jax.fused_trunk_heads_dbmtl(trunk_fn, head_fns, optax.adam(1e-2), in_place=in_place, chunk_size=2)
    outs = []
    for step in (new, old):
        p, s, update = params, step.init(params), jax.jit(step.update)
        for _ in range(2):
            losses, u, s = update(s, p, batch)
            p = optax.apply_updates(p, u)
        outs.append((losses, p, s))
    _equal(outs[0], outs[1])


def test_fold_helpers_are_private_and_the_old_names_warn():
    params, batch, trunk_fn, head_fns = _problem()
    spec = dbmtl_jax.TrunkHeads(trunk_fn, head_fns)

    def collect(carry, start, grads):
        return jax.tree.map(lambda c, g: jax.lax.dynamic_update_slice_in_dim(c, g, start, axis=0), carry, grads)

    zeros = jax.tree.map(lambda x: jnp.zeros((T,) + x.shape), params[0])
    with pytest.warns(DeprecationWarning, match="trunk_heads_fold_task_grads is deprecated"):
        old = dbmtl_jax.trunk_heads_fold_task_grads(trunk_fn, head_fns, collect, chunk_size=2)
    new = tg._trunk_heads_fold_task_grads(trunk_fn, head_fns, collect, chunk_size=2)
    _equal(jax.jit(old)(zeros, params[0], params[1], batch), jax.jit(new)(zeros, params[0], params[1], batch))

    with pytest.warns(DeprecationWarning, match="fold_task_grads is deprecated"):
        old = dbmtl_jax.fold_task_grads(spec.losses, collect, chunk_size=2)
    new = tg._fold_task_grads(spec.losses, collect, chunk_size=2)
    zeros = jax.tree.map(lambda x: jnp.zeros((T,) + x.shape), params)
    got = jax.jit(old)(zeros, params, batch)
    _equal(got, jax.jit(new)(zeros, params, batch))
    _, want = jax.jit(dbmtl_jax.value_and_task_grads(spec.losses))(params, batch)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_jacrev_strategy_is_vmap():
    params, batch, _, _ = _problem()
    spec = dbmtl_jax.TrunkHeads(*_problem()[2:])
    want = jax.jit(dbmtl_jax.value_and_task_grads(spec.losses, strategy="vmap"))(params, batch)
    with pytest.warns(DeprecationWarning, match='strategy="jacrev" is deprecated.*"vmap"'):
        old = dbmtl_jax.value_and_task_grads(spec.losses, strategy="jacrev")
    _equal(jax.jit(old)(params, batch), want)
    assert tg.STRATEGIES == ("vmap", "loop")


@pytest.mark.parametrize("name,module", [
    ("ALPHA_MODES", "dbmtl_jax.dbmtl"), ("get_factory", "dbmtl_jax.methods"), ("SkipState", "dbmtl_jax.guard"),
    ("check_task_axis", "dbmtl_jax.task_axis"), ("flatten_tasks", "dbmtl_jax.task_axis"),
    ("resolve_shared", "dbmtl_jax.task_axis"), ("sum_tasks", "dbmtl_jax.task_axis"),
    ("task_norms", "dbmtl_jax.task_axis"), ("STRATEGIES", "dbmtl_jax.task_gradients"),
    ("transform_losses", "dbmtl_jax.task_gradients"),
])
def test_names_moved_off_the_top_level_warn_and_are_the_same_objects(name, module):
    import importlib

    with pytest.warns(DeprecationWarning, match=f"dbmtl_jax.{name} is deprecated.*from {module} import {name}"):
        value = getattr(dbmtl_jax, name)
    assert value is getattr(importlib.import_module(module), name)
    assert name not in dbmtl_jax.__all__


def test_top_level_api():
    for name in dbmtl_jax.__all__:
        assert hasattr(dbmtl_jax, name), name
    assert len(dbmtl_jax.__all__) <= 18
    with pytest.raises(AttributeError):
        dbmtl_jax.no_such_name  # noqa: B018
    for name in ("fused_trunk_heads_dbmtl", "trunk_heads_task_grads", "heads_to_task_axis", "fold_task_grads",
                 "trunk_heads_fold_task_grads"):
        assert getattr(dbmtl_jax, name) is getattr(tg if name != "fused_trunk_heads_dbmtl" else dbmtl_jax.fused, name)
        assert name not in dbmtl_jax.__all__


def test_hps_task_grads():
    pytest.importorskip("flax")
    from flax import nnx

    from dbmtl_jax.architectures import HPS, MLPEncoder, hps_spec, hps_task_grads

    rngs = nnx.Rngs(0)
    model = HPS(MLPEncoder(5, (7,), rngs=rngs), [nnx.Linear(7, 2, rngs=rngs) for _ in range(T)])
    x, ys = _problem()[1]
    head_losses = [(lambda t: lambda o, y: jnp.mean((o - y[t]) ** 2))(t) for t in range(T)]
    with pytest.warns(DeprecationWarning, match=r"hps_task_grads is deprecated.*hps_spec"):
        old = hps_task_grads(head_losses, strategy="vmap")
    got = nnx.jit(old)(model, x, ys)
    want = nnx.jit(lambda m, b: dbmtl_jax.value_and_task_grads(hps_spec(m, head_losses), strategy="vmap")(
        nnx.state(m, nnx.Param), b))(model, (x, ys))
    _equal(got, want)
