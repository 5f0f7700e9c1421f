"""MTAdam, MetaBalance, MoCo and GradNorm against independent NumPy references, plus properties."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dbmtl_jax.methods import get_method
from gm_harness import SHAPES, SHARED_NAMES, random_grads, run_method

def _grads(rng, T, steps, scales):
    return [random_grads(rng, T, scales) for _ in range(steps)]


_run = run_method


def _groups(granularity):
    return [SHARED_NAMES] if granularity == "global" else [(n,) for n in SHARED_NAMES]


def _group_norms(g, names, T):
    return np.sqrt(sum((g[n].reshape(T, -1) ** 2).sum(1) for n in names))


# ----------------------------------------------------------------------------- MTAdam


class NumpyMTAdam:
    def __init__(self, T, granularity, b1=0.9, b2=0.999, b3=0.9, eps=1e-8, norm_eps=1e-10, ranks=None):
        self.T, self.groups = T, _groups(granularity)
        self.b1, self.b2, self.b3, self.eps, self.norm_eps = b1, b2, b3, eps, norm_eps
        self.ranks = np.ones(T) if ranks is None else np.asarray(ranks, np.float64)
        self.k, self.n = 0, None
        self.m = {n: np.zeros((T,) + SHAPES[n]) for n in SHARED_NAMES}
        self.v = {n: np.zeros((T,) + SHAPES[n]) for n in SHARED_NAMES}
        self.mh, self.vh = np.zeros(SHAPES["h"]), np.zeros(SHAPES["h"])

    def step(self, g):
        T = self.T
        self.k += 1
        bc1, bc2 = 1 - self.b1**self.k, 1 - self.b2**self.k
        cur = np.stack([_group_norms(g, names, T) for names in self.groups])
        self.n = cur if self.k == 1 else self.b3 * self.n + (1 - self.b3) * cur
        out = {}
        for gi, names in enumerate(self.groups):
            n = self.n[gi]
            ok = n > self.norm_eps
            scale = np.ones(T)
            if ok.any():
                anchor = n[np.argmax(ok)]
                for t in range(T):
                    if ok[t]:
                        scale[t] = self.ranks[t] * anchor / n[t]
            for name in names:
                gt = g[name] * scale.reshape((T,) + (1,) * len(SHAPES[name]))
                self.m[name] = self.b1 * self.m[name] + (1 - self.b1) * gt
                self.v[name] = self.b2 * self.v[name] + (1 - self.b2) * gt**2
                denom = (np.sqrt(self.v[name]) / np.sqrt(bc2) + self.eps).max(0)
                out[name] = (self.m[name] / bc1).sum(0) / denom
        gs = g["h"].sum(0)
        self.mh = self.b1 * self.mh + (1 - self.b1) * gs
        self.vh = self.b2 * self.vh + (1 - self.b2) * gs**2
        out["h"] = self.mh / bc1 / (np.sqrt(self.vh) / np.sqrt(bc2) + self.eps)
        return out


@pytest.mark.parametrize("granularity", ["leaf", "global"])
def test_mtadam_matches_numpy(granularity):
    T, steps = 3, 5
    rng = np.random.default_rng(0)
    grads = _grads(rng, T, steps, [1.0, 1e3, 1e-3])
    grads[0]["a"][0] = 0.0  # task 0 has no gradient on leaf 'a' at the first step: anchor falls to task 1
    outs, states = _run("mtadam", T, grads, granularity=granularity)
    ref = NumpyMTAdam(T, granularity)
    for g, out in zip(grads, outs):
        want = ref.step(g)
        for n in SHAPES:
            np.testing.assert_allclose(out[n], want[n], rtol=1e-9, atol=1e-12, err_msg=n)
    np.testing.assert_allclose(states[-1].norms, ref.n, rtol=1e-6)
    assert int(states[-1].count) == steps


def test_mtadam_invariant_to_auxiliary_task_scales():
    """Constant rescaling of the auxiliary tasks' gradients is undone by the balancing."""
    T, steps = 3, 4
    rng = np.random.default_rng(1)
    grads = _grads(rng, T, steps, [1.0, 1.0, 1.0])
    scaled = [{n: v * np.array([1.0, 1e4, 1e-4]).reshape((T,) + (1,) * (v.ndim - 1)) for n, v in g.items()}
              for g in grads]
    scaled = [{**s, "h": g["h"]} for s, g in zip(scaled, grads)]  # heads are not balanced
    o1, _ = _run("mtadam", T, grads, granularity="leaf")
    o2, _ = _run("mtadam", T, scaled, granularity="leaf")
    for a, b in zip(o1, o2):
        for n in SHAPES:
            np.testing.assert_allclose(a[n], b[n], rtol=1e-7, atol=1e-12)


