"""Behaviour shared by the projection / closed-form / stateful gradient methods.

Every method is built through the registry, run under ``jax.jit`` and checked
for: finite outputs over gradient scales 1e-10..1e10 and all-zero gradients,
the output structure/shape/dtype, stable state structure/shape/dtype across
steps, the single-task case, required extra arguments, and option validation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dbmtl_jax.methods import get_method

METHODS = [
    "pcgrad",
    "graddrop",
    "gradvac",
    "imtl_g",
    "imtl",
    "aligned_mtl",
    "mtadam",
    "metabalance",
    "moco",
    "gradnorm",
]

# two shared leaves of different dtypes and one head leaf
PARAMS = {
    "trunk": {"w": jnp.zeros((4, 3), jnp.float32), "b": jnp.zeros((3,), jnp.bfloat16)},
    "head": jnp.zeros((2,), jnp.float32),
}
SHARED = lambda path: path.startswith("trunk")  # noqa: E731


def _grads(rng, num_tasks, scale):
    def leaf(p):
        x = rng.standard_normal((num_tasks,) + p.shape) * scale
        return jnp.asarray(x, p.dtype)

    return jax.tree.map(leaf, PARAMS)


def _extra(num_tasks, step=0):
    return dict(key=jax.random.key(step), losses=jnp.linspace(1.0, 2.0, num_tasks) + step)


def _all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32)))) for x in jax.tree.leaves(tree))


def _signature(state):
    leaves, treedef = jax.tree.flatten(state)
    return treedef, [(jnp.shape(x), jnp.asarray(x).dtype) for x in leaves]


@pytest.mark.parametrize("name", METHODS)
def test_finite_over_scales_and_stable_state(name):
    T = 3
    tx = get_method(name, T, shared=SHARED)
    state = tx.init(PARAMS)
    sig0 = _signature(state)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    step = 0
    for scale in [0.0, 1e-10, 1e-4, 1.0, 1e4, 1e10, 0.0]:
        for _ in range(2):
            g = _grads(rng, T, scale)
            out, state = update(g, state, PARAMS, **_extra(T, step))
            step += 1
            assert _all_finite(out), (name, scale)
            assert _all_finite(state), (name, scale)
            assert _signature(state) == sig0, (name, scale)
            for o, p in zip(jax.tree.leaves(out), jax.tree.leaves(PARAMS)):
                assert o.shape == p.shape and o.dtype == p.dtype
            if step <= 2:
                # all-zero gradients from the start give a zero update
                assert all(not np.any(np.asarray(x, np.float32)) for x in jax.tree.leaves(out))
    assert int(state.count) == step


def _single_task_expected(name, g):
    """What each method must return for T = 1 on its first step (shared leaves)."""
    g = np.asarray(g, np.float64)[0]
    if name == "moco":
        return 0.5 * g  # y = beta_1 * g with beta_1 = 0.5, lambda = 1
    if name == "mtadam":
        return g / (np.abs(g) + 1e-8)  # Adam's first step
    return g


@pytest.mark.parametrize("name", METHODS)
def test_single_task(name):
    tx = get_method(name, 1, shared=SHARED)
    state = tx.init(PARAMS)
    g = _grads(np.random.default_rng(1), 1, 1.0)
    out, state = jax.jit(tx.update)(g, state, PARAMS, **_extra(1))
    want = _single_task_expected(name, g["trunk"]["w"])
    np.testing.assert_allclose(np.asarray(out["trunk"]["w"]), want, rtol=1e-5, atol=1e-7)
    want_b = _single_task_expected(name, np.asarray(g["trunk"]["b"], np.float32))
    np.testing.assert_allclose(np.asarray(out["trunk"]["b"], np.float32), want_b, rtol=2e-2, atol=1e-2)
    head = np.asarray(g["head"])[0]
    want_h = head / (np.abs(head) + 1e-8) if name == "mtadam" else head
    np.testing.assert_allclose(np.asarray(out["head"]), want_h, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "name, missing",
    [
        ("pcgrad", "key"),
        ("graddrop", "key"),
        ("gradvac", "key"),
        ("imtl", "losses"),
        ("gradnorm", "losses"),
    ],
)
def test_missing_extra_arg_raises(name, missing):
    T = 2
    tx = get_method(name, T)
    params = {"w": jnp.zeros((3,))}
    state = tx.init(params)
    extra = _extra(T)
    del extra[missing]
    with pytest.raises(ValueError, match=missing):
        tx.update({"w": jnp.ones((T, 3))}, state, params, **extra)


def test_moco_normalize_loss_needs_losses():
    tx = get_method("moco", 2, grad_transform="normalize_loss")
    params = {"w": jnp.zeros((3,))}
    with pytest.raises(ValueError, match="losses"):
        tx.update({"w": jnp.ones((2, 3))}, tx.init(params), params)


def test_losses_shape_checked():
    tx = get_method("gradnorm", 3)
    params = {"w": jnp.zeros((3,))}
    with pytest.raises(ValueError, match="shape"):
        tx.update({"w": jnp.ones((3, 3))}, tx.init(params), params, losses=jnp.ones(2))


@pytest.mark.parametrize(
    "name, option, value",
    [
        ("pcgrad", "reduction", "max"),
        ("gradvac", "ema_update", "sometimes"),
        ("gradvac", "granularity", "layer"),
        ("aligned_mtl", "scale_mode", "max"),
        ("mtadam", "granularity", "model"),
        ("metabalance", "strategy", "both"),
        ("metabalance", "granularity", "tensor"),
        ("moco", "lambda_update", "mirror"),
        ("moco", "grad_transform", "unit"),
    ],
)
def test_unknown_option_raises(name, option, value):
    with pytest.raises(ValueError, match=option):
        get_method(name, 2, **{option: value})


@pytest.mark.parametrize("name", ["pcgrad", "imtl_g", "mtadam"])
def test_wrong_task_axis_raises(name):
    tx = get_method(name, 3)
    params = {"w": jnp.zeros((4,))}
    state = tx.init(params)
    with pytest.raises(ValueError, match="task axis"):
        tx.update({"w": jnp.ones((2, 4))}, state, params, **_extra(3))


@pytest.mark.parametrize("name", METHODS)
def test_bad_num_tasks_raises(name):
    with pytest.raises(ValueError, match="num_tasks"):
        get_method(name, 0)


def test_chain_with_optimizer_and_inject_extra_args():
    """The transforms compose with optax optimizers and forward extra args."""
    T = 2
    tx = optax.chain(get_method("pcgrad", T), optax.sgd(0.1))
    params = {"w": jnp.ones((3,))}
    state = tx.init(params)
    g = {"w": jnp.asarray([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0]])}
    upd, state = jax.jit(tx.update)(g, state, params, key=jax.random.key(0))
    new = optax.apply_updates(params, upd)
    # g1·g2 = -1: g1' = g1 + g2/2 = (.5,.5,0), g2' = g2 + g1 = (0,1,0); sum (.5,1.5,0)
    np.testing.assert_allclose(np.asarray(new["w"]), [1 - 0.05, 1 - 0.15, 1.0], rtol=1e-6)
