"""IGBv2: improvable gap balancing with a soft actor-critic weighting agent.

Reference: Y. Dai, N. Fei, Z. Lu, "Improvable Gap Balancing for Multi-Task
Learning", UAI, 2023 (official code ``YanqiDai/IGB4MTL``,
``ImprovableGapBalancing_v2``).

IGBv2 weights the *log* losses, ``L = Σ_t a_t log(ℓ_t + ε)``, so the update is
``Σ_t w_t ∇ℓ_t`` with ``w_t = a_t / (ℓ_t + ε)`` (losses clamped at 0).  The
action ``a`` (``Σ_t a_t = T``) comes from

* epochs ``e < start_epoch`` (5): random weights ``a = T softmax(N(0, I))``;
* later: a soft actor-critic (SAC) agent whose state is the current batch
  losses: ``a = T softmax(u)``, ``u ~ N(μ(ℓ), σ(ℓ))`` (a stochastic action).

Base losses ``ℓ^base`` are the mean training losses of epoch ``base_epoch``
(1).  From the epoch after it on, every step stores the transition
``(ℓ_prev, a_prev, r, ℓ)`` with the reward
``r = reward_scale · min_t (ℓ_prev,t − ℓ_t) / ℓ^base_t`` (the improvable-gap
reduction of the worst task) in a replay buffer (``buffer_size`` 10⁴).  From
epoch ``update_after`` (3) on, every ``update_every`` (50) steps the agent
trains for ``⌊update_every κ / 2⌋`` SAC iterations, ``κ = 1 + size/capacity``,
each on ``⌊256 κ / 2⌋`` samples (drawn with replacement): twin Q critics with
Polyak-averaged targets (τ = 0.005, discount 0.99), an entropy-regularised
actor, an adaptive temperature (α₀ = 0.2, target entropy −T), Adam with
learning rate 3e-4 for all, two hidden ReLU layers of 128 units.  These are
the official code's values; the log-density correction of the official actor
(written for a tanh squashing although the action is a softmax) is kept.

Deviations, all forced by a pure, fixed-shape Optax state or by the cheap path:

* an *epoch* is ``steps_per_epoch`` consecutive updates (default 1: set it to
  the number of batches per epoch);
* the SAC training round of a step runs at the end of ``update``, after the
  step's action was drawn (the official code trains first, then acts); the
  action of a training step therefore comes from the previous actor;
* the SAC minibatch has a fixed shape (256 rows, of which the official
  ``⌊256 κ / 2⌋`` enter the losses);
* ``reward_scale`` is a hyperparameter (official: ``lr₀ / lr_current`` of the
  model's learning-rate schedule); to follow a schedule, wrap the factory in
  ``optax.inject_hyperparams`` (the value injected for an update is the one
  that update uses, as for every hyperparameter stored in the state);
* the networks are initialised from ``seed`` (PyTorch ``nn.Linear`` scheme,
  drawn with NumPy).

All randomness (the action, the SAC minibatches and noise) comes from the
``key`` passed to ``update``; :func:`dbmtl_jax.loss_weighting.loss_weights`
with the same key gives the same action.  Every leaf, shared or head, gets
the weighting.  This is a reimplementation from the paper and the official
code's description; results of the original PyTorch agent are not bit-for-bit
reproducible (different random streams).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import jax.scipy.special
import numpy as np
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _loss_common as lc
from dbmtl_jax.methods import _numerics as nm

__all__ = ["IGBv2State", "SACState", "igbv2"]

_LOG_STD_MIN, _LOG_STD_MAX = -20.0, 2.0
# Official SAC minibatch: int(256 κ / 2) rows, κ = 1 + size / capacity ∈ [1, 2]; sampled as 256
# rows of which the first int(256 κ / 2) are used (a fixed shape under jit).
_SAC_BATCH = 256


class SACState(NamedTuple):
    """The SAC agent of IGBv2: networks, target critic, temperature and their Adam states."""

    actor: Any
    critic: Any
    critic_target: Any
    log_alpha: chex.Array
    actor_opt: Any
    critic_opt: Any
    alpha_opt: Any


class IGBv2State(NamedTuple):
    """State of :func:`igbv2`.

    Attributes:
      count: number of updates applied (int32 scalar); the epoch is ``count // steps_per_epoch``.
      base_losses: running mean of the losses of epoch ``base_epoch`` (``[T]``).
      base_count: steps averaged into ``base_losses`` (int32 scalar).
      prev_losses, prev_action: the last step's losses and action (``[T]``).
      buf_state, buf_action, buf_reward, buf_next: the replay buffer
        (``[N, T]``, ``[N, T]``, ``[N]``, ``[N, T]``).
      buf_ptr, buf_size: ring-buffer write position and fill (int32 scalars).
      sac: the agent (:class:`SACState`).
      train_rounds: SAC training rounds run so far (int32 scalar).
      last_q_loss: critic loss of the last SAC iteration (float32, for logging).
      sac_skipped: SAC iterations discarded because they produced a non-finite
        loss, parameter or Adam moment (int32 scalar; the agent is left as before).
      steps_per_epoch, base_epoch, start_epoch, update_after, update_every: schedule (int32).
      eps, reward_scale, sac_lr, discount, tau: float32 hyperparameters.
    """

    count: chex.Array
    base_losses: chex.Array
    base_count: chex.Array
    prev_losses: chex.Array
    prev_action: chex.Array
    buf_state: chex.Array
    buf_action: chex.Array
    buf_reward: chex.Array
    buf_next: chex.Array
    buf_ptr: chex.Array
    buf_size: chex.Array
    sac: SACState
    train_rounds: chex.Array
    last_q_loss: chex.Array
    sac_skipped: chex.Array
    steps_per_epoch: chex.Array
    base_epoch: chex.Array
    start_epoch: chex.Array
    update_after: chex.Array
    update_every: chex.Array
    eps: chex.Array
    reward_scale: chex.Array
    sac_lr: chex.Array
    discount: chex.Array
    tau: chex.Array

    needs_losses = True
    needs_key = True

    @property
    def num_tasks(self) -> int:
        """``T``, the length of ``prev_losses``."""
        return self.prev_losses.shape[0]

    def epoch(self) -> jax.Array:
        return self.count // self.steps_per_epoch

    def action(self, losses: jax.Array, key: jax.Array) -> jax.Array:
        """The action ``a`` (``Σ a = T``): random before ``start_epoch``, the SAC actor's sample after."""
        t = losses.shape[0]
        k_rand, k_act = jax.random.split(key)
        rand = t * jax.nn.softmax(jax.random.normal(k_rand, (t,), jnp.float32))
        noise = jax.random.normal(k_act, (1, t), jnp.float32)
        act, _ = _actor_sample(self.sac.actor, losses.astype(jnp.float32)[None], noise)
        return jnp.where(self.epoch() < self.start_epoch, rand, act[0])

    def loss_weights(self, losses: Optional[jax.Array] = None, key: Optional[jax.Array] = None) -> jax.Array:
        """``w_t = a_t / (max(ℓ_t, 0) + ε)``: the gradient weights of ``Σ_t a_t log(ℓ_t + ε)``."""
        a = self.action(losses, key)
        return a / (jnp.maximum(losses.astype(jnp.float32), 0.0) + self.eps)

    def advance(
        self, losses: Optional[jax.Array], key: Optional[jax.Array], **extra_args: Any
    ) -> "IGBv2State":
        del extra_args
        losses = losses.astype(jnp.float32)
        action = self.action(losses, key)
        epoch = self.epoch()
        n = self.buf_state.shape[0]

        # Base losses: the running mean over epoch `base_epoch`.
        acc = epoch == self.base_epoch
        k = self.base_count.astype(jnp.float32) + 1.0
        base = jnp.where(acc, self.base_losses + (losses - self.base_losses) / k, self.base_losses)
        base_count = jnp.where(acc, self.base_count + 1, self.base_count)

        # Replay buffer: (prev losses, prev action, reward, losses) once the base is known.
        add = (epoch > self.base_epoch) & (self.count > 0)
        safe_base = jnp.where(self.base_losses > 0, self.base_losses, 1.0)
        reward = self.reward_scale * jnp.min((self.prev_losses - losses) / safe_base)
        reward = jnp.where(jnp.isfinite(reward), reward, 0.0)
        ptr = self.buf_ptr

        def put(buf: jax.Array, row: jax.Array) -> jax.Array:
            buf = jnp.asarray(buf)  # a restored checkpoint may hold NumPy arrays (no .at)
            return buf.at[ptr].set(jnp.where(add, row, buf[ptr]))

        s = self._replace(
            base_losses=base,
            base_count=base_count,
            buf_state=put(self.buf_state, self.prev_losses),
            buf_action=put(self.buf_action, self.prev_action),
            buf_reward=put(self.buf_reward, reward),
            buf_next=put(self.buf_next, losses),
            buf_ptr=jnp.where(add, (ptr + 1) % n, ptr),
            buf_size=jnp.where(add, jnp.minimum(self.buf_size + 1, n), self.buf_size),
        )

        # SAC training round.
        train = (
            (self.count >= self.update_after * self.steps_per_epoch)
            & (self.count % self.update_every == 0)
            & (s.buf_size > 0)
        )
        sac, q_loss, skipped = jax.lax.cond(
            train,
            lambda: _train_round(s, jax.random.fold_in(key, 1)),
            lambda: (s.sac, s.last_q_loss, s.sac_skipped),
        )
        return s._replace(
            count=optax.safe_increment(self.count),
            prev_losses=losses,
            prev_action=action,
            sac=sac,
            train_rounds=jnp.where(train, s.train_rounds + 1, s.train_rounds),
            last_q_loss=q_loss,
            sac_skipped=skipped,
        )


