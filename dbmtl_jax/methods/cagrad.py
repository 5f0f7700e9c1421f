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
  ``t`` the inner problem is ``min_{w∈Δ} ½‖g_w + (t/r) g₀‖²``, the projection
  of ``−(t/r) g₀`` onto the convex hull of the gradients, solved exactly by
  the active set of :func:`dbmtl_jax.methods._qp.simplex_qp` in the
  preconditioned variables ``μ_t = w_t ‖g_t‖`` on the cosine matrix (so no
  task is rounded away whatever the relative scale of the gradients; the
  shifted Gram matrix is never formed), warm-started from the previous
  solution.  ``ψ'(t)`` has the sign of ``t² − ‖g_w(t)‖² − ε``, which is
  monotone; its root lies in ``[√(m² + ε), √(M² + ε)]`` (``m`` the min-norm
  point of the hull, i.e. MGDA, solved first; ``M = max_t ‖g_t‖``) and is
  found by ``num_bisections`` (default 40) bisection steps, at the geometric
  mean while the bracket spans more than a factor 2 and at the arithmetic
  mean after (full float precision on ``t``, ~30 steps for 12 decades).
  As in the official code ``‖g_w‖`` is smoothed as ``sqrt(‖g_w‖² + ε)`` and
  ``λ`` uses ``‖g_w‖ + ε`` with ``ε = eps`` (default 1e-8), here in units where
  the mean squared task-gradient norm is 1 (so the result is
  scale-invariant).  The smoothing is part of the problem solved (its effect
  is small: see docs/methods.md); ``eps = 0`` removes it, then the dual needs
  ``m > 0``, i.e. gradients that are not Pareto-stationary.
* residual (``state.gap``): the relative KKT residual of ``w*`` for the
  smoothed dual (a cosine bound including a rounding margin,
  :func:`dbmtl_jax.methods._qp.qp_kkt_residual`).  With
  ``d̃ = g₀ + r g_w / sqrt(‖g_w‖² + ε)`` (``∇F(w)_t = ⟨g_t, d̃⟩``), a value ``ρ``
  certifies: there is a ``ν`` with ``⟨g_t, d̃⟩ ≥ ν − ρ ‖g_t‖ ‖d̃‖`` for every task
  and ``|⟨g_t, d̃⟩ − ν| ≤ ρ ‖g_t‖ ‖d̃‖`` where ``w*_t > 0``: the tasks in the
  support are the worst-off ones and improve equally.
