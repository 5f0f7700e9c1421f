"""RLW: random loss weighting.

Reference: B. Lin, F. Ye, Y. Zhang, I. W. Tsang, "Reasonable Effectiveness of
Random Weighting: A Litmus Test for Multi-Task Learning", TMLR, 2022
(arXiv:2111.10603).

At every step fresh weights are drawn from the ``key`` passed to ``update``::

    "normal"     (default):  w = softmax(λ),  λ ~ N(0, I_T)
    "uniform":               w = softmax(λ),  λ ~ U(0, 1)^T
    "dirichlet":             w = softmax(λ),  λ ~ Dir(1, …, 1)
    "bernoulli":             w = b,  b ~ Bernoulli(1/2)^T conditioned on b ≠ 0
    "constrained_bernoulli": w = one-hot of a uniformly drawn task

The distributions and the normalisation follow LibMTL's ``RLW`` (which also
applies the softmax to the Dirichlet sample; ``Σ_t w_t = 1`` for the softmax
variants).  LibMTL resamples the Bernoulli draw until it is non-zero; here the
same conditional distribution is drawn directly (a uniform integer in
``[1, 2^T)`` read as a bit mask, for ``T ≤ 30``).  Every leaf, shared or head,
gets the weighting.

The weights depend only on ``key``, so :func:`dbmtl_jax.loss_weighting.loss_weights`
and ``update`` give the same weights for the same key: pass the same key to both.
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

DISTRIBUTIONS = ("normal", "uniform", "dirichlet", "bernoulli", "constrained_bernoulli")

__all__ = ["RLWState", "rlw", "DISTRIBUTIONS", "sample_weights"]


def sample_weights(key: jax.Array, num_tasks: int, distribution: str = "normal") -> jax.Array:
    """Draws RLW weights ``[T]`` (float32) from ``key``; see the module docstring."""
    if distribution == "normal":
        return jax.nn.softmax(jax.random.normal(key, (num_tasks,), jnp.float32))
    if distribution == "uniform":
        return jax.nn.softmax(jax.random.uniform(key, (num_tasks,), jnp.float32))
    if distribution == "dirichlet":
        # Dir(1, …, 1) exactly, as normalised Exp(1) draws (no gamma sampler loop to compile).
        e = jax.random.exponential(key, (num_tasks,), jnp.float32)
        return jax.nn.softmax(e / jnp.sum(e))
    if distribution == "bernoulli":
        if num_tasks > 30:
            raise ValueError("distribution='bernoulli' supports at most 30 tasks.")
        code = jax.random.randint(key, (), 1, 2**num_tasks, dtype=jnp.int32)
        bits = (code >> jnp.arange(num_tasks, dtype=jnp.int32)) & 1
        return bits.astype(jnp.float32)
    if distribution == "constrained_bernoulli":
        return jax.nn.one_hot(jax.random.randint(key, (), 0, num_tasks), num_tasks, dtype=jnp.float32)
    raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}.")


class RLWState(NamedTuple):
    """State of :func:`rlw`.

    Attributes:
      count: number of updates applied (int32 scalar).
      distribution: index into :data:`DISTRIBUTIONS` (int32 scalar).
      last_weights: the weights used by the last update (``[T]``, for logging).
    """

    count: chex.Array
    distribution: chex.Array
    last_weights: chex.Array

    needs_losses = False
    needs_key = True

    @property
    def num_tasks(self) -> int:
        """``T``, the length of ``last_weights``."""
        return self.last_weights.shape[0]

    def loss_weights(self, losses: Optional[jax.Array] = None, key: Optional[jax.Array] = None) -> jax.Array:
        """Weights drawn from ``key`` with the state's distribution."""
        del losses
        t = self.last_weights.shape[0]
        branches = [lambda k, d=d: sample_weights(k, t, d) for d in DISTRIBUTIONS]
        if t > 30:
            branches[DISTRIBUTIONS.index("bernoulli")] = lambda k: jnp.full([t], jnp.nan, jnp.float32)
        return jax.lax.switch(self.distribution, branches, key)

    def advance(self, losses: Optional[jax.Array], key: Optional[jax.Array], **extra_args: Any) -> "RLWState":
        del losses, extra_args
        return self._replace(count=optax.safe_increment(self.count), last_weights=self.loss_weights(None, key))


def rlw(
    num_tasks: int,
    *,
    distribution: str = "normal",
    grads: str = "per_task",
    weight_heads: bool = True,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """Random loss weighting (RLW).

    Args:
      num_tasks: ``T``.
      distribution: one of :data:`DISTRIBUTIONS`; default ``"normal"`` (LibMTL).
      grads: ``"per_task"`` or ``"weighted"`` (see :mod:`dbmtl_jax.loss_weighting`).
      weight_heads: in ``"per_task"`` mode, weight head leaves too (default).
      shared: which leaves are shared (used only when ``weight_heads=False``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``key=``.
    """
    nm.check_num_tasks(num_tasks, "rlw")
    nm.check_choice(distribution, DISTRIBUTIONS, "distribution", "rlw")
    if distribution == "bernoulli" and num_tasks > 30:
        raise ValueError("rlw: distribution='bernoulli' supports at most 30 tasks.")

    def init_state() -> RLWState:
        return RLWState(
            count=jnp.zeros([], jnp.int32),
            distribution=jnp.asarray(DISTRIBUTIONS.index(distribution), jnp.int32),
            last_weights=jnp.zeros([num_tasks], jnp.float32),
        )

    return lc.make_loss_transform(
        num_tasks, "rlw", init_state, {}, grads=grads, weight_heads=weight_heads, shared=shared
    )
