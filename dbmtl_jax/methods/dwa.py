"""DWA: dynamic weight average.

Reference: S. Liu, E. Johns, A. J. Davison, "End-to-End Multi-Task Learning
with Attention", CVPR, 2019.

With ``L_t(e)`` the mean training loss of task ``t`` over epoch ``e``, the
weights during epoch ``e`` are::

    r_t = L_t(e − 1) / L_t(e − 2),      w_t = T softmax(r / τ)_t

and ``w_t = 1`` during the first two epochs (``e = 0, 1``), as in LibMTL's
``DWA`` and the official MTAN code.  Default temperature ``τ = 2``.

An *epoch* here is ``steps_per_epoch`` consecutive calls of ``update``: the
state accumulates the per-epoch loss sums from ``losses=`` and, when an epoch
ends, shifts the two last epoch means.  Set ``steps_per_epoch`` to the number of
batches per epoch to reproduce the paper; the default 1 makes every step an
epoch (the ratio of the last two batch losses, noisier).  ``r_t`` uses
``L_t(e − 2) = 0 → r_t = 1``.  Every leaf, shared or head, gets the weighting.
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

__all__ = ["DWAState", "dwa"]


class DWAState(NamedTuple):
    """State of :func:`dwa`.

    Attributes:
      count: number of updates applied (int32 scalar).
      epoch_sum: sum of the losses over the current epoch so far (``[T]`` float32).
      epoch_steps: steps accumulated in the current epoch (int32 scalar).
      epochs_done: completed epochs (int32 scalar).
      last_mean: ``L(e − 1)``, the mean losses of the last completed epoch (``[T]``).
      prev_mean: ``L(e − 2)`` (``[T]``).
      temperature: ``τ`` (float32 scalar).
      steps_per_epoch: steps per epoch (int32 scalar).
    """

    count: chex.Array
    epoch_sum: chex.Array
    epoch_steps: chex.Array
    epochs_done: chex.Array
    last_mean: chex.Array
    prev_mean: chex.Array
    temperature: chex.Array
    steps_per_epoch: chex.Array

    needs_losses = True
    needs_key = False

    @property
    def num_tasks(self) -> int:
        """``T``, the length of ``epoch_sum``."""
        return self.epoch_sum.shape[0]

    def loss_weights(self, losses: Optional[jax.Array] = None, key: Optional[jax.Array] = None) -> jax.Array:
        """``T softmax(r / τ)`` once two epochs are complete, ones before."""
        del losses, key
        t = self.last_mean.shape[0]
        ratio = jnp.where(self.prev_mean > 0, self.last_mean / jnp.where(self.prev_mean > 0, self.prev_mean, 1.0), 1.0)
        w = t * jax.nn.softmax(ratio / self.temperature)
        return jnp.where(self.epochs_done >= 2, w, jnp.ones_like(w))

    def advance(self, losses: Optional[jax.Array], key: Optional[jax.Array], **extra_args: Any) -> "DWAState":
        del key, extra_args
        epoch_sum = self.epoch_sum + losses.astype(jnp.float32)
        epoch_steps = self.epoch_steps + 1
        done = epoch_steps >= self.steps_per_epoch
        mean = epoch_sum / epoch_steps.astype(jnp.float32)
        return self._replace(
            count=optax.safe_increment(self.count),
            epoch_sum=jnp.where(done, jnp.zeros_like(epoch_sum), epoch_sum),
            epoch_steps=jnp.where(done, 0, epoch_steps),
            epochs_done=jnp.where(done, optax.safe_increment(self.epochs_done), self.epochs_done),
            last_mean=jnp.where(done, mean, self.last_mean),
            prev_mean=jnp.where(done, self.last_mean, self.prev_mean),
        )


def dwa(
    num_tasks: int,
    *,
    temperature: float = 2.0,
    steps_per_epoch: int = 1,
    grads: str = "per_task",
    weight_heads: bool = True,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """Dynamic weight average (DWA).

    Args:
      num_tasks: ``T``.
      temperature: softmax temperature ``τ > 0`` (paper and LibMTL: 2).
      steps_per_epoch: number of ``update`` calls per epoch (positive int).
      grads: ``"per_task"`` or ``"weighted"`` (see :mod:`dbmtl_jax.loss_weighting`).
      weight_heads: in ``"per_task"`` mode, weight head leaves too (default).
      shared: which leaves are shared (used only when ``weight_heads=False``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``losses=``.
    """
    nm.check_num_tasks(num_tasks, "dwa")
    int_minimum = {"steps_per_epoch": 1}  # also checked per step when injected
    steps_per_epoch = nm.check_int(steps_per_epoch, "steps_per_epoch", "dwa", lo=int_minimum["steps_per_epoch"])
    temperature = nm.check_real(temperature, "temperature", "dwa", lo=0, lo_open=True)

    def init_state() -> DWAState:
        z = jnp.zeros([num_tasks], jnp.float32)
        i0 = jnp.zeros([], jnp.int32)
        return DWAState(
            count=i0,
            epoch_sum=z,
            epoch_steps=i0,
            epochs_done=i0,
            last_mean=z,
            prev_mean=z,
            temperature=lc.f32(temperature),
            steps_per_epoch=jnp.asarray(steps_per_epoch, jnp.int32),
        )

    return lc.make_loss_transform(
        num_tasks,
        "dwa",
        init_state,
        {"temperature": temperature, "steps_per_epoch": steps_per_epoch},
        grads=grads,
        weight_heads=weight_heads,
        shared=shared,
        int_minimum=int_minimum,
    )