# ----------------------------------------------------------------------------------------------
# The SAC agent (pure functions of parameter pytrees).


def _linear_init(rng: np.random.Generator, fan_in: int, fan_out: int) -> dict:
    """PyTorch ``nn.Linear`` initialisation: U(±1/√fan_in) for weights and bias."""
    bound = 1.0 / math.sqrt(fan_in)
    return {
        "w": rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32),
        "b": rng.uniform(-bound, bound, (fan_out,)).astype(np.float32),
    }


def _mlp_init(rng: np.random.Generator, sizes: list[int]) -> list:
    return [_linear_init(rng, a, b) for a, b in zip(sizes[:-1], sizes[1:])]


def _dense(p: dict, x: jax.Array) -> jax.Array:
    return x @ p["w"] + p["b"]


def _actor_init(rng: np.random.Generator, num_tasks: int, hidden: tuple[int, ...]) -> dict:
    """Actor MLP; its output layer holds the μ and log σ heads side by side (``2T`` outputs)."""
    trunk = _mlp_init(rng, [num_tasks, *hidden])
    mu, log_std = _linear_init(rng, hidden[-1], num_tasks), _linear_init(rng, hidden[-1], num_tasks)
    return {"trunk": trunk, "out": {k: np.concatenate([mu[k], log_std[k]], axis=-1) for k in mu}}


