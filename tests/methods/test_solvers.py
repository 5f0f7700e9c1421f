"""Tests of the solver-based methods: mgda, cagrad, nash_mtl, upgrad, fairgrad, excessmtl.

Every method is built through ``get_method`` and run under ``jax.jit``; results are
compared with NumPy references (float64) written here, and with the defining
properties of each method (KKT conditions, no conflict, bargaining equations).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dbmtl_jax.methods import get_method

NAMES = ("mgda", "cagrad", "nash_mtl", "upgrad", "fairgrad", "excessmtl")
SHAPES = {"trunk": {"w": (3, 4), "b": (5,)}, "head": (2,)}
P_SHARED = 17  # 3*4 + 5


def is_shared(path: str) -> bool:
    return path.startswith("trunk")


def params_like() -> dict:
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s, jnp.float32), SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def make_grads(j: np.ndarray, head: np.ndarray, dtype=jnp.float32) -> dict:
    """Task-axis updates from a flat shared Jacobian ``[T, 17]`` and head gradients ``[T, 2]``."""
    t = j.shape[0]
    return {
        "trunk": {"w": jnp.asarray(j[:, :12].reshape(t, 3, 4), dtype), "b": jnp.asarray(j[:, 12:], dtype)},
        "head": jnp.asarray(head, dtype),
    }


def flat_shared(out: dict) -> np.ndarray:
    return np.concatenate([np.asarray(out["trunk"]["w"], np.float64).reshape(-1), np.asarray(out["trunk"]["b"], np.float64)])


def conflicting(rng: np.random.Generator, t: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Random task gradients of different norms, with some conflicting pairs."""
    j = rng.normal(size=(t, P_SHARED)) * rng.uniform(0.3, 3.0, size=(t, 1))
    j[0] -= 0.8 * j[-1] * (t > 1)  # make the first and last task conflict
    return j * scale, rng.normal(size=(t, 2)) * scale


@functools.lru_cache(maxsize=None)
def method(name: str, t: int = 3, **kw):
    """(transform, jitted update) built through the registry; cached to compile once per config."""
    tx = get_method(name, t, shared=is_shared, **dict(kw))
    return tx, jax.jit(tx.update)


def run(name: str, j: np.ndarray, head: np.ndarray, state=None, losses=None, **kw):
    tx, update = method(name, j.shape[0], **kw)
    if state is None:
        state = tx.init(params_like())
    extra = {} if losses is None else {"losses": jnp.asarray(losses, jnp.float32)}
    out, new_state = update(make_grads(j, head), state, params_like(), **extra)
    return out, new_state


# ----------------------------------------------------------------------------
# NumPy references
# ----------------------------------------------------------------------------


def np_min_norm(g: np.ndarray) -> np.ndarray:
    """argmin_{λ∈Δ} λᵀGλ by enumerating the supports of the KKT system."""
    n = len(g)
    best, best_v = None, np.inf
    for r in range(1, n + 1):
        for s in itertools.combinations(range(n), r):
            s = list(s)
            k = np.block([[g[np.ix_(s, s)], np.ones((r, 1))], [np.ones((1, r)), np.zeros((1, 1))]])
            sol = np.linalg.lstsq(k, np.r_[np.zeros(r), 1.0], rcond=None)[0]
            lam = np.zeros(n)
            lam[s] = sol[:r]
            if (lam < -1e-12).any():
                continue
            v = lam @ g @ lam
            if v < best_v:
                best, best_v = lam, v
    return best


def np_nnls(h: np.ndarray, c: np.ndarray) -> np.ndarray:
    """argmin_{z≥0} ½zᵀHz + cᵀz (H positive definite) by enumerating supports."""
    n = len(c)
    best, best_v = np.zeros(n), 0.0
    for r in range(1, n + 1):
        for s in itertools.combinations(range(n), r):
            s = list(s)
            z = np.zeros(n)
            z[s] = np.linalg.solve(h[np.ix_(s, s)], -c[s])
            if (z < 0).any():
                continue
            v = 0.5 * z @ h @ z + c @ z
            if v < best_v:
                best, best_v = z, v
    return best


