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
  (see :func:`dbmtl_jax.methods._qp.power_balance`).  It works in variables
  scaled per task: with ``G = D C D`` (``D = diag ‖g_t‖``, ``C`` the cosines,
  each formed from the task's gradient divided by its own largest entry) and
  ``α = D⁻¹ z``, the condition is ``C z = 1/z``, which does not depend on the
  norms at all; so ``α`` is exact whatever the relative scale of the task
  gradients (1e-6 next to 1e6 included).  It stops once
  ``max_t |α_t (Gα)_t − 1| ≤ tol / 4`` (default ``tol = 1e-4``).
* residual: the state keeps a *bound* on ``max_t |α_t (Gα)_t − 1|`` (the
  residual evaluated in the scaled variables plus a rounding margin that
  grows with the cancellation in ``Gα``), and the Newton iterations.
  ``residual ≤ tol`` certifies the bargaining condition; nearly dependent
  task gradients (where float32 cannot resolve ``α``) or a cap hit report a
  residual above ``tol``, never a false success.
* a ridge ``ridge · ‖g_t‖²`` on each diagonal entry of ``G`` (default 1e-6,
  i.e. ``C + ridge·I``) keeps ``α`` finite when the bargaining equation has no
  solution (for instance ``g_3 = −g_1``); its ``O(ridge)`` bias is removed by
  two final Newton steps without it when a solution exists.  A task with a
  zero shared gradient cannot satisfy its condition: it gets the weight of
  an orthogonal task of the largest norm and the residual is 1.  With an
  all-zero shared gradient (or no shared leaves) ``α = 1`` and the residual
  is 1.
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
* hyperparameters are checked when the transform is built: a value out of
  its range raises ``ValueError`` naming the option and the accepted range.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _qp

PyTree = Any

__all__ = [
    "NashMTLState",
    "nash_mtl",
    "solve_balanced_weights",
    "clip_leaves",
    "check_number",
    "check_count",
    "check_flag",
]


class NashMTLState(NamedTuple):
    """State of :func:`nash_mtl`.

    Attributes:
      count: number of updates so far (int32).
      weights: the last ``α`` (``[T]`` float32, raw gradient scale), reused
        between recomputations and as the solver's warm start.
      residual: a bound on ``max_t |α_t (Gα)_t − 1|`` for the last solve
        (float32; ``≤ tol`` means converged).
      iterations: Newton iterations of the last update (int32; 0 when ``α`` was reused).
    """

    count: chex.Array
    weights: chex.Array
    residual: chex.Array
    iterations: chex.Array


def check_number(
    value: Any,
    option: str,
    method: str,
    *,
    lo: float,
    hi: float = math.inf,
    lo_open: bool = False,
    hi_open: bool = True,
) -> float:
    """A finite real hyperparameter in the range ``lo .. hi``; ``ValueError`` naming the option and range."""
    rng = f"{'(' if lo_open else '['}{lo:g}, {'inf' if math.isinf(hi) else format(hi, 'g')}{')' if hi_open else ']'}"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ValueError(f"{method}: {option} must be a finite number in {rng}, got {value!r}.")
    return float(value)


def check_count(value: Any, option: str, method: str) -> int:
    """A Python int ≥ 1; ``ValueError`` naming the option and range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{method}: {option} must be an int >= 1, got {value!r}.")
    return int(value)


def check_flag(value: Any, option: str, method: str) -> bool:
    """A bool; ``ValueError`` naming the option otherwise."""
    if not isinstance(value, bool):
        raise ValueError(f"{method}: {option} must be True or False, got {value!r}.")
    return value


def solve_balanced_weights(
    leaves: list,
    num_tasks: int,
    p: float,
    prev: jax.Array,
    *,
    ridge: float,
    max_iter: int,
    tol: float = 1e-4,
) -> _qp.SolverResult:
    """Solves ``G w = w^{-p}`` for the raw Gram matrix of ``leaves``; ``prev`` is the warm start.

    ``G = diag(n) C diag(n)`` is formed as task norms ``n`` and cosines ``C``
    (:func:`dbmtl_jax.methods._qp.task_cosine_gram`, each task pre-scaled by
    its own largest entry) and solved in variables scaled per task
    (:func:`dbmtl_jax.methods._qp.power_balance`), so the result is accurate
    whatever the relative scale of the task gradients.  The residual is a
    bound on ``max_t |w_t^p (Gw)_t − 1|``.  When the shared gradient is all
    zeros (or there are no shared leaves) the equation has no solution:
    ``w = 1`` is returned with residual 1.
    """
    cos, norms = _qp.task_cosine_gram(leaves, num_tasks)
    return _qp.power_balance(
        cos, p, norms=norms, w0=prev, ridge=ridge, max_iter=max_iter, tol=tol, out_dtype=jnp.float32
    )


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
    tol: float = 1e-4,
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
      max_iter: Newton iteration cap (fixed budget), an int ≥ 1.
      ridge: ridge relative to each task's squared gradient norm, in [0, 1)
        (see the module docstring).
      tol: target of the relative residual ``max_t |α_t (Gα)_t − 1|``, in
        (0, 1); the state's residual above it means not converged.
      weight_heads: weight task-specific leaves by ``α`` (official) rather than
        summing them.
      shared: which leaves are shared (see :func:`dbmtl_jax.dbmtl`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args are ignored.

    Raises:
      ValueError: a hyperparameter out of its range (the message names it).
    """
    name = "nash_mtl"
    num_tasks = check_count(num_tasks, "num_tasks", name)
    max_norm = check_number(max_norm, "max_norm", name, lo=0.0)
    update_weights_every = check_count(update_weights_every, "update_weights_every", name)
    max_iter = check_count(max_iter, "max_iter", name)
    ridge = check_number(ridge, "ridge", name, lo=0.0, hi=1.0)
    tol = check_number(tol, "tol", name, lo=0.0, hi=1.0, lo_open=True)
    check_flag(weight_heads, "weight_heads", name)

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
        ta.check_task_axis(updates, num_tasks, params=params)
        mask = ta.resolve_shared(shared, updates if params is None else params)
        g_shared, g_heads, treedef = ta.split_shared(updates, mask)

        def solve(_):
            res = solve_balanced_weights(
                g_shared, num_tasks, 1.0, state.weights, ridge=ridge, max_iter=max_iter, tol=tol
            )
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
