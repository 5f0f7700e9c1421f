"""CAGrad: conflict-averse gradient descent.

Reference: B. Liu, X. Liu, X. Jin, P. Stone, Q. Liu, "Conflict-Averse Gradient
Descent for Multi-task Learning", NeurIPS 2021.

CAGrad looks for the update ``d`` in the ball ``‖d − g₀‖ ≤ c‖g₀‖`` around the
average gradient ``g₀ = (1/T) Σ_t g_t`` that maximises the worst task
improvement ``min_t ⟨g_t, d⟩``.  Its dual is a problem over the simplex::

    w* = argmin_{w ∈ Δ_T}  g_wᵀ g₀ + c‖g₀‖ ‖g_w‖,      g_w = Σ_t w_t g_t
    d  = g₀ + c‖g₀‖ / ‖g_w*‖ · g_w*

and the update is ``d / (1 + c²)`` (``rescale=1``, the official default),
``d`` (``rescale=0``) or ``d / (1 + c)`` (``rescale=2``).  Everything is
computed on the ``[T, T]`` Gram matrix of the global shared gradient, so the
update is the single weighted sum ``Σ_t (1/T + λ w*_t) g_t / rescale`` with
``λ = c‖g₀‖ / ‖g_w*‖``.

Choices:

* ``c = 0.5`` by default (LibMTL's ``calpha`` default and the default
  ``alpha=0.5`` of the official ``cagrad()`` function); the official
  NYUv2/Cityscapes runs and the Nash-MTL repository use ``c = 0.4``.
* solver: the official code calls SciPy's SLSQP on the dual.  Here the dual
  is solved in-graph, exactly up to a 1-D search: with ``r = c‖g₀‖`` and
  ``√q = min_{t>0} (q/t + t)/2``, the dual is ``min_{t>0} ψ(t)`` with the
  convex ``ψ(t) = min_{w∈Δ} ⟨g₀, g_w⟩ + r/2·((‖g_w‖² + ε)/t + t)``.  For a fixed
  ``t`` the inner problem is the min-norm point of the shifted gradients
  ``{g_i + (t/r) g₀}`` (an MGDA problem, solved exactly by the active-set NNLS
  of :mod:`dbmtl_jax.methods._qp`), and ``ψ'(t)`` has the sign of
  ``t² − ‖g_w(t)‖² − ε``, which is monotone; ``t`` is found by
  ``num_bisections`` (default 40) bisections in ``log t`` over
  ``[√ε, max_t ‖g_t‖]``.  Being gradient-based, this is accurate in float32,
  where value-based first-order solvers stall.  As in the official code
  ``‖g_w‖`` is smoothed as ``sqrt(‖g_w‖² + ε)`` and ``λ`` uses ``‖g_w‖ + ε``
  with ``ε = 1e-8``, here in units where the mean squared task-gradient norm
  is 1 (so the result is scale-invariant).  The state keeps the Frank–Wolfe gap of
  ``w*`` for the dual (the residual; ~0 when solved).
* scale: ``g₀`` is the mean, so the update is on the scale of one task
  gradient (official code and LibMTL; the Nash-MTL repository multiplies by
  T and clips the norm to 1).
* heads: task-specific leaves get the plain ``Σ_t g_t`` (official code and
  LibMTL: only the shared gradient is replaced).
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
RESCALES = (0, 1, 2)

__all__ = ["CAGradState", "cagrad", "cagrad_weights", "cagrad_dual_objective", "RESCALES"]


class CAGradState(NamedTuple):
    """State of :func:`cagrad`.

    Attributes:
      count: number of updates so far (int32).
      weights: coefficients ``a`` of the last shared update ``Σ_t a_t g_t``, ``[T]`` float32.
      dual_weights: the dual solution ``w*`` on the simplex, ``[T]`` float32.
      gap: Frank–Wolfe gap of ``w*`` for the (normalised) dual objective, float32.
      iterations: total NNLS iterations of the last update (int32).
    """

    count: chex.Array
    weights: chex.Array
    dual_weights: chex.Array
    gap: chex.Array
    iterations: chex.Array


@_qp.highest_precision
def cagrad_dual_objective(gram: jax.Array, c: float, w: jax.Array, eps: float = 1e-8) -> tuple[jax.Array, jax.Array]:
    """The (smoothed) dual ``F(w) = wᵀGb + c‖g₀‖ sqrt(wᵀGw + ε)`` and its gradient, ``b = 1/T``."""
    t = gram.shape[0]
    b = jnp.full((t,), 1.0 / t, gram.dtype)
    gb = gram @ b
    radius = c * jnp.sqrt(jnp.maximum(jnp.dot(b, gb), 0.0))
    gw = gram @ w
    root = jnp.sqrt(jnp.maximum(jnp.dot(w, gw), 0.0) + eps)
    return jnp.dot(w, gb) + radius * root, gb + radius * gw / root


@_qp.highest_precision
def cagrad_weights(
    gram: jax.Array,
    c: float,
    *,
    rescale: int = 1,
    num_bisections: int = 40,
    eps: float = 1e-8,
) -> tuple[jax.Array, _qp.SolverResult]:
    """Coefficients of the CAGrad update for a Gram matrix normalised to mean diagonal ~1.

    Returns ``(coef, dual)``: the update is ``Σ_t coef_t g_t``, ``dual.x`` is
    ``w*``, ``dual.residual`` its Frank–Wolfe gap for :func:`cagrad_dual_objective`
    and ``dual.iterations`` the total number of NNLS iterations.
    """
    n = gram.shape[0]
    dtype = gram.dtype
    b = jnp.full((n,), 1.0 / n, dtype)
    a = gram @ b
    n0 = jnp.maximum(jnp.dot(b, a), 0.0)
    radius = c * jnp.sqrt(n0)
    ones = jnp.ones((n, n), dtype)
    safe_radius = jnp.where(radius > 0, radius, 1.0)

    def inner(t):
        # argmin_w ⟨g0, g_w⟩ + r/(2t)·‖g_w‖²  =  min-norm point of {g_i + τ g0}, τ = t/r
        tau = t / safe_radius
        g_tau = gram + tau * (a[:, None] + a[None, :]) + tau * tau * n0 * ones
        res = _qp.min_norm_simplex(g_tau)
        return res.x, res.iterations

    def h(w, t):
        # sign of ψ'(t) for the convex ψ(t) = min_w ⟨g0,g_w⟩ + r/2·((‖g_w‖²+ε)/t + t)
        return t * t - jnp.maximum(jnp.dot(w, gram @ w), 0.0) - eps

    lo = jnp.log(jnp.sqrt(jnp.asarray(eps, dtype)))
    hi = jnp.log(jnp.sqrt(jnp.max(jnp.diagonal(gram)) + eps))

    def body(_, state):
        lo, hi, iters = state
        mid = 0.5 * (lo + hi)
        t = jnp.exp(mid)
        w, it = inner(t)
        up = h(w, t) >= 0
        return jnp.where(up, lo, mid), jnp.where(up, mid, hi), iters + it

    lo, hi, iters = jax.lax.fori_loop(0, num_bisections, body, (lo, hi, jnp.zeros([], jnp.int32)))
    w, it = inner(jnp.exp(0.5 * (lo + hi)))
    w = jnp.where(radius > 0, w, b)
    _, grad = cagrad_dual_objective(gram, c, w, eps)
    fw_gap = jnp.maximum(jnp.dot(grad, w) - jnp.min(grad), 0.0)
    gw_norm = jnp.sqrt(jnp.maximum(jnp.dot(w, gram @ w), 0.0))
    lmbda = radius / (gw_norm + eps)
    coef = b + lmbda * w
    div = {0: 1.0, 1: 1.0 + c**2, 2: 1.0 + c}[rescale]
    return coef / div, _qp.SolverResult(w, iters + it, fw_gap)


def cagrad(
    num_tasks: int,
    *,
    c: float = 0.5,
    rescale: int = 1,
    num_bisections: int = 40,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """CAGrad (Liu et al., NeurIPS 2021).

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      c: radius factor of the ball around the mean gradient (default 0.5;
        official NYUv2 runs use 0.4).  ``c = 0`` gives the mean gradient.
      rescale: 0 (no rescaling), 1 (divide by ``1 + c²``, default) or 2
        (divide by ``1 + c``), as the official code.
      num_bisections: bisection steps of the 1-D search (fixed budget).
      shared: which leaves are shared (see :func:`dbmtl_jax.dbmtl`); head
        leaves get ``Σ_t g_t``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args are ignored.
    """
    _qp.check_positive_int(num_tasks, "num_tasks")
    c = _qp.check_nonnegative(c, "c")
    if isinstance(rescale, bool) or rescale not in RESCALES:
        raise ValueError(f"unknown rescale {rescale!r}; expected one of {RESCALES}.")
    _qp.check_positive_int(num_bisections, "num_bisections")

    def init_fn(params: PyTree) -> CAGradState:
        del params
        uniform = jnp.full([num_tasks], 1.0 / num_tasks, jnp.float32)
        return CAGradState(
            count=jnp.zeros([], jnp.int32),
            weights=uniform,
            dual_weights=uniform,
            gap=jnp.zeros([], jnp.float32),
            iterations=jnp.zeros([], jnp.int32),
        )

    def update_fn(
        updates: PyTree, state: CAGradState, params: Optional[PyTree] = None, **extra_args: Any
    ) -> tuple[PyTree, CAGradState]:
        del extra_args
        ta.check_task_axis(updates, num_tasks)
        mask = ta.resolve_shared(shared, updates if params is None else params)
        g_shared, g_heads, treedef = ta.split_shared(updates, mask)
        gram, _ = _qp.shared_gram(g_shared, num_tasks)
        coef, res = cagrad_weights(gram, c, rescale=rescale, num_bisections=num_bisections)
        out_shared = _qp.weighted_sum(g_shared, coef)
        out_heads = [jnp.sum(g, axis=0) for g in g_heads]
        out = ta.merge_shared(out_shared, out_heads, mask, treedef)
        new_state = CAGradState(
            count=optax.safe_increment(state.count),
            weights=coef.astype(jnp.float32),
            dual_weights=res.x.astype(jnp.float32),
            gap=res.residual.astype(jnp.float32),
            iterations=res.iterations.astype(jnp.int32),
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