def np_upgrad_weights(j: np.ndarray, pref: np.ndarray, reg: float) -> np.ndarray:
    """TorchJD's UPGrad weights: Σ_i argmin_{v ≥ p_i e_i} vᵀ(G/tr G + reg I)v."""
    g = j @ j.T
    g = g / np.trace(g) + reg * np.eye(len(g))
    total = np.zeros(len(g))
    for i in range(len(g)):
        u = np.zeros(len(g))
        u[i] = pref[i]
        total += u + np_nnls(g, g @ u)
    return total


def np_cagrad(j: np.ndarray, c: float, rescale: int = 1) -> np.ndarray:
    """CAGrad by grid search with zooming over the simplex (T ≤ 3), float64."""
    t = len(j)
    g = j @ j.T
    b = np.full(t, 1.0 / t)
    md = np.diag(g).mean()
    radius = c * np.sqrt(b @ g @ b)

    def objective(w):
        return w @ g @ b + radius * np.sqrt(np.einsum("ki,ij,kj->k", w, g, w) + 1e-8 * md)

    center, width = np.full(t - 1, 0.5), 1.0
    for _ in range(40):
        axes = [np.linspace(cx - width / 2, cx + width / 2, 41) for cx in center]
        pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, t - 1)
        pts = np.clip(pts, 0, 1)
        pts = pts[pts.sum(1) <= 1]
        w = np.concatenate([pts, 1 - pts.sum(1, keepdims=True)], 1)
        best = pts[np.argmin(objective(w))]
        center, width = best, width / 4
    w = np.r_[center, 1 - center.sum()]
    gw = j.T @ w
    d = j.T @ b + radius / np.linalg.norm(gw) * gw
    return d / {0: 1.0, 1: 1 + c**2, 2: 1 + c}[rescale]


def np_excessmtl(grads: list[np.ndarray], eta: float = 1e-2, eps: float = 1e-7) -> list[np.ndarray]:
    """The official ExcessMTL recurrence on a sequence of flat shared Jacobians; returns the weights."""
    t = grads[0].shape[0]
    acc = np.zeros_like(grads[0])
    weights = np.ones(t)
    initial = None
    out = []
    for j in grads:
        acc = acc + j**2
        e = np.sum(j**2 / np.sqrt(acc + eps), axis=1)
        if initial is None:
            initial = e
        else:
            weights = weights * np.exp(eta * e / initial)
            weights = weights / weights.sum() * t
        out.append(weights.copy())
    return out


# ----------------------------------------------------------------------------
# generic behaviour of all six methods
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_jit_finite_across_scales_and_zero(name):
    rng = np.random.default_rng(0)
    base, head = conflicting(rng, 3)
    outs = {}
    for scale in (1e-10, 1e-5, 1.0, 1e5, 1e10):
        out, state = run(name, base * scale, head * scale)
        for leaf in jax.tree_util.tree_leaves(out):
            assert leaf.dtype == jnp.float32
            assert np.isfinite(np.asarray(leaf)).all(), (name, scale)
        for leaf in jax.tree_util.tree_leaves(state):
            assert np.isfinite(np.asarray(leaf)).all(), (name, scale)
        assert out["trunk"]["w"].shape == (3, 4) and out["head"].shape == (2,)
        outs[scale] = flat_shared(out)
    # the direction of the shared update does not depend on the gradient scale
    ref = outs[1.0] / np.linalg.norm(outs[1.0])
    for scale, d in outs.items():
        np.testing.assert_allclose(d / np.linalg.norm(d), ref, atol=2e-3, err_msg=f"{name} {scale}")
    out, state = run(name, np.zeros((3, P_SHARED)), np.zeros((3, 2)))
    for leaf in jax.tree_util.tree_leaves(out):
        assert np.all(np.asarray(leaf) == 0)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state))


