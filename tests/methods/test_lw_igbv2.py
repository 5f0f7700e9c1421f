"""IGBv2: the weights, base losses, replay buffer and SAC schedule against NumPy references.

One configuration and one compiled update serve most tests (the agent is costly to compile).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dbmtl_jax import loss_weighting as lw
from dbmtl_jax.methods import get_method

T = 3
EPS = 1e-8
CFG = dict(steps_per_epoch=2, base_epoch=1, start_epoch=3, update_after=2, update_every=2,
           buffer_size=8, sac_hidden=(16,), tau=0.25, reward_scale=2.0)
P = {"g": jnp.zeros((T,), jnp.float32)}
EYE = {"g": jnp.eye(T, dtype=jnp.float32)}  # Σ_t w_t e_t = w: the update is the weight vector


@functools.lru_cache(maxsize=None)
def tx_and_step():
    tx = get_method("igbv2", T, **CFG)
    return tx, jax.jit(tx.update)


def np_softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def np_actor(actor, s, noise):
    h = np.asarray(s, np.float64)
    for p in actor["trunk"]:
        h = np.maximum(h @ np.asarray(p["w"], np.float64) + np.asarray(p["b"], np.float64), 0)
    out = h @ np.asarray(actor["out"]["w"], np.float64) + np.asarray(actor["out"]["b"], np.float64)
    mu, log_std = out[:T], np.clip(out[T:], -20, 2)
    return T * np_softmax(mu + np.exp(log_std) * noise)


def run(seq, key):
    tx, step = tx_and_step()
    state = tx.init(P)
    states, ws = [state], []
    for i, l in enumerate(seq):
        u, state = step(EYE, state, P, losses=jnp.asarray(l, jnp.float32), key=jax.random.fold_in(key, i))
        ws.append(np.asarray(u["g"], np.float64))
        states.append(state)
    return np.array(ws), states


@functools.lru_cache(maxsize=None)
def trajectory():
    seq = np.random.default_rng(0).uniform(0.2, 3.0, size=(12, T)).astype(np.float32)
    key = jax.random.PRNGKey(42)
    ws, states = run(seq, key)
    return seq, key, ws, states


def test_weights_random_phase_then_actor():
    seq, key, ws, states = trajectory()
    spe, start = CFG["steps_per_epoch"], CFG["start_epoch"]
    for i, l in enumerate(seq):
        k_rand, k_act = jax.random.split(jax.random.fold_in(key, i))
        if i // spe < start:
            a = T * np_softmax(np.asarray(jax.random.normal(k_rand, (T,)), np.float64))
        else:
            noise = np.asarray(jax.random.normal(k_act, (1, T)), np.float64)[0]
            a = np_actor(states[i].sac.actor, l, noise)  # the actor before step i
        np.testing.assert_allclose(ws[i], a / (l + EPS), rtol=2e-5)
        np.testing.assert_allclose((ws[i] * (l + EPS)).sum(), T, rtol=1e-5)
        # the cheap path reads the same weights from the state
        np.testing.assert_allclose(
            lw.loss_weights(states[i], jnp.asarray(l), jax.random.fold_in(key, i)), ws[i], rtol=1e-6)


def test_base_losses_buffer_and_rewards():
    seq, key, ws, states = trajectory()
    spe, base_epoch, cap = CFG["steps_per_epoch"], CFG["base_epoch"], CFG["buffer_size"]
    base = seq[base_epoch * spe : (base_epoch + 1) * spe].mean(0)
    final = states[-1]
    np.testing.assert_allclose(final.base_losses, base, rtol=1e-6)
    assert int(final.base_count) == spe
    actions = ws * (seq + EPS)
    # transitions from the first step after the base epoch on, in a ring of `cap` slots
    rs = CFG["reward_scale"]
    trans = [(seq[k - 1], actions[k - 1], rs * np.min((seq[k - 1] - seq[k]) / base), seq[k])
             for k in range((base_epoch + 1) * spe, len(seq))]
    assert int(final.buf_size) == min(len(trans), cap)
    assert int(final.buf_ptr) == len(trans) % cap
    for j, (s, a, r, s2) in enumerate(trans[-cap:]):
        slot = (len(trans) - min(len(trans), cap) + j) % cap
        np.testing.assert_allclose(final.buf_state[slot], s, rtol=1e-6)
        np.testing.assert_allclose(final.buf_action[slot], a, rtol=1e-5)
        np.testing.assert_allclose(final.buf_reward[slot], r, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(final.buf_next[slot], s2, rtol=1e-6)
    # before the base is known nothing is stored
    assert int(states[(base_epoch + 1) * spe].buf_size) == 0


def test_sac_training_schedule_and_polyak():
    seq, key, ws, states = trajectory()
    spe, after, every, tau = CFG["steps_per_epoch"], CFG["update_after"], CFG["update_every"], CFG["tau"]
    trained = [k for k in range(len(seq)) if k >= after * spe and k % every == 0]
    assert int(states[-1].train_rounds) == len(trained) > 0
    assert int(states[-1].sac_skipped) == 0 and np.isfinite(float(states[-1].last_q_loss))
    for k in range(len(seq)):
        before, after_ = states[k].sac, states[k + 1].sac
        changed = not np.array_equal(before.actor["out"]["w"], after_.actor["out"]["w"])
        assert changed == (k in trained), k
        if k in trained:
            # one SAC iteration per round here (⌊update_every κ / 2⌋ = 1): exact Polyak averaging
            for c, t_old, t_new in zip(jax.tree_util.tree_leaves(after_.critic),
                                       jax.tree_util.tree_leaves(before.critic_target),
                                       jax.tree_util.tree_leaves(after_.critic_target)):
                np.testing.assert_allclose(t_new, tau * np.asarray(c) + (1 - tau) * np.asarray(t_old),
                                           rtol=1e-5, atol=1e-7)
            assert float(after_.log_alpha) != float(before.log_alpha)


def test_reproducible_from_key():
    seq, key, ws, states = trajectory()
    ws2, states2 = run(seq, key)
    np.testing.assert_array_equal(ws, ws2)
    for a, b in zip(jax.tree_util.tree_leaves(states[-1]), jax.tree_util.tree_leaves(states2[-1])):
        np.testing.assert_array_equal(a, b)
    ws3, _ = run(seq[:3], jax.random.PRNGKey(7))
    assert not np.allclose(ws3, ws[:3])


def test_weighted_mode_passes_gradient_through_and_advances_identically():
    seq, key, ws, states = trajectory()
    tx_w = get_method("igbv2", T, grads="weighted", **CFG)
    step_w = jax.jit(tx_w.update)
    state = tx_w.init(P)
    for i, l in enumerate(seq):
        g = {"g": jnp.asarray(ws[i] * l, jnp.float32)}  # e.g. the gradient of Σ w ℓ for some model
        out, state = step_w(g, state, P, losses=jnp.asarray(l), key=jax.random.fold_in(key, i))
        np.testing.assert_array_equal(out["g"], g["g"])
        for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(states[i + 1])):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_robust_scales_and_stable_state():
    tx, step = tx_and_step()
    rng = np.random.default_rng(1)
    state0 = tx.init(P)
    leaves0 = jax.tree_util.tree_leaves(state0)
    assert len({id(x) for x in leaves0}) == len(leaves0)  # no shared buffers: the state can be donated
    struct = jax.tree_util.tree_structure(state0)
    shapes = [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(state0)]
    state = state0
    for i, scale in enumerate([1e-10, 1e-5, 1.0, 1e5, 1e10, 1e10, 0.0, 1e-10, 1.0, 1e10]):
        g = {"g": jnp.asarray(rng.normal(size=(T, T)) * scale, jnp.float32)}
        losses = jnp.asarray(rng.uniform(0.1, 2.0, T) * scale, jnp.float32)
        out, state = step(g, state, P, losses=losses, key=jax.random.PRNGKey(i))
        assert np.all(np.isfinite(out["g"])), scale
        if scale == 0.0:
            np.testing.assert_array_equal(out["g"], 0.0)
        assert jax.tree_util.tree_structure(state) == struct
        assert [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(state)] == shapes
        for x in jax.tree_util.tree_leaves(state):
            if jnp.issubdtype(x.dtype, jnp.floating):
                assert np.all(np.isfinite(x)), scale
    assert int(state.train_rounds) > 0


def test_single_task():
    tx = get_method("igbv2", 1, steps_per_epoch=1, start_epoch=0, buffer_size=4, sac_hidden=(4,))
    p = {"g": jnp.zeros((1,))}
    out, _ = jax.jit(tx.update)({"g": jnp.ones((1, 1))}, tx.init(p), p, losses=jnp.array([0.5]),
                                key=jax.random.PRNGKey(0))
    # Σ a = T = 1: the weight of the single log loss is 1 / (ℓ + ε)
    np.testing.assert_allclose(out["g"], [1 / (0.5 + EPS)], rtol=1e-6)


def test_inject_hyperparams_epoch_fields_and_reward_scale_act_in_their_update():
    """The integer schedule fields and reward_scale injected by optax.inject_hyperparams (set by hand in
    state.hyperparams before the first update) are the ones that update uses: the trajectory equals the
    plain transform built with those values."""
    import optax

    from dbmtl_jax.methods import get_factory

    seq, key, ws, states = trajectory()
    wrong = dict(steps_per_epoch=1, base_epoch=0, start_epoch=6, update_after=5, update_every=3, reward_scale=1.0)
    tx = optax.inject_hyperparams(get_factory("igbv2"), static_args=("num_tasks", "buffer_size", "seed"))(
        num_tasks=T, **{**CFG, **wrong})
    state = tx.init(P)
    state.hyperparams.update({k: jnp.asarray(CFG[k]) for k in wrong})
    step = jax.jit(tx.update)
    for i, l in enumerate(seq):
        u, state = step(EYE, state, P, losses=jnp.asarray(l, jnp.float32), key=jax.random.fold_in(key, i))
        np.testing.assert_allclose(np.asarray(u["g"], np.float64), ws[i], rtol=1e-6, err_msg=str(i))
    for a, b in zip(jax.tree_util.tree_leaves(state.inner_state), jax.tree_util.tree_leaves(states[-1])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
