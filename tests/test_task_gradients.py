"""Per-task gradient helpers: strategies agree with independent per-task jax.grad calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dbmtl_jax
from dbmtl_jax.task_gradients import STRATEGIES, _fold_task_grads

T = 3


def _problem(seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (32, 5))
    ys = [jax.random.normal(k[1], (32, 2)) * s for s in (1.0, 30.0, 0.01)]
    trunk = {"w": jax.random.normal(k[2], (5, 7)) * 0.5, "b": jnp.zeros(7)}
    heads = tuple({"w": jax.random.normal(kk, (7, 2)) * 0.5} for kk in jax.random.split(k[3], T))

    def trunk_fn(p, batch):
        return jnp.tanh(batch @ p["w"] + p["b"])

    def head_loss(t):
        def f(hp, z, batch):
            del batch
            return jnp.mean((z @ hp["w"] - ys[t]) ** 2)

        return f

    head_fns = [head_loss(t) for t in range(T)]

    def losses(params):
        z = trunk_fn(params["trunk"], x)
        return jnp.stack([head_fns[t](params["heads"][t], z, x) for t in range(T)])

    return {"trunk": trunk, "heads": heads}, losses, trunk_fn, head_fns, x


def _reference(params, losses, log=True):
    out = []
    for t in range(T):
        f = (lambda p, t=t: jnp.log(losses(p)[t] + 1e-8)) if log else (lambda p, t=t: losses(p)[t])
        out.append(jax.grad(f)(params))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *out)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("log", [True, False])
def test_strategies_match_separate_grads(strategy, log):
    params, losses, *_ = _problem()
    want = _reference(params, losses, log)
    got_l, got = jax.jit(dbmtl_jax.value_and_task_grads(losses, log=log, strategy=strategy))(params)
    np.testing.assert_allclose(got_l, losses(params), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_chunked_matches_unchunked(chunk):
    params, losses, *_ = _problem(1)
    _, a = dbmtl_jax.value_and_task_grads(losses)(params)
    _, b = jax.jit(dbmtl_jax.value_and_task_grads(losses, chunk_size=chunk))(params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_has_aux_and_argnums():
    params, losses, *_ = _problem(2)

    def f(scale, p):
        l = losses(p) * scale
        return l, {"sum": jnp.sum(l)}

    (l, aux), g = dbmtl_jax.value_and_task_grads(f, argnums=1, has_aux=True)(2.0, params)
    np.testing.assert_allclose(aux["sum"], jnp.sum(l), rtol=1e-6)
    want = _reference(params, lambda p: losses(p) * 2.0)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_trunk_heads_matches_full(strategy):
    params, losses, trunk_fn, head_fns, x = _problem(3)
    want = _reference(params, losses)
    fn = jax.jit(dbmtl_jax.value_and_task_grads(dbmtl_jax.TrunkHeads(trunk_fn, head_fns), strategy=strategy))
    l, (g_trunk, g_heads) = fn((params["trunk"], params["heads"]), x)
    np.testing.assert_allclose(l, losses(params), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_trunk), jax.tree.leaves(want["trunk"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert isinstance(g_heads, tuple)  # the heads' container, each head's gradient in its own task's row
    for a, b in zip(jax.tree.leaves(g_heads), jax.tree.leaves(want["heads"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 2])
def test_trunk_heads_spec_layouts_agree_bit_for_bit(chunk):
    """A spec with split/join over {"trunk", "heads"} params gives the (trunk, heads) layout's numbers, and the
    spec's losses are those of the loss_fn."""
    params, losses, trunk_fn, head_fns, x = _problem(5)
    pair = dbmtl_jax.value_and_task_grads(dbmtl_jax.TrunkHeads(trunk_fn, head_fns), chunk_size=chunk)
    spec = dbmtl_jax.TrunkHeads(trunk_fn, head_fns, split=lambda p: (p["trunk"], p["heads"]),
                                join=lambda tr, hs: {"trunk": tr, "heads": tuple(hs)})
    dct = dbmtl_jax.value_and_task_grads(spec, chunk_size=chunk)
    l1, (gt, gh) = jax.jit(pair)((params["trunk"], params["heads"]), x)
    l2, g = jax.jit(dct)(params, x)
    np.testing.assert_array_equal(l1, l2)
    assert jax.tree.structure(g) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves((gt, gh)), jax.tree.leaves((g["trunk"], g["heads"]))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(spec.losses(params, x), losses(params), rtol=1e-6)
    assert spec.shared_mask(params) == {"trunk": {"b": True, "w": True}, "heads": ({"w": False},) * T}
    assert spec.num_tasks == T


