"""FAMO: fast adaptive multitask optimization.

Reference: B. Liu, Y. Feng, P. Stone, Q. Liu, "FAMO: Fast Adaptive Multitask
Optimization", NeurIPS, 2023 (official code ``Cranial-XIX/FAMO``).

FAMO keeps task logits ``ξ`` (``z = softmax(ξ)``) and minimises
``Σ_t (z_t / c) log D_t`` with ``D_t = ℓ_t − ℓ*_t + ε`` (``ℓ*`` the minimum
losses, default 0) and ``c = Σ_t z_t / D_t`` treated as a constant, so the
update is ``Σ_t w_t ∇ℓ_t`` with

    w_t = (z_t / D_t) / Σ_s (z_s / D_s) = softmax(ξ − log D)_t      (Σ_t w_t = 1).

After the parameter step, with ``δ_t = log D_t(before) − log D_t(after)`` (the
log-loss decrease), the logits take one Adam step (PyTorch semantics, L2
``weight_decay = γ``) on the gradient ``J_softmax(ξ)ᵀ δ = z ⊙ (δ − zᵀδ)``.

The "after" losses need a second forward pass.  Two ways, both pure Optax:

* exact (official): after ``optax.apply_updates`` evaluate the losses of the
  same batch and call :func:`dbmtl_jax.loss_weighting.observe_losses`
  ``(opt_state, next_losses)``; the logits are updated at once.
* lagged (default when ``observe_losses`` is not called): the losses of the
  *next* step (next batch, new parameters) stand in for the "after" losses;
  the pending logit step is applied at the start of the next step, before its
  weights are computed (in ``loss_weights`` and again in ``update``, which
  agree), so no second forward pass is needed.

The state records whether a logit step is pending (``pending``), so mixing the
two is safe.  ``D`` is floored: ``max(ℓ − ℓ*, 0) + ε`` (the official code takes
the log of ``ℓ − ℓ* + ε`` as is and gives NaN for a loss below ``ℓ*``).

Defaults from the official ``FAMO`` class: logit learning rate 0.025,
``γ = 0.01`` (LibMTL uses ``γ = 1e-3``), ``ε = 1e-8``, logits initialised to 0.
The official code also clips the shared-parameter gradient norm to 1; that is
a separate transform here (``optax.clip_by_global_norm``).  Every leaf, shared
or head, gets the weighting.
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

__all__ = ["FAMOState", "famo"]


class FAMOState(NamedTuple):
    """State of :func:`famo`.

    Attributes:
      count: number of updates applied (int32 scalar).
      logits: task logits ``ξ`` (``[T]`` float32).
      adam: Adam moments of ``logits``.
      prev_losses: the losses of the last update (``[T]``), the "before" of δ.
      pending: True while the last update's logit step still waits for its
        "after" losses (bool scalar).
      min_losses: ``ℓ*`` (``[T]`` float32).
      learning_rate, gamma, b1, b2, adam_eps, eps: hyperparameters (float32).
    """

    count: chex.Array
    logits: chex.Array
    adam: lc.InnerAdam
    prev_losses: chex.Array
    pending: chex.Array
    min_losses: chex.Array
    learning_rate: chex.Array
    gamma: chex.Array
    b1: chex.Array
    b2: chex.Array
    adam_eps: chex.Array
    eps: chex.Array

    needs_losses = True
    needs_key = False

    @property
    def num_tasks(self) -> int:
        """``T``, the length of ``logits``."""
        return self.logits.shape[0]

    def log_gap(self, losses: jax.Array) -> jax.Array:
        """``log D = log(max(ℓ − ℓ*, 0) + ε)``."""
        return lc.clamped_log(losses.astype(jnp.float32) - self.min_losses, self.eps)

    def _logit_step(self, next_losses: jax.Array) -> "FAMOState":
        """The logit step for the pending update with "after" losses ``next_losses``."""
        delta = self.log_gap(self.prev_losses) - self.log_gap(next_losses)
        z = jax.nn.softmax(self.logits)
        grad = z * (delta - jnp.sum(z * delta))
        logits, adam = lc.state_adam_step(self, self.logits, grad, weight_decay=self.gamma)
        return self._replace(logits=logits, adam=adam, pending=jnp.zeros([], bool))

    def _settled(self, losses: jax.Array) -> "FAMOState":
        """The state with a pending logit step applied, using ``losses`` as the "after" losses (lagged)."""
        stepped = self._logit_step(losses)
        return jax.tree_util.tree_map(lambda a, b: jnp.where(self.pending, a, b), stepped, self)

    def observe(self, next_losses: jax.Array) -> "FAMOState":
        """Exact FAMO: the logit step with the losses measured after the parameter update."""
        next_losses = jnp.asarray(next_losses)
        if next_losses.shape != self.logits.shape:
            raise ValueError(f"famo: next_losses must have shape {self.logits.shape}, got {next_losses.shape}.")
        return self._settled(next_losses)

    def loss_weights(self, losses: Optional[jax.Array] = None, key: Optional[jax.Array] = None) -> jax.Array:
        """``softmax(ξ − log D)`` with any pending (lagged) logit step applied first."""
        del key
        s = self._settled(losses)
        return jax.nn.softmax(s.logits - s.log_gap(losses))

    def advance(self, losses: Optional[jax.Array], key: Optional[jax.Array], **extra_args: Any) -> "FAMOState":
        del key, extra_args
        s = self._settled(losses)
        return s._replace(
            count=optax.safe_increment(self.count),
            prev_losses=losses.astype(jnp.float32),
            pending=jnp.ones([], bool),
        )


def famo(
    num_tasks: int,
    *,
    learning_rate: float = 0.025,
    gamma: float = 0.01,
    min_losses: Optional[Any] = None,
    eps: float = 1e-8,
    b1: float = 0.9,
    b2: float = 0.999,
    adam_eps: float = 1e-8,
    grads: str = "per_task",
    weight_heads: bool = True,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """Fast adaptive multitask optimization (FAMO).

    Args:
      num_tasks: ``T``.
      learning_rate: Adam learning rate of the logits, ``>= 0`` (official 0.025).
      gamma: L2 regularisation of the logits, ``>= 0`` (official class default 0.01).
      min_losses: ``ℓ*``, a finite ``[T]`` vector; default zeros (official).
      eps: ``ε > 0`` in ``D = max(ℓ − ℓ*, 0) + ε``.
      b1, b2, adam_eps: Adam constants of the logits (PyTorch defaults); ``b1, b2`` in
        ``[0, 1)``, ``adam_eps >= 0``.
      grads: ``"per_task"`` or ``"weighted"`` (see :mod:`dbmtl_jax.loss_weighting`).
      weight_heads: in ``"per_task"`` mode, weight head leaves too (default).
      shared: which leaves are shared (used only when ``weight_heads=False``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` requires
      ``losses=``.  Use :func:`dbmtl_jax.loss_weighting.observe_losses` for the
      exact variant.
    """
    nm.check_num_tasks(num_tasks, "famo")
    if min_losses is None:
        min_arr = np.zeros([num_tasks], np.float32)
    else:
        if np.shape(min_losses) != (num_tasks,):
            raise ValueError(f"famo: min_losses must have shape ({num_tasks},), got {np.shape(min_losses)}.")
        min_arr = nm.check_real(min_losses, "min_losses", "famo", shapes=((num_tasks,),))
    learning_rate, b1, b2, adam_eps = lc.check_inner_adam("famo", learning_rate, b1, b2, adam_eps)
    gamma = nm.check_real(gamma, "gamma", "famo", lo=0, note="the L2 weight decay of the logits")
    eps = nm.check_real(eps, "eps", "famo", lo=0, lo_open=True)
    hp = dict(learning_rate=learning_rate, gamma=gamma, b1=b1, b2=b2, adam_eps=adam_eps, eps=eps)

    def init_state() -> FAMOState:
        z = jnp.zeros([num_tasks], jnp.float32)
        return FAMOState(
            count=jnp.zeros([], jnp.int32),
            logits=z,
            adam=lc.adam_init(num_tasks),
            prev_losses=z,
            pending=jnp.zeros([], bool),
            min_losses=jnp.asarray(min_arr, jnp.float32),
            **{k: lc.f32(v) for k, v in hp.items()},
        )

    return lc.make_loss_transform(
        num_tasks, "famo", init_state, {**hp, "min_losses": min_arr}, grads=grads, weight_heads=weight_heads,
        shared=shared,
    )
