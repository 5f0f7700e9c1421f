"""Loss-weighting methods: NumPy references of the weights, both paths, robustness, errors.

IGBv2's agent is tested in test_lw_igbv2.py.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dbmtl_jax import loss_weighting as lw
from dbmtl_jax import value_and_task_grads
from dbmtl_jax.methods import get_method

T = 3
METHODS = ("ew", "gls", "rlw", "uw", "dwa", "imtl_l", "igbv2", "famo", "stch")
# IGBv2's agent is costly to compile: its paths, robustness, T = 1 and state checks share compiled
# programs in test_lw_igbv2.py.
CHEAP = tuple(m for m in METHODS if m != "igbv2")
# Small, fast settings for IGBv2 in the shared tests.
SMALL = {"igbv2": dict(buffer_size=16, sac_hidden=(8,), update_every=2, update_after=1, start_epoch=2)}


def make(name, num_tasks=T, **kw):
    return get_method(name, num_tasks, **{**SMALL.get(name, {}), **kw})


def params_like():
    return {"trunk": jnp.zeros((5,), jnp.float32), "head": jnp.zeros((2, 3), jnp.float32)}


def task_grads(rng, num_tasks=T, scale=1.0):
    return {
        "trunk": jnp.asarray(rng.normal(size=(num_tasks, 5)) * scale, jnp.float32),
        "head": jnp.asarray(rng.normal(size=(num_tasks, 2, 3)) * scale, jnp.float32),
    }


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def run_weights(name, losses_seq, key=None, **kw):
    """Weights used by each of a sequence of jitted per-task updates (recovered from the update)."""
    tx = make(name, **kw)
    p = {"g": jnp.zeros((T,), jnp.float32)}
    state = tx.init(p)
    eye = {"g": jnp.eye(T, dtype=jnp.float32)}  # Σ_t w_t e_t = w
    upd = jax.jit(tx.update)
    out = []
    for i, l in enumerate(losses_seq):
        k = None if key is None else jax.random.fold_in(key, i)
        u, state = upd(eye, state, p, losses=jnp.asarray(l, jnp.float32), key=k)
        out.append(np.asarray(u["g"]))
    return np.array(out), state


# ------------------------------------------------------------------------------------------------
# NumPy references of the weights.


def test_ew_sum_and_mean():
    w, _ = run_weights("ew", [[1.0, 2.0, 3.0]] * 2)
    np.testing.assert_allclose(w, np.ones((2, T)))
    w, _ = run_weights("ew", [[1.0, 2.0, 3.0]], reduction="mean")
    np.testing.assert_allclose(w, np.full((1, T), 1 / T), rtol=1e-6)


def test_gls_matches_geometric_mean_gradient():
    losses = np.array([0.5, 2.0, 7.0])
    w, _ = run_weights("gls", [losses])
    eps = 1e-8
    # Central finite differences of (Π (ℓ+ε))^{1/T} in float64: an independent reference.
    f = lambda l: np.prod(l + eps) ** (1 / T)  # noqa: E731
    fd = np.array([(f(losses + h * e) - f(losses - h * e)) / (2 * h) for e, h in zip(np.eye(T), [1e-6] * T)])
    np.testing.assert_allclose(w[0], fd, rtol=1e-5)
    # many tasks with large losses: the product overflows float32, the log-space weights do not
    big = np.full(40, 1e6)
    w40, _ = run_weights_n("gls", [big], 40)
    np.testing.assert_allclose(w40[0], np.full(40, 1 / 40), rtol=1e-5)


def run_weights_n(name, losses_seq, n, **kw):
    tx = make(name, n, **kw)
    p = {"g": jnp.zeros((n,), jnp.float32)}
    state = tx.init(p)
    out = []
    for l in losses_seq:
        u, state = jax.jit(tx.update)({"g": jnp.eye(n, dtype=jnp.float32)}, state, p, losses=jnp.asarray(l, jnp.float32))
        out.append(np.asarray(u["g"]))
    return np.array(out), state


def test_rlw_distributions():
    key = jax.random.PRNGKey(3)
    p = {"g": jnp.zeros((T,), jnp.float32)}
    eye = {"g": jnp.eye(T, dtype=jnp.float32)}
    # The distribution is a state field: one compiled update serves every distribution.
    upd = jax.jit(get_method("rlw", T).update)
    for dist in ("normal", "uniform", "dirichlet", "bernoulli", "constrained_bernoulli"):
        runs = []
        for losses in ([1.0, 1.0, 1.0], [5.0, 1.0, 2.0]):
            state = get_method("rlw", T, distribution=dist).init(p)
            w = []
            for i in range(6):
                u, state = upd(eye, state, p, losses=jnp.asarray(losses), key=jax.random.fold_in(key, i))
                w.append(np.asarray(u["g"]))
            runs.append(np.array(w))
        w = runs[0]
        np.testing.assert_array_equal(w, runs[1])  # a function of the key only: reproducible, loss-independent
        assert len({tuple(r) for r in w.round(6)}) > 1, dist  # fresh weights each step
        np.testing.assert_allclose(np.asarray(state.last_weights), w[-1], rtol=1e-6)
        if dist in ("normal", "uniform", "dirichlet"):
            np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)
            assert (w > 0).all()
        if dist == "normal":
            ref = [np_softmax(np.asarray(jax.random.normal(jax.random.fold_in(key, i), (T,)))) for i in range(6)]
            np.testing.assert_allclose(w, np.array(ref), rtol=1e-5)
        if dist == "bernoulli":
            assert set(np.unique(w)) <= {0.0, 1.0} and (w.sum(1) >= 1).all()
        if dist == "constrained_bernoulli":
            np.testing.assert_array_equal(w.sum(1), 1.0)
            assert set(np.unique(w)) <= {0.0, 1.0}
    # Bernoulli: every non-zero mask, never the zero mask
    ws = jax.vmap(lambda k: lw.loss_weights(get_method("rlw", T, distribution="bernoulli").init({}), None, k))(
        jax.random.split(jax.random.PRNGKey(0), 400)
    )
    masks = {tuple(int(x) for x in r) for r in np.asarray(ws)}
    assert masks == {m for m in np.ndindex(2, 2, 2) if any(m)}


def np_adam(p, g, m, v, k, lr, b1=0.9, b2=0.999, eps=1e-8):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * (m / (1 - b1**k)) / (np.sqrt(v / (1 - b2**k)) + eps)
    return p, m, v


def test_uw_reference_and_direction():
    rng = np.random.default_rng(0)
    seq = rng.uniform(0.5, 20.0, size=(6, T))
    lr = 0.05
    w, state = run_weights("uw", seq, learning_rate=lr)
    s, m, v = np.full(T, -0.5), np.zeros(T), np.zeros(T)
    for k, l in enumerate(seq, 1):
        np.testing.assert_allclose(w[k - 1], 0.5 * np.exp(-s), rtol=1e-5)
        s, m, v = np_adam(s, 0.5 * (1 - l * np.exp(-s)), m, v, k, lr)
    np.testing.assert_allclose(np.asarray(state.log_var), s, rtol=1e-5)
    # the learnable log-variance moves towards log ℓ: a larger loss ends with a smaller weight
    w, state = run_weights("uw", [[0.2, 1.0, 5.0]] * 300, learning_rate=0.05)
    np.testing.assert_allclose(np.asarray(state.log_var), np.log([0.2, 1.0, 5.0]), atol=0.15)
    assert w[-1][0] > w[-1][1] > w[-1][2]


def test_imtl_l_reference_and_direction():
    rng = np.random.default_rng(1)
    seq = rng.uniform(0.5, 20.0, size=(6, T))
    lr = 0.05
    w, state = run_weights("imtl_l", seq, learning_rate=lr, init=0.2)
    s, m, v = np.full(T, 0.2), np.zeros(T), np.zeros(T)
    for k, l in enumerate(seq, 1):
        np.testing.assert_allclose(w[k - 1], np.exp(s), rtol=1e-5)
        s, m, v = np_adam(s, np.exp(s) * l - 1, m, v, k, lr)
    np.testing.assert_allclose(np.asarray(state.scale), s, rtol=1e-5)
    # e^{s} ℓ → 1: the weighted losses are balanced
    w, _ = run_weights("imtl_l", [[0.2, 1.0, 5.0]] * 300, learning_rate=0.05)
    np.testing.assert_allclose(w[-1] * np.array([0.2, 1.0, 5.0]), 1.0, rtol=0.2)


def np_dwa(seq, spe, temp):
    means, ws = [], []
    for k, l in enumerate(seq):
        e = k // spe
        if e > 1:
            ws.append(T * np_softmax((means[e - 1] / means[e - 2]) / temp))
        else:
            ws.append(np.ones(T))
        if k % spe == spe - 1:
            means.append(np.mean(seq[k - spe + 1 : k + 1], axis=0))
    return np.array(ws), means


@pytest.mark.parametrize("spe,temp", [(1, 2.0), (3, 0.7)])
def test_dwa_reference_and_history(spe, temp):
    rng = np.random.default_rng(2)
    seq = rng.uniform(0.1, 5.0, size=(5 * spe + 1, T))
    w, state = run_weights("dwa", seq, steps_per_epoch=spe, temperature=temp)
    ref, means = np_dwa(seq, spe, temp)
    np.testing.assert_allclose(w, ref, rtol=1e-5)
    st = state
    assert int(st.epochs_done) == len(means) == len(seq) // spe
    np.testing.assert_allclose(np.asarray(st.last_mean), means[-1], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(st.prev_mean), means[-2], rtol=1e-5)
    assert int(st.epoch_steps) == (len(seq) % spe)


def np_stch(seq, spe, warmup, mu, eps=1e-20):
    acc, ws = [], []
    for k, l in enumerate(seq):
        e = k // spe
        if e <= warmup:
            ws.append(1 / (l + eps))
            if e == warmup:
                acc.append(l)
        else:
            nadir = np.mean(acc, axis=0)
            # Central finite differences of T μ log Σ exp(log(ℓ/n + ε)/μ) in float64.
            f = lambda x: T * mu * np.log(np.sum(np.exp(np.log(x / nadir + eps) / mu)))  # noqa: E731
            h = 1e-6 * l
            ws.append(np.array([(f(l + h[i] * e_) - f(l - h[i] * e_)) / (2 * h[i]) for i, e_ in enumerate(np.eye(T))]))
    return np.array(ws), np.mean(acc, axis=0)


@pytest.mark.parametrize("spe,warmup,mu", [(2, 1, 1.0), (1, 0, 0.3)])
def test_stch_reference(spe, warmup, mu):
    rng = np.random.default_rng(3)
    seq = rng.uniform(0.2, 4.0, size=((warmup + 3) * spe, T))
    w, state = run_weights("stch", seq, steps_per_epoch=spe, warmup_epochs=warmup, mu=mu)
    ref, nadir = np_stch(seq, spe, warmup, mu)
    np.testing.assert_allclose(w, ref, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(state.nadir), nadir, rtol=1e-5)
    # a given nadir skips the warm-up
    w2, _ = run_weights("stch", seq[:1], nadir=nadir, mu=mu)
    l = seq[0]
    u = np.log(l / nadir + 1e-20)
    np.testing.assert_allclose(w2[0], T * np_softmax(u / mu) / (l + 1e-20 * nadir), rtol=1e-5)


class NpFAMO:
    """The official FAMO algorithm in NumPy (float64)."""

    def __init__(self, lr=0.025, gamma=0.01, eps=1e-8):
        self.w = np.zeros(T)
        self.m = np.zeros(T)
        self.v = np.zeros(T)
        self.k = 0
        self.lr, self.gamma, self.eps = lr, gamma, eps

    def weights(self, l):
        z = np_softmax(self.w)
        d = l + self.eps
        return (z / d) / np.sum(z / d)

    def update(self, prev, curr):
        delta = np.log(prev + self.eps) - np.log(curr + self.eps)
        z = np_softmax(self.w)
        g = z * delta - z * np.dot(z, delta) + self.gamma * self.w
        self.k += 1
        self.w, self.m, self.v = np_adam(self.w, g, self.m, self.v, self.k, self.lr)


def test_famo_exact_with_observe_losses():
    rng = np.random.default_rng(4)
    before = rng.uniform(0.5, 3.0, size=(6, T))
    after = before * rng.uniform(0.3, 1.1, size=(6, T))
    ref = NpFAMO(lr=0.1)
    tx = make("famo", learning_rate=0.1)
    p = {"g": jnp.zeros((T,))}
    state = tx.init(p)
    step = jax.jit(lambda s, l, l2: (lambda u, s2: (u, lw.observe_losses(s2, l2)))(*tx.update({"g": jnp.eye(T)}, s, p, losses=l)))
    for l, l2 in zip(before, after):
        u, state = step(state, jnp.asarray(l, jnp.float32), jnp.asarray(l2, jnp.float32))
        np.testing.assert_allclose(np.asarray(u["g"]), ref.weights(l), rtol=1e-5)
        ref.update(l, l2)
        np.testing.assert_allclose(np.asarray(state.logits), ref.w, rtol=1e-4, atol=1e-7)
        assert not bool(state.pending)


def test_famo_lagged_uses_next_losses():
    rng = np.random.default_rng(5)
    seq = rng.uniform(0.5, 3.0, size=(6, T))
    w, state = run_weights("famo", seq, learning_rate=0.1)
    ref = NpFAMO(lr=0.1)
    for k, l in enumerate(seq):
        if k:
            ref.update(seq[k - 1], l)
        np.testing.assert_allclose(w[k], ref.weights(l), rtol=1e-5)
    assert bool(state.pending)
    # the logit of the task whose loss does not decrease grows
    _, state = run_weights("famo", [[0.9**k, 0.8**k, 1.0] for k in range(40)])
    logits = np.asarray(state.logits)
    assert logits[2] > logits[0] > logits[1]


# ------------------------------------------------------------------------------------------------
# The two paths agree; the public helpers.


def loss_fn(params, batch):
    """Three toy tasks sharing a trunk, one head each: returns the [T] losses."""
    x, y = batch
    h = jnp.tanh(x @ params["trunk"])
    preds = jnp.einsum("bh,th->tb", h, params["heads"])
    return jnp.mean(jnp.square(preds - y), axis=1) * jnp.array([1.0, 10.0, 0.1])


def toy_problem():
    rng = np.random.default_rng(6)
    params = {"trunk": jnp.asarray(rng.normal(size=(4, 6)) * 0.5, jnp.float32),
              "heads": jnp.asarray(rng.normal(size=(T, 6)) * 0.5, jnp.float32)}
    batches = [(jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), jnp.asarray(rng.normal(size=(T, 8)), jnp.float32))
               for _ in range(5)]
    return params, batches


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("name", CHEAP)
def test_per_task_and_weighted_paths_agree(name, log):
    params0, batches = toy_problem()
    extra = {"steps_per_epoch": 2} if name in ("dwa", "stch", "igbv2") else {}
    if name == "stch":
        extra["warmup_epochs"] = 0
    tx_a = optax.chain(make(name, **extra), optax.sgd(0.05))
    tx_b = optax.chain(make(name, grads="weighted", **extra), optax.sgd(0.05))
    per_task = value_and_task_grads(loss_fn, log=log)
    weighted = lw.value_and_weighted_grad(loss_fn, log=log)

    xs = jax.tree_util.tree_map(lambda *b: jnp.stack(b), *batches)

    @jax.jit
    def run(params, key):
        def body(carry, inp):
            pa, sa, pb, sb = carry
            i, batch = inp
            k = jax.random.fold_in(key, i)
            la, ga = per_task(pa, batch)
            ua, sa = tx_a.update(ga, sa, pa, losses=la, key=k)
            pa = optax.apply_updates(pa, ua)
            lb, gb = weighted(sb, pb, batch, key=k)
            ub, sb = tx_b.update(gb, sb, pb, losses=lb, key=k)
            pb = optax.apply_updates(pb, ub)
            return (pa, sa, pb, sb), None

        init = (params, tx_a.init(params), params, tx_b.init(params))
        (pa, sa, pb, sb), _ = jax.lax.scan(body, init, (jnp.arange(len(batches)), xs))
        return pa, pb, sa, sb

    pa, pb, sa, sb = run(params0, jax.random.PRNGKey(0))
    for a, b, p0 in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb), jax.tree_util.tree_leaves(params0)):
        assert not np.allclose(a, p0)
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(sa), jax.tree_util.tree_leaves(sb)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_value_and_weighted_grad_and_loss_weights_through_wrappers():
    params, batches = toy_problem()
    tx = optax.inject_hyperparams(
        lambda num_tasks, temperature: optax.chain(
            get_method("dwa", num_tasks, temperature=temperature, grads="weighted"), optax.adam(1e-3)),
        static_args=("num_tasks",),
    )(num_tasks=T, temperature=0.5)
    state = tx.init(params)
    # move DWA past its two warm-up epochs
    for b in batches[:3]:
        losses, g = lw.value_and_weighted_grad(loss_fn)(state, params, b)
        _, state = tx.update(g, state, params, losses=losses)
    w = lw.loss_weights(state, losses)
    dwa_state = lw.find_loss_weighting_state(state)
    r = np.asarray(dwa_state.last_mean) / np.asarray(dwa_state.prev_mean)
    np.testing.assert_allclose(w, T * np_softmax(r / 0.5), rtol=1e-5)
    # the gradient is the gradient of Σ stop_gradient(w) ℓ
    (losses, aux), g = lw.value_and_weighted_grad(lambda p, b: (loss_fn(p, b), 7), has_aux=True)(
        state, params, batches[3])
    assert aux == 7
    ref = jax.grad(lambda p: jnp.sum(w * loss_fn(p, batches[3])))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(lw.weighted_loss(state, losses), np.sum(np.asarray(w) * np.asarray(losses)), rtol=1e-6)


@pytest.mark.parametrize("name,kw", [("uw", dict(learning_rate=0.1)), ("dwa", dict(temperature=0.5)),
                                     ("stch", dict(mu=0.5, nadir=jnp.array([1.0, 2.0, 3.0]))),
                                     ("famo", dict(min_losses=jnp.full(3, 0.01)))])
def test_inject_hyperparams_matches_plain(name, kw):
    import importlib

    factory = getattr(importlib.import_module(f"dbmtl_jax.methods.{name}"), name)
    wrapped = optax.inject_hyperparams(factory, static_args=("num_tasks",))(num_tasks=T, **kw)
    plain = factory(T, **kw)
    p = {"g": jnp.zeros((T,))}
    sw, sp = wrapped.init(p), plain.init(p)

    @jax.jit
    def both(sw, sp, l):
        uw_, sw = wrapped.update({"g": jnp.eye(T)}, sw, p, losses=l)
        up_, sp = plain.update({"g": jnp.eye(T)}, sp, p, losses=l)
        return uw_, sw, up_, sp

    for i in range(4):
        a, sw, b, sp = both(sw, sp, jnp.array([1.0, 2.0, 3.0]) / (i + 1))
        np.testing.assert_allclose(a["g"], b["g"], rtol=1e-6)


def _inject(name, **kw):
    from dbmtl_jax.methods import get_factory

    return optax.inject_hyperparams(get_factory(name), static_args=("num_tasks",))(num_tasks=T, **kw)


@pytest.mark.parametrize("grads", ["per_task", "weighted"])
@pytest.mark.parametrize("how", ["schedule", "by_hand"])
def test_inject_hyperparams_value_is_used_in_the_update_it_is_injected_for(grads, how):
    """optax's rule: the value injected for update k (schedule(k), or one set in state.hyperparams) is the
    one update k uses. UW's learning rate 0 freezes s in exactly the updates it is injected for."""
    lrs = [0.0, 0.0, 0.05, 0.05, 0.0, 0.05]
    if how == "schedule":
        tx = _inject("uw", learning_rate=lambda c: jnp.asarray(lrs)[c], grads=grads)
    else:
        tx = _inject("uw", learning_rate=0.05, grads=grads)
    p = {"g": jnp.zeros((T,), jnp.float32)}
    g = {"g": jnp.eye(T, dtype=jnp.float32) if grads == "per_task" else jnp.ones((T,), jnp.float32)}
    state, upd = tx.init(p), jax.jit(tx.update)
    rng = np.random.default_rng(5)
    s, m, v = np.full(T, -0.5), np.zeros(T), np.zeros(T)
    for k, lr in enumerate(lrs, 1):
        l = rng.uniform(0.5, 5.0, T)
        if how == "by_hand":
            state.hyperparams["learning_rate"] = jnp.asarray(lr)
        u, state = upd(g, state, p, losses=jnp.asarray(l, jnp.float32))
        if grads == "per_task":
            np.testing.assert_allclose(u["g"], 0.5 * np.exp(-s), rtol=1e-5)
        s, m, v = np_adam(s, 0.5 * (1 - l * np.exp(-s)), m, v, k, lr)
        np.testing.assert_allclose(state.inner_state.log_var, s, rtol=1e-5, err_msg=f"update {k}")
        # the state holds the values of the last update
        assert float(state.inner_state.learning_rate) == np.float32(lr)


