"""GLS: geometric loss strategy, minimising the geometric mean of the task losses.

Reference: S. Chennupati, G. Sistu, S. Yogamani, S. A. Rawashdeh,
"MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for
Multi-Task Learning", CVPR Workshops, 2019.

The objective is ``G = (Π_t ℓ̃_t)^{1/T}`` with ``ℓ̃_t = max(ℓ_t, 0) + ε``, so
the update is ``∇G = Σ_t w_t ∇ℓ_t`` with

    w_t = G / (T ℓ̃_t),      G = exp(mean_t log ℓ̃_t)

computed in log space (no overflow of the product for many tasks or large
losses).  ``ε`` (default 1e-8, as in this library's log transform) keeps the
weights finite when a loss is 0; LibMTL's ``GLS`` uses no ε (a zero loss gives
a NaN there).  Every leaf, shared or head, gets the weighting (it is the
gradient of ``G``).
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

__all__ = ["GLSState", "gls"]


class GLSState(NamedTuple):
    """State of :func:`gls`.

    Attributes:
      count: number of updates applied (int32 scalar).
      eps: the loss floor ``ε`` (float32 scalar).
      last_weights: the weights used by the last update (``[T]`` float32, ``1/T``
        before the first); its length is the state's task count.
    """

    count: chex.Array
    eps: chex.Array
    last_weights: chex.Array

    needs_losses = True
    needs_key = False

    @property
    def num_tasks(self) -> int:
        """``T``, the length of ``last_weights``."""
        return self.last_weights.shape[0]

    def loss_weights(self, losses: Optional[jax.Array] = None, key: Optional[jax.Array] = None) -> jax.Array:
        """``w_t = G / (T ℓ̃_t)`` with ``G`` the geometric mean of ``ℓ̃``."""
        del key
        log_l = lc.clamped_log(losses.astype(jnp.promote_types(losses.dtype, jnp.float32)), self.eps)
        return jnp.exp(jnp.mean(log_l) - log_l - jnp.log(float(self.num_tasks))).astype(jnp.float32)

    def advance(self, losses: Optional[jax.Array], key: Optional[jax.Array], **extra_args: Any) -> "GLSState":
        del extra_args
        return self._replace(count=optax.safe_increment(self.count), last_weights=self.loss_weights(losses, key))


def gls(
    num_tasks: int,
    *,
    eps: float = 1e-8,
    grads: str = "per_task",
    weight_heads: bool = True,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """Geometric loss strategy (GLS).

    Args:
      num_tasks: ``T``.
      eps: ``ε > 0`` in ``ℓ̃ = max(ℓ, 0) + ε`` (0 gives infinite weights for a zero loss).
      grads: ``"per_task"`` or ``"weighted"`` (see :mod:`dbmtl_jax.loss_weighting`).
      weight_heads: in ``"per_task"`` mode, weight head leaves too (default).
      shared: which leaves are shared (used only when ``weight_heads=False``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``losses=``.
    """
    nm.check_num_tasks(num_tasks, "gls")
    eps = nm.check_real(eps, "eps", "gls", lo=0, lo_open=True)

    def init_state() -> GLSState:
        return GLSState(
            count=jnp.zeros([], jnp.int32),
            eps=lc.f32(eps),
            last_weights=jnp.full([num_tasks], 1.0 / num_tasks, jnp.float32),
        )

    return lc.make_loss_transform(
        num_tasks, "gls", init_state, {"eps": eps}, grads=grads, weight_heads=weight_heads, shared=shared
    )
