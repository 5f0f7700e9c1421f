"""UW: uncertainty weighting with learnable homoscedastic log-variances.

Reference: A. Kendall, Y. Gal, R. Cipolla, "Multi-Task Learning Using
Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR, 2018.

With one learnable ``s_t = log σ_t²`` per task the objective is (LibMTL's form,
the regression form of the paper for every task)::

    L(θ, s) = Σ_t  ℓ_t / (2 e^{s_t}) + s_t / 2

so the model update is ``Σ_t w_t ∇ℓ_t`` with ``w_t = e^{-s_t} / 2`` and the
loss parameters follow the analytic gradient
``∂L/∂s_t = (1 − ℓ_t e^{-s_t}) / 2`` (its zero is ``s_t = log ℓ_t``: a task with
a larger loss gets a smaller weight).  The ``s_t`` live in the state and are
updated inside ``update`` from ``losses=`` by their own Adam step (PyTorch
semantics, L2 ``weight_decay``), *after* the weights of the step were taken
from the current ``s``: both ``grads`` modes therefore give the same update.

Defaults follow LibMTL (the code base of the DB-MTL paper's experiments):
``s`` initialised to −0.5 and trained by the model's optimizer, Adam with
learning rate 1e-4 (LibMTL also applies its weight decay 1e-5 to ``s``; here
``weight_decay`` defaults to 0).  Other implementations initialise ``s = 0``
and use larger learning rates (e.g. 0.025 in Nash-MTL-derived code such as IGB4MTL): set
``init`` and ``learning_rate``.  Every leaf, shared or head, gets the weighting.
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

__all__ = ["UWState", "uw"]


class UWState(NamedTuple):
    """State of :func:`uw`.

    Attributes:
      count: number of updates applied (int32 scalar).
      log_var: the learnable ``s_t = log σ_t²`` (``[T]`` float32).
      adam: Adam moments of ``log_var``.
      learning_rate, b1, b2, adam_eps, weight_decay: the Adam hyperparameters
        of ``log_var`` (float32 scalars).
    """

    count: chex.Array
    log_var: chex.Array
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
        """``T``, the length of ``log_var``."""
        return self.log_var.shape[0]

    def loss_weights(self, losses: Optional[jax.Array] = None, key: Optional[jax.Array] = None) -> jax.Array:
        """``w_t = e^{-s_t} / 2``."""
        del losses, key
        return 0.5 * jnp.exp(-self.log_var)

    def log_var_grad(self, losses: jax.Array) -> jax.Array:
        """``∂/∂s_t [ℓ_t / (2 e^{s_t}) + s_t / 2] = (1 − ℓ_t e^{-s_t}) / 2``."""
        return 0.5 * (1.0 - losses.astype(jnp.float32) * jnp.exp(-self.log_var))

    def advance(self, losses: Optional[jax.Array], key: Optional[jax.Array], **extra_args: Any) -> "UWState":
        del key, extra_args
        log_var, adam = lc.state_adam_step(self, self.log_var, self.log_var_grad(losses))
        return self._replace(count=optax.safe_increment(self.count), log_var=log_var, adam=adam)


def uw(
    num_tasks: int,
    *,
    init: float = -0.5,
    learning_rate: float = 1e-4,
    b1: float = 0.9,
    b2: float = 0.999,
    adam_eps: float = 1e-8,
    weight_decay: float = 0.0,
    grads: str = "per_task",
    weight_heads: bool = True,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """Uncertainty weighting (UW).

    Args:
      num_tasks: ``T``.
      init: initial ``s_t``, a finite float or ``[T]`` (LibMTL: −0.5).
      learning_rate, b1, b2, adam_eps, weight_decay: Adam for ``s``
        (LibMTL: the model's Adam, learning rate 1e-4); ``learning_rate >= 0``,
        ``b1, b2`` in ``[0, 1)``, ``adam_eps >= 0``, ``weight_decay >= 0``.
      grads: ``"per_task"`` or ``"weighted"`` (see :mod:`dbmtl_jax.loss_weighting`).
      weight_heads: in ``"per_task"`` mode, weight head leaves too (default).
      shared: which leaves are shared (used only when ``weight_heads=False``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``losses=``.
    """
    nm.check_num_tasks(num_tasks, "uw")
    init = nm.check_real(init, "init", "uw", shapes=((), (num_tasks,)))
    learning_rate, b1, b2, adam_eps = lc.check_inner_adam("uw", learning_rate, b1, b2, adam_eps)
    weight_decay = nm.check_real(weight_decay, "weight_decay", "uw", lo=0)
    hp = dict(learning_rate=learning_rate, b1=b1, b2=b2, adam_eps=adam_eps, weight_decay=weight_decay)

    def init_state() -> UWState:
        return UWState(
            count=jnp.zeros([], jnp.int32),
            log_var=jnp.full([num_tasks], init, jnp.float32),
            adam=lc.adam_init(num_tasks),
            **{k: lc.f32(v) for k, v in hp.items()},
        )

    return lc.make_loss_transform(
        num_tasks, "uw", init_state, hp, grads=grads, weight_heads=weight_heads, shared=shared
    )
