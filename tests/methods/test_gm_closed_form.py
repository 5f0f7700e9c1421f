"""IMTL-G, IMTL and Aligned-MTL against independent NumPy references, plus properties."""

from __future__ import annotations

import numpy as np
import optax
import pytest

from gm_harness import SHARED_NAMES, random_grads, run_method

P = 10  # shared size


def _grads(rng, T, scales=None):
    return random_grads(rng, T, scales)


def _from_matrix(G, heads=None):
    """Shared gradients from a [T, P] matrix; heads random or given."""
    T = G.shape[0]
    return {
        "a": G[:, :6].reshape(T, 3, 2),
        "b": G[:, 6:].reshape(T, 4),
        "h": np.zeros((T, 2)) if heads is None else heads,
    }


def _flat(g):
    T = g["a"].shape[0]
    return np.concatenate([g[n].reshape(T, -1) for n in SHARED_NAMES], axis=1)


def _run(name, T, grads, losses=None, **hp):
    """Flat shared outputs, head outputs and states of ``name`` over the steps ``grads`` (float64, jit)."""
    outs, states = run_method(name, T, grads, losses, **hp)
    return [np.concatenate([o[n].ravel() for n in SHARED_NAMES]) for o in outs], [o["h"] for o in outs], states


# ----------------------------------------------------------------------------- IMTL-G


def numpy_imtl_g_alpha(G):
    """The paper's / LibMTL's closed form with an explicit inverse."""
    u = G / np.linalg.norm(G, axis=1, keepdims=True)
    D = G[0:1] - G[1:]
    U = u[0:1] - u[1:]
    a = G[0] @ U.T @ np.linalg.inv(D @ U.T)
    return np.concatenate([[1 - a.sum()], a])