@pytest.mark.parametrize("name", NAMES)
def test_single_task(name):
    rng = np.random.default_rng(1)
    j, head = rng.normal(size=(1, P_SHARED)), rng.normal(size=(1, 2))
    out, _ = run(name, j, head)
    g = j[0]
    n = np.linalg.norm(g)
    expected = {
        "mgda": g,
        "upgrad": g,
        "excessmtl": g,
        "cagrad": g * (1 + 0.5) / (1 + 0.5**2),  # g0 + c‖g0‖ g/‖g‖, rescaled
        "nash_mtl": g / n,  # α = 1/‖g‖, then ‖d‖ = 1 = max_norm
        "fairgrad": g * n ** (-4.0 / 3.0) / max(1.0, n ** (-1.0 / 3.0)),  # w‖g‖² = w^{-1/2}, clip to 1
    }[name]
    np.testing.assert_allclose(flat_shared(out), expected, rtol=2e-4, atol=1e-6)
    head_scale = {"mgda": 1.0, "nash_mtl": 1.0 / n, "excessmtl": 1.0}.get(name, 1.0)
    np.testing.assert_allclose(np.asarray(out["head"]), head[0] * head_scale, rtol=2e-4)


@pytest.mark.parametrize("name", NAMES)
def test_state_structure_stable_across_steps(name):
    rng = np.random.default_rng(2)
    tx, update = method(name, 3)
    state = tx.init(params_like())
    spec0 = jax.tree_util.tree_structure(state)
    shapes0 = [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(state)]
    for _ in range(3):
        j, head = conflicting(rng, 3)
        _, state = update(make_grads(j, head), state, params_like())
        assert jax.tree_util.tree_structure(state) == spec0
        assert [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(state)] == shapes0
    assert int(state.count) == 3


@pytest.mark.parametrize("name", NAMES)
def test_all_matmuls_use_full_float32_precision(name):
    # accelerators default to reduced-precision (TF32/bf16-pass) float32 matmuls, which would spoil the
    # solvers' KKT conditions; every dot in the traced update must request HIGHEST precision.
    tx, update = method(name, 3)
    j, head = conflicting(np.random.default_rng(5), 3)
    text = update.lower(make_grads(j, head), tx.init(params_like()), params_like()).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert dots or name == "excessmtl"
    assert all("HIGHEST" in line for line in dots), [d for d in dots if "HIGHEST" not in d][:2]


@pytest.mark.parametrize("name", NAMES)
def test_rejects_wrong_task_axis(name):
    tx, _ = method(name, 3)
    state = tx.init(params_like())
    j, head = conflicting(np.random.default_rng(3), 2)
    with pytest.raises(ValueError, match="num_tasks=3"):
        tx.update(make_grads(j, head), state, params_like())


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("mgda", {"normalization": "l1"}, "normalization"),
        ("mgda", {"solver": "cvxpy"}, "solver"),
        ("cagrad", {"rescale": 3}, "rescale"),
        ("cagrad", {"c": -0.1}, "c must"),
        ("nash_mtl", {"update_weights_every": 0}, "update_weights_every"),
        ("nash_mtl", {"max_norm": -1.0}, "max_norm"),
        ("upgrad", {"pref_vector": [1.0, 1.0]}, "pref_vector"),
        ("fairgrad", {"alpha": 0.0}, "alpha"),
        ("excessmtl", {"robust_step_size": -1.0}, "robust_step_size"),
        ("mgda", {"num_tasks_typo": 1}, None),
    ],
)
def test_rejects_bad_options(name, kwargs, match):
    if match is None:
        with pytest.raises(TypeError):
            get_method(name, 3, **kwargs)
    else:
        with pytest.raises(ValueError, match=match):
            get_method(name, 3, **kwargs)


def test_bfloat16_inputs_keep_dtype():
    rng = np.random.default_rng(4)
    j, head = conflicting(rng, 3)
    tx = get_method("mgda", 3, shared=is_shared)
    grads = make_grads(j, head, jnp.bfloat16)
    out, state = jax.jit(tx.update)(grads, tx.init(params_like()), params_like())
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(out))
    assert state.weights.dtype == jnp.float32
    ref, _ = run("mgda", j, head)
    np.testing.assert_allclose(flat_shared(out), flat_shared(ref), atol=0.02 * np.abs(flat_shared(ref)).max())