def _actor_sample(actor: dict, state: jax.Array, noise: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reparameterised action ``T softmax(μ + σ ε)`` and the official log-density; ``state`` is ``[B, T]``."""
    h = state
    for p in actor["trunk"]:
        h = jax.nn.relu(_dense(p, h))
    t = state.shape[-1]
    out = _dense(actor["out"], h)
    mu, log_std = out[..., :t], jnp.clip(out[..., t:], _LOG_STD_MIN, _LOG_STD_MAX)
    u = mu + jnp.exp(log_std) * noise
    a = t * jax.nn.softmax(u, axis=-1)
    normal_logp = -0.5 * jnp.square(noise) - log_std - 0.5 * math.log(2 * math.pi)
    correction = 2.0 * (math.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    logp = jnp.sum(normal_logp - correction, axis=-1)
    return a, logp


def _critic_init(rng: np.random.Generator, num_tasks: int, hidden: tuple[int, ...]) -> list:
    """The twin Q networks, stacked: every layer has a leading axis of size 2 (Q1, Q2)."""
    sizes = [2 * num_tasks, *hidden, 1]
    q1, q2 = _mlp_init(rng, sizes), _mlp_init(rng, sizes)
    return [{k: np.stack([a[k], b[k]]) for k in a} for a, b in zip(q1, q2)]


def _critic(critic: list, state: jax.Array, action: jax.Array) -> jax.Array:
    """``[2, B]``: Q1 and Q2 of the ``[B, T]`` states and actions."""
    x = jnp.concatenate([state, action], axis=-1)
    x = jnp.broadcast_to(x, (2,) + x.shape)
    for i, p in enumerate(critic):
        x = jnp.einsum("kbi,kio->kbo", x, p["w"]) + p["b"][:, None, :]
        if i < len(critic) - 1:
            x = jax.nn.relu(x)
    return x[..., 0]


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the used rows (the last axis) and any leading axes."""
    lead = math.prod(x.shape[:-1])
    return jnp.sum(x * mask) / (lead * jnp.maximum(jnp.sum(mask), 1.0))


def _train_round(s: IGBv2State, key: jax.Array) -> tuple[SACState, jax.Array, jax.Array]:
    """``⌊update_every κ / 2⌋`` SAC iterations on the replay buffer (official schedule)."""
    n, t = s.buf_state.shape
    batch = _SAC_BATCH
    kappa = 1.0 + s.buf_size.astype(jnp.float32) / n
    iters = jnp.floor(s.update_every.astype(jnp.float32) * kappa / 2).astype(jnp.int32)
    used = jnp.floor(256.0 * kappa / 2)
    mask = (jnp.arange(batch) < used).astype(jnp.float32)
    target_entropy = -float(t)
    lr = s.sac_lr
    adam = optax.adam(lr)

    def one(i: jax.Array, carry: tuple[SACState, jax.Array, jax.Array]) -> tuple[SACState, jax.Array, jax.Array]:
        sac, _, skipped = carry
        # One draw per iteration: uniform row indices and two standard-normal noise blocks.
        unif = jax.random.uniform(jax.random.fold_in(key, i), (batch, 1 + 2 * t), jnp.float32)
        size = jnp.maximum(s.buf_size, 1)
        idx = jnp.minimum(jnp.floor(unif[:, 0] * size).astype(jnp.int32), size - 1)
        gauss = jax.scipy.special.ndtri(jnp.clip(unif[:, 1:], 1e-7, 1 - 1e-7))
        noise_next, noise = gauss[:, :t], gauss[:, t:]
        st, ac, rw, nx = s.buf_state[idx], s.buf_action[idx], s.buf_reward[idx], s.buf_next[idx]
        alpha = jnp.exp(sac.log_alpha)

        # Critic.
        a2, logp2 = _actor_sample(sac.actor, nx, noise_next)
        tq = _critic(sac.critic_target, nx, a2)
        target = jax.lax.stop_gradient(rw + s.discount * (jnp.min(tq, axis=0) - alpha * logp2))

        def q_loss_fn(critic: list) -> jax.Array:
            # mse(Q1, target) + mse(Q2, target)
            return 2.0 * _masked_mean(jnp.square(_critic(critic, st, ac) - target), mask)

        q_loss, g_c = jax.value_and_grad(q_loss_fn)(sac.critic)
        upd, critic_opt = adam.update(g_c, sac.critic_opt, sac.critic)
        critic = optax.apply_updates(sac.critic, upd)

        # Actor (against the updated critic).

        def a_loss_fn(actor: dict) -> tuple[jax.Array, jax.Array]:
            a, logp = _actor_sample(actor, st, noise)
            return _masked_mean(alpha * logp - jnp.min(_critic(critic, st, a), axis=0), mask), logp

        (_, logp), g_a = jax.value_and_grad(a_loss_fn, has_aux=True)(sac.actor)
        upd, actor_opt = adam.update(g_a, sac.actor_opt, sac.actor)
        actor = optax.apply_updates(sac.actor, upd)

        # Temperature.
        g_alpha = -_masked_mean(jax.lax.stop_gradient(logp) + target_entropy, mask)
        upd, alpha_opt = adam.update(g_alpha, sac.alpha_opt, sac.log_alpha)
        log_alpha = optax.apply_updates(sac.log_alpha, upd)

        critic_target = jax.tree_util.tree_map(
            lambda p, q: s.tau * p + (1 - s.tau) * q, critic, sac.critic_target
        )
        new = SACState(actor, critic, critic_target, log_alpha, actor_opt, critic_opt, alpha_opt)
        # Never let a diverged iteration (a non-finite loss, parameter or Adam moment) into the
        # state: it is dropped and counted in `sac_skipped`.
        zero = sum(jnp.sum(x * 0) for x in jax.tree_util.tree_leaves(new) if jnp.issubdtype(x.dtype, jnp.floating))
        ok = jnp.isfinite(q_loss) & (zero == 0)  # x * 0 is NaN exactly for a non-finite x
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, sac)
        return new, q_loss.astype(jnp.float32), skipped + (~ok).astype(jnp.int32)

    return jax.lax.fori_loop(0, iters, one, (s.sac, s.last_q_loss, s.sac_skipped))