@pytest.mark.parametrize("T", [2, 4])
def test_imtl_g_matches_closed_form(T):
    rng = np.random.default_rng(T)
    grads = [_grads(rng, T, np.logspace(-3, 3, T)) for _ in range(2)]
    flat, heads, states = _run("imtl_g", T, grads)
    for g, f, h, s in zip(grads, flat, heads, states):
        G = _flat(g)
        alpha = numpy_imtl_g_alpha(G)
        np.testing.assert_allclose(s.weights, alpha, rtol=1e-5, atol=1e-9)  # float32 state
        np.testing.assert_allclose(f, alpha @ G, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(h, g["h"].sum(0), rtol=1e-12)
        assert float(s.residual) < 1e-8


def test_imtl_g_equal_projections_and_scale_invariance():
    T = 3
    rng = np.random.default_rng(11)
    G = rng.standard_normal((T, P)) * np.array([[1e-2], [1.0], [1e2]])
    flat, _, states = _run("imtl_g", T, [_from_matrix(G), _from_matrix(G * 1e8)])
    u = G / np.linalg.norm(G, axis=1, keepdims=True)
    proj = u @ flat[0]
    np.testing.assert_allclose(proj, proj[0], rtol=1e-8)
    assert proj[0] > 0
    np.testing.assert_allclose(states[0].weights.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(flat[1], 1e8 * flat[0], rtol=1e-8)


def test_imtl_g_degenerate_gradients():
    """Duplicated and zero task gradients: finite, and still equal projections on the nonzero tasks."""
    T = 4
    rng = np.random.default_rng(12)
    G = rng.standard_normal((T, P))
    G[2] = G[0]  # duplicate: D Uᵀ is singular
    G[3] = 0.0  # zero task
    flat, _, states = _run("imtl_g", T, [_from_matrix(G)])
    assert np.all(np.isfinite(flat[0]))
    u = G[:3] / np.linalg.norm(G[:3], axis=1, keepdims=True)
    proj = u @ flat[0]
    np.testing.assert_allclose(proj, proj[0], rtol=1e-8)
    assert float(states[0].weights[3]) == 0.0
    np.testing.assert_allclose(states[0].weights.sum(), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------- IMTL (hybrid)


def test_imtl_matches_numpy_with_sgd_scales():
    T, steps, lr = 3, 4, 0.3
    rng = np.random.default_rng(13)
    grads = [_grads(rng, T, [0.1, 1.0, 10.0]) for _ in range(steps)]
    losses = [np.array([0.5, 2.0, 8.0]) * (1 + 0.1 * k) for k in range(steps)]
    flat, heads, states = _run("imtl", T, grads, losses=losses, scale_optimizer=optax.sgd(lr))
    s = np.zeros(T)
    for g, l, f, h, st in zip(grads, losses, flat, heads, states):
        G = _flat(g) * np.exp(s)[:, None]
        alpha = numpy_imtl_g_alpha(G)
        np.testing.assert_allclose(f, alpha @ G, rtol=1e-6)
        np.testing.assert_allclose(h, np.tensordot(np.exp(s), g["h"], axes=(0, 0)), rtol=1e-6)
        s = s - lr * (np.exp(s) * l - 1)
        np.testing.assert_allclose(st.log_scales, s, rtol=1e-5, atol=1e-6)
    # the scales move towards -log(loss): the largest loss gets the smallest scale
    assert np.argmin(states[-1].log_scales) == 2


# ----------------------------------------------------------------------------- Aligned-MTL


def numpy_aligned_mtl_alpha(G, scale_mode="min"):
    """Official recipe: eigendecomposition, rank truncation, σ from the kept spectrum."""
    M = G @ G.T
    lam, V = np.linalg.eigh(M)
    tol = lam.max() * M.shape[0] * np.finfo(np.float64).eps
    rank = int((lam > tol).sum())
    order = np.argsort(lam)[::-1]
    lam, V = lam[order][:rank], V[:, order][:, :rank]
    if scale_mode == "min":
        scale = np.sqrt(lam[-1])
    elif scale_mode == "median":
        scale = np.sqrt(np.sort(lam)[(rank - 1) // 2])  # torch.median: lower median
    else:
        scale = np.sqrt(lam.mean())
    B = scale * (V / np.sqrt(lam)[None, :]) @ V.T
    return B.sum(0), rank


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_aligned_mtl_matches_numpy(scale_mode):
    T = 4
    rng = np.random.default_rng(14)
    G_full = rng.standard_normal((T, P)) * np.array([[0.1], [1.0], [3.0], [30.0]])
    G_def = G_full.copy()
    G_def[3] = 0.5 * G_def[0] - 2.0 * G_def[1]  # rank 3
    grads = [_from_matrix(G_full, rng.standard_normal((T, 2))), _from_matrix(G_def)]
    flat, heads, states = _run("aligned_mtl", T, grads, scale_mode=scale_mode)
    for g, f, h, s, want_rank in zip(grads, flat, heads, states, [4, 3]):
        G = _flat(g)
        alpha, rank = numpy_aligned_mtl_alpha(G, scale_mode)
        assert rank == want_rank and int(s.rank) == rank
        np.testing.assert_allclose(s.weights, alpha, rtol=1e-5)
        np.testing.assert_allclose(f, alpha @ G, rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(h, g["h"].sum(0), rtol=1e-12)


def test_aligned_mtl_orthogonal_gradients():
    """Orthogonal gradients with norms 1, 2, 4: the aligned rows all have norm σ_min = 1."""
    T = 3
    G = np.zeros((T, P))
    G[0, 0], G[1, 3], G[2, 7] = 1.0, -2.0, 4.0
    flat, _, states = _run("aligned_mtl", T, [_from_matrix(G), _from_matrix(1e-9 * G)])
    np.testing.assert_allclose(states[0].weights, [1.0, 0.5, 0.25], rtol=1e-6)
    want = np.zeros(P)
    want[0], want[3], want[7] = 1.0, -1.0, 1.0
    np.testing.assert_allclose(flat[0], want, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(flat[1], 1e-9 * want, rtol=1e-8)
    assert int(states[0].rank) == 3


def test_aligned_mtl_more_tasks_than_parameters():
    """T > P: the Gram matrix is rank-deficient; the masked solve matches the truncated one."""
    T = 3
    G = np.zeros((T, P))
    G[:, :2] = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    flat, _, states = _run("aligned_mtl", T, [_from_matrix(G)])
    alpha, rank = numpy_aligned_mtl_alpha(G)
    assert rank == 2 and int(states[0].rank) == 2
    np.testing.assert_allclose(flat[0], alpha @ G, rtol=1e-8, atol=1e-12)
