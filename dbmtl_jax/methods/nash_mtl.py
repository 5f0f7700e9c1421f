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

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _gradient_common as gc
from dbmtl_jax.methods import _numerics as nm
from dbmtl_jax.methods import _qp

PyTree = Any

__all__ = [
    "NashMTLState",
    "nash_mtl",
    "solve_balanced_weights",
    "clip_leaves",
    "balance_transform",
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


def solve_balanced_weights(
    gram: tuple[jax.Array, jax.Array],
    p: float,
    prev: jax.Array,
    *,
    ridge: float,
    max_iter: int,
    tol: float = 1e-4,
) -> _qp.SolverResult:
    """Solves ``G w = w^{-p}`` for the raw Gram matrix of the shared gradients; ``prev`` is the warm start.

    ``G = diag(n) C diag(n)`` is given as ``gram = (C, n)``, cosines and task
    norms (:func:`dbmtl_jax.methods._numerics.task_cosine_gram`, each task
    pre-scaled by its own largest entry), and solved in variables scaled per task
    (:func:`dbmtl_jax.methods._qp.power_balance`), so the result is accurate
    whatever the relative scale of the task gradients.  The residual is a
    bound on ``max_t |w_t^p (Gw)_t − 1|``.  When the shared gradient is all
    zeros (or there are no shared leaves) the equation has no solution:
    ``w = 1`` is returned with residual 1.
    """
    cos, norms = gram
    return _qp.power_balance(
        cos, p, norms=norms, w0=prev, ridge=ridge, max_iter=max_iter, tol=tol, out_dtype=jnp.float32
    )


def clip_leaves(leaves: list, max_norm: float) -> list:
    """Scales ``leaves`` so that their global norm is at most ``max_norm`` (0: no clipping)."""
    if max_norm <= 0 or not leaves:
        return leaves
    norm = nm.global_norm(leaves)
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
    num_tasks = nm.check_num_tasks(num_tasks, name)
    nm.check_static(update_weights_every, "update_weights_every", name, "it decides whether the solver runs")
    update_weights_every = nm.check_int(update_weights_every, "update_weights_every", name, lo=1, type_error=ValueError)
    return balance_transform(
        name,
        NashMTLState,
        num_tasks,
        1.0,
        max_norm=max_norm,
        max_iter=max_iter,
        ridge=ridge,
        tol=tol,
        weight_heads=weight_heads,
        shared=shared,
        update_every=update_weights_every,
    )


def balance_transform(
    name: str,
    state_cls: type,
    num_tasks: int,
    p: float,
    *,
    max_norm: Any,
    max_iter: Any,
    ridge: Any,
    tol: Any,
    weight_heads: Any,
    shared: ta.SharedSpec,
    update_every: int = 1,
) -> optax.GradientTransformationExtraArgs:
    """The transform of the balance methods ``G w = w^{-p}`` (Nash-MTL ``p = 1``, FairGrad ``p = 1/α``).

    Validates the hyperparameters the two share (``ValueError`` for every bad
    value, naming ``name``), then builds the Gram-weighting transform on the
    cosine Gram matrix: weights by :func:`solve_balanced_weights` warm-started
    from ``state.weights`` (recomputed every ``update_every`` updates), shared
    update clipped to ``max_norm`` (:func:`clip_leaves`), heads weighted or
    summed.  ``state_cls`` has the fields ``count, weights, residual, iterations``.
    """
    strict = {"type_error": ValueError, "interval": True}  # this family raises ValueError for every bad value
    nm.check_static(max_norm, "max_norm", name, "0 turns the clipping off")
    nm.check_static(ridge, "ridge", name, "the solver reads it as a Python float")
    nm.check_static(tol, "tol", name, "the solver reads it as a Python float")
    max_norm = float(nm.check_real(max_norm, "max_norm", name, lo=0.0, **strict))
    max_iter = nm.check_int(max_iter, "max_iter", name, lo=1, type_error=ValueError)
    ridge = float(nm.check_real(ridge, "ridge", name, lo=0.0, hi=1.0, hi_open=True, **strict))
    tol = float(nm.check_real(tol, "tol", name, lo=0.0, hi=1.0, lo_open=True, hi_open=True, **strict))
    nm.check_bool(weight_heads, "weight_heads", name, type_error=ValueError)

    def init_state(params: PyTree) -> NamedTuple:
        del params
        return state_cls(
            count=jnp.zeros([], jnp.int32),
            weights=jnp.ones([num_tasks], jnp.float32),
            residual=jnp.zeros([], jnp.float32),
            iterations=jnp.zeros([], jnp.int32),
        )

    def weighting(gram: tuple, state: NamedTuple, **_: Any) -> tuple[jax.Array, dict]:
        res = solve_balanced_weights(gram, p, state.weights, ridge=ridge, max_iter=max_iter, tol=tol)
        w = res.x.astype(jnp.float32)
        return w, dict(weights=w, residual=res.residual.astype(jnp.float32),
                       iterations=res.iterations.astype(jnp.int32))

    def normal_weights(w: jax.Array) -> jax.Array:
        # The weights are positive by construction; one that is not a normal float32 (FairGrad's grow like
        # ‖g_t‖^(−2/(1+p)) and underflow for norms above ~3e28) would give a silently wrong update.
        return jnp.all(jnp.isfinite(w) & (w >= jnp.finfo(jnp.float32).tiny))

    def refresh(state: NamedTuple) -> jax.Array:
        return state.count % update_every == 0

    def stale(state: NamedTuple) -> tuple[jax.Array, dict]:
        zero = jnp.zeros([], jnp.int32)
        return state.weights, dict(weights=state.weights, residual=state.residual, iterations=zero)

    return gc.make_gradient_transform(
        name,
        num_tasks,
        weighting,
        init_state,
        shared=shared,
        gram="cosine",
        heads="weighted" if weight_heads else "sum",
        refresh=None if update_every == 1 else refresh,
        stale=stale,
        postprocess=lambda leaves: clip_leaves(leaves, max_norm),
        accept=normal_weights,
    )