def test_mtadam_bad_ranks_shape():
    with pytest.raises(ValueError, match="ranks"):
        get_method("mtadam", 3, ranks=[1.0, 2.0])


# ----------------------------------------------------------------------------- MetaBalance


def numpy_metabalance(grads, T, relax, beta, strategy, granularity, main=0):
    groups = _groups(granularity)
    m = np.zeros((len(groups), T))
    outs = []
    for g in grads:
        out = {"h": g["h"].sum(0)}
        for gi, names in enumerate(groups):
            m[gi] = beta * m[gi] + (1 - beta) * _group_norms(g, names, T)
            f = np.ones(T)
            for t in range(T):
                if t == main:
                    continue
                apply = {"adapt": True, "reduce": m[gi, t] > m[gi, main], "enlarge": m[gi, t] < m[gi, main]}[strategy]
                if apply:
                    f[t] = relax * m[gi, main] / m[gi, t] + (1 - relax)
            for n in names:
                out[n] = np.tensordot(f, g[n], axes=(0, 0))
        outs.append(out)
    return outs, m


@pytest.mark.parametrize(
    "cfg",
    [
        dict(strategy="adapt", granularity="leaf", main_task=0),
        dict(strategy="reduce", granularity="global", main_task=1),
        dict(strategy="enlarge", granularity="leaf", main_task=2),
    ],
    ids=lambda c: "-".join(map(str, c.values())),
)
def test_metabalance_matches_numpy(cfg):
    T, steps = 3, 4
    rng = np.random.default_rng(2)
    grads = _grads(rng, T, steps, [1.0, 30.0, 0.05])
    outs, states = _run("metabalance", T, grads, **cfg)
    want, m = numpy_metabalance(grads, T, 0.7, 0.9, cfg["strategy"], cfg["granularity"], cfg["main_task"])
    for out, w in zip(outs, want):
        for n in SHAPES:
            np.testing.assert_allclose(out[n], w[n], rtol=1e-9, atol=1e-12, err_msg=n)
    np.testing.assert_allclose(states[-1].norms, m, rtol=1e-6)


def test_metabalance_full_relax_equalises_magnitudes():
    """r = 1: auxiliary gradients are rescaled to the main task's moving-average norm."""
    T, steps = 3, 3
    rng = np.random.default_rng(3)
    grads = _grads(rng, T, steps, [1.0, 1.0, 1.0])
    scaled = [{n: (v * np.array([1.0, 1e5, 1e-5]).reshape((T,) + (1,) * (v.ndim - 1)) if n != "h" else v)
               for n, v in g.items()} for g in grads]
    o1, _ = _run("metabalance", T, grads, relax_factor=1.0)
    o2, _ = _run("metabalance", T, scaled, relax_factor=1.0)
    for a, b in zip(o1, o2):
        for n in SHAPES:
            np.testing.assert_allclose(a[n], b[n], rtol=1e-8)


def test_metabalance_bad_values():
    with pytest.raises(ValueError, match="relax_factor"):
        get_method("metabalance", 2, relax_factor=1.5)
    with pytest.raises(ValueError, match="main_task"):
        get_method("metabalance", 2, main_task=2)


# ----------------------------------------------------------------------------- MoCo


