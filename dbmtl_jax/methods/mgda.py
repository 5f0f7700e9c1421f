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
  (a finite primal active-set method, :func:`dbmtl_jax.methods._qp.simplex_qp`);
  ``"frank_wolfe"`` is Frank–Wolfe with exact line search from the best pair of
  tasks with at most ``max_iter`` (default 250, the official ``MAX_ITER``)
  iterations and stopping tolerance ``tol``, as the official
  ``MinNormSolver`` FW variant, plus away steps (so interior solutions
  converge linearly; the official solver in use is a projected gradient
  variant without them) and a final active-set polish of at most ``T + 2``
  iterations on the support it found (which makes it exact whenever that
  support is right; without it, FW stalls for tasks of very different scales).
* numerics: both solvers work in the preconditioned variables
  ``μ_t = λ_t ‖ĝ_t‖`` on the matrix of cosines between the task gradients
  (:func:`dbmtl_jax.methods._qp.precondition_gram`), so they are exact for
  task gradients of any relative scale (tested for norms 10^±6 apart), and
  their stopping rules are relative to the optimum's own scale.
* scale: ``λ*`` sums to 1, so the update is on the scale of one task gradient
  (official code and LibMTL; the Nash-MTL repository's re-implementation
  multiplies by T).
* heads: the official code back-propagates ``Σ_t λ*_t ℓ_t``, so task-specific
  leaves are weighted too: head leaves get ``Σ_t λ*_t g_t`` by default
  (``weight_heads=True``; the DB-MTL paper, Sec. 2, describes MGDA this way).
  ``weight_heads=False`` gives them the plain ``Σ_t g_t`` (LibMTL).

Degenerate input: for all-zero shared gradients every ``λ`` is optimal and the
uniform weights are used; a zero task gradient makes ``d = 0`` optimal (its
vertex is returned, residual 0).

Residual (``state.gap``): the relative KKT residual of ``λ*``
(:func:`dbmtl_jax.methods._qp.min_norm_kkt_gap`), a bound including a rounding
margin: a value ``r`` certifies, for every task and with ``d = Σ_t λ*_t ĝ_t``,
``⟨ĝ_t, d⟩ ≥ ‖d‖² − r ‖ĝ_t‖ ‖d‖`` (so ``cos(ĝ_t, d) ≥ −r``: no task is
conflicted by more than a cosine of ``r``) and ``|⟨ĝ_t, d⟩ − ‖d‖²| ≤ r ‖ĝ_t‖ ‖d‖``
for the tasks with ``λ*_t > 0``.  The solve has converged when ``gap ≤ tol``.
The bound is for the float32 (or wider) Gram matrix, whose entries are
accurate to about ``√P ε`` relative to ``‖g_i‖ ‖g_j‖``.  Near a Pareto-stationary
point (``0`` in the convex hull) ``d`` is only determined to ``~√ε`` of the
gradients and the gap is of order 1: the relative conditions cannot be
certified for an update that is numerically zero.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _gradient_common as gc
from dbmtl_jax.methods import _numerics as nm
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
      gap: relative KKT residual of ``λ*`` (a cosine bound, see the module docstring;
        the solve converged when ``gap ≤ tol``), float32.
      iterations: solver iterations of the last update (int32).
    """

    count: chex.Array
    weights: chex.Array
    gap: chex.Array
    iterations: chex.Array


@nm.highest_precision
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
    res = _qp.min_norm_simplex(g, solver=solver, max_iter=max_iter, tol=tol)
    if normalization in ("loss", "loss+"):
        # A loss that is not finite and > 0 cannot normalise its gradient (the solver would read it as
        # a zero task or flip its sign): the weights, and so the update, become NaN (a visibly invalid
        # step, which skip_invalid_steps rejects) and the residual inf, rather than a finite update.
        bad = ~jnp.all(jnp.isfinite(loss) & (loss > 0))
        res = res._replace(x=jnp.where(bad, jnp.nan, res.x), residual=jnp.where(bad, jnp.inf, res.residual))
    return res


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
      max_iter: iteration cap of the solver, an int ``>= 1``; default ``4T + 20``
        (active set) or 250 (Frank–Wolfe, the official ``MAX_ITER``).
      tol: relative KKT tolerance in ``(0, 1)`` (a cosine, see the module
        docstring): the convergence criterion of Frank–Wolfe and the level
        below which ``state.gap`` reports convergence; the active set adds
        every constraint violated by more than ``max(tol / 100, rounding)``.
      weight_heads: weight task-specific leaves by ``λ*`` (official code) rather
        than summing them (a bool).
      shared: which leaves are shared (see :func:`dbmtl_jax.dbmtl`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update(updates, state,
      params=None, *, losses=None)`` needs ``losses=`` (``[T]``) only for the
      ``"loss"``/``"loss+"`` normalisations.
    """
    nm.check_num_tasks(num_tasks, "mgda")
    nm.check_choice(normalization, NORMALIZATIONS, "normalization", "mgda")
    nm.check_choice(solver, SOLVERS, "solver", "mgda")
    nm.check_static(max_iter, "max_iter", "mgda", "it sizes the solver's loop")
    if max_iter is not None:
        max_iter = nm.check_int(max_iter, "max_iter", "mgda", lo=1)
    tol = nm.check_real(tol, "tol", "mgda", lo=0, hi=1, lo_open=True, hi_open=True)
    nm.check_bool(weight_heads, "weight_heads", "mgda")

    def init_state(params: PyTree) -> MGDAState:
        del params
        return MGDAState(
            count=jnp.zeros([], jnp.int32),
            weights=jnp.full([num_tasks], 1.0 / num_tasks, jnp.float32),
            gap=jnp.zeros([], jnp.float32),
            iterations=jnp.zeros([], jnp.int32),
        )

    def weighting(gram: jax.Array, state: MGDAState, *, losses: Any = None, **_: Any) -> tuple[jax.Array, dict]:
        if normalization in ("loss", "loss+"):
            losses = nm.check_losses(losses, num_tasks, f"mgda (normalization={normalization!r})")
        res = mgda_weights(gram, normalization=normalization, losses=losses, solver=solver, max_iter=max_iter, tol=tol)
        lam = res.x
        fields = dict(
            weights=lam.astype(jnp.float32),
            gap=res.residual.astype(jnp.float32),
            iterations=res.iterations.astype(jnp.int32),
        )
        return lam, fields

    heads = "weighted" if weight_heads else "sum"
    return gc.make_gradient_transform("mgda", num_tasks, weighting, init_state, shared=shared, heads=heads, hparams=tol)