def test_inject_hyperparams_dwa_temperature_schedule_and_integer_fields():
    rng = np.random.default_rng(6)
    seq = rng.uniform(0.1, 5.0, size=(7, T))
    p = {"g": jnp.zeros((T,), jnp.float32)}
    eye = {"g": jnp.eye(T, dtype=jnp.float32)}

    def run(tx, set_by_hand=None):
        state, upd, out = tx.init(p), jax.jit(tx.update), []
        if set_by_hand:
            state.hyperparams.update({k: jnp.asarray(v) for k, v in set_by_hand.items()})
        for l in seq:
            u, state = upd(eye, state, p, losses=jnp.asarray(l, jnp.float32))
            out.append(np.asarray(u["g"]))
        return np.array(out), state

    # temperature 2 for the first four updates, 0.5 from the fifth on
    w, _ = run(_inject("dwa", temperature=lambda c: jnp.where(c < 4, 2.0, 0.5)))
    ref_hot, _ = np_dwa(seq, 1, 2.0)
    ref_cold, _ = np_dwa(seq, 1, 0.5)
    np.testing.assert_allclose(w[:4], ref_hot[:4], rtol=1e-5)
    np.testing.assert_allclose(w[4:], ref_cold[4:], rtol=1e-5)
    # an integer hyperparameter (the epoch length) injected by hand is used too
    w, state = run(_inject("dwa", steps_per_epoch=1, temperature=0.7), set_by_hand={"steps_per_epoch": 3})
    ref, means = np_dwa(seq, 3, 0.7)
    np.testing.assert_allclose(w, ref, rtol=1e-5)
    assert int(state.inner_state.epochs_done) == len(means) == 2
    # STCH's warm-up and epoch length
    w, _ = run(_inject("stch", mu=0.3), set_by_hand={"warmup_epochs": 0, "steps_per_epoch": 2})
    ref, _ = np_stch(seq, 2, 0, 0.3)
    np.testing.assert_allclose(w, ref, rtol=1e-4)