# ----------------------------------------------------------------------------
# MGDA
# ----------------------------------------------------------------------------


def test_mgda_kkt_reference_and_no_conflict():
    rng = np.random.default_rng(10)
    for trial in range(8):
        j, head = conflicting(rng, 3, scale=10.0 ** rng.uniform(-3, 3))
        out, state = run("mgda", j, head)
        lam = np.asarray(state.weights, np.float64)
        d = flat_shared(out)
        g = j @ j.T
        md = np.diag(g).mean()
        assert (lam >= 0).all() and abs(lam.sum() - 1) < 1e-5
        np.testing.assert_allclose(d, j.T @ lam, rtol=1e-4, atol=1e-6 * np.sqrt(md))
        np.testing.assert_allclose(d, j.T @ np_min_norm(g), atol=1e-3 * np.sqrt(md))
        # KKT of the min-norm point: ⟨g_t, d⟩ ≥ ‖d‖², with equality on the support
        proj = j @ d
        assert (proj >= d @ d - 1e-4 * md).all()
        np.testing.assert_allclose(proj[lam > 1e-3], d @ d, atol=1e-4 * md)
        assert (proj >= -1e-5 * md).all()  # J·d ≥ 0
        # official variant: heads are weighted by λ
        np.testing.assert_allclose(np.asarray(out["head"]), lam @ head, rtol=1e-4, atol=1e-7)
        assert float(state.gap) < 1e-4


def test_mgda_l2_normalization_and_unweighted_heads():
    rng = np.random.default_rng(11)
    j, head = conflicting(rng, 3)
    out, state = run("mgda", j, head, normalization="l2", weight_heads=False)
    unit = j / np.linalg.norm(j, axis=1, keepdims=True)
    lam_ref = np_min_norm(unit @ unit.T)
    np.testing.assert_allclose(np.asarray(state.weights), lam_ref, atol=1e-4)
    # the weights apply to the raw gradients, as the official code
    np.testing.assert_allclose(flat_shared(out), j.T @ np.asarray(state.weights, np.float64), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["head"]), head.sum(0), rtol=1e-5)


def test_mgda_loss_normalization_requires_losses():
    tx = get_method("mgda", 3, normalization="loss", shared=is_shared)
    j, head = conflicting(np.random.default_rng(12), 3)
    with pytest.raises(ValueError, match="losses="):
        tx.update(make_grads(j, head), tx.init(params_like()), params_like())


# ----------------------------------------------------------------------------
# CAGrad
# ----------------------------------------------------------------------------


def test_cagrad_matches_grid_reference_two_tasks():
    rng = np.random.default_rng(20)
    for trial in range(5):
        j, head = conflicting(rng, 2)
        if trial == 0:
            j[1] = -0.5 * j[0] + 0.1 * rng.normal(size=P_SHARED)  # strong conflict
        out, state = run("cagrad", j, head)
        ref = np_cagrad(j, 0.5)
        np.testing.assert_allclose(flat_shared(out), ref, atol=2e-4 * np.linalg.norm(ref))
        np.testing.assert_allclose(np.asarray(out["head"]), head.sum(0), rtol=1e-5)  # heads: plain sum