* degenerate input: a zero task gradient gets coefficient ``1/T`` only (with
  ``w*`` on it, ``g_w = 0`` and ``d = g₀``); all-zero gradients give ``d = 0``.
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
from dbmtl_jax.methods import _gradient_common as gc
from dbmtl_jax.methods import _numerics as nm
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
      gap: relative KKT residual of ``w*`` for the dual (a cosine bound, see the
        module docstring; converged when ``gap ≤ tol``), float32.
      iterations: total active-set iterations of the last update (int32).
    """

    count: chex.Array
    weights: chex.Array
    dual_weights: chex.Array
    gap: chex.Array
    iterations: chex.Array


@nm.highest_precision
def cagrad_dual_objective(gram: jax.Array, c: float, w: jax.Array, eps: float = 1e-8) -> tuple[jax.Array, jax.Array]:
    """The (smoothed) dual ``F(w) = wᵀGb + c‖g₀‖ sqrt(wᵀGw + ε)`` and its gradient, ``b = 1/T``."""
    t = gram.shape[0]
    b = jnp.full((t,), 1.0 / t, gram.dtype)
    gb = gram @ b
    radius = c * jnp.sqrt(jnp.maximum(jnp.dot(b, gb), 0.0))
    gw = gram @ w
    root = jnp.sqrt(jnp.maximum(jnp.dot(w, gw), 0.0) + eps)
    return jnp.dot(w, gb) + radius * root, gb + radius * gw / root


@nm.highest_precision
def cagrad_weights(
    gram: jax.Array,
    c: float,
    *,
    rescale: int = 1,
    num_bisections: int = 40,
    eps: float = 1e-8,
    max_iter: Optional[int] = None,
    tol: float = 1e-5,
) -> tuple[jax.Array, _qp.SolverResult]:
    """Coefficients of the CAGrad update for a Gram matrix ``G`` of the task gradients.

    Returns ``(coef, dual)``: the update is ``Σ_t coef_t g_t``, ``dual.x`` is
    ``w*``, ``dual.residual`` its relative KKT residual for
    :func:`cagrad_dual_objective` (see the module docstring) and
    ``dual.iterations`` the total number of active-set iterations.  ``eps`` is
    in units of the mean diagonal of ``G``; ``max_iter`` (default ``4T + 20``)
    and ``tol`` are those of every inner :func:`dbmtl_jax.methods._qp.simplex_qp`.
    """
    n = gram.shape[0]
    dtype = gram.dtype
    cos, nrm = _qp.precondition_gram(gram)
    nz = nrm > 0
    nmin = jnp.min(jnp.where(nz, nrm, jnp.inf))
    nmin = jnp.where(jnp.isfinite(nmin), nmin, 1.0)
    a = jnp.where(nz, nmin / jnp.where(nz, nrm, 1.0), 1.0)  # w = a ⊙ μ (simplex: aᵀμ = 1)
    b = jnp.full((n,), 1.0 / n, dtype)
    beta = jnp.where(nz, b / a, 0.0)  # g₀ = n_min Σ_t β_t ĝ_t
    n0 = jnp.maximum(jnp.dot(beta, cos @ beta), 0.0)
    radius = c * jnp.sqrt(n0)  # r / n_min
    md = jnp.mean(nrm * nrm)
    md = jnp.where(md > 0, md, 1.0)
    eps_n = eps * md / (nmin * nmin)  # ε in units of n_min²
    safe_radius = jnp.where(radius > 0, radius, 1.0)
    cap = max_iter or 4 * n + 20

    def inner(t, x0):
        # argmin_{w∈Δ} ½‖g_w + (t/r) g₀‖²: offset (t/r) β in the preconditioned variables
        res = _qp.simplex_qp(cos, a, offset=(t / safe_radius) * beta, max_iter=cap, tol=tol, x0=x0)
        return res.x, res.iterations

    def sq_norm(x):
        return jnp.maximum(jnp.dot(x, cos @ x), 0.0)

    mgda = _qp.simplex_qp(cos, a, max_iter=cap, tol=tol)
    hi = jnp.sqrt(jnp.max(jnp.where(nz, 1.0 / (a * a), 0.0)) + eps_n)
    lo = jnp.maximum(jnp.sqrt(sq_norm(mgda.x) + eps_n), hi * jnp.finfo(dtype).eps ** 2)

    def mid(lo, hi):
        return jnp.where(hi > 2.0 * lo, jnp.sqrt(lo) * jnp.sqrt(hi), 0.5 * (lo + hi))

    def body(_, state):
        lo, hi, x, iters = state
        t = mid(lo, hi)
        x, it = inner(t, x)
        up = t * t - sq_norm(x) - eps_n >= 0  # ψ'(t) ≥ 0: the root is below t
        return jnp.where(up, lo, t), jnp.where(up, t, hi), x, iters + it

    lo, hi, x, iters = jax.lax.fori_loop(0, num_bisections, body, (lo, hi, mgda.x, mgda.iterations))
    mu, it = inner(mid(lo, hi), x)
    q = sq_norm(mu)
    t_star = jnp.sqrt(q + eps_n)
    resid, _, _ = _qp.qp_kkt_residual(cos, mu, offset=(t_star / safe_radius) * beta, a=a)
    w = a * mu
    w = w / jnp.sum(w)
    active = radius > 0
    w = jnp.where(active, w, b)
    # λ = r / (‖g_w‖ + ε) with both norms in units of the root-mean-square task-gradient norm
    # (a zero task gradient takes no coefficient: with w* on it, g_w = 0 and λ would be r / ε or ∞)
    s = nmin / jnp.sqrt(md)
    den = jnp.sqrt(q) * s + eps
    lmbda = jnp.where(active & (den > 0), radius * s / jnp.where(den > 0, den, 1.0), 0.0)
    coef = b + lmbda * jnp.where(nz, w, 0.0)
    div = {0: 1.0, 1: 1.0 + c**2, 2: 1.0 + c}[rescale]
    return coef / div, _qp.SolverResult(w, iters + it, jnp.where(active, resid, 0.0))


def cagrad(
    num_tasks: int,
    *,
    c: float = 0.5,
    rescale: int = 1,
    num_bisections: int = 40,
    eps: float = 1e-8,
    max_iter: Optional[int] = None,
    tol: float = 1e-5,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """CAGrad (Liu et al., NeurIPS 2021).

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      c: radius factor ``>= 0`` of the ball around the mean gradient (default
        0.5; official NYUv2 runs use 0.4).  ``c = 0`` gives the mean gradient.
      rescale: 0 (no rescaling), 1 (divide by ``1 + c²``, default) or 2
        (divide by ``1 + c``), as the official code.
      num_bisections: bisection steps of the 1-D search, an int ``>= 1``
        (fixed budget; 40 reaches float32 precision on ``t`` for gradient
        norms up to ~12 decades apart).
      eps: smoothing ``>= 0`` of ``‖g_w‖`` (official 1e-8), in units of the
        mean squared task-gradient norm; see the module docstring.
      max_iter: iteration cap of every inner active-set solve, an int ``>= 1``
        (default ``4T + 20``).
      tol: relative KKT tolerance in ``(0, 1)`` of the inner solves (a
        cosine); ``state.gap ≤ tol`` reports convergence.
      shared: which leaves are shared (see :func:`dbmtl_jax.dbmtl`); head
        leaves get ``Σ_t g_t``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args are ignored.
    """
    nm.check_num_tasks(num_tasks, "cagrad")
    c = nm.check_real(c, "c", "cagrad", lo=0)
    nm.check_static(rescale, "rescale", "cagrad", "it selects the rescaling formula")
    nm.check_static(max_iter, "max_iter", "cagrad", "it sizes the solver's loop")
    if hasattr(rescale, "dtype") and jnp.ndim(rescale) == 0 and jnp.issubdtype(rescale.dtype, jnp.integer):
        rescale = int(rescale)  # a concrete array (inject_hyperparams outside jit)
    if isinstance(rescale, bool) or rescale not in RESCALES:
        raise ValueError(f"cagrad: unknown rescale={rescale!r}; expected one of {RESCALES}.")
    num_bisections = nm.check_int(num_bisections, "num_bisections", "cagrad", lo=1)
    eps = nm.check_real(eps, "eps", "cagrad", lo=0)
    if max_iter is not None:
        max_iter = nm.check_int(max_iter, "max_iter", "cagrad", lo=1)
    tol = nm.check_real(tol, "tol", "cagrad", lo=0, hi=1, lo_open=True, hi_open=True)

    def init_state(params: PyTree) -> CAGradState:
        del params
        uniform = jnp.full([num_tasks], 1.0 / num_tasks, jnp.float32)
        return CAGradState(
            count=jnp.zeros([], jnp.int32),
            weights=uniform,
            dual_weights=uniform,
            gap=jnp.zeros([], jnp.float32),
            iterations=jnp.zeros([], jnp.int32),
        )

    def weighting(gram: jax.Array, state: CAGradState, **_: Any) -> tuple[jax.Array, dict]:
        coef, res = cagrad_weights(
            gram, c, rescale=rescale, num_bisections=num_bisections, eps=eps, max_iter=max_iter, tol=tol
        )
        fields = dict(
            weights=coef.astype(jnp.float32),
            dual_weights=res.x.astype(jnp.float32),
            gap=res.residual.astype(jnp.float32),
            iterations=res.iterations.astype(jnp.int32),
        )
        return coef, fields

    return gc.make_gradient_transform("cagrad", num_tasks, weighting, init_state, shared=shared, hparams=(c, eps, tol),
                                     int_minimum=((num_bisections, 1),))