def test_inject_hyperparams_integer_out_of_range_makes_the_step_invalid():
    """A traced integer cannot be checked when the transform is built: steps_per_epoch = 0 (a division by
    zero) makes its step invalid (NaN update, state kept); eagerly the factory raises."""
    p = {"g": jnp.zeros((T,), jnp.float32)}
    eye = {"g": jnp.eye(T, dtype=jnp.float32)}
    for name, field in [("dwa", "steps_per_epoch"), ("stch", "steps_per_epoch"), ("stch", "warmup_epochs")]:
        tx = _inject(name)
        state = tx.init(p)
        _, state = jax.jit(tx.update)(eye, state, p, losses=jnp.ones(T))
        state.hyperparams[field] = jnp.asarray(-1 if field == "warmup_epochs" else 0)
        u, new = jax.jit(tx.update)(eye, state, p, losses=jnp.ones(T))
        assert bool(jnp.all(jnp.isnan(u["g"]))), (name, field)
        for a, b in zip(jax.tree.leaves(new.inner_state), jax.tree.leaves(state.inner_state)):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(ValueError, match=f"{name}: {field} must be an int"):
            tx.update(eye, state, p, losses=jnp.ones(T))


def test_find_state_errors_and_observe_noop():
    p = params_like()
    with pytest.raises(ValueError, match="no loss-weighting state"):
        lw.loss_weights(optax.adam(1.0).init(p), jnp.ones(T))
    two = optax.chain(get_method("ew", T), get_method("gls", T)).init(p)
    with pytest.raises(ValueError, match="2 loss-weighting states"):
        lw.loss_weights(two, jnp.ones(T))
    st = optax.chain(get_method("dwa", T), optax.sgd(1.0)).init(p)
    assert lw.observe_losses(st, jnp.ones(T)) is not None
    with pytest.raises(ValueError, match="losses"):
        lw.loss_weights(st)
    with pytest.raises(ValueError, match="key"):
        lw.loss_weights(get_method("rlw", T).init(p))