def test_trunk_heads_runs_each_head_backward_once():
    """With T heads, the head part of the jaxpr holds T head backward passes, not T×T."""
    params, losses, trunk_fn, head_fns, x = _problem(4)
    fn = dbmtl_jax.value_and_task_grads(dbmtl_jax.TrunkHeads(trunk_fn, head_fns))
    jaxpr = jax.make_jaxpr(fn)((params["trunk"], params["heads"]), x)
    # forward z@w (T) + backward: d/dw and d/dz per head (2T) -> 3T dots on [32,7]x[7,2]-shaped operands
    head_dots = [
        e for e in jaxpr.eqns if e.primitive.name == "dot_general" and any(v.aval.shape in [(7, 2)] for v in e.invars)
    ]
    assert len(head_dots) == 2 * T, len(head_dots)


def test_errors():
    params, losses, trunk_fn, head_fns, x = _problem()
    with pytest.raises(ValueError, match="1-D vector"):
        dbmtl_jax.value_and_task_grads(lambda p: jnp.sum(losses(p)))(params)
    with pytest.raises(ValueError, match="1-D vector"):
        dbmtl_jax.value_and_task_grads(lambda p: losses(p)[None])(params)
    with pytest.raises(ValueError, match="unknown strategy"):
        dbmtl_jax.value_and_task_grads(losses, strategy="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        dbmtl_jax.value_and_task_grads(losses, chunk_size=0)
    for eps in (-1.0, 0.0, float("inf"), float("nan")):  # eps = -1 silently gave ∇ log(ℓ − 1)
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            dbmtl_jax.value_and_task_grads(losses, eps=eps)
    for eps in ("1e-8", True):
        with pytest.raises(TypeError, match="eps must be"):
            dbmtl_jax.value_and_task_grads(losses, eps=eps)
    spec = dbmtl_jax.TrunkHeads(trunk_fn, head_fns)
    with pytest.raises(ValueError, match="trunk_params, head_params"):
        dbmtl_jax.value_and_task_grads(spec)((params["trunk"], params["heads"][:2]), x)
    with pytest.raises(ValueError, match="head parameter sets"):
        dbmtl_jax.value_and_task_grads(spec._replace(split=lambda p: p))((params["trunk"], params["heads"][:2]), x)
    with pytest.raises(TypeError, match="floating-point loss"):  # was all-zero gradients for that task
        dbmtl_jax.value_and_task_grads(dbmtl_jax.TrunkHeads(trunk_fn, [lambda hp, z, b: jnp.sum(z).astype(int)] * T))(
            (params["trunk"], params["heads"]), x
        )
    with pytest.raises(ValueError, match="scalar loss"):
        dbmtl_jax.value_and_task_grads(dbmtl_jax.TrunkHeads(trunk_fn, [lambda hp, z, b: z @ hp["w"]] * T))(
            (params["trunk"], params["heads"]), x
        )
    with pytest.raises(ValueError, match="argnums must be 0"):
        dbmtl_jax.value_and_task_grads(spec, has_aux=True)
    with pytest.raises(ValueError, match="empty"):
        dbmtl_jax.value_and_task_grads(dbmtl_jax.TrunkHeads(trunk_fn, []))


def _conv_problem(T=3):
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    w = jax.random.normal(k[0], (3, 3, 2, 4)) * 0.3
    x = jax.random.normal(k[1], (2, 6, 6, 2))

    def loss_fn(w, x):
        z = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.stack([jnp.mean(jnp.square(z[..., t] - t)) + 0.1 for t in range(T)])

    return loss_fn, w, x


def _stack_fold(carry, start, grads):
    return jax.lax.dynamic_update_slice_in_dim(carry, grads, start, axis=0)


@pytest.mark.parametrize("unroll", [None, True, False])
def test_fold_task_grads_unroll_default_follows_convolutions(unroll):
    """unroll=None: no while loop for a convolutional model on CPU (XLA:CPU runs convolutions in loop
    bodies on a slow kernel), a fori_loop for a dense one; the gradients are the same either way."""
    T = 3
    loss_fn, w, x = _conv_problem(T)
    fold = _fold_task_grads(loss_fn, _stack_fold, chunk_size=1, unroll=unroll)
    init = jnp.zeros((T,) + w.shape)
    run = jax.jit(lambda w, x: fold(init, w, x))
    _, got = run(w, x)
    _, want = dbmtl_jax.value_and_task_grads(loss_fn)(w, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
    has_while = " while(" in run.lower(w, x).compile().as_text()
    expect_loop = unroll is False or (unroll is None and jax.default_backend() != "cpu")
    assert has_while == expect_loop

    dense = _fold_task_grads(lambda v, x: jnp.stack([jnp.sum(v * x[t]) ** 2 for t in range(T)]),
                             _stack_fold, chunk_size=1, unroll=unroll)
    v, xs = jnp.ones(4), jnp.arange(12.0).reshape(T, 4)
    run_dense = jax.jit(lambda v, xs: dense(jnp.zeros((T, 4)), v, xs))
    assert (" while(" in run_dense.lower(v, xs).compile().as_text()) == (unroll is not True)