def test_cagrad_three_tasks_reference_and_dual_optimality():
    rng = np.random.default_rng(21)
    for trial in range(4):
        j, head = conflicting(rng, 3)
        out, state = run("cagrad", j, head)
        ref = np_cagrad(j, 0.5)
        np.testing.assert_allclose(flat_shared(out), ref, atol=1e-3 * np.linalg.norm(ref))
        # Frank–Wolfe gap of the dual weights, recomputed in float64
        g = j @ j.T
        b = np.full(3, 1 / 3)
        w = np.asarray(state.dual_weights, np.float64)
        radius = 0.5 * np.sqrt(b @ g @ b)
        grad = g @ b + radius * g @ w / np.sqrt(w @ g @ w)
        assert grad @ w - grad.min() < 1e-4 * np.diag(g).mean()
        # the update is the documented weighted sum: Σ (1/T + λ w_t) g_t / (1 + c²)
        np.testing.assert_allclose(flat_shared(out), j.T @ np.asarray(state.weights, np.float64), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------
# Nash-MTL
# ----------------------------------------------------------------------------


def test_nash_mtl_bargaining_condition():
    rng = np.random.default_rng(30)
    for trial in range(6):
        j, head = conflicting(rng, 3, scale=10.0 ** rng.uniform(-4, 4))
        out, state = run("nash_mtl", j, head, max_norm=0.0)
        alpha = np.asarray(state.weights, np.float64)
        d = flat_shared(out)
        assert (alpha > 0).all()
        np.testing.assert_allclose(d, j.T @ alpha, rtol=1e-4, atol=1e-6 * np.abs(d).max())
        np.testing.assert_allclose(alpha * (j @ d), 1.0, atol=2e-3)  # α_t ⟨g_t, d⟩ = 1
        np.testing.assert_allclose(d @ d, 3.0, rtol=2e-3)  # ‖d‖² = T
        np.testing.assert_allclose(np.asarray(out["head"]), alpha @ head, rtol=1e-4)
        assert float(state.residual) < 2e-3


def test_nash_mtl_default_clips_shared_norm_and_reuses_weights():
    rng = np.random.default_rng(31)
    j, head = conflicting(rng, 3, scale=50.0)
    out, state = run("nash_mtl", j, head)
    np.testing.assert_allclose(np.linalg.norm(flat_shared(out)), 1.0, rtol=1e-4)  # ‖d‖ = √3 clipped to 1
    # update_weights_every=2: α is recomputed at steps 0, 2, … and reused in between
    j1, h1 = conflicting(rng, 3)
    j2, h2 = conflicting(rng, 3)
    _, s1 = run("nash_mtl", j1, h1, max_norm=0.0, update_weights_every=2)
    out2, s2 = run("nash_mtl", j2, h2, state=s1, max_norm=0.0, update_weights_every=2)
    np.testing.assert_array_equal(np.asarray(s2.weights), np.asarray(s1.weights))
    np.testing.assert_allclose(flat_shared(out2), j2.T @ np.asarray(s1.weights, np.float64), rtol=1e-4, atol=1e-6)
    _, s3 = run("nash_mtl", j2, h2, state=s2, max_norm=0.0, update_weights_every=2)
    alpha = np.asarray(s3.weights, np.float64)
    np.testing.assert_allclose(alpha * (j2 @ (j2.T @ alpha)), 1.0, atol=2e-3)
    assert int(s3.count) == 3


def test_nash_mtl_zero_task_gradient_reports_residual():
    rng = np.random.default_rng(32)
    j, head = conflicting(rng, 3)
    j[1] = 0.0
    out, state = run("nash_mtl", j, head, max_norm=0.0)
    assert np.isfinite(flat_shared(out)).all()
    assert float(state.residual) > 0.5  # the bargaining condition cannot hold for task 1


# ----------------------------------------------------------------------------
# UPGrad
# ----------------------------------------------------------------------------


def test_upgrad_reference_and_no_conflict():
    rng = np.random.default_rng(40)
    for trial in range(6):
        j, head = conflicting(rng, 3, scale=10.0 ** rng.uniform(-3, 3))
        out, state = run("upgrad", j, head)
        w_ref = np_upgrad_weights(j, np.full(3, 1 / 3), 1e-4)
        np.testing.assert_allclose(np.asarray(state.weights), w_ref, rtol=2e-4, atol=2e-5)
        d = flat_shared(out)
        np.testing.assert_allclose(d, j.T @ w_ref, rtol=1e-3, atol=1e-5 * np.abs(j).max())
        md = np.diag(j @ j.T).mean()
        assert (j @ d >= -1e-3 * md * w_ref.sum()).all()  # J·d ≥ 0 up to reg_eps
        np.testing.assert_allclose(np.asarray(out["head"]), head.sum(0), rtol=1e-5)
    # a conflicting problem is really changed by the projection
    assert np.abs(np.asarray(state.weights) - 1 / 3).max() > 1e-3


def test_upgrad_exact_projection_and_non_conflicting_sum():
    rng = np.random.default_rng(41)
    kw = {"reg_eps": 0.0, "pref_vector": (1.0, 1.0, 1.0)}
    for trial in range(4):
        j, head = conflicting(rng, 3)
        out, state = run("upgrad", j, head, **kw)
        d = flat_shared(out)
        md = np.diag(j @ j.T).mean()
        assert (j @ d >= -1e-5 * md).all()  # J·d ≥ 0 exactly without regularisation
        assert float(state.residual) < 1e-4
    # non-conflicting gradients (pairwise ⟨g_i, g_j⟩ ≥ 0): every projection is the identity
    j = np.abs(rng.normal(size=(3, P_SHARED)))
    out, state = run("upgrad", j, np.zeros((3, 2)), **kw)
    np.testing.assert_allclose(np.asarray(state.weights), 1.0, rtol=1e-6)
    np.testing.assert_allclose(flat_shared(out), j.sum(0), rtol=1e-5)
    out, state = run("upgrad", j, np.zeros((3, 2)))  # default: TorchJD's mean
    np.testing.assert_allclose(flat_shared(out), j.mean(0), rtol=1e-5)


# ----------------------------------------------------------------------------
# FairGrad
# ----------------------------------------------------------------------------


def test_fairgrad_fairness_condition_and_clipping():
    rng = np.random.default_rng(50)
    for trial in range(5):
        j, head = conflicting(rng, 3, scale=10.0 ** rng.uniform(-3, 3))
        out, state = run("fairgrad", j, head)
        w = np.asarray(state.weights, np.float64)
        d = j.T @ w
        assert (w > 0).all()
        np.testing.assert_allclose(w**0.5 * (j @ d), 1.0, atol=2e-3)  # ⟨g_t, d⟩ = w_t^{-1/α}, α = 2
        np.testing.assert_allclose(flat_shared(out), d / max(1.0, np.linalg.norm(d)), rtol=1e-3, atol=1e-7)
        np.testing.assert_allclose(np.asarray(out["head"]), head.sum(0), rtol=1e-5)  # official: heads summed
        assert float(state.residual) < 2e-3


def test_fairgrad_alpha_one_is_nash_mtl():
    rng = np.random.default_rng(51)
    j, head = conflicting(rng, 3)
    fair, fs = run("fairgrad", j, head, alpha=1.0, max_norm=0.0)
    nash, ns = run("nash_mtl", j, head, max_norm=0.0)
    np.testing.assert_allclose(np.asarray(fs.weights), np.asarray(ns.weights), rtol=1e-3)
    np.testing.assert_allclose(flat_shared(fair), flat_shared(nash), rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------
# ExcessMTL
# ----------------------------------------------------------------------------


def test_excessmtl_matches_reference_recurrence():
    rng = np.random.default_rng(60)
    seq = [conflicting(rng, 3) for _ in range(4)]
    # task 2 keeps a large gradient (far from convergence), the others shrink
    seq = [(j * np.array([[0.5**k], [0.5**k], [1.0]]), h) for k, (j, h) in enumerate(seq)]
    ref = np_excessmtl([j for j, _ in seq])
    state = None
    for (j, head), w_ref in zip(seq, ref):
        out, state = run("excessmtl", j, head, state=state)
        np.testing.assert_allclose(np.asarray(state.weights), w_ref, rtol=1e-5)
        np.testing.assert_allclose(flat_shared(out), j.T @ w_ref, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out["head"]), w_ref @ head, rtol=1e-4)
    assert np.argmax(np.asarray(state.weights)) == 2
    np.testing.assert_allclose(float(np.sum(state.weights)), 3.0, rtol=1e-6)
    acc = sum(j**2 for j, _ in seq)
    np.testing.assert_allclose(np.asarray(state.sq_sum["trunk"]["b"]), acc[:, 12:], rtol=1e-5)