def test_weight_heads_false_sums_heads():
    g = task_grads(np.random.default_rng(7))
    p = params_like()
    tx = get_method("gls", T, weight_heads=False, shared=lambda path: path.startswith("trunk"))
    losses = jnp.array([1.0, 4.0, 9.0])
    out, _ = jax.jit(tx.update)(g, tx.init(p), p, losses=losses)
    w = np.asarray(lw.loss_weights(tx.init(p), losses))
    np.testing.assert_allclose(out["trunk"], np.tensordot(w, np.asarray(g["trunk"]), 1), rtol=1e-5)
    np.testing.assert_allclose(out["head"], np.asarray(g["head"]).sum(0), rtol=1e-5)
    with pytest.raises(ValueError, match="weight_heads=False needs grads='per_task'"):
        get_method("gls", T, weight_heads=False, grads="weighted")


# ------------------------------------------------------------------------------------------------
# Robustness, T = 1, state stability, errors.


@pytest.mark.parametrize("name", CHEAP)
def test_robust_scales_zero_grads_and_stable_state(name):
    rng = np.random.default_rng(8)
    p = params_like()
    tx = make(name, **({"steps_per_epoch": 1, "warmup_epochs": 0} if name == "stch" else {}))
    state0 = tx.init(p)
    leaves0 = jax.tree_util.tree_leaves(state0)
    assert len({id(x) for x in leaves0}) == len(leaves0)  # no shared buffers: the state can be donated
    upd = jax.jit(tx.update, donate_argnums=(1,))
    key = jax.random.PRNGKey(1)
    struct = jax.tree_util.tree_structure(state0)
    shapes = [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(state0)]
    state = state0
    for i, scale in enumerate([1e-10, 1e-5, 1.0, 1e5, 1e10, 0.0]):
        g = task_grads(rng, scale=scale)
        losses = jnp.asarray(rng.uniform(0.1, 2.0, T) * scale, jnp.float32)
        out, state = upd(g, state, p, losses=losses, key=jax.random.fold_in(key, i))
        for leaf, ref in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(p)):
            assert leaf.shape == ref.shape and leaf.dtype == ref.dtype
            assert np.all(np.isfinite(leaf)), (name, scale)
        if scale == 0.0:
            assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(out))
        assert jax.tree_util.tree_structure(state) == struct
        assert [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(state)] == shapes
        assert all(np.all(np.isfinite(np.asarray(x, np.float64))) for x in jax.tree_util.tree_leaves(state)
                   if jnp.issubdtype(x.dtype, jnp.floating))
    # bf16 updates come back in bf16
    gb = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), task_grads(rng))
    pb = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), p)
    out, _ = tx.update(gb, tx.init(pb), pb, losses=jnp.ones(T, jnp.bfloat16), key=key)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(out))


