"""EW: equal weighting of the task losses.

Reference: the EW baseline of the DB-MTL comparison, as surveyed in Y. Zhang
and Q. Yang, "A Survey on Multi-Task Learning", IEEE TKDE, 2022.

    update = Σ_t w g_t,   w = 1  (``reduction="sum"``, default)  or  w = 1/T  (``"mean"``)

The default is the *sum* of the task losses, as in LibMTL's ``EW`` (weights of
ones); ``reduction="mean"`` averages instead (a global 1/T rescaling, which
Adam-type optimizers ignore).  Every leaf, shared or head, gets the same
weighting.
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

REDUCTIONS = ("sum", "mean")

__all__ = ["EWState", "ew", "REDUCTIONS"]


class EWState(NamedTuple):
    """State of :func:`ew`.

    Attributes:
      count: number of updates applied (int32 scalar).
      weights: the constant task weights, all 1 (sum) or 1/T (mean), ``[T]`` float32.
    """

    count: chex.Array
    weights: chex.Array

    needs_losses = False
    needs_key = False

    @property
    def num_tasks(self) -> int:
        """``T``, the length of ``weights``."""
        return self.weights.shape[0]

    def loss_weights(self, losses: Optional[jax.Array] = None, key: Optional[jax.Array] = None) -> jax.Array:
        """The constant weights."""
        del losses, key
        return self.weights

    def advance(self, losses: Optional[jax.Array], key: Optional[jax.Array], **extra_args: Any) -> "EWState":
        del losses, key, extra_args
        return self._replace(count=optax.safe_increment(self.count))


def ew(
    num_tasks: int,
    *,
    reduction: str = "sum",
    grads: str = "per_task",
    weight_heads: bool = True,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """Equal weighting (EW).

    Args:
      num_tasks: ``T``.
      reduction: ``"sum"`` (w = 1, LibMTL, default) or ``"mean"`` (w = 1/T).
      grads: ``"per_task"`` (updates with a leading task axis) or
        ``"weighted"`` (the gradient of ``Σ_t w_t ℓ_t``, passed through).
      weight_heads: in ``"per_task"`` mode, weight head leaves too (default).
      shared: which leaves are shared (used only when ``weight_heads=False``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``losses=`` and ``key=``
      are accepted and not needed.
    """
    nm.check_num_tasks(num_tasks, "ew")
    nm.check_choice(reduction, REDUCTIONS, "reduction", "ew")
    scale = 1.0 if reduction == "sum" else 1.0 / num_tasks

    def init_state() -> EWState:
        return EWState(count=jnp.zeros([], jnp.int32), weights=jnp.full([num_tasks], scale, jnp.float32))

    return lc.make_loss_transform(
        num_tasks, "ew", init_state, {}, grads=grads, weight_heads=weight_heads, shared=shared
    )
