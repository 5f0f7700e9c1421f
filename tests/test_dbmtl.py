"""DB-MTL transform: against the NumPy oracle, properties, behaviour and errors."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dbmtl_jax
from numpy_reference import NumpyDBMTL

SHAPES = {"a": (3, 4), "b": (5,), "h": (4, 2)}


def _random_grads(rng, num_tasks, steps, scales):
    out = []
    for _ in range(steps):
        g = {}
        for name, shape in SHAPES.items():
            x = rng.standard_normal((num_tasks,) + shape)
            g[name] = x * np.asarray(scales).reshape((num_tasks,) + (1,) * len(shape))
        out.append(g)
    return out


CONFIGS = [
    dict(beta=0.9, beta_sigma=0.0, alpha="max"),
    dict(beta=0.5, beta_sigma=0.5, alpha="max"),
    dict(beta=0.1, beta_sigma=0.5, alpha="min"),
    dict(beta=0.9, beta_sigma=0.0, alpha="mean"),
    dict(beta=0.0, beta_sigma=0.0, alpha="median"),
    dict(beta=0.9, beta_sigma=0.0, alpha=2.5),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("with_heads", [False, True])
def test_matches_numpy_oracle(cfg, with_heads):
    T, steps = 4, 12
    rng = np.random.default_rng(0)
    scales = [1e-4, 1.0, 1e2, 1e4]
    grads = _random_grads(rng, T, steps, scales)
    shared_names = {"a", "b"} if with_heads else None
    ref = NumpyDBMTL(T, shared=shared_names, **cfg)
    with jax.enable_x64(True):
        params = {n: jnp.zeros(s, jnp.float64) for n, s in SHAPES.items()}
        mask = None if shared_names is None else {n: n in shared_names for n in SHAPES}
        tx = dbmtl_jax.dbmtl(T, shared=mask, **cfg)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for g in grads:
            out, state = update({n: jnp.asarray(v) for n, v in g.items()}, state, params)
            want = ref.step(g)
            for n in SHAPES:
                assert out[n].dtype == jnp.float64
                np.testing.assert_allclose(np.asarray(out[n]), want[n], rtol=1e-6, atol=0, err_msg=n)
        assert int(state.count) == steps


def test_beta_schedule_callable_matches_constant():
    T = 2
    rng = np.random.default_rng(1)
    grads = _random_grads(rng, T, 5, [1.0, 3.0])
    params = {n: jnp.zeros(s) for n, s in SHAPES.items()}
    a = dbmtl_jax.dbmtl(T, beta=optax.constant_schedule(0.7))
    b = dbmtl_jax.dbmtl(T, beta=0.7)
    sa, sb = a.init(params), b.init(params)
    for g in grads:
        g = {n: jnp.asarray(v, jnp.float32) for n, v in g.items()}
        ua, sa = a.update(g, sa)
        ub, sb = b.update(g, sb)
        for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
            np.testing.assert_allclose(x, y, rtol=1e-6)


def test_beta_schedule_gets_optax_step_count_directly_and_under_inject_hyperparams():
    """A schedule is called with the number of updates already applied (0 at the first update), as optax
    calls schedules: update k uses β_k = schedule(k − 1) / k^σ (the paper's decay k^σ still counts k = 1, 2,
    …), and dbmtl(beta=schedule) and inject_hyperparams(dbmtl)(beta=schedule) agree at every update."""
    T, sigma = 3, 0.5
    values = [0.0, 0.5, 0.8, 0.3, 0.6]
    sched = lambda c: jnp.asarray(values)[c]  # noqa: E731
    rng = np.random.default_rng(3)
    grads = _random_grads(rng, T, len(values), [1.0, 2.0, 0.5])
    params = {n: jnp.zeros(s) for n, s in SHAPES.items()}
    direct = dbmtl_jax.dbmtl(T, beta=sched, beta_sigma=sigma, shared=lambda p: p != "h")
    inj = optax.inject_hyperparams(dbmtl_jax.dbmtl, static_args=("num_tasks", "alpha", "shared", "ema_dtype"))(
        num_tasks=T, beta=sched, beta_sigma=sigma, shared=lambda p: p != "h")
    ref = NumpyDBMTL(T, beta_sigma=sigma, shared=("a", "b"))
    sd, si = direct.init(params), inj.init(params)
    ud, ui = jax.jit(direct.update), jax.jit(inj.update)
    for k, g in enumerate(grads, 1):
        g32 = {n: jnp.asarray(v, jnp.float32) for n, v in g.items()}
        a, sd = ud(g32, sd, params)
        b, si = ui(g32, si, params)
        ref.beta = values[k - 1]  # NumpyDBMTL divides by its own k^σ
        want = ref.step(g)
        for n in SHAPES:
            np.testing.assert_allclose(a[n], want[n], rtol=2e-5, atol=1e-6, err_msg=f"direct {n} k={k}")
            np.testing.assert_allclose(b[n], want[n], rtol=2e-5, atol=1e-6, err_msg=f"inject {n} k={k}")
        for n in ("a", "b"):
            np.testing.assert_allclose(sd.ema[n], ref.ema[n], rtol=2e-5, atol=1e-6)
            np.testing.assert_allclose(si.inner_state.ema[n], ref.ema[n], rtol=2e-5, atol=1e-6)


def _loss_problem(T=3, seed=0):
    """A tiny 2-layer HPS regression problem with T tasks; returns (params, losses_fn)."""
    key = jax.random.key(seed)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    x = jax.random.normal(k1, (64, 6))
    y = jax.random.normal(k2, (64, T)) * jnp.array([1.0, 10.0, 0.1, 3.0, 0.5][:T])
    params = {
        "trunk": {"w": jax.random.normal(k3, (6, 8)) * 0.3, "b": jnp.zeros(8)},
        "heads": {"w": jax.random.normal(k4, (8, T)) * 0.3},
    }

    def losses(p, scale=None):
        z = jnp.tanh(x @ p["trunk"]["w"] + p["trunk"]["b"])
        pred = z @ p["heads"]["w"]
        l = jnp.mean((pred - y) ** 2, axis=0)
        return l if scale is None else l * scale

    return params, losses


def _is_trunk(path: str) -> bool:
    return path.startswith("trunk")


def _one_step(params, losses_fn, T, *, scale=None, perm=None, steps=3):
    tx = dbmtl_jax.dbmtl(T, shared=_is_trunk)
    state = tx.init(params)
    grads_fn = dbmtl_jax.value_and_task_grads(lambda p: losses_fn(p, scale) if perm is None else losses_fn(p, scale)[perm])
    outs = []
    for _ in range(steps):
        _, g = grads_fn(params)
        u, state = tx.update(g, state, params)
        outs.append(u)
    return outs


def test_scaling_one_task_loss_leaves_shared_update_unchanged():
    params, losses = _loss_problem()
    base = _one_step(params, losses, 3)
    scaled = _one_step(params, losses, 3, scale=jnp.array([1.0, 1e3, 1.0]))
    for u, v in zip(base, scaled):
        for x, y in zip(jax.tree.leaves(u["trunk"]), jax.tree.leaves(v["trunk"])):
            np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-7)
        # heads get ∇ log(c ℓ + ε) = ∇ log ℓ as well
        np.testing.assert_allclose(u["heads"]["w"], v["heads"]["w"], rtol=2e-4, atol=1e-7)


def test_permuting_tasks_leaves_update_unchanged():
    T = 4
    rng = np.random.default_rng(3)
    grads = _random_grads(rng, T, 4, [1e-2, 1.0, 5.0, 1e3])
    perm = np.array([2, 0, 3, 1])
    params = {n: jnp.zeros(s) for n, s in SHAPES.items()}
    tx = dbmtl_jax.dbmtl(T, shared=lambda p: p != "h")
    s1, s2 = tx.init(params), tx.init(params)
    for g in grads:
        u1, s1 = tx.update({n: jnp.asarray(v, jnp.float32) for n, v in g.items()}, s1)
        u2, s2 = tx.update({n: jnp.asarray(v[perm], jnp.float32) for n, v in g.items()}, s2)
        for n in SHAPES:
            np.testing.assert_allclose(u1[n], u2[n], rtol=1e-5, atol=1e-6)


def test_without_ema_a_per_task_rescaling_changes_only_the_step_length():
    """β = 0: task gradients c_t g_t (e.g. the log's 1/ℓ_t) give the update on g_t times max_t c_t‖g_t‖ / max_t ‖g_t‖.

    Why the log adds nothing to balancing on qm9 (results/README.md §23): the normalisation removes any per-task
    scale, so the direction is the same and only α changes.
    """
    T = 3
    rng = np.random.default_rng(7)
    (g,) = _random_grads(rng, T, 1, [0.3, 1.0, 4.0])
    c = np.array([50.0, 0.2, 3.0])  # per-task factors, as 1/ℓ_t
    shared = lambda p: p != "h"
    params = {n: jnp.zeros(s) for n, s in SHAPES.items()}
    tx = dbmtl_jax.dbmtl(T, beta=0.0, shared=shared)
    raw = {n: jnp.asarray(v, jnp.float32) for n, v in g.items()}
    scaled = {n: jnp.asarray(v * c.reshape((T,) + (1,) * (v.ndim - 1)), jnp.float32) for n, v in g.items()}
    u_raw, s_raw = tx.update(raw, tx.init(params))
    u_scaled, s_scaled = tx.update(scaled, tx.init(params))
    ratio = float(jnp.max(s_scaled.norms) / jnp.max(s_raw.norms))
    norms = np.sqrt(sum((g[n].reshape(T, -1) ** 2).sum(1) for n in ("a", "b")))
    np.testing.assert_allclose(ratio, np.max(c * norms) / np.max(norms), rtol=1e-5)
    for n in ("a", "b"):
        np.testing.assert_allclose(u_scaled[n], ratio * u_raw[n], rtol=1e-4, atol=1e-6)
    # the head leaf is not balanced: its plain sum over tasks keeps the factors
    np.testing.assert_allclose(u_scaled["h"], (g["h"] * c[:, None, None]).sum(0), rtol=1e-5)


@pytest.mark.parametrize("alpha", ["max", "mean"])
def test_update_norm_bounded_by_T_alpha(alpha):
    T = 5
    rng = np.random.default_rng(4)
    grads = _random_grads(rng, T, 6, [1e-3, 1e-1, 1.0, 1e1, 1e3])
    params = {n: jnp.zeros(s) for n, s in SHAPES.items()}
    tx = dbmtl_jax.dbmtl(T, alpha=alpha)
    state = tx.init(params)
    for g in grads:
        u, state = tx.update({n: jnp.asarray(v, jnp.float32) for n, v in g.items()}, state)
        a = float(jnp.max(state.norms)) if alpha == "max" else float(jnp.mean(state.norms))
        total = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(u))))
        assert total <= T * a * (1 + 1e-5)
        # each normalised task contributes exactly alpha: with identical directions the bound is tight
    same = {n: jnp.broadcast_to(jnp.ones(s), (T,) + s) for n, s in SHAPES.items()}
    state = tx.init(params)
    u, state = tx.update(same, state)
    total = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(u))))
    np.testing.assert_allclose(total, T * float(jnp.max(state.norms)), rtol=1e-5)


def test_zero_task_gradient_gives_no_nan():
    T = 3
    params = {n: jnp.zeros(s) for n, s in SHAPES.items()}
    g = {n: jnp.stack([jnp.ones(s), jnp.zeros(s), -2 * jnp.ones(s)]) for n, s in SHAPES.items()}
    tx = dbmtl_jax.dbmtl(T)
    state = tx.init(params)
    for _ in range(3):
        u, state = jax.jit(tx.update)(g, state)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    zeros = jax.tree.map(jnp.zeros_like, g)
    u, state = tx.update(zeros, tx.init(params))
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))


def test_single_task_returns_the_ema():
    rng = np.random.default_rng(5)
    params = {n: jnp.zeros(s) for n, s in SHAPES.items()}
    tx = dbmtl_jax.dbmtl(1, beta=0.6)
    state = tx.init(params)
    for _ in range(4):
        g = {n: jnp.asarray(rng.standard_normal((1,) + s), jnp.float32) for n, s in SHAPES.items()}
        u, state = tx.update(g, state)
        for n in SHAPES:
            ema = state.ema[n][0]
            norm = float(state.norms[0])
            np.testing.assert_allclose(u[n], ema * norm / (norm + 1e-8), rtol=1e-6)
            np.testing.assert_allclose(u[n], ema, rtol=1e-6)


def test_jit_and_eager_agree_and_dtypes_preserved():
    T = 3
    rng = np.random.default_rng(6)
    params = {"a": jnp.zeros((3, 4), jnp.bfloat16), "b": jnp.zeros((5,), jnp.float32)}
    tx = dbmtl_jax.dbmtl(T)
    s_eager, s_jit = tx.init(params), tx.init(params)
    assert s_eager.ema["a"].dtype == jnp.float32  # float32 state for bf16 params by default
    upd = jax.jit(tx.update)
    for _ in range(3):
        g = {
            "a": jnp.asarray(rng.standard_normal((T, 3, 4)), jnp.bfloat16),
            "b": jnp.asarray(rng.standard_normal((T, 5)), jnp.float32),
        }
        u1, s_eager = tx.update(g, s_eager)
        u2, s_jit = upd(g, s_jit)
        assert u1["a"].dtype == jnp.bfloat16 and u1["b"].dtype == jnp.float32
        for x, y in zip(jax.tree.leaves((u1, s_eager)), jax.tree.leaves((u2, s_jit))):
            np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-6, atol=1e-7)
    tx16 = dbmtl_jax.dbmtl(T, ema_dtype=jnp.bfloat16)
    assert tx16.init(params).ema["b"].dtype == jnp.bfloat16


def test_state_structure_and_dtypes_stable():
    T = 2
    params = {n: jnp.zeros(s) for n, s in SHAPES.items()}
    tx = dbmtl_jax.dbmtl(T, shared=lambda p: p != "h")
    s0 = tx.init(params)
    g = {n: jnp.ones((T,) + s) for n, s in SHAPES.items()}
    _, s1 = jax.jit(tx.update)(g, s0)
    assert jax.tree.structure(s0) == jax.tree.structure(s1)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), s0) == jax.tree.map(lambda x: (x.shape, x.dtype), s1)
    assert isinstance(s0.ema["h"], optax.MaskedNode)


def test_inject_hyperparams():
    T = 3
    rng = np.random.default_rng(7)
    params = {n: jnp.zeros(s) for n, s in SHAPES.items()}
    make = optax.inject_hyperparams(dbmtl_jax.dbmtl, static_args=("num_tasks", "alpha"))
    tx = make(num_tasks=T, beta=0.5, beta_sigma=0.5, alpha="max")
    ref = dbmtl_jax.dbmtl(T, beta=0.5, beta_sigma=0.5)
    s, r = tx.init(params), ref.init(params)
    upd = jax.jit(tx.update)
    for i in range(4):
        g = {n: jnp.asarray(rng.standard_normal((T,) + sh), jnp.float32) for n, sh in SHAPES.items()}
        if i == 2:  # change beta mid-run: the injected value is used
            s.hyperparams["beta"] = jnp.asarray(0.25)
            ref = dbmtl_jax.dbmtl(T, beta=0.25, beta_sigma=0.5)
        u, s = upd(g, s)
        v, r = ref.update(g, r)
        for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_inject_hyperparams_with_low_precision_params():
    """inject_hyperparams casts β, σ, ε to the parameters' dtype. bfloat16 values are accepted and used (the
    update equals dbmtl built with the bfloat16-rounded values); a float16 ε of 0 (1e-8 flushed) is refused
    with an error naming hyperparam_dtype=jnp.float32, which keeps them float32."""
    T = 3
    params = {"w": jnp.ones(4, jnp.bfloat16)}
    g = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((T, 4)), jnp.bfloat16)}
    make = optax.inject_hyperparams(dbmtl_jax.dbmtl, static_args=("num_tasks", "alpha", "shared", "ema_dtype"))
    tx = make(num_tasks=T, beta=0.9, beta_sigma=0.5, eps=1e-8)
    s = tx.init(params)
    assert s.hyperparams["beta"].dtype == jnp.bfloat16
    rounded = {k: float(np.float32(jnp.asarray(v, jnp.bfloat16))) for k, v in dict(beta=0.9, beta_sigma=0.5,
                                                                                     eps=1e-8).items()}
    assert rounded["beta"] != 0.9  # 0.8984375
    ref = dbmtl_jax.dbmtl(T, **rounded)
    r = ref.init(params)
    for _ in range(3):
        u, s = jax.jit(tx.update)(g, s, params)
        v, r = ref.update(g, r, params)
        np.testing.assert_array_equal(np.asarray(u["w"], np.float32), np.asarray(v["w"], np.float32))
    p16 = {"w": jnp.ones(4, jnp.float16)}
    with pytest.raises(ValueError, match=r"eps must be finite and > 0.*got 0.0; the value arrived as float16.*"
                                         r"hyperparam_dtype=jnp.float32"):
        make(num_tasks=T).init(p16)
    ok = optax.inject_hyperparams(dbmtl_jax.dbmtl, static_args=("num_tasks", "alpha"),
                                  hyperparam_dtype=jnp.float32)(num_tasks=T).init(p16)
    assert float(ok.hyperparams["eps"]) == np.float32(1e-8)


def test_chained_with_adam_lowers_every_task_loss():
    params, losses = _loss_problem(T=3, seed=1)
    tx = optax.chain(dbmtl_jax.dbmtl(3, shared=_is_trunk), optax.adam(1e-2))
    state = tx.init(params)
    grads_fn = dbmtl_jax.value_and_task_grads(losses)

    @jax.jit
    def step(p, s):
        l, g = grads_fn(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, l

    l0 = losses(params)
    for _ in range(300):
        params, state, _ = step(params, state)
    l1 = losses(params)
    assert bool(jnp.all(l1 < 0.9 * l0)), (l0, l1)


# ----------------------------------------------------------------------------- errors


def test_error_leading_sizes_differ():
    tx = dbmtl_jax.dbmtl(3)
    params = {"a": jnp.zeros((2,)), "b": jnp.zeros((4,))}
    state = tx.init(params)
    with pytest.raises(ValueError, match="disagree.*task-axis"):
        tx.update({"a": jnp.zeros((3, 2)), "b": jnp.zeros((2, 4))}, state)


def test_error_T_does_not_match_state():
    tx = dbmtl_jax.dbmtl(3)
    params = {"a": jnp.zeros((2,))}
    with pytest.raises(ValueError, match="num_tasks=3"):
        jax.jit(tx.update)({"a": jnp.zeros((4, 2))}, tx.init(params))


def test_error_leaf_without_task_axis_names_leaf():
    tx = dbmtl_jax.dbmtl(3)
    params = {"a": jnp.zeros((3, 5)), "b": jnp.zeros((2,))}
    state = tx.init(params)
    with pytest.raises(ValueError, match="'a'.*task axis"):
        tx.update({"a": jnp.zeros((3, 5)), "b": jnp.zeros((3, 2))}, state)
    with pytest.raises(ValueError, match="scalar"):
        tx.update({"a": jnp.zeros((3, 3, 5)), "b": jnp.zeros(())}, state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha="maximum"), "unknown alpha"),
        (dict(alpha=None), "alpha must be"),
    ],
)
def test_error_unknown_options(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        dbmtl_jax.dbmtl(2, **kwargs)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_error_bad_num_tasks(bad):
    with pytest.raises(ValueError, match="num_tasks"):
        dbmtl_jax.dbmtl(bad)


def test_error_mask_does_not_match_params():
    params = {"a": jnp.zeros((2,)), "b": jnp.zeros((3,))}
    tx = dbmtl_jax.dbmtl(2, shared={"a": True})
    with pytest.raises(ValueError, match="shared mask"):
        tx.init(params)
    tx = dbmtl_jax.dbmtl(2, shared={"a": True, "b": 1})
    with pytest.raises(TypeError, match="bools"):
        tx.init(params)


def test_error_shared_leaves_changed_since_init():
    params = {"a": jnp.zeros((2,)), "b": jnp.zeros((3,))}
    tx = dbmtl_jax.dbmtl(2)
    state = tx.init(params)
    with pytest.raises(ValueError, match="shared leaves"):
        tx.update({"a": jnp.zeros((2, 2))}, state)


def test_extra_args_are_accepted_in_chain():
    params = {n: jnp.zeros(s) for n, s in SHAPES.items()}
    tx = optax.chain(dbmtl_jax.dbmtl(2), optax.adam(1e-3))
    state = tx.init(params)
    g = {n: jnp.ones((2,) + s) for n, s in SHAPES.items()}
    u, _ = tx.update(g, state, params, losses=jnp.ones(2), key=jax.random.key(0))
    assert jax.tree.map(jnp.shape, u) == jax.tree.map(jnp.shape, params)


@pytest.mark.parametrize("T", [1, 2, 7])
def test_all_combinations_of_head_masks(T):
    rng = np.random.default_rng(T)
    for flags in itertools.product([True, False], repeat=3):
        shared_names = {n for n, f in zip(SHAPES, flags) if f}
        ref = NumpyDBMTL(T, shared=shared_names)
        tx = dbmtl_jax.dbmtl(T, shared=dict(zip(SHAPES, flags)))
        state = tx.init({n: jnp.zeros(s) for n, s in SHAPES.items()})
        for g in _random_grads(rng, T, 2, np.ones(T)):
            u, state = tx.update({n: jnp.asarray(v, jnp.float32) for n, v in g.items()}, state)
            want = ref.step(g)
            for n in SHAPES:
                np.testing.assert_allclose(u[n], want[n], rtol=2e-5, atol=1e-6)
