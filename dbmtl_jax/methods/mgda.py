"""MGDA: the min-norm point of the convex hull of the task gradients.

Reference: O. Sener, V. Koltun, "Multi-Task Learning as Multi-Objective
Optimization", NeurIPS 2018 (after J.-A. Désidéri, "Multiple-gradient descent
algorithm (MGDA) for multiobjective optimization", C. R. Math. 2012).

The task weights are the solution of::

    λ* = argmin_{λ ∈ Δ_T} ‖Σ_t λ_t ĝ_t‖²,     ĝ_t = g_t / n_t

over the probability simplex ``Δ_T``, where ``g_t`` is task t's gradient of the
shared parameters (all shared leaves flattened together) and ``n_t`` an
optional normaliser.  The update is ``d = Σ_t λ*_t g_t``.  With ``n_t = 1``,
``d`` is the min-norm element of the convex hull, so ``⟨g_t, d⟩ ≥ ‖d‖²`` for
every task (with equality where ``λ*_t > 0``): ``d`` conflicts with no task.

Choices (see the report table in the docs):

* normalisation ``n_t`` (``normalization=``): ``"none"`` (default, as LibMTL's
  ``mgda_gn`` default, which produced the DB-MTL paper's MGDA numbers),
  ``"l2"`` (``‖g_t‖``), ``"loss"`` (``ℓ_t``) or ``"loss+"`` (``ℓ_t ‖g_t‖``);
  the last two need ``losses=``.  The official code's sample config uses
  ``"loss+"``.  As in the official code, the normalisers only enter the
  solver: the weights ``λ*`` multiply the *raw* gradients (LibMTL instead
  combines the normalised ones; the two agree for ``"none"``).
* solver (``solver=``): ``"active_set"`` (default) solves the problem exactly
  as an NNLS (Lawson–Hanson; see :mod:`dbmtl_jax.methods._qp`);
  ``"frank_wolfe"`` is Frank–Wolfe with exact line search from the best pair of
  tasks with at most ``max_iter`` (default 250, the official ``MAX_ITER``)
  iterations and stopping tolerance ``tol`` on the duality gap, as the
  official ``MinNormSolver`` FW variant, plus away steps (so interior
  solutions converge linearly; the official solver in use is a projected
  gradient variant without them).
* scale: ``λ*`` sums to 1, so the update is on the scale of one task gradient
  (official code and LibMTL; the Nash-MTL repository's re-implementation
  multiplies by T).
* heads: the official code back-propagates ``Σ_t λ*_t ℓ_t``, so task-specific
  leaves are weighted too: head leaves get ``Σ_t λ*_t g_t`` by default
  (``weight_heads=True``; the DB-MTL paper, Sec. 2, describes MGDA this way).
  ``weight_heads=False`` gives them the plain ``Σ_t g_t`` (LibMTL).

Degenerate input: for all-zero shared gradients every ``λ`` is optimal and the
uniform weights are used.  The Frank–Wolfe gap of the solution (relative to
the mean squared gradient norm, 0 at the optimum) is stored in the state.
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
NORMALIZATIONS = ("none", "l2", "loss", "loss+")
SOLVERS = _qp.MIN_NORM_SOLVERS

__all__ = ["MGDAState", "mgda", "mgda_weights", "NORMALIZATIONS", "SOLVERS"]


class MGDAState(NamedTuple):
    """State of :func:`mgda`.

    Attributes:
      count: number of updates so far (int32).
      weights: ``λ*`` of the last update, ``[T]`` float32 on the simplex.
      gap: Frank–Wolfe duality gap of ``λ*`` (relative; ~0 when solved), float32.
      iterations: solver iterations of the last update (int32).
    """

    count: chex.Array
    weights: chex.Array
    gap: chex.Array
    iterations: chex.Array


@_qp.highest_precision
def mgda_weights(
    gram: jax.Array,
    *,
    normalization: str = "none",
    losses: Optional[jax.Array] = None,
    solver: str = "active_set",
    max_iter: Optional[int] = None,
    tol: float = 1e-5,
) -> _qp.SolverResult:
    """Min-norm weights ``λ*`` for the Gram matrix ``G`` (``[T, T]``) of the task gradients."""
    dtype = gram.dtype
    tiny = jnp.finfo(dtype).tiny
    if normalization == "none":
        norm = jnp.ones(gram.shape[0], dtype)
    else:
        l2 = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        if normalization == "l2":
            norm = l2
        else:
            if losses is None:
                raise ValueError(f"mgda with normalization={normalization!r} requires the losses= extra argument.")
            loss = jnp.asarray(losses).astype(dtype)
            norm = loss if normalization == "loss" else loss * l2
        norm = jnp.where(jnp.abs(norm) > tiny, norm, 1.0)
    g = gram / (norm[:, None] * norm[None, :])
    return _qp.min_norm_simplex(g, solver=solver, max_iter=max_iter, tol=tol)


def mgda(
    num_tasks: int,
    *,
    normalization: str = "none",
    solver: str = "active_set",
    max_iter: Optional[int] = None,
    tol: float = 1e-5,
    weight_heads: bool = True,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """MGDA (Sener & Koltun, NeurIPS 2018): ``d = Σ_t λ*_t g_t`` with min-norm ``λ*``.

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      normalization: gradient normaliser for the solver, one of
        ``"none"`` (default, LibMTL), ``"l2"``, ``"loss"``, ``"loss+"``.
      solver: ``"active_set"`` (exact, default) or ``"frank_wolfe"``.
      max_iter: iteration cap of the solver; default ``4T + 20`` (active set)
        or 250 (Frank–Wolfe, the official ``MAX_ITER``).
      tol: solver tolerance (KKT for the active set, duality gap for FW).
      weight_heads: weight task-specific leaves by ``λ*`` (official code) rather
        than summing them.
      shared: which leaves are shared (see :func:`dbmtl_jax.dbmtl`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update(updates, state,
      params=None, *, losses=None)`` needs ``losses=`` (``[T]``) only for the
      ``"loss"``/``"loss+"`` normalisations.
    """
    _qp.check_positive_int(num_tasks, "num_tasks")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}.")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}.")
    if max_iter is not None:
        _qp.check_positive_int(max_iter, "max_iter")
    _qp.check_nonnegative(tol, "tol")

    def init_fn(params: PyTree) -> MGDAState:
        del params
        return MGDAState(
            count=jnp.zeros([], jnp.int32),
            weights=jnp.full([num_tasks], 1.0 / num_tasks, jnp.float32),
            gap=jnp.zeros([], jnp.float32),
            iterations=jnp.zeros([], jnp.int32),
        )

    def update_fn(
        updates: PyTree,
        state: MGDAState,
        params: Optional[PyTree] = None,
        *,
        losses: Optional[jax.Array] = None,
        **extra_args: Any,
    ) -> tuple[PyTree, MGDAState]:
        del extra_args
        ta.check_task_axis(updates, num_tasks)
        if normalization in ("loss", "loss+"):
            if losses is None:
                raise ValueError(f"mgda with normalization={normalization!r} requires the losses= extra argument.")
            if jnp.shape(losses) != (num_tasks,):
                raise ValueError(f"losses must have shape ({num_tasks},), got {jnp.shape(losses)}.")
        mask = ta.resolve_shared(shared, updates if params is None else params)
        g_shared, g_heads, treedef = ta.split_shared(updates, mask)
        gram, _ = _qp.shared_gram(g_shared, num_tasks)
        res = mgda_weights(gram, normalization=normalization, losses=losses, solver=solver, max_iter=max_iter, tol=tol)
        lam = res.x
        out_shared = _qp.weighted_sum(g_shared, lam)
        out_heads = _qp.weighted_sum(g_heads, lam) if weight_heads else [jnp.sum(g, axis=0) for g in g_heads]
        out = ta.merge_shared(out_shared, out_heads, mask, treedef)
        new_state = MGDAState(
            count=optax.safe_increment(state.count),
            weights=lam.astype(jnp.float32),
            gap=res.residual.astype(jnp.float32),
            iterations=res.iterations.astype(jnp.int32),
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
