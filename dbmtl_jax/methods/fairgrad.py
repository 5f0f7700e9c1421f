"""FairGrad: α-fair resource allocation among tasks.

Reference: H. Ban, K. Ji, "Fair Resource Allocation in Multi-Task Learning",
ICML 2024.

FairGrad picks the update ``d = Σ_t w_t g_t`` that maximises the α-fair
utility ``Σ_t u_t^{1−α} / (1−α)`` of the task improvements ``u_t = ⟨g_t, d⟩``
(``Σ_t log u_t`` for α = 1) over a ball.  Its optimality condition gives the
positive weights as the solution of::

    G w = w^{-1/α}       (G = J Jᵀ),   i.e.   ⟨g_t, d⟩ = w_t^{-1/α}

so every task improves.  α = 1 is proportional fairness (Nash-MTL's
bargaining condition); α → ∞ approaches max-min fairness.

Choices:

* ``alpha = 2.0`` by default: the value in the official run scripts (QM9,
  CelebA); the official ``FairGrad`` class defaults to 1.0.
* solver: the official code calls SciPy's ``least_squares`` on
  ``Gw − w^{−1/α}`` from ``w = 1/T`` with bounds ``w ≥ 0``.  Here ``w`` is the
  minimiser of the strictly convex ``½ wᵀGw − Σ_t h(w_t)``,
  ``h'(w) = w^{−1/α}``, found in-graph by damped Newton with at most
  ``max_iter`` (default 50) iterations, warm-started from the previous ``w``
  (see :func:`dbmtl_jax.methods._qp.power_balance`).  The residual
  ``max_t |w_t^{1/α} (Gw)_t − 1|`` and the iterations are kept in the state.
* ``ridge`` (default 1e-6, relative to the mean squared gradient norm) is
  added to ``G`` to keep ``w`` finite when ``G`` is singular; the residual
  then shows the unmet condition.  With an all-zero shared gradient (or no
  shared leaves) ``w = 1`` and the residual is 1.
* ``max_norm`` (default 1.0, official ``WeightMethod`` default): the shared
  update is clipped to this global norm (``0`` disables).  The official code
  also multiplies the shared update by T before clipping (a leftover of its
  CAGrad template); here the shared update is ``Σ_t w_t g_t`` as in LibMTL.
* heads: the official code overwrites only the shared gradient, so head
  leaves keep the plain ``Σ_t g_t`` (``weight_heads=False``, default);
  ``weight_heads=True`` gives ``Σ_t w_t g_t`` (LibMTL, which back-propagates
  ``Σ_t w_t ℓ_t``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _qp
from dbmtl_jax.methods.nash_mtl import clip_leaves, solve_balanced_weights

PyTree = Any

__all__ = ["FairGradState", "fairgrad"]


class FairGradState(NamedTuple):
    """State of :func:`fairgrad`.

    Attributes:
      count: number of updates so far (int32).
      weights: the last ``w`` (``[T]`` float32, raw gradient scale; warm start).
      residual: ``max_t |w_t^{1/α} (Gw)_t − 1|`` of the last solve (float32).
      iterations: Newton iterations of the last solve (int32).
    """

    count: chex.Array
    weights: chex.Array
    residual: chex.Array
    iterations: chex.Array


def fairgrad(
    num_tasks: int,
    *,
    alpha: float = 2.0,
    max_norm: float = 1.0,
    max_iter: int = 50,
    ridge: float = 1e-6,
    weight_heads: bool = False,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """FairGrad (Ban & Ji, ICML 2024): ``d = Σ_t w_t g_t`` with ``Gw = w^{-1/α}``.

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      alpha: the fairness parameter α > 0 (default 2.0, official run scripts).
      max_norm: clip the shared update to this global norm; 0 disables.
      max_iter: Newton iteration cap (fixed budget).
      ridge: relative ridge added to ``G``.
      weight_heads: weight task-specific leaves by ``w`` (LibMTL) instead of
        summing them (official, default).
      shared: which leaves are shared (see :func:`dbmtl_jax.dbmtl`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args are ignored.
    """
    _qp.check_positive_int(num_tasks, "num_tasks")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite positive float, got {alpha!r}.")
    p = 1.0 / float(alpha)
    max_norm = _qp.check_nonnegative(max_norm, "max_norm")
    _qp.check_positive_int(max_iter, "max_iter")
    ridge = _qp.check_nonnegative(ridge, "ridge")

    def init_fn(params: PyTree) -> FairGradState:
        del params
        return FairGradState(
            count=jnp.zeros([], jnp.int32),
            weights=jnp.ones([num_tasks], jnp.float32),
            residual=jnp.zeros([], jnp.float32),
            iterations=jnp.zeros([], jnp.int32),
        )

    def update_fn(
        updates: PyTree, state: FairGradState, params: Optional[PyTree] = None, **extra_args: Any
    ) -> tuple[PyTree, FairGradState]:
        del extra_args
        ta.check_task_axis(updates, num_tasks)
        mask = ta.resolve_shared(shared, updates if params is None else params)
        g_shared, g_heads, treedef = ta.split_shared(updates, mask)
        res = solve_balanced_weights(g_shared, num_tasks, p, state.weights, ridge=ridge, max_iter=max_iter)
        w = res.x.astype(jnp.float32)
        out_shared = clip_leaves(_qp.weighted_sum(g_shared, w), max_norm)
        out_heads = _qp.weighted_sum(g_heads, w) if weight_heads else [jnp.sum(g, axis=0) for g in g_heads]
        out = ta.merge_shared(out_shared, out_heads, mask, treedef)
        new_state = FairGradState(
            count=optax.safe_increment(state.count),
            weights=w,
            residual=res.residual.astype(jnp.float32),
            iterations=res.iterations.astype(jnp.int32),
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
