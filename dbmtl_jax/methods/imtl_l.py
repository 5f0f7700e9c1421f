"""IMTL-L: the loss-balancing half of impartial multi-task learning.

Reference: L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao,
W. Zhang, "Towards Impartial Multi-task Learning", ICLR, 2021.

Each task loss is transformed to ``e^{s_t} ℓ_t − s_t`` with a learnable
``s_t``, so the model update is ``Σ_t w_t ∇ℓ_t`` with ``w_t = e^{s_t}`` and the
loss parameters follow the analytic gradient ``∂/∂s_t = e^{s_t} ℓ_t − 1`` (its
zero is ``s_t = −log ℓ_t``, i.e. ``w_t ℓ_t = 1``: every weighted loss is pushed
to the same scale; the DB-MTL paper's Proposition 1 shows the exact minimiser
recovers the log transform).  The ``s_t`` live in the state and take one Adam
step per ``update`` (PyTorch semantics) from ``losses=``, after the step's
weights were read from the current ``s``, so both ``grads`` modes agree.

Defaults follow LibMTL's ``IMTL`` (whose loss half this is; the code base of
the DB-MTL paper): ``s`` initialised to 0 and trained by the model's
optimizer, Adam with learning rate 1e-4.  Every leaf, shared or head, gets
the weighting.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _loss_common as lc
from dbmtl_jax.methods import _numerics as nm

__all__ = ["IMTLLState", "imtl_l"]


class IMTLLState(NamedTuple):
    """State of :func:`imtl_l`.

    Attributes:
      count: number of updates applied (int32 scalar).
      scale: the learnable ``s_t`` (``[T]`` float32); the weights are ``e^{s}``.
      adam: Adam moments of ``scale``.
      learning_rate, b1, b2, adam_eps, weight_decay: Adam hyperparameters.
    """

    count: chex.Array
    scale: chex.Array
    adam: lc.InnerAdam
    learning_rate: chex.Array
    b1: chex.Array
    b2: chex.Array
    adam_eps: chex.Array
    weight_decay: chex.Array

    needs_losses = True
    needs_key = False

    @property
    def num_tasks(self) -> int:
        """``T``, the length of ``scale``."""
        return self.scale.shape[0]

    def loss_weights(self, losses: Optional[jax.Array] = None, key: Optional[jax.Array] = None) -> jax.Array:
        """``w_t = e^{s_t}``."""
        del losses, key
        return jnp.exp(self.scale)

    def scale_grad(self, losses: jax.Array) -> jax.Array:
        """``∂/∂s_t [e^{s_t} ℓ_t − s_t] = e^{s_t} ℓ_t − 1``."""
        return jnp.exp(self.scale) * losses.astype(jnp.float32) - 1.0

    def advance(self, losses: Optional[jax.Array], key: Optional[jax.Array], **extra_args: Any) -> "IMTLLState":
        del key, extra_args
        scale, adam = lc.state_adam_step(self, self.scale, self.scale_grad(losses))
        return self._replace(count=optax.safe_increment(self.count), scale=scale, adam=adam)


def imtl_l(
    num_tasks: int,
    *,
    init: float = 0.0,
    learning_rate: float = 1e-4,
    b1: float = 0.9,
    b2: float = 0.999,
    adam_eps: float = 1e-8,
    weight_decay: float = 0.0,
    grads: str = "per_task",
    weight_heads: bool = True,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """IMTL-L loss balancing.

    Args:
      num_tasks: ``T``.
      init: initial ``s_t``, a finite float or ``[T]`` (LibMTL: 0).
      learning_rate, b1, b2, adam_eps, weight_decay: Adam for ``s``
        (LibMTL: the model's Adam, learning rate 1e-4); ``learning_rate >= 0``,
        ``b1, b2`` in ``[0, 1)``, ``adam_eps >= 0``, ``weight_decay >= 0``.
      grads: ``"per_task"`` or ``"weighted"`` (see :mod:`dbmtl_jax.loss_weighting`).
      weight_heads: in ``"per_task"`` mode, weight head leaves too (default).
      shared: which leaves are shared (used only when ``weight_heads=False``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``losses=``.
    """
    nm.check_num_tasks(num_tasks, "imtl_l")
    init = nm.check_real(init, "init", "imtl_l", shapes=((), (num_tasks,)))
    learning_rate, b1, b2, adam_eps = lc.check_inner_adam("imtl_l", learning_rate, b1, b2, adam_eps)
    weight_decay = nm.check_real(weight_decay, "weight_decay", "imtl_l", lo=0)
    hp = dict(learning_rate=learning_rate, b1=b1, b2=b2, adam_eps=adam_eps, weight_decay=weight_decay)

    def init_state() -> IMTLLState:
        return IMTLLState(
            count=jnp.zeros([], jnp.int32),
            scale=jnp.full([num_tasks], init, jnp.float32),
            adam=lc.adam_init(num_tasks),
            **{k: lc.f32(v) for k, v in hp.items()},
        )

    return lc.make_loss_transform(
        num_tasks, "imtl_l", init_state, hp, grads=grads, weight_heads=weight_heads, shared=shared
    )