def numpy_simplex_projection(v):
    """Projection onto the probability simplex by bisection on the threshold (independent method)."""
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(v - mid, 0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return np.maximum(v - 0.5 * (lo + hi), 0)


def numpy_moco(grads, losses, T, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0,
               lambda_update="project", grad_transform="none"):
    y = {n: np.zeros((T,) + SHAPES[n]) for n in SHARED_NAMES}
    lam = np.ones(T) / T
    outs = []
    for k, (g, l) in enumerate(zip(grads, losses), start=1):
        bk, gk = beta / k**beta_sigma, gamma / k**gamma_sigma
        h = {n: g[n].copy() for n in SHARED_NAMES}
        if grad_transform == "normalize_loss":
            nrm = _group_norms(g, SHARED_NAMES, T)
            for n in SHARED_NAMES:
                h[n] = h[n] / nrm.reshape((T,) + (1,) * len(SHAPES[n])) * l.reshape((T,) + (1,) * len(SHAPES[n]))
        for n in SHARED_NAMES:
            y[n] = y[n] - bk * (y[n] - h[n])
        Y = np.concatenate([y[n].reshape(T, -1) for n in SHARED_NAMES], axis=1)
        z = lam - gk * (Y @ Y.T + rho * np.eye(T)) @ lam
        if lambda_update == "project":
            lam = numpy_simplex_projection(z)
        else:
            e = np.exp(z - z.max())
            lam = e / e.sum()
        out = {n: np.tensordot(lam, y[n], axes=(0, 0)) for n in SHARED_NAMES}
        out["h"] = g["h"].sum(0)
        outs.append((out, lam.copy()))
    return outs


@pytest.mark.parametrize(
    "cfg",
    [
        dict(lambda_update="project", grad_transform="none"),
        dict(lambda_update="softmax", grad_transform="normalize_loss", rho=0.1, beta=0.9, beta_sigma=0.0),
    ],
    ids=lambda c: "-".join(map(str, c.values())),
)
def test_moco_matches_numpy(cfg):
    T, steps = 3, 6
    rng = np.random.default_rng(4)
    grads = _grads(rng, T, steps, [0.5, 2.0, 4.0])
    losses = [np.array([1.0, 0.5, 2.0]) + 0.1 * k for k in range(steps)]
    outs, states = _run("moco", T, grads, losses=losses, **cfg)
    want = numpy_moco(grads, losses, T, **cfg)
    for out, st, (w, lam) in zip(outs, states, want):
        np.testing.assert_allclose(st.lambd, lam, rtol=1e-5, atol=1e-7)  # float32 state
        assert np.all(st.lambd >= 0) and abs(st.lambd.sum() - 1) < 1e-6
        for n in SHAPES:
            np.testing.assert_allclose(out[n], w[n], rtol=1e-5, atol=1e-8, err_msg=n)
    # projected steps on these (large) Gram matrices leave the simplex interior
    if cfg["lambda_update"] == "project":
        assert np.any(np.stack([s.lambd for s in states]) == 0.0)


# ----------------------------------------------------------------------------- GradNorm


def numpy_gradnorm(grads, losses, T, alpha, lr, weight_heads=True, norm_names=SHARED_NAMES, min_weight=1e-6):
    w = np.ones(T)
    l0 = None
    outs = []
    for g, l in zip(grads, losses):
        out = {n: np.tensordot(w, g[n], axes=(0, 0)) for n in SHARED_NAMES}
        out["h"] = np.tensordot(w, g["h"], axes=(0, 0)) if weight_heads else g["h"].sum(0)
        if l0 is None:
            l0 = l.copy()
        n = _group_norms(g, norm_names, T)
        G = w * n
        r = (l / l0) / (l / l0).mean()
        target = G.mean() * r**alpha
        loss = np.abs(G - target).sum()
        w = np.maximum(w - lr * np.sign(G - target) * n, min_weight)
        w = T * w / w.sum()
        outs.append((out, w.copy(), loss))
    return outs, l0


@pytest.mark.parametrize(
    "cfg",
    [
        dict(alpha=1.5, weight_heads=True),
        dict(alpha=0.5, weight_heads=False, norm_leaves=lambda p: p == "b"),
    ],
    ids=["default", "no-heads-norm-b"],
)
def test_gradnorm_matches_numpy(cfg):
    T, steps, lr = 3, 5, 0.01
    rng = np.random.default_rng(5)
    grads = _grads(rng, T, steps, [1.0, 5.0, 20.0])
    losses = [np.array([2.0, 1.0, 4.0]) * np.array([0.9, 0.8, 0.95]) ** k for k in range(steps)]
    outs, states = _run("gradnorm", T, grads, losses=losses, weight_optimizer=optax.sgd(lr), **cfg)
    norm_names = ("b",) if "norm_leaves" in cfg else SHARED_NAMES
    want, l0 = numpy_gradnorm(grads, losses, T, cfg["alpha"], lr, cfg["weight_heads"], norm_names)
    for out, st, (w_out, w, loss) in zip(outs, states, want):
        for n in SHAPES:
            np.testing.assert_allclose(out[n], w_out[n], rtol=1e-6, err_msg=n)
        np.testing.assert_allclose(st.weights, w, rtol=1e-5)
        np.testing.assert_allclose(st.gradnorm_loss, loss, rtol=1e-5)
        np.testing.assert_allclose(st.weights.sum(), T, rtol=1e-6)
    np.testing.assert_allclose(states[-1].initial_losses, l0, rtol=1e-6)
    # the task with the largest gradient norm (task 2) is pushed down
    assert states[-1].weights[2] < 1.0 < states[-1].weights[0] + states[-1].weights[1]


def test_gradnorm_norm_leaves_must_select_something():
    tx = get_method("gradnorm", 2, norm_leaves=lambda p: False)
    params = {"w": jnp.zeros((3,))}
    with pytest.raises(ValueError, match="norm_leaves"):
        tx.update({"w": jnp.ones((2, 3))}, tx.init(params), params, losses=jnp.ones(2))
