"""Nash-MTL: multi-task learning as a bargaining game.

Reference: A. Navon, A. Shamsian, I. Achituve, H. Maron, K. Kawaguchi,
G. Chechik, E. Fetaya, "Multi-Task Learning as a Bargaining Game", ICML 2022.

The Nash bargaining solution is ``d = Σ_t α_t g_t`` with ``α > 0`` solving::

    α_t ⟨g_t, d⟩ = 1   for every t,      i.e.   G α = 1/α   (G = J Jᵀ)

where ``g_t`` is task t's gradient of the shared parameters (all shared leaves
flattened together).  Consequences: ``⟨g_t, d⟩ = 1/α_t > 0`` (every task
improves) and ``‖d‖² = Σ_t α_t ⟨g_t, d⟩ = T``; the solution is invariant to
the scale of the gradients (``α`` scales inversely).

Choices:

* solver: the official code runs up to ``optim_niter = 20`` sequential convex
  approximations with CVXPY/ECOS (and keeps the previous ``α`` when ECOS
  fails).  Here ``α`` is the minimiser of the strictly convex, self-concordant
  ``½ αᵀGα − Σ_t log α_t`` found by damped Newton in-graph, with at most
  ``max_iter`` (default 50) iterations, warm-started from the previous ``α``
  (see :func:`dbmtl_jax.methods._qp.power_balance`).  The residual
  ``max_t |α_t (Gα)_t − 1|`` and the iteration count are kept in the state.
* a ridge ``ridge · mean_t ‖g_t‖²`` (default 1e-6) is added to ``G``: the
  bargaining equation has no solution when ``G`` is singular (for instance a
  task with a zero shared gradient); the ridge keeps ``α`` finite there and
  the residual in the state then shows that the condition is not met.  With
  an all-zero shared gradient (or no shared leaves) ``α = 1`` and the
  residual is 1.
* ``update_weights_every`` (default 1): ``α`` is recomputed when
  ``count % update_weights_every == 0`` and reused from the state otherwise
  (official option).
* ``max_norm`` (default 1.0, official): the shared update is clipped to
  global norm ``max_norm`` (``0`` disables), as the official
  ``clip_grad_norm_`` on the shared parameters.  Since ``‖d‖ = √T``, with the
  default every shared update has norm 1.
* heads: the official code back-propagates ``Σ_t α_t ℓ_t``, so task-specific
  leaves get ``Σ_t α_t g_t`` (``weight_heads=True``, default; the DB-MTL paper,
  Sec. 2, describes Nash-MTL this way) and are not clipped.
* scale: ``α`` is the exact solution for the raw ``G``.  (The official code
  divides ``G`` by its Frobenius norm before solving; its constraint is
  written on the raw scale.)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _qp

PyTree = Any

__all__ = ["NashMTLState", "nash_mtl", "solve_balanced_weights", "clip_leaves"]


class NashMTLState(NamedTuple):
    """State of :func:`nash_mtl`.

    Attributes:
      count: number of updates so far (int32).
      weights: the last ``α`` (``[T]`` float32, raw gradient scale), reused
        between recomputations and as the solver's warm start.
      residual: ``max_t |α_t (Gα)_t − 1|`` of the last solve (float32).
      iterations: Newton iterations of the last update (int32; 0 when ``α`` was reused).
    """

    count: chex.Array
    weights: chex.Array
    residual: chex.Array
    iterations: chex.Array


def solve_balanced_weights(
    leaves: list,
    num_tasks: int,
    p: float,
    prev: jax.Array,
    *,
    ridge: float,
    max_iter: int,
) -> _qp.SolverResult:
    """Solves ``G w = w^{-p}`` for the raw Gram matrix of ``leaves``; ``prev`` is the warm start.

    Works on the normalised Gram ``Ĝ = G / s`` and maps back exactly with
    ``w = ŵ · s^{-1/(1+p)}``.  When the shared gradient is all zeros (or there
    are no shared leaves) the equation has no solution: ``w = 1`` is returned
    with residual 1.
    """
    gram, scale = _qp.shared_gram(leaves, num_tasks)
    dtype = gram.dtype
    expo = -1.0 / (1.0 + p)
    factor = scale.astype(dtype) ** expo
    factor = jnp.where(jnp.isfinite(factor) & (factor > 0), factor, 1.0)
    res = _qp.power_balance(gram, p, w0=prev.astype(dtype) / factor, ridge=ridge, max_iter=max_iter)
    zero = jnp.all(gram == 0)
    w = jnp.where(zero, jnp.ones_like(res.x), res.x * factor)
    residual = jnp.where(zero, jnp.ones_like(res.residual), res.residual)
    return _qp.SolverResult(w, res.iterations, residual)


def clip_leaves(leaves: list, max_norm: float) -> list:
    """Scales ``leaves`` so that their global norm is at most ``max_norm`` (0: no clipping)."""
    if max_norm <= 0 or not leaves:
        return leaves
    norm = _qp.global_norm(leaves)
    factor = jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny))
    return [(x.astype(jnp.promote_types(x.dtype, jnp.float32)) * factor).astype(x.dtype) for x in leaves]


def nash_mtl(
    num_tasks: int,
    *,
    max_norm: float = 1.0,
    update_weights_every: int = 1,
    max_iter: int = 50,
    ridge: float = 1e-6,
    weight_heads: bool = True,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """Nash-MTL (Navon et al., ICML 2022): ``d = Σ_t α_t g_t`` with ``Gα = 1/α``.

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      max_norm: clip the shared update to this global norm; 0 disables
        (official default 1.0).
      update_weights_every: recompute ``α`` every this many updates (official
        default 1).
      max_iter: Newton iteration cap (fixed budget).
      ridge: relative ridge added to ``G`` (see the module docstring).
      weight_heads: weight task-specific leaves by ``α`` (official) rather than
        summing them.
      shared: which leaves are shared (see :func:`dbmtl_jax.dbmtl`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args are ignored.
    """
    _qp.check_positive_int(num_tasks, "num_tasks")
    max_norm = _qp.check_nonnegative(max_norm, "max_norm")
    _qp.check_positive_int(update_weights_every, "update_weights_every")
    _qp.check_positive_int(max_iter, "max_iter")
    ridge = _qp.check_nonnegative(ridge, "ridge")

    def init_fn(params: PyTree) -> NashMTLState:
        del params
        return NashMTLState(
            count=jnp.zeros([], jnp.int32),
            weights=jnp.ones([num_tasks], jnp.float32),
            residual=jnp.zeros([], jnp.float32),
            iterations=jnp.zeros([], jnp.int32),
        )

    def update_fn(
        updates: PyTree, state: NashMTLState, params: Optional[PyTree] = None, **extra_args: Any
    ) -> tuple[PyTree, NashMTLState]:
        del extra_args
        ta.check_task_axis(updates, num_tasks)
        mask = ta.resolve_shared(shared, updates if params is None else params)
        g_shared, g_heads, treedef = ta.split_shared(updates, mask)

        def solve(_):
            res = solve_balanced_weights(g_shared, num_tasks, 1.0, state.weights, ridge=ridge, max_iter=max_iter)
            return res.x.astype(jnp.float32), res.residual.astype(jnp.float32), res.iterations.astype(jnp.int32)

        def keep(_):
            return state.weights, state.residual, jnp.zeros([], jnp.int32)

        if update_weights_every == 1:
            alpha, residual, iters = solve(None)
        else:
            alpha, residual, iters = jax.lax.cond(state.count % update_weights_every == 0, solve, keep, None)
        out_shared = clip_leaves(_qp.weighted_sum(g_shared, alpha), max_norm)
        out_heads = _qp.weighted_sum(g_heads, alpha) if weight_heads else [jnp.sum(g, axis=0) for g in g_heads]
        out = ta.merge_shared(out_shared, out_heads, mask, treedef)
        new_state = NashMTLState(
            count=optax.safe_increment(state.count),
            weights=alpha,
            residual=residual,
            iterations=iters,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