def _init_sac(seed: int, init_alpha: float, num_tasks: int, hidden: tuple[int, ...]) -> SACState:
    """The initial agent, drawn with NumPy from ``seed`` (no compilation at init)."""
    rng = np.random.default_rng(seed)
    to_jnp = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)  # noqa: E731
    actor = _actor_init(rng, num_tasks, hidden)
    critic = _critic_init(rng, num_tasks, hidden)
    log_alpha = np.float32(math.log(init_alpha))

    adam = optax.adam(1.0)  # Adam's state does not depend on the learning rate
    sac = SACState(
        actor=to_jnp(actor),
        critic=to_jnp(critic),
        critic_target=to_jnp(critic),
        log_alpha=jnp.asarray(log_alpha),
        actor_opt=adam.init(to_jnp(actor)),
        critic_opt=adam.init(to_jnp(critic)),
        alpha_opt=adam.init(jnp.asarray(log_alpha)),
    )
    return sac


def igbv2(
    num_tasks: int,
    *,
    steps_per_epoch: int = 1,
    base_epoch: int = 1,
    start_epoch: int = 5,
    update_after: int = 3,
    update_every: int = 50,
    buffer_size: int = 10_000,
    sac_lr: float = 3e-4,
    sac_hidden: tuple[int, ...] = (128, 128),
    discount: float = 0.99,
    tau: float = 0.005,
    init_alpha: float = 0.2,
    reward_scale: float = 1.0,
    eps: float = 1e-8,
    seed: int = 0,
    grads: str = "per_task",
    weight_heads: bool = True,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """Improvable gap balancing v2 (IGBv2).

    Args:
      num_tasks: ``T``.
      steps_per_epoch: ``update`` calls per epoch (positive int).
      base_epoch: epoch whose mean losses are the base losses (int >= 0; official 1).
      start_epoch: random weights before this epoch, the agent after (int >= 0; official 5).
      update_after: first epoch with SAC training (int >= 0; official 3).
      update_every: steps between SAC training rounds (int >= 1; official 50).
      buffer_size: replay buffer capacity (int >= 1; official 10⁴).
      sac_lr: Adam learning rate of actor, critic and temperature (>= 0; official 3e-4).
      sac_hidden: hidden layer widths of actor and critics (positive ints; official (128, 128)).
      discount, tau, init_alpha: SAC discount in ``[0, 1]``, Polyak rate in ``(0, 1]``
        (0 would freeze the target critic), initial temperature ``> 0``.
      reward_scale: reward multiplier ``> 0`` (official ``lr₀ / lr_current``; see the module
        docstring for schedules; a negative value would reward the worst task's increase).
      eps: ``ε > 0`` of the log losses.
      seed: initialisation seed of the networks (int >= 0).
      grads: ``"per_task"`` or ``"weighted"`` (see :mod:`dbmtl_jax.loss_weighting`).
      weight_heads: in ``"per_task"`` mode, weight head leaves too (default).
      shared: which leaves are shared (used only when ``weight_heads=False``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` requires
      ``losses=`` and ``key=``.
    """
    nm.check_num_tasks(num_tasks, "igbv2")
    # the integer fields' smallest valid values: checked here, and per step when injected (make_loss_transform)
    int_minimum = dict(steps_per_epoch=1, base_epoch=0, start_epoch=0, update_after=0, update_every=1)
    int_hp = {k: nm.check_int(v, k, "igbv2", lo=int_minimum[k]) for k, v in dict(
        steps_per_epoch=steps_per_epoch, base_epoch=base_epoch, start_epoch=start_epoch, update_after=update_after,
        update_every=update_every).items()}
    buffer_size = nm.check_int(nm.check_static(buffer_size, "buffer_size", "igbv2", "it sizes the replay buffer"),
                               "buffer_size", "igbv2", lo=1)
    seed = nm.check_int(nm.check_static(seed, "seed", "igbv2", "NumPy draws the initial agent from it"),
                        "seed", "igbv2", lo=0)
    if not isinstance(sac_hidden, (tuple, list)):
        raise TypeError(f"igbv2: sac_hidden must be a tuple of positive ints, got {sac_hidden!r}.")
    sac_hidden = tuple(sac_hidden)
    if not sac_hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in sac_hidden):
        raise ValueError(f"igbv2: sac_hidden must be a non-empty tuple of positive ints, got {sac_hidden!r}.")
    sac_lr = nm.check_real(sac_lr, "sac_lr", "igbv2", lo=0)
    discount = nm.check_real(discount, "discount", "igbv2", lo=0, hi=1)
    tau = nm.check_real(tau, "tau", "igbv2", lo=0, hi=1, lo_open=True, note="0 freezes the target critic")
    init_alpha = nm.check_real(init_alpha, "init_alpha", "igbv2", lo=0, lo_open=True,
                               note="its log is the initial log-temperature")
    reward_scale = nm.check_real(reward_scale, "reward_scale", "igbv2", lo=0, lo_open=True)
    eps = nm.check_real(eps, "eps", "igbv2", lo=0, lo_open=True)
    hp = dict(eps=eps, reward_scale=reward_scale, sac_lr=sac_lr, discount=discount, tau=tau)

    def init_state() -> IGBv2State:
        sac = _init_sac(seed, init_alpha, num_tasks, sac_hidden)
        z = jnp.zeros([num_tasks], jnp.float32)
        zb = jnp.zeros([buffer_size, num_tasks], jnp.float32)
        i0 = jnp.zeros([], jnp.int32)
        i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
        return IGBv2State(
            count=i0,
            base_losses=z,
            base_count=i0,
            prev_losses=z,
            prev_action=jnp.ones([num_tasks], jnp.float32),
            buf_state=zb,
            buf_action=zb,
            buf_reward=jnp.zeros([buffer_size], jnp.float32),
            buf_next=zb,
            buf_ptr=i0,
            buf_size=i0,
            sac=sac,
            train_rounds=i0,
            last_q_loss=jnp.zeros([], jnp.float32),
            sac_skipped=i0,
            **{k: i32(v) for k, v in int_hp.items()},
            **{k: lc.f32(v) for k, v in hp.items()},
        )

    return lc.make_loss_transform(
        num_tasks, "igbv2", init_state, {**hp, **int_hp}, grads=grads, weight_heads=weight_heads, shared=shared,
        int_minimum=int_minimum,
    )
