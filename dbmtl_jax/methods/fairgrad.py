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
  (see :func:`dbmtl_jax.methods._qp.power_balance`).  It works in variables
  scaled per task (``w_t = z_t ‖g_t‖^{−2/(1+1/α)}``, cosines formed from each
  task's gradient divided by its own largest entry), so ``w`` is exact
  whatever the relative scale of the task gradients, as far as the weights
  are representable (α-fair weights grow like ``‖g_t‖^{−2α/(1+α)}``).  It
  stops once ``max_t |w_t^{1/α} (Gw)_t − 1| ≤ tol / 4`` (default
  ``tol = 1e-4``).
* residual: the state keeps a *bound* on ``max_t |w_t^{1/α} (Gw)_t − 1|``
  (the residual in the scaled variables plus a rounding margin that grows
  with the cancellation in ``Gw``) and the iterations; ``residual ≤ tol``
  certifies the condition, while ill-conditioned problems or a cap hit
  report a residual above ``tol``.  Weights outside float32's normal range
  (task-gradient norms above ~3e28 at α = 2) make the step invalid: NaN
  update and the whole state kept (the update itself, of norm ~‖g‖^((1−α)/(1+α)),
  is representable, but not through raw-scale weights).
* ``ridge`` (default 1e-6, relative to each task's own squared gradient
  norm) is added to the diagonal of ``G`` to keep ``w`` finite when the
  equation has no solution; its bias is removed by two final Newton steps
  without it when a solution exists.  A task with a zero shared gradient gets
  the weight of an orthogonal task of the largest norm and residual 1; with
  an all-zero shared gradient (or no shared leaves) ``w = 1`` and the
  residual is 1.
* ``max_norm`` (default 1.0, official ``WeightMethod`` default): the shared
  update is clipped to this global norm (``0`` disables).  The official code
  also multiplies the shared update by T before clipping (a leftover of its
  CAGrad template); here the shared update is ``Σ_t w_t g_t`` as in LibMTL.
* heads: the official code overwrites only the shared gradient, so head
  leaves keep the plain ``Σ_t g_t`` (``weight_heads=False``, default);
  ``weight_heads=True`` gives ``Σ_t w_t g_t`` (LibMTL, which back-propagates
  ``Σ_t w_t ℓ_t``).
* hyperparameters are checked when the transform is built: a value out of
  its range raises ``ValueError`` naming the option and the accepted range.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _numerics as nm
from dbmtl_jax.methods.nash_mtl import balance_transform

PyTree = Any

__all__ = ["FairGradState", "fairgrad"]


class FairGradState(NamedTuple):
    """State of :func:`fairgrad`.

    Attributes:
      count: number of updates so far (int32).
      weights: the last ``w`` (``[T]`` float32, raw gradient scale; warm start).
      residual: a bound on ``max_t |w_t^{1/α} (Gw)_t − 1|`` for the last solve
        (float32; ``≤ tol`` means converged).
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
    tol: float = 1e-4,
    weight_heads: bool = False,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """FairGrad (Ban & Ji, ICML 2024): ``d = Σ_t w_t g_t`` with ``Gw = w^{-1/α}``.

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      alpha: the fairness parameter α > 0 (default 2.0, official run scripts).
      max_norm: clip the shared update to this global norm (≥ 0); 0 disables.
      max_iter: Newton iteration cap (fixed budget), an int ≥ 1.
      ridge: ridge relative to each task's squared gradient norm, in [0, 1).
      tol: target of the relative residual ``max_t |w_t^{1/α} (Gw)_t − 1|``,
        in (0, 1); the state's residual above it means not converged.
      weight_heads: weight task-specific leaves by ``w`` (LibMTL) instead of
        summing them (official, default).
      shared: which leaves are shared (see :func:`dbmtl_jax.dbmtl`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args are ignored.

    Raises:
      ValueError: a hyperparameter out of its range (the message names it).
    """
    name = "fairgrad"
    num_tasks = nm.check_num_tasks(num_tasks, name)
    nm.check_static(alpha, "alpha", name, "it sets the solver's exponent 1/α")
    alpha = float(nm.check_real(alpha, "alpha", name, lo=0.0, lo_open=True, type_error=ValueError, interval=True))
    return balance_transform(
        name,
        FairGradState,
        num_tasks,
        1.0 / alpha,
        max_norm=max_norm,
        max_iter=max_iter,
        ridge=ridge,
        tol=tol,
        weight_heads=weight_heads,
        shared=shared,
    )
