"""PCGrad, GradDrop and GradVac against independent NumPy references, plus properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dbmtl_jax.methods import get_method
from dbmtl_jax.methods._gradient_common import task_orders
from gm_harness import SHAPES, SHARED_NAMES, random_grads, run_method

def _grads(rng, T, scales=None):
    return random_grads(rng, T, scales)


def _flat(g, T):
    return np.concatenate([g[n].reshape(T, -1) for n in SHARED_NAMES], axis=1)


def _unflat(v):
    out, i = {}, 0
    for n in SHARED_NAMES:
        size = int(np.prod(SHAPES[n]))
        out[n] = v[i : i + size].reshape(SHAPES[n])
        i += size
    return out


def _run(name, T, grads, keys, **hp):
    """Outputs per step and the final state of ``name`` (float64, jit, one key per step)."""
    outs, states = run_method(name, T, grads, keys=keys, **hp)
    return outs, states[-1]


_task_orders = jax.jit(task_orders, static_argnums=1)


def _orders(key, T):
    with jax.enable_x64(True):  # the same mode the methods run in below
        return np.asarray(_task_orders(key, T))


# ----------------------------------------------------------------------------- PCGrad


def numpy_pcgrad(G, orders, reduction="sum"):
    """Direct PCGrad on the [T, P] matrix with the given visiting orders."""
    T = G.shape[0]
    out = []
    for i in range(T):
        gi = G[i].copy()
        for j in orders[i]:
            d = gi @ G[j]
            if d < 0:
                gi = gi - d / (G[j] @ G[j]) * G[j]
        out.append(gi)
    s = np.sum(out, axis=0)
    return s / T if reduction == "mean" else s


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_pcgrad_matches_numpy(reduction):
    T, steps = 4, 3
    rng = np.random.default_rng(0)
    grads = [_grads(rng, T, [1e-3, 1.0, 10.0, 1e3]) for _ in range(steps)]
    keys = [jax.random.key(10 + s) for s in range(steps)]
    outs, state = _run("pcgrad", T, grads, keys, reduction=reduction)
    for g, k, out in zip(grads, keys, outs):
        G = _flat(g, T)
        orders = _orders(k, T)
        want = _unflat(numpy_pcgrad(G, orders, reduction))
        for n in SHARED_NAMES:
            np.testing.assert_allclose(out[n], want[n], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(out["h"], g["h"].sum(0), rtol=1e-12)
    assert int(state.count) == steps
    assert 0 < int(state.num_projections) <= T * (T - 1)


def test_task_orders_are_permutations_of_the_others():
    T = 5
    orders = _orders(jax.random.key(3), T)
    assert orders.shape == (T, T - 1)
    for i in range(T):
        assert sorted(orders[i].tolist()) == [j for j in range(T) if j != i]
    # different keys give different orders (overwhelmingly likely for T = 5)
    assert not np.array_equal(orders, _orders(jax.random.key(4), T))


def test_pcgrad_non_conflicting_unchanged():
    T = 4
    rng = np.random.default_rng(1)
    g = {n: np.abs(rng.standard_normal((T,) + s)) for n, s in SHAPES.items()}  # all dot products > 0
    outs, state = _run("pcgrad", T, [g], [jax.random.key(0)], reduction="sum")
    for n in SHAPES:
        np.testing.assert_allclose(outs[0][n], g[n].sum(0), rtol=1e-12)
    assert int(state.num_projections) == 0


def test_pcgrad_order_matters_and_key_reproducible():
    """Mutually conflicting gradients: the result depends on the order, hence on the key."""
    T = 4
    G = np.array([[1.0, 0.0, 0.0, 0.0], [-0.8, 1.0, 0.0, 0.0], [-0.5, -0.9, 1.0, 0.0], [0.3, -0.2, -0.7, 1.0]])
    # embed G into the shared leaves: the first 4 coordinates of 'a', zeros elsewhere
    a = np.zeros((T, 6))
    a[:, :4] = G
    g = {"a": a.reshape(T, 3, 2), "b": np.zeros((T, 4)), "h": np.zeros((T, 2))}
    keys = [jax.random.key(s) for s in range(8)]
    outs, _ = _run("pcgrad", T, [g] * len(keys), keys, reduction="sum")
    again, _ = _run("pcgrad", T, [g] * len(keys), keys, reduction="sum")
    for o1, o2 in zip(outs, again):
        np.testing.assert_array_equal(o1["a"], o2["a"])
    distinct = {tuple(np.round(o["a"].ravel(), 12)) for o in outs}
    assert len(distinct) > 1
    for k, o in zip(keys, outs):
        want = numpy_pcgrad(_flat(g, T), _orders(k, T))
        np.testing.assert_allclose(o["a"].ravel()[:4], want[:4], rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- GradDrop


def numpy_graddrop(g_leaf, u, leak):
    T = g_leaf.shape[0]
    total = g_leaf.sum(0)
    absum = np.abs(g_leaf).sum(0)
    P = 0.5 * (1 + np.divide(total, absum, out=np.zeros_like(total), where=absum > 0))
    lk = np.broadcast_to(np.asarray(leak, np.float64), (T,)).reshape((T,) + (1,) * (g_leaf.ndim - 1))
    keep = ((g_leaf > 0) & (u < P)) | ((g_leaf < 0) & (u >= P))
    return np.sum((lk + (1 - lk) * keep) * g_leaf, axis=0)


@jax.jit
def _draw(key):
    # the documented draw: shared leaf number l uses fold_in(key, l)
    return [jax.random.uniform(jax.random.fold_in(key, l), SHAPES[n], jnp.float32) for l, n in enumerate(SHARED_NAMES)]


def _uniforms(key):
    with jax.enable_x64(True):
        return {n: np.asarray(u, np.float64) for n, u in zip(SHARED_NAMES, _draw(key))}


@pytest.mark.parametrize("leak", [0.0, [0.0, 0.5, 1.0]])
def test_graddrop_matches_numpy(leak):
    T, steps = 3, 2
    rng = np.random.default_rng(2)
    grads = [_grads(rng, T) for _ in range(steps)]
    keys = [jax.random.key(20 + s) for s in range(steps)]
    outs, _ = _run("graddrop", T, grads, keys, leak=leak)
    for g, k, out in zip(grads, keys, outs):
        u = _uniforms(k)
        for n in SHARED_NAMES:
            np.testing.assert_allclose(out[n], numpy_graddrop(g[n], u[n], leak), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(out["h"], g["h"].sum(0), rtol=1e-12)


def test_graddrop_properties():
    T = 3
    rng = np.random.default_rng(3)
    g = _grads(rng, T)
    keys = [jax.random.key(0), jax.random.key(0)] + [jax.random.key(s) for s in range(1, 6)]
    outs, state = _run("graddrop", T, [g] * len(keys), keys, leak=0.0)
    for n in SHARED_NAMES:
        pos = np.where(g[n] > 0, g[n], 0).sum(0)
        neg = np.where(g[n] < 0, g[n], 0).sum(0)
        # each coordinate keeps exactly one sign
        assert np.all(np.isclose(outs[0][n], pos) | np.isclose(outs[0][n], neg))
        np.testing.assert_array_equal(outs[0][n], outs[1][n])  # same key, same draw
    # other keys give other draws
    assert any(not np.array_equal(outs[0][n], o[n]) for o in outs[2:] for n in SHARED_NAMES)
    assert 0.0 < float(state.kept_fraction) < 1.0
    # one sign everywhere: nothing is dropped
    for sign in (1.0, -1.0):
        same_sign = {n: sign * np.abs(v) for n, v in g.items()}
        o, _ = _run("graddrop", T, [same_sign], [jax.random.key(5)], leak=0.0)
        for n in SHAPES:
            np.testing.assert_allclose(o[0][n], same_sign[n].sum(0), rtol=1e-12)


def test_graddrop_bad_leak_shape():
    with pytest.raises(ValueError, match="leak"):
        get_method("graddrop", 3, leak=[0.1, 0.2])


# ----------------------------------------------------------------------------- GradVac


def numpy_gradvac(G, orders, targets, beta, ema_update, eps=1e-8):
    """Direct GradVac on one group ([T, P]); returns the summed update and new targets.

    ``eps`` is relative to the largest task-gradient norm (as documented).
    """
    T = G.shape[0]
    scale = max(np.linalg.norm(G, axis=1).max(), 1e-300)
    targets = targets.copy()
    out = []
    for i in range(T):
        gi = G[i].copy()
        for j in orders[i]:
            ni, nj = np.linalg.norm(gi) / scale, np.linalg.norm(G[j]) / scale
            phi = np.clip((gi @ G[j]) / scale**2 / (ni * nj + eps), -1, 1)
            tgt = targets[i, j]
            if phi < tgt:
                w = ni * (tgt * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - tgt**2)) / (nj * np.sqrt(1 - tgt**2) + eps)
                gi = gi + w * G[j]
            if ema_update == "always" or phi < tgt:
                targets[i, j] = (1 - beta) * tgt + beta * phi
        out.append(gi)
    return np.sum(out, axis=0), targets


@pytest.mark.parametrize(
    "cfg",
    [
        dict(beta=0.5, ema_update="always", granularity="global"),
        dict(beta=0.5, ema_update="on_violation", granularity="global"),
        dict(beta=0.3, ema_update="always", granularity="leaf"),
    ],
    ids=lambda c: "-".join(map(str, c.values())),
)
def test_gradvac_matches_numpy(cfg):
    T, steps = 4, 4
    rng = np.random.default_rng(4)
    grads = [_grads(rng, T, [1.0, 5.0, 0.2, 2.0]) for _ in range(steps)]
    keys = [jax.random.key(30 + s) for s in range(steps)]
    outs, state = _run("gradvac", T, grads, keys, **cfg)
    groups = [SHARED_NAMES] if cfg["granularity"] == "global" else [(n,) for n in SHARED_NAMES]
    targets = np.zeros((len(groups), T, T))
    for g, k, out in zip(grads, keys, outs):
        orders = _orders(k, T)
        for gi, names in enumerate(groups):
            G = np.concatenate([g[n].reshape(T, -1) for n in names], axis=1)
            upd, targets[gi] = numpy_gradvac(G, orders, targets[gi], cfg["beta"], cfg["ema_update"])
            i = 0
            for n in names:
                size = int(np.prod(SHAPES[n]))
                np.testing.assert_allclose(out[n].ravel(), upd[i : i + size], rtol=1e-6, atol=1e-12)
                i += size
        np.testing.assert_allclose(out["h"], g["h"].sum(0), rtol=1e-12)
    # the targets are kept in float32 state
    np.testing.assert_allclose(state.targets, targets, rtol=1e-6, atol=1e-7)
    assert np.any(targets != 0)


def test_gradvac_first_step_with_zero_targets_is_pcgrad():
    """With φ̂ = 0 the first GradVac step projects exactly the conflicting pairs (as PCGrad)."""
    T = 4
    rng = np.random.default_rng(5)
    g = _grads(rng, T)
    k = jax.random.key(7)
    gv, _ = _run("gradvac", T, [g], [k], beta=0.5, ema_update="always", granularity="global")
    pc, _ = _run("pcgrad", T, [g], [k], reduction="sum")
    for n in SHAPES:
        np.testing.assert_allclose(gv[0][n], pc[0][n], rtol=1e-7, atol=1e-12)  # up to eps = 1e-8