@pytest.mark.parametrize("name", CHEAP)
def test_single_task(name):
    rng = np.random.default_rng(9)
    tx = make(name, 1)
    p = params_like()
    g = task_grads(rng, num_tasks=1)
    out, state = jax.jit(tx.update)(g, tx.init(p), p, losses=jnp.array([0.7]), key=jax.random.PRNGKey(0))
    w = float(np.asarray(out["trunk"])[0] / np.asarray(g["trunk"])[0, 0])
    assert np.isfinite(w) and w > 0
    for leaf in jax.tree_util.tree_leaves(out):
        assert np.all(np.isfinite(leaf))


@pytest.mark.parametrize("name", METHODS)
def test_missing_args_and_bad_shapes(name):
    p = params_like()
    tx = make(name)
    s = tx.init(p)
    g = task_grads(np.random.default_rng(10))
    key = jax.random.PRNGKey(0)
    needs_losses = name not in ("ew", "rlw")
    needs_key = name in ("rlw", "igbv2")
    if needs_losses:
        with pytest.raises(ValueError, match="losses="):
            tx.update(g, s, p, key=key)
    if needs_key:
        with pytest.raises(ValueError, match="key="):
            tx.update(g, s, p, losses=jnp.ones(T))
    with pytest.raises(ValueError, match="losses must be a \\[T\\]"):
        tx.update(g, s, p, losses=jnp.ones(T + 1), key=key)
    # The cheap path's weights refuse a wrong task count too (before any weight is computed, so a [1]
    # vector cannot broadcast against the state's [T] arrays into a plausible-looking weighting).
    assert lw.find_loss_weighting_state(s).num_tasks == T
    for wrong in (1, T + 1):
        with pytest.raises(ValueError, match=f"losses has {wrong} entries but the method was built for {T} tasks"):
            lw.loss_weights(s, jnp.ones(wrong), key=key)
        with pytest.raises(ValueError, match=f"built for {T} tasks"):
            lw.weighted_loss(s, jnp.ones(wrong), key=key)
    with pytest.raises(ValueError, match="task axis"):
        tx.update({"trunk": g["trunk"][:2], "head": g["head"][:2]}, s, p, losses=jnp.ones(T), key=key)
    txw = make(name, grads="weighted")
    with pytest.raises(ValueError, match="grads='per_task'"):
        txw.update(g, txw.init(p), p, losses=jnp.ones(T), key=key)
    with pytest.raises(ValueError, match="grads"):
        make(name, grads="both")


def test_option_validation():
    with pytest.raises(ValueError, match="reduction"):
        get_method("ew", T, reduction="median")
    with pytest.raises(ValueError, match="distribution"):
        get_method("rlw", T, distribution="gamma")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        get_method("dwa", T, steps_per_epoch=0)
    with pytest.raises(ValueError, match="nadir"):
        get_method("stch", T, nadir=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="min_losses"):
        get_method("famo", T, min_losses=[0.0, 0.0])
    with pytest.raises(ValueError, match="num_tasks"):
        get_method("uw", 0)
    with pytest.raises(ValueError, match="sac_hidden"):
        get_method("igbv2", T, sac_hidden=())
