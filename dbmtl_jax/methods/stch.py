"""STCH: smooth Tchebycheff scalarisation of the (log, nadir-normalised) task losses.

Reference: X. Lin, X. Zhang, Z. Yang, F. Liu, Z. Wang, Q. Zhang, "Smooth
Tchebycheff Scalarization for Multi-Objective Optimization", ICML, 2024.

The smooth Tchebycheff scalarisation of objectives ``f_t`` with ideal point
``z*``, preference ``λ`` and smoothing ``μ`` is
``μ log Σ_t exp(λ_t (f_t − z*_t) / μ)``.  For multi-task learning the official
code (``Xi-L/STCH``, ``STCH_MTL``, also in LibMTL) uses::

    u_t = log(ℓ_t / n_t + ε),      L = T μ log Σ_t exp(u_t / μ)

with ``λ = 1`` and the nadir vector ``n`` = the mean training losses of one
epoch; the ideal point is 0 in this log space (a common shift of every
``u_t`` cancels in the softmax, so only the per-task nadir normalisation
matters).  Training runs in three phases over *epochs* of ``steps_per_epoch``
updates:

* epochs ``e < warmup_epochs``: ``L = Σ_t log(ℓ_t + ε)`` (log-loss warm-up);
* epoch ``e = warmup_epochs``: the same, while the losses are averaged into ``n``;
* later epochs: the STCH objective above with the fixed ``n``.

The update is ``∇L = Σ_t w_t ∇ℓ_t`` with ``w_t = 1 / (ℓ_t + ε)`` in the first
two phases and ``w_t = T softmax(u / μ)_t / (ℓ_t + ε n_t)`` afterwards; the
denominators are floored at ``ε`` and losses clamped at 0, so the weights stay
finite (``≤ T/ε``) for zero losses.  Passing ``nadir=`` skips the warm-up and
uses STCH with that nadir from the first step.

Numerics: a memorised training set drives float32 losses to exactly 0 while
their gradients stay nonzero (a cross-entropy whose margins pass ~17 rounds to
0; its gradient ``softmax − onehot`` does not).  When *every* task loss of a
batch rounds to 0 the softmax is uniform and each weight is ``1/ε``: with the
official ``ε = 1e-20`` one step then hands Adam a gradient ~1e14 times too large
(a maximal step on every parameter, and a second moment that takes ~5e4 steps to
decay), which the run does not recover from.  Use ``eps=1e-8`` (the ``ε`` of
DB-MTL's log transform) when training losses can reach 0; results/README.md
(§31) has the trace and the runs.

Defaults from the official code: ``μ = 1``, ``warmup_epochs = 4``,
``ε = 1e-20``.  ``steps_per_epoch`` (default 1) must be set to the number of
batches per epoch to reproduce it.  Every leaf, shared or head, gets the
weighting (it is the gradient of ``L``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _loss_common as lc
from dbmtl_jax.methods import _numerics as nm

__all__ = ["STCHState", "stch"]

_NADIR_FLOOR = 1e-30


class STCHState(NamedTuple):
    """State of :func:`stch`.

    Attributes:
      count: number of updates applied (int32 scalar); the current epoch is
        ``count // steps_per_epoch``.
      nadir: the nadir vector ``n`` (``[T]`` float32): the running mean of the
        losses of epoch ``warmup_epochs`` (or the user's nadir).
      nadir_count: how many steps were averaged into ``nadir`` (int32 scalar).
      fixed_nadir: True when the nadir was given (bool scalar).
      mu: smoothing ``μ`` (float32 scalar).
      eps: ``ε`` (float32 scalar).
      steps_per_epoch: updates per epoch (int32 scalar).
      warmup_epochs: log-loss warm-up epochs (int32 scalar).
    """

    count: chex.Array
    nadir: chex.Array
    nadir_count: chex.Array
    fixed_nadir: chex.Array
    mu: chex.Array
    eps: chex.Array
    steps_per_epoch: chex.Array
    warmup_epochs: chex.Array

    needs_losses = True
    needs_key = False

    @property
    def num_tasks(self) -> int:
        """``T``, the length of ``nadir``."""
        return self.nadir.shape[0]

    def phase(self) -> tuple[jax.Array, jax.Array]:
        """``(use_stch, accumulate)`` booleans for the current step."""
        epoch = self.count // self.steps_per_epoch
        use_stch = self.fixed_nadir | (epoch > self.warmup_epochs)
        accumulate = (~self.fixed_nadir) & (epoch == self.warmup_epochs)
        return use_stch, accumulate

    def loss_weights(self, losses: Optional[jax.Array] = None, key: Optional[jax.Array] = None) -> jax.Array:
        """``1/(ℓ+ε)`` during warm-up, ``T softmax(u/μ)_t / (ℓ_t + ε n_t)`` afterwards."""
        del key
        lp = jnp.maximum(losses.astype(jnp.float32), 0.0)
        t = lp.shape[0]
        warm = 1.0 / jnp.maximum(lp + self.eps, self.eps)
        n = jnp.maximum(self.nadir, _NADIR_FLOOR)
        # u = log(ℓ/n + ε) in log space: no overflow of ℓ/n for a tiny nadir.
        u = jnp.logaddexp(jnp.log(lp) - jnp.log(n), jnp.log(self.eps))
        soft = jax.nn.softmax(u / self.mu)
        tch = t * soft / jnp.maximum(lp + self.eps * n, self.eps)
        use_stch, _ = self.phase()
        return jnp.where(use_stch, tch, warm)

    def advance(self, losses: Optional[jax.Array], key: Optional[jax.Array], **extra_args: Any) -> "STCHState":
        del key, extra_args
        _, accumulate = self.phase()
        lp = jnp.maximum(losses.astype(jnp.float32), 0.0)
        k = self.nadir_count.astype(jnp.float32) + 1.0
        running = self.nadir + (lp - self.nadir) / k
        return self._replace(
            count=optax.safe_increment(self.count),
            nadir=jnp.where(accumulate, running, self.nadir),
            nadir_count=jnp.where(accumulate, optax.safe_increment(self.nadir_count), self.nadir_count),
        )


def stch(
    num_tasks: int,
    *,
    mu: float = 1.0,
    warmup_epochs: int = 4,
    steps_per_epoch: int = 1,
    nadir: Optional[Any] = None,
    eps: float = 1e-20,
    grads: str = "per_task",
    weight_heads: bool = True,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """Smooth Tchebycheff scalarisation (STCH).

    Args:
      num_tasks: ``T``.
      mu: smoothing parameter ``μ > 0`` (official default 1).
      warmup_epochs: log-loss warm-up epochs before the nadir epoch (int >= 0; official 4).
      steps_per_epoch: number of ``update`` calls per epoch (positive int).
      nadir: optional positive, finite ``[T]`` nadir vector; when given, STCH is
        used from the first step and no warm-up is run.
      eps: ``ε > 0`` inside the log (official 1e-20).
      grads: ``"per_task"`` or ``"weighted"`` (see :mod:`dbmtl_jax.loss_weighting`).
      weight_heads: in ``"per_task"`` mode, weight head leaves too (default).
      shared: which leaves are shared (used only when ``weight_heads=False``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``losses=``.
    """
    nm.check_num_tasks(num_tasks, "stch")
    int_minimum = {"steps_per_epoch": 1, "warmup_epochs": 0}  # also checked per step when injected
    steps_per_epoch = nm.check_int(steps_per_epoch, "steps_per_epoch", "stch", lo=int_minimum["steps_per_epoch"])
    warmup_epochs = nm.check_int(warmup_epochs, "warmup_epochs", "stch", lo=int_minimum["warmup_epochs"])
    mu = nm.check_real(mu, "mu", "stch", lo=0, lo_open=True)
    eps = nm.check_real(eps, "eps", "stch", lo=0, lo_open=True)
    if nadir is not None:
        if np.shape(nadir) != (num_tasks,):
            raise ValueError(f"stch: nadir must have shape ({num_tasks},), got {np.shape(nadir)}.")
        nadir = nm.check_real(nadir, "nadir", "stch", lo=0, lo_open=True, shapes=((num_tasks,),), note="it divides the losses")
    hp = dict(mu=mu, eps=eps, steps_per_epoch=steps_per_epoch, warmup_epochs=warmup_epochs)
    if nadir is not None:  # a given nadir is a hyperparameter (an accumulated one is learned state)
        hp["nadir"] = nadir

    def init_state() -> STCHState:
        return STCHState(
            count=jnp.zeros([], jnp.int32),
            nadir=jnp.zeros([num_tasks], jnp.float32) if nadir is None else jnp.asarray(nadir, jnp.float32),
            nadir_count=jnp.zeros([], jnp.int32),
            fixed_nadir=jnp.asarray(nadir is not None),
            mu=lc.f32(mu),
            eps=lc.f32(eps),
            steps_per_epoch=jnp.asarray(steps_per_epoch, jnp.int32),
            warmup_epochs=jnp.asarray(warmup_epochs, jnp.int32),
        )

    return lc.make_loss_transform(
        num_tasks,
        "stch",
        init_state,
        hp,
        grads=grads,
        weight_heads=weight_heads,
        shared=shared,
        int_minimum=int_minimum,
    )
