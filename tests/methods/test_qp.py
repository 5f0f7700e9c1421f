"""Tests of the private small-solver module dbmtl_jax.methods._qp against NumPy references."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dbmtl_jax.methods import _qp

# ----------------------------------------------------------------------------
# independent NumPy references (float64)
# ----------------------------------------------------------------------------


def np_project_simplex(v: np.ndarray) -> np.ndarray:
    """Projection onto the simplex by bisection on the threshold θ: Σ max(v − θ, 0) = 1."""
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(v - mid, 0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return np.maximum(v - 0.5 * (lo + hi), 0)


def np_nnls_enumerate(h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, float]:
    """argmin_{x≥0} ½xᵀHx + cᵀx by enumerating supports (exact for small n)."""
    n = len(c)
    best_x, best_v = np.zeros(n), 0.0
    for r in range(1, n + 1):
        for s in itertools.combinations(range(n), r):
            s = list(s)
            x = np.zeros(n)
            x[s] = np.linalg.lstsq(h[np.ix_(s, s)], -c[s], rcond=None)[0]
            if (x < -1e-12).any():
                continue
            v = 0.5 * x @ h @ x + c @ x
            if v < best_v - 1e-15:
                best_x, best_v = x, v
    return best_x, best_v


def np_min_norm_enumerate(g: np.ndarray) -> tuple[np.ndarray, float]:
    """argmin_{λ∈Δ} λᵀGλ by enumerating supports of the KKT system."""
    n = len(g)
    best_l, best_v = None, np.inf
    for r in range(1, n + 1):
        for s in itertools.combinations(range(n), r):
            s = list(s)
            k = np.zeros((r + 1, r + 1))
            k[:r, :r] = g[np.ix_(s, s)]
            k[:r, r] = 1
            k[r, :r] = 1
            rhs = np.zeros(r + 1)
            rhs[r] = 1
            sol = np.linalg.lstsq(k, rhs, rcond=None)[0]
            lam = np.zeros(n)
            lam[s] = sol[:r]
            if (lam < -1e-12).any() or abs(lam.sum() - 1) > 1e-9:
                continue
            v = lam @ g @ lam
            if v < best_v:
                best_l, best_v = lam, v
    return best_l, best_v


def np_power_balance(g: np.ndarray, p: float) -> np.ndarray:
    """Positive solution of G w = w^{-p} by plain Newton with step halving (float64)."""
    w = np.ones(len(g))
    for _ in range(200):
        f = g @ w - w ** (-p)
        jac = g + np.diag(p * w ** (-p - 1))
        dx = -np.linalg.solve(jac, f)
        t = 1.0
        while (w + t * dx <= 0).any() or np.linalg.norm(g @ (w + t * dx) - (w + t * dx) ** (-p)) > np.linalg.norm(f):
            t *= 0.5
            if t < 1e-12:
                break
        w = w + t * dx
    return w


def random_gram(rng: np.random.Generator, n: int, p: int, common: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    j = rng.normal(size=(n, p)) * rng.uniform(0.2, 3.0, size=(n, 1)) + common * rng.normal(size=(1, p))
    return j, j @ j.T


# ----------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------


def test_project_simplex_matches_reference():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(40, 5)) * rng.uniform(0.01, 10, size=(40, 1))
    v[0] = 0.2  # already on the simplex
    v[1] = [5, -5, -5, -5, -5]  # a vertex
    out = np.asarray(jax.jit(jax.vmap(_qp.project_simplex))(jnp.asarray(v, jnp.float32)))
    ref = np.stack([np_project_simplex(x) for x in v])
    np.testing.assert_allclose(out, ref, atol=2e-6 * np.abs(v).max())
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)
    assert (out >= 0).all()


def test_nnls_matches_support_enumeration():
    rng = np.random.default_rng(1)
    solve = jax.jit(lambda h, c: _qp.nnls_gram(h, c, max_iter=40))
    for trial in range(30):
        p = int(rng.integers(1, 7))  # p < 4 gives a singular H
        j, h = random_gram(rng, 4, p, common=float(rng.uniform(0, 2)))
        if p >= 4:
            c = rng.normal(size=4) * np.sqrt(np.diag(h).mean())
        else:  # keep c in the range of the singular H so that the problem is bounded
            c = h @ rng.normal(size=4) / np.sqrt(np.diag(h).mean())
        res = solve(jnp.asarray(h, jnp.float32), jnp.asarray(c, jnp.float32))
        x = np.asarray(res.x, np.float64)
        _, v_ref = np_nnls_enumerate(h, c)
        v = 0.5 * x @ h @ x + c @ x
        assert (x >= 0).all()
        scale = np.abs(c).max() ** 2 / np.diag(h).mean()
        assert v <= v_ref + 1e-5 * scale, (trial, v, v_ref)
        assert float(res.residual) < 1e-4
        assert int(res.iterations) < 40


@pytest.mark.parametrize("solver", ["active_set", "frank_wolfe"])
def test_min_norm_simplex_matches_enumeration_and_kkt(solver):
    rng = np.random.default_rng(2)
    solve = jax.jit(lambda g: _qp.min_norm_simplex(g, solver=solver))
    tol = 1e-5 if solver == "active_set" else 1e-4
    for trial in range(25):
        j, g = random_gram(rng, 4, int(rng.integers(1, 8)), common=float(rng.uniform(0, 2)))
        if trial == 0:  # duplicated task
            j[1] = j[0]
            g = j @ j.T
        res = solve(jnp.asarray(g, jnp.float32))
        lam = np.asarray(res.x, np.float64)
        lam_ref, v_ref = np_min_norm_enumerate(g)
        np.testing.assert_allclose(lam.sum(), 1.0, atol=1e-5)
        assert (lam >= 0).all()
        md = np.diag(g).mean()
        # the min-norm element d = Jᵀλ is unique even when λ is not
        np.testing.assert_allclose(j.T @ lam, j.T @ lam_ref, atol=np.sqrt(tol * md) * 3 + 1e-6)
        # KKT: ⟨g_t, d⟩ ≥ ‖d‖² for every task
        d = j.T @ lam
        assert (j @ d >= d @ d - 10 * tol * md).all()
        # the residual is relative to ‖g_t‖‖d‖ (a cosine); at a Pareto-stationary point (d* = 0, here
        # when the gradients span fewer dimensions than tasks) it cannot be certified and is O(1)
        if v_ref > 1e-4 * md:
            assert float(res.residual) <= 10 * tol


def test_min_norm_simplex_zero_gram_is_uniform():
    out = jax.jit(_qp.min_norm_simplex)(jnp.zeros((3, 3)))
    np.testing.assert_allclose(np.asarray(out.x), np.full(3, 1 / 3), rtol=1e-6)


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_power_balance_solves_equation(p):
    rng = np.random.default_rng(3)
    solve = jax.jit(lambda g, w0: _qp.power_balance(g, p, w0=w0, ridge=0.0, max_iter=50))
    for trial in range(15):
        j, g = random_gram(rng, 4, 9, common=float(rng.uniform(0, 1.5)))
        g = g / np.diag(g).mean()
        w0 = rng.uniform(0.1, 5, size=4)  # an arbitrary warm start must not matter
        res = solve(jnp.asarray(g, jnp.float32), jnp.asarray(w0, jnp.float32))
        w = np.asarray(res.x, np.float64)
        ref = np_power_balance(g, p)
        assert (w > 0).all()
        np.testing.assert_allclose(w, ref, rtol=2e-3)
        np.testing.assert_allclose(w**p * (g @ w), 1.0, atol=2e-3)
        assert float(res.residual) < 2e-3


def test_shared_gram_reconstructs_scaled_gram():
    rng = np.random.default_rng(4)
    gram_fn = jax.jit(lambda a, b: _qp.shared_gram([a, b], 3))
    for scale in (1e-10, 1.0, 1e10):
        a = rng.normal(size=(3, 4, 2))
        b = rng.normal(size=(3, 5))
        j = np.concatenate([a.reshape(3, -1), b], axis=1)
        gram, s = gram_fn(jnp.asarray(a * scale, jnp.float32), jnp.asarray(b * scale, jnp.float32))
        gram = np.asarray(gram, np.float64)
        assert np.isfinite(gram).all() and np.isfinite(float(s))
        np.testing.assert_allclose(np.diag(gram).mean(), 1.0, rtol=1e-5)
        np.testing.assert_allclose(gram * float(s), (j @ j.T) * scale**2, rtol=1e-4, atol=1e-5 * scale**2)
    gram, s = gram_fn(jnp.zeros((3, 4, 2)), jnp.zeros((3, 5)))
    assert np.all(np.asarray(gram) == 0) and float(s) == 1.0
