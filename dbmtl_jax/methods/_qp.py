"""Small dense solvers of the solver-based methods (private).

The solver-based gradient-balancing methods (MGDA, CAGrad, Nash-MTL, UPGrad,
FairGrad) only need the ``[T, T]`` Gram matrix ``G = J Jᵀ`` of the global
shared gradient ``J`` (``[T, P]``, all shared leaves flattened together) to pick
their task coefficients; the update is then one weighted sum per leaf.  The
Gram matrices they start from, the simplex projection, the precision decorator
and the argument checks live in :mod:`dbmtl_jax.methods._numerics`
(``shared_gram`` here is :func:`dbmtl_jax.methods._numerics.gram`: the Gram
matrix of the shared leaves, prescaled by ``max |J|`` and normalised to mean
diagonal 1, so the solvers see O(1) numbers for gradients scaled anywhere from
1e-10 to 1e10).  This module holds the solvers:

* :func:`precondition_gram`: ``G = diag(n) C diag(n)`` split into cosines
  ``C`` and norms ``n``; the QP solvers below work on ``C`` (per-task
  preconditioning), so they are exact at any relative scale of the tasks.
* :func:`nnls_gram`: ``argmin_{x ≥ 0} ½ xᵀHx + cᵀx`` (a non-negative least
  squares problem in Gram form) by the Lawson–Hanson active-set method, and
  :func:`simplex_qp`, the same with the equality ``aᵀx = 1`` (a scaled
  simplex); both with a relative KKT residual (:func:`qp_kkt_residual`).
* :func:`min_norm_simplex`: the min-norm point of the convex hull of the task
  gradients (MGDA), exactly by the active set or by Frank–Wolfe.
* :func:`power_balance`: the positive solution of ``G w = w^{-p}`` (Nash-MTL
  for ``p = 1``, FairGrad for ``p = 1/α``) by damped Newton on a strictly
  convex potential, in variables scaled per task, with a residual that is a
  bound; :func:`dbmtl_jax.methods._numerics.task_cosine_gram` gives it ``G``
  as task norms and cosines, each task's gradient divided by its own largest
  entry, so that it is exact at any relative scale of the task gradients.

Every solver runs under ``jax.jit`` with a fixed iteration cap
(``lax.while_loop``) and returns its iteration count and a residual so that
callers can store them in their optimizer state.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

# shared_gram / project_simplex / highest_precision: the names the solver tests and
# benchmarks/bench_solvers.py use; the one implementation of each is in _numerics.
from dbmtl_jax.methods._numerics import HIGHEST, highest_precision, project_simplex
from dbmtl_jax.methods._numerics import gram as shared_gram

PyTree = Any

__all__ = [
    "SolverResult",
    "shared_gram",
    "project_simplex",
    "highest_precision",
    "precondition_gram",
    "nnls_gram",
    "simplex_qp",
    "qp_kkt_residual",
    "min_norm_simplex",
    "min_norm_kkt_gap",
    "power_balance",
    "power_balance_residual",
    "MIN_NORM_SOLVERS",
]

MIN_NORM_SOLVERS = ("active_set", "frank_wolfe")


class SolverResult(NamedTuple):
    """Solution of one of the small solvers.

    Attributes:
      x: the solution vector ``[T]``.
      iterations: iterations used (int32).
      residual: a non-negative optimality residual (0 at an exact solution);
        its meaning is given by each solver.
    """

    x: jax.Array
    iterations: jax.Array
    residual: jax.Array


# ----------------------------------------------------------------------------
# preconditioned active-set QP (NNLS and the simplex-constrained problem)
# ----------------------------------------------------------------------------

_BIG = 1e30  # reported instead of an infinite residual (state leaves stay finite)


def precondition_gram(gram: jax.Array, norms: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Splits a Gram matrix into cosines and norms: ``G = diag(n) C diag(n)``, returns ``(C, n)``.

    ``C`` has a unit diagonal; a task with ``G_tt = 0`` gets ``n_t = 0`` and a
    zero row and column.  Every entry of ``G`` computed as a floating-point dot
    product is accurate relative to ``n_i n_j``, so the entries of ``C`` are
    accurate to rounding relative to 1 whatever the relative scale of the task
    gradients: the solvers below work on ``C`` (the diagonally rescaled
    variables ``μ_t = n_t λ_t``) and never form badly scaled numbers.  With
    ``norms`` given, ``gram`` is taken to be ``C`` already.
    """
    if norms is not None:
        return gram, norms.astype(gram.dtype)
    t = gram.shape[0]
    d = jnp.diagonal(gram)
    nz = d > 0
    n = jnp.sqrt(jnp.where(nz, d, 1.0))
    cos = gram / (n[:, None] * n[None, :])
    both = nz[:, None] & nz[None, :]
    cos = jnp.where(both, jnp.clip(cos, -1.0, 1.0), 0.0)
    cos = jnp.where(jnp.eye(t, dtype=bool) & both, 1.0, cos)
    return cos, jnp.where(nz, n, 0.0)


def _simplex_scales(norms: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(a, n_min)`` with ``a_t = n_min / n_t`` (1 for a zero task): ``Σ_t λ_t = 1`` reads ``aᵀμ = 1``."""
    nz = norms > 0
    nmin = jnp.min(jnp.where(nz, norms, jnp.inf))
    nmin = jnp.where(jnp.isfinite(nmin), nmin, 1.0)
    return jnp.where(nz, nmin / jnp.where(nz, norms, 1.0), 1.0), nmin


def qp_kkt_residual(
    h: jax.Array,
    x: jax.Array,
    c: Optional[jax.Array] = None,
    *,
    offset: Optional[jax.Array] = None,
    a: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """KKT residual of ``min ½ xᵀHx + cᵀx`` over ``x ≥ 0`` [and ``aᵀx = 1``] at a feasible ``x``.

    With ``offset = u`` the problem is ``min ½‖x + u‖²_H`` (``c = Hu``), i.e. the
    projection of ``−Jᵀu`` onto a cone or a polytope spanned by the columns of
    ``Jᵀ`` (``H = JJᵀ``), and the residual is *relative*: coordinate ``k``'s
    violation is divided by ``√H_kk ‖x + u‖_H = ‖g_k‖ ‖Jᵀ(x + u)‖``, so it is a
    cosine and does not depend on the scale of the problem or of one task.
    Without ``offset`` it is divided by ``max|c|`` (absolute, legacy use).

    ``‖x + u‖_H`` is floored at its rounding level ``(4 + 2√T) ε ‖|x + u|‖_{|H|}``:
    at a point that is numerically zero (e.g. MGDA at a Pareto-stationary
    point, where ``d = 0`` is only determined to ``~√ε`` of the gradients) the
    relative conditions cannot be certified and the residual is of order 1.

    Reduced gradient ``r = ∇ − ν a`` with ``∇ = Hx + c`` and, with the equality,
    the least-squares multiplier ``ν = Σ_P a_k ∇_k / Σ_P a_k²`` over the support
    ``P = {x > 0}`` (any ``ν`` certifies optimality; this one is the best
    conditioned when ``a`` spans many orders of magnitude), else ``ν = 0``.
    The violation of coordinate ``k`` is ``|r_k|`` on the support and ``−r_k``
    off it (negative when its constraint holds with room); to it is added a
    rounding margin ``(4 + 2√T) ε (|H||x + u|)_k / scale`` (plus the
    multiplier's share), ``ε`` the machine epsilon.

    Returns ``(residual, neg, margin)``: ``residual = max_k (violation_k +
    margin_k)₊`` (capped at 1e30), so that ``residual ≤ tol`` certifies the KKT
    conditions to ``tol`` for the given ``H``; ``neg = −r / scale`` and
    ``margin`` per coordinate (used by the active set to pick entering
    coordinates).
    """
    n = h.shape[0]
    dtype = h.dtype
    eps = jnp.finfo(dtype).eps
    if offset is not None:
        y = x + offset
        grad = h @ y
        err = jnp.abs(h) @ jnp.abs(y)
        # ‖x + u‖_H, floored at its own rounding level (a numerically zero point gets residual ~1, not ∞)
        floor = (4.0 + 2.0 * math.sqrt(n)) * eps * jnp.sqrt(jnp.dot(jnp.abs(y), err))
        hn = jnp.maximum(jnp.sqrt(jnp.maximum(jnp.dot(y, grad), 0.0)), floor)
        den = jnp.sqrt(jnp.maximum(jnp.diagonal(h), 0.0)) * hn
    else:
        grad = h @ x + c
        err = jnp.abs(h) @ jnp.abs(x) + jnp.abs(c)
        den = jnp.full((n,), jnp.max(jnp.abs(c)), dtype)
    supp = x > 0
    if a is None:
        r = grad
    else:
        aw = jnp.where(supp, a, 0.0)
        a2 = jnp.dot(aw, aw)
        a2 = jnp.where(a2 > 0, a2, 1.0)
        r = grad - (jnp.dot(aw, grad) / a2) * a
        err = err + a * (jnp.dot(aw, err) / a2)
    ok = den > 0
    safe = jnp.where(ok, den, 1.0)
    margin = jnp.where(ok, (4.0 + 2.0 * math.sqrt(n)) * eps * err / safe, 0.0)
    raw = jnp.where(supp, jnp.abs(r), -r)
    viol = jnp.where(ok, raw / safe, jnp.where(raw > 0, _BIG, 0.0))
    neg = jnp.where(ok, -r / safe, jnp.where(-r > 0, _BIG, 0.0))
    res = jnp.max(jnp.maximum(viol + margin, 0.0))
    return jnp.minimum(res, _BIG), jnp.minimum(neg, _BIG), margin


def _restricted_solve(
    h: jax.Array,
    c: jax.Array,
    passive: jax.Array,
    ridge: jax.Array,
    a: Optional[jax.Array] = None,
    refine: int = 2,
) -> jax.Array:
    """``argmin ½ sᵀHs + cᵀs`` on the passive set ``P`` (``s = 0`` off it) [subject to ``aᵀs = 1``].

    The system is factored once with ``ridge`` on the passive diagonal (so that
    it is always solvable) and ``refine`` steps of iterative refinement against
    the system *without* the ridge remove the ridge's bias.  With the equality
    the KKT system ``[[H_PP, â], [âᵀ, 0]]`` uses ``â = a_P / max a_P`` and is
    solved for the right-hand sides ``[−c_P; 0]`` and ``[0; 1]`` separately
    (``s = s₁ + s₂ / max a_P``), which keeps it well scaled whatever the range
    of ``a``.
    """
    from jax.scipy import linalg as jsl

    n = h.shape[0]
    dtype = h.dtype
    both = passive[:, None] & passive[None, :]
    hp = jnp.where(both, h, 0.0) + jnp.diag(jnp.where(passive, 0.0, 1.0))
    rdg = jnp.diag(jnp.where(passive, ridge, 0.0))
    cp = jnp.where(passive, -c, 0.0)
    if a is None:
        k_ex = hp
        rhs = cp[:, None]
    else:
        ap = jnp.where(passive, a, 0.0)
        m = jnp.max(ap)
        m = jnp.where(m > 0, m, 1.0)
        ah = ap / m
        k_ex = jnp.zeros((n + 1, n + 1), dtype).at[:n, :n].set(hp).at[:n, n].set(ah).at[n, :n].set(ah)
        rdg = jnp.zeros((n + 1, n + 1), dtype).at[:n, :n].set(rdg)
        rhs = jnp.zeros((n + 1, 2), dtype).at[:n, 0].set(cp).at[n, 1].set(1.0)
    lu = jsl.lu_factor(k_ex + rdg)
    s = jsl.lu_solve(lu, rhs)
    for _ in range(refine):
        s = s + jsl.lu_solve(lu, rhs - jnp.matmul(k_ex, s, precision=HIGHEST))
    s = s[:, 0] if a is None else s[:n, 0] + s[:n, 1] / m
    s = jnp.where(jnp.isfinite(s), s, 0.0)
    return jnp.where(passive, s, 0.0)


def _active_set(
    h: jax.Array,
    c: jax.Array,
    *,
    offset: Optional[jax.Array],
    a: Optional[jax.Array],
    max_iter: int,
    tol: float,
    ridge: float,
    x0: Optional[jax.Array] = None,
) -> SolverResult:
    """Primal active-set loop shared by :func:`nnls_gram` and :func:`simplex_qp` (see there)."""
    n = h.shape[0]
    dtype = h.dtype
    idx = jnp.arange(n)
    hscale = jnp.maximum(jnp.mean(jnp.abs(jnp.diagonal(h))), jnp.finfo(dtype).tiny)
    rdg = jnp.asarray(ridge, dtype) * hscale
    thr = jnp.asarray(tol / 100.0, dtype)

    def kkt(x):
        return qp_kkt_residual(h, x, c, offset=offset, a=a)

    if x0 is not None:
        x_init = x0.astype(dtype)
    elif a is None:
        x_init = jnp.zeros((n,), dtype)
    else:  # the best vertex e_k / a_k of {x ≥ 0, aᵀx = 1}
        vals = 0.5 * jnp.diagonal(h) / (a * a) + c / a
        x_init = jnp.where(idx == jnp.argmin(vals), 1.0 / a, 0.0).astype(dtype)

    def cond(state):
        return (~state[5]) & (state[4] < max_iter)

    def body(state):
        x, passive, blocked, last, it, _ = state
        s = _restricted_solve(h, c, passive, rdg, a)
        feasible = jnp.all(jnp.where(passive, s > 0, True))
        newly = idx == last
        # rounding guard: the coordinate that just entered is rejected at once -> undo, block it
        reject = jnp.any(newly & passive & (s <= 0))
        # feasible: accept s, then let the most violated coordinate enter (or stop)
        _, neg, margin = kkt(s)
        cand = (~passive) & (~blocked) & (neg > jnp.maximum(thr, margin))
        finished = ~jnp.any(cand)
        j = jnp.argmax(jnp.where(cand, neg, -jnp.inf))
        add = (idx == j) & ~finished
        # infeasible: move from x towards s until the first coordinate reaches 0, which leaves
        bad = passive & (s <= 0)
        denom = x - s
        ratio = jnp.where(bad & (denom > 0), x / jnp.where(denom > 0, denom, 1.0), jnp.where(bad, 0.0, jnp.inf))
        k = jnp.argmin(ratio)
        alpha = jnp.clip(ratio[k], 0.0, 1.0)
        x_bt = jnp.where(passive, x + alpha * (s - x), 0.0)
        p_bt = passive & (x_bt > 0) & (idx != k)
        x_bt = jnp.where(p_bt, x_bt, 0.0)
        grow = feasible & ~finished & ~reject
        x_new = jnp.where(reject, x, jnp.where(feasible, s, x_bt))
        p_new = jnp.where(reject, passive & ~newly, jnp.where(feasible, passive | add, p_bt))
        b_new = jnp.where(reject, blocked | newly, jnp.where(grow, jnp.zeros_like(blocked), blocked))
        last_new = jnp.where(grow, j, -1)
        return x_new, p_new, b_new, last_new, it + 1, feasible & finished & ~reject

    init = (
        x_init,
        x_init > 0,
        jnp.zeros((n,), bool),
        jnp.asarray(-1, idx.dtype),
        jnp.zeros([], jnp.int32),
        jnp.zeros([], bool),
    )
    x, _, _, _, it, _ = jax.lax.while_loop(cond, body, init)
    return SolverResult(x, it, kkt(x)[0])


@highest_precision
def nnls_gram(
    h: jax.Array,
    c: Optional[jax.Array] = None,
    *,
    offset: Optional[jax.Array] = None,
    max_iter: int,
    tol: float = 1e-5,
    ridge: float = 1e-7,
    x0: Optional[jax.Array] = None,
) -> SolverResult:
    """``argmin_{x ≥ 0} ½ xᵀHx + cᵀx`` for a symmetric PSD ``H`` (Lawson–Hanson).

    The classical active-set method for non-negative least squares, written
    on the Gram matrix: grow the passive set ``P`` by the coordinate with the
    most violated KKT condition, solve the equality-constrained problem on
    ``P`` (:func:`_restricted_solve`: exact up to rounding, the stabilising
    ``ridge``, relative to the mean diagonal of ``H``, is refined away), and
    step back towards the previous feasible point whenever that solution
    leaves the orthant.  Each iteration is one ``|T|×|T|`` factorisation.  The
    method is finite: it stops when no coordinate violates its condition by
    more than ``max(tol / 100, rounding margin)``, or after ``max_iter``
    iterations, keeping the last feasible iterate (``x0``, if given, is a
    feasible warm start whose support is the initial passive set).  A
    coordinate that the restricted solve rejects right after entering is
    blocked until the next successful entry, which prevents cycling on
    rounding-level violations.

    Give ``offset = u`` (and no ``c``) for the projection form
    ``min ½‖x + u‖²_H`` (``c = Hu``): the stopping rule and the residual are
    then relative, i.e. cosines (:func:`qp_kkt_residual`), and the problem is
    solved to rounding whatever the scale of ``H`` and ``u``.  With ``c`` only,
    the residual is relative to ``max|c|``.  Residual: :func:`qp_kkt_residual`.
    """
    if (c is None) == (offset is None):
        raise ValueError("nnls_gram needs exactly one of c and offset.")
    if offset is not None:
        offset = offset.astype(h.dtype)
        c = h @ offset
    return _active_set(h, c, offset=offset, a=None, max_iter=max_iter, tol=tol, ridge=ridge, x0=x0)


@highest_precision
def simplex_qp(
    h: jax.Array,
    a: jax.Array,
    *,
    offset: Optional[jax.Array] = None,
    max_iter: int,
    tol: float = 1e-5,
    ridge: float = 1e-7,
    x0: Optional[jax.Array] = None,
) -> SolverResult:
    """``argmin ½‖x + u‖²_H`` over ``{x ≥ 0, aᵀx = 1}`` (``u = offset``, default 0; ``a > 0``).

    The scaled simplex ``aᵀx = 1`` with ``a_t = n_min / n_t`` is the probability
    simplex of the weights ``λ_t = a_t x_t`` written in the preconditioned
    variables ``x_t = λ_t n_t / n_min`` (:func:`precondition_gram`): with ``H``
    the cosine matrix, ``½‖x + u‖²_H`` is ``‖Σ_t λ_t g_t + Σ_t u_t ĝ_t‖² /
    (2 n_min²)``.  MGDA is ``u = 0``; the inner problem of CAGrad is a nonzero
    ``u``.  Solved by the primal active-set method of :func:`nnls_gram` with
    the equality kept in every restricted system, from the best vertex
    ``e_k / a_k`` (or the feasible warm start ``x0``).  Residual:
    :func:`qp_kkt_residual` (relative, a cosine).
    """
    dtype = h.dtype
    a = a.astype(dtype)
    u = jnp.zeros(h.shape[:1], dtype) if offset is None else offset.astype(dtype)
    return _active_set(h, h @ u, offset=u, a=a, max_iter=max_iter, tol=tol, ridge=ridge, x0=x0)


# ----------------------------------------------------------------------------
# min-norm point of the convex hull (MGDA)
# ----------------------------------------------------------------------------


@highest_precision
def min_norm_kkt_gap(gram: jax.Array, lam: jax.Array, norms: Optional[jax.Array] = None) -> jax.Array:
    """Relative KKT residual of ``λ ∈ Δ`` for ``min_{λ∈Δ} λᵀGλ`` (0 at the min-norm point).

    With ``d = Σ_t λ_t g_t``: the largest of ``(‖d‖² − ⟨g_t, d⟩) / (‖g_t‖ ‖d‖)``
    over all tasks and ``|⟨g_t, d⟩ − ‖d‖²| / (‖g_t‖ ‖d‖)`` over the tasks with
    ``λ_t > 0`` (a cosine: scale-free, and a bound for every task however small
    its gradient), plus a rounding margin (:func:`qp_kkt_residual`).  So a
    residual ``r`` certifies ``⟨g_t, d⟩ ≥ ‖d‖² − r‖g_t‖‖d‖ ≥ −r‖g_t‖‖d‖``:
    ``d`` conflicts with no task by more than a cosine of ``r``.  0 when a task
    gradient is zero and carries all the weight (then ``d = 0`` is optimal).
    """
    n = gram.shape[0]
    dtype = gram.dtype
    cos, nrm = precondition_gram(gram, norms)
    a, _ = _simplex_scales(nrm)
    zero = ~(nrm > 0)
    mu = jnp.where(zero, 0.0, lam.astype(dtype) / a)
    tot = jnp.dot(a, mu)
    mu = mu / jnp.where(tot > 0, tot, 1.0)
    res, _, _ = qp_kkt_residual(cos, mu, offset=jnp.zeros((n,), dtype), a=a)
    return jnp.where(jnp.any(zero & (lam > 0)) | jnp.all(zero), 0.0, res)


def _best_pair(cos: jax.Array, a: jax.Array) -> jax.Array:
    """Min-norm point over all segments ``[v_i, v_j]`` (and vertices ``v_k = e_k / a_k``), as ``x``."""
    n = cos.shape[0]
    g = cos / (a[:, None] * a[None, :])  # Gram of the vertices (weights space, units n_min²)
    d = jnp.diagonal(g)
    v11, v22, v12 = d[:, None], d[None, :], g
    denom = v11 + v22 - 2.0 * v12
    gamma = jnp.where(denom > 0, (v22 - v12) / jnp.where(denom > 0, denom, 1.0), 1.0)
    gamma = jnp.clip(gamma, 0.0, 1.0)
    cost = gamma**2 * v11 + 2.0 * gamma * (1.0 - gamma) * v12 + (1.0 - gamma) ** 2 * v22
    flat = jnp.argmin(cost.reshape(-1))
    i, j = flat // n, flat % n
    gm = gamma.reshape(-1)[flat]
    eye = jnp.eye(n, dtype=cos.dtype)
    return (gm * eye[i] + (1.0 - gm) * eye[j]) / a


def _frank_wolfe(cos: jax.Array, a: jax.Array, *, max_iter: int, tol: float) -> SolverResult:
    """Away-step Frank–Wolfe with exact line search for ``min ½ xᵀCx`` over ``{x ≥ 0, aᵀx = 1}``.

    The iterates are those of Frank–Wolfe on the weights ``λ = a ⊙ x`` (the
    method is affine invariant); working in ``x`` only makes the arithmetic
    scale-free.  Stops when the relative KKT residual is ``≤ tol``; then a
    short active-set polish (at most ``T + 2`` iterations of :func:`simplex_qp`
    warm-started from the FW iterate and its support) replaces the iterate
    when it is better or converged.
    """
    n = cos.shape[0]
    dtype = cos.dtype
    idx = jnp.arange(n)
    zero_u = jnp.zeros((n,), dtype)

    def resid(x):
        return qp_kkt_residual(cos, x, offset=zero_u, a=a)[0]

    def cond(state):
        _, it, res = state
        return (res > tol) & (it < max_iter)

    def body(state):
        x, it, _ = state
        g = cos @ x
        score = g / a  # ⟨∇, v_k⟩
        lam = a * x
        s = jnp.argmin(score)
        aw = jnp.argmax(jnp.where(lam > 0, score, -jnp.inf))
        nu = jnp.dot(x, g)
        use_fw = nu - score[s] >= score[aw] - nu
        v_s = jnp.where(idx == s, 1.0 / a, 0.0)
        v_a = jnp.where(idx == aw, 1.0 / a, 0.0)
        d = jnp.where(use_fw, v_s - x, x - v_a)
        la = lam[aw]
        step_max = jnp.where(use_fw, 1.0, jnp.where(la < 1, la / jnp.where(la < 1, 1.0 - la, 1.0), 1.0))
        num = -jnp.dot(d, g)
        den = jnp.dot(d, cos @ d)
        step = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), step_max)
        step = jnp.clip(step, 0.0, step_max)
        x = jnp.maximum(x + step * d, 0.0)
        x = x / jnp.dot(a, x)
        return x, it + 1, resid(x)

    x0 = _best_pair(cos, a)
    x, it, res = jax.lax.while_loop(cond, body, (x0, jnp.zeros([], jnp.int32), resid(x0)))
    pol = simplex_qp(cos, a, max_iter=n + 2, tol=tol, x0=x)
    take = (pol.residual < res) | (pol.residual <= tol)
    return SolverResult(jnp.where(take, pol.x, x), it + pol.iterations, jnp.where(take, pol.residual, res))


@highest_precision
def min_norm_simplex(
    gram: jax.Array,
    *,
    solver: str = "active_set",
    max_iter: Optional[int] = None,
    tol: float = 1e-5,
    norms: Optional[jax.Array] = None,
) -> SolverResult:
    """``argmin_{λ ∈ Δ} λᵀGλ``: the min-norm point ``d = Σ λ_t g_t`` of the convex hull.

    Solved in the preconditioned variables ``x_t = λ_t ‖g_t‖ / n_min`` on the
    cosine matrix ``C`` (:func:`precondition_gram`), where the problem is
    ``min ½ xᵀCx`` over ``{x ≥ 0, aᵀx = 1}``, ``a_t = n_min / ‖g_t‖``: every
    number is O(1) whatever the relative scale of the task gradients, and the
    stopping rule is relative to the optimum's own scale (cosines, not the
    mean squared norm).

    ``"active_set"`` (exact, finite): :func:`simplex_qp`, by default at most
    ``4T + 20`` iterations.  ``"frank_wolfe"``: away-step Frank–Wolfe with
    exact line search from the best pair of tasks (as the official MGDA code's
    FW variant, plus away steps, Lacoste-Julien & Jaggi 2015), at most
    ``max_iter`` (default 250) iterations until the residual is ``≤ tol``,
    then a short active-set polish on its support (:func:`_frank_wolfe`).

    A zero task gradient makes ``d = 0`` optimal: ``λ`` is that task's vertex
    (residual 0).  For the all-zero Gram matrix the uniform ``λ`` is returned.
    Residual: :func:`min_norm_kkt_gap` (a relative bound: ``⟨g_t, d⟩ ≥ ‖d‖² −
    r‖g_t‖‖d‖`` for every task).  ``iterations``: solver iterations.
    """
    n = gram.shape[0]
    dtype = gram.dtype
    if solver not in MIN_NORM_SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {MIN_NORM_SOLVERS}.")
    cos, nrm = precondition_gram(gram, norms)
    a, _ = _simplex_scales(nrm)
    zero = ~(nrm > 0)
    if solver == "active_set":
        res = simplex_qp(cos, a, max_iter=max_iter or 4 * n + 20, tol=tol)
    else:
        res = _frank_wolfe(cos, a, max_iter=max_iter or 250, tol=tol)
    lam = a * res.x
    total = jnp.sum(lam)
    lam = jnp.where(total > 0, lam / jnp.where(total > 0, total, 1.0), jnp.full((n,), 1.0 / n, dtype))
    vertex = (jnp.arange(n) == jnp.argmax(zero)).astype(dtype)
    lam = jnp.where(jnp.all(zero), jnp.full((n,), 1.0 / n, dtype), jnp.where(jnp.any(zero), vertex, lam))
    return SolverResult(lam, res.iterations, jnp.where(jnp.any(zero), 0.0, res.residual))


# ----------------------------------------------------------------------------
# G w = w^{-p} on the positive orthant (Nash-MTL, FairGrad)
# ----------------------------------------------------------------------------


def _solver_dtype(dtype: Any) -> Any:
    """The widest float available for the T×T solver internals (float64 under x64, else float32)."""
    widest = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    return jnp.promote_types(dtype, widest)


def _balance_eval(cos: jax.Array, e: jax.Array, z: jax.Array, p: float, rho: Any) -> tuple[jax.Array, jax.Array]:
    """Relative residual ``r_t = z_t^p ((C + ρI) y)_t / e_t − 1`` (``y = e ⊙ z``) and its amplification
    ``a_t = z_t^p Σ_j |C_tj + ρδ_tj| y_j / e_t`` (the factor by which rounding in the sum is magnified)."""
    y = e * z
    q = z**p / e
    s = cos @ y + rho * y
    a = (jnp.abs(cos) @ y + rho * y) * q
    return q * s - 1.0, a


@highest_precision
def power_balance_residual(
    gram: jax.Array, w: jax.Array, p: float, *, norms: Optional[jax.Array] = None
) -> jax.Array:
    """``max_t |w_t^p (G w)_t − 1|``: 0 exactly when ``G w = w^{-p}``.

    With ``norms`` (see :func:`dbmtl_jax.methods._numerics.task_cosine_gram`),
    ``gram`` is the cosine matrix ``C`` and ``G = diag(norms) C diag(norms)``; the products are formed
    as ``w_t^p n_t (C (n ⊙ w))_t`` so that no badly scaled entry of ``G`` is
    ever formed.  Plain floating-point evaluation, without the rounding margin
    that :func:`power_balance` adds to its reported residual.
    """
    w = jnp.maximum(w, jnp.finfo(w.dtype).tiny)
    if norms is None:
        return jnp.max(jnp.abs(w**p * (gram @ w) - 1.0))
    u = norms * w
    return jnp.max(jnp.abs(w**p * norms * (gram @ u) - 1.0))


@highest_precision
def power_balance(
    gram: jax.Array,
    p: float,
    *,
    norms: Optional[jax.Array] = None,
    w0: Optional[jax.Array] = None,
    ridge: float = 1e-6,
    max_iter: int = 50,
    tol: float = 1e-5,
    num_backtracks: int = 30,
    polish_steps: int = 2,
    out_dtype: Any = None,
) -> SolverResult:
    """Positive solution of ``G w = w^{-p}``, accurate at any relative scale of the task gradients.

    ``G = diag(n) C diag(n)`` is given either as ``gram = C`` (the cosine
    matrix) with ``norms = n`` (:func:`dbmtl_jax.methods._numerics.task_cosine_gram`, the accurate route
    for raw gradients), or as a plain Gram matrix ``gram = G`` (``norms=None``;
    ``n_t = √G_tt``).

    Change of variables.  With ``w_t = z_t · n_t^{−2/(1+p)}`` (``z = 1`` is the
    solution for orthogonal gradients), ``m_t = n_t / max_s n_s``,
    ``e_t = m_t^{(p−1)/(p+1)}`` and ``y = e ⊙ z``, the equation reads
    ``(C y)_t = e_t z_t^{−p}`` and the relative residual is
    ``r_t = w_t^p (Gw)_t − 1 = z_t^p (C y)_t / e_t − 1``: only cosines and
    ratios of norms appear, so nothing under- or overflows and no task is
    rounded away, whatever the scale of ``n``.  (For Nash-MTL, ``p = 1``:
    ``e = 1`` and the problem is ``C z = 1/z``, independent of the norms.)

    Method.  ``y`` minimises the strictly convex potential
    ``½ yᵀ(C + ρI)y − Σ_t b_t h(y_t)`` (``h' = y^{−p}``, ``b_t = m_t^{p−1}``),
    whose stationarity condition is the equation with the ridge ``ρ`` (relative
    to each task's own squared norm: ``G + ρ·diag(n²)``).  Damped Newton:
    the Newton system ``(C + ρI + diag(p z^{−p−1})) dy = −∇`` is solved after
    symmetric Jacobi scaling; far from the solution the step is cut to stay in
    the orthant and backtracked (Armijo on a cancellation-free form of the
    potential difference, ``num_backtracks`` halvings evaluated together);
    once the Newton decrement is small, full steps are taken.  The loop stops
    when ``max_t |r_t| ≤ tol / 4``, when progress stalls at rounding level, or
    after ``max_iter`` iterations.  Then up to ``polish_steps`` Newton steps
    on the equation *without* the ridge (in ``log z``, on the relative
    residual, so every task gets relative accuracy) remove the ``O(ρ)`` bias;
    each is kept only if it lowers ``max_t |r_t|``.  The start is the better
    (lower potential) of ``z = 1`` and the warm start ``w0``.  Internals are
    computed in float64 when x64 is enabled, else in float32.

    The ridge keeps ``w`` finite when the equation has no solution (a zero task
    gradient, or gradients such as ``g_3 = −g_1``); the residual then shows it.
    A task with ``n_t = 0`` gets the weight of an orthogonal task of the
    largest norm and residual 1 (its condition ``0 = w_t^{−p}`` cannot hold);
    with all norms zero ``w = 1``.

    Residual (a bound, not an estimate): ``max_t |r_t|`` on ``G`` without the
    ridge, evaluated in the scaled form, plus the rounding margin
    ``c · ε · max_t (a_t + p)`` (``a_t = z_t^p (|C| y)_t / e_t`` ≥ 1 is the
    cancellation factor of row ``t``, ``ε`` the machine epsilon, ``c`` covering
    the entries of ``C`` (4), the evaluation (``2√T``), the map back to ``w``
    (``2 + 4 max_t |log n_t| / (1+p)``) and the cast of ``w``).  So ``residual ≤ tol`` certifies the condition to ``tol``
    for the computed Gram matrix; an ill-conditioned problem (nearly dependent
    task gradients) reports a residual above ``tol`` instead of a false
    success.  ``iterations`` counts Newton and polishing steps.
    """
    from jax.scipy import linalg as jsl

    if not p > 0:
        raise ValueError(f"the exponent p must be positive, got {p!r}.")
    n = gram.shape[0]
    eps_in = float(jnp.finfo(gram.dtype).eps)
    eps_out = float(jnp.finfo(out_dtype if out_dtype is not None else gram.dtype).eps)
    dtype = _solver_dtype(gram.dtype)
    gram = gram.astype(dtype)
    if norms is None:
        d = jnp.diagonal(gram)
        nonzero = d > 0
        nn = jnp.sqrt(jnp.where(nonzero, d, 1.0))
        cos = gram / (nn[:, None] * nn[None, :])
        both = nonzero[:, None] & nonzero[None, :]
        cos = jnp.where(both, cos, 0.0)
        norms_ = jnp.where(nonzero, nn, jnp.where(jnp.isnan(d), jnp.nan, 0.0))
    else:
        cos = gram
        norms_ = norms.astype(dtype)
    eps = float(jnp.finfo(dtype).eps)
    tiny = jnp.finfo(dtype).tiny
    p = float(p)
    rho = jnp.asarray(ridge, dtype)
    eye = jnp.eye(n, dtype=dtype)
    zero_task = ~(norms_ > 0) & ~jnp.isnan(norms_)
    # placeholders for zero tasks: an orthogonal unit-cosine task at the reference norm
    c = jnp.where(zero_task[:, None] | zero_task[None, :], 0.0, cos)
    c = jnp.where((eye > 0) & zero_task[:, None], 1.0, c)
    logn = jnp.log(jnp.where(norms_ > 0, norms_, 1.0))
    logn = jnp.where(jnp.isnan(norms_), jnp.nan, logn)
    any_pos = jnp.any(norms_ > 0)
    logref = jnp.where(any_pos, jnp.max(jnp.where(norms_ > 0, logn, -jnp.inf)), 0.0)
    logn = jnp.where(zero_task, logref, logn)
    logm = logn - logref
    e = jnp.exp((p - 1.0) / (p + 1.0) * logm)
    halvings = 0.5 ** jnp.arange(num_backtracks, dtype=dtype)

    def hdiff(z, tau):
        # b_t (h(y_t (1 + τ_t)) − h(y_t)) without cancellation: e_t² z_t^{1−p} ((1+τ)^{1−p} − 1)/(1−p)
        l1 = jnp.log1p(tau)
        if p == 1.0:
            return l1
        return e * e * z ** (1.0 - p) * jnp.expm1((1.0 - p) * l1) / (1.0 - p)

    def dpsi(z, dy, ts):
        # ψ(y + t dy) − ψ(y) for every t in ts (inf where y + t dy leaves the orthant)
        y = e * z
        lin = jnp.dot(y, c @ dy + rho * dy)
        quad = jnp.dot(dy, c @ dy + rho * dy)
        tau = ts[:, None] * (dy / y)[None, :]
        ok = jnp.all(tau > -1.0, axis=1)
        h = jnp.sum(jax.vmap(lambda tt: hdiff(z, tt))(jnp.where(tau > -1.0, tau, 0.0)), axis=1)
        return jnp.where(ok, ts * lin + 0.5 * ts * ts * quad - h, jnp.inf)

    def newton_dir(z, rh):
        # Jacobi-scaled Newton system, LU once plus one step of iterative refinement (componentwise accuracy)
        y = e * z
        grad = c @ y + rh * y - e * z ** (-p)
        hd = 1.0 + rh + p * z ** (-p - 1.0)
        s = 1.0 / jnp.sqrt(hd)
        k = (c + rh * eye) * (s[:, None] * s[None, :]) + jnp.diag(p * z ** (-p - 1.0) * s * s)
        lu = jsl.lu_factor(k)
        b = -s * grad
        x = jsl.lu_solve(lu, b)
        x = x + jsl.lu_solve(lu, b - k @ x)
        dy = jnp.where(jnp.isfinite(x), s * x, 0.0)
        return dy, -jnp.dot(grad, dy)

    def res_max(z, rh):
        r, _ = _balance_eval(c, e, z, p, rh)
        return jnp.max(jnp.abs(r))

    target = jnp.asarray(tol / 4.0, dtype)

    def cond(state):
        _, it, res, done = state
        return (it < max_iter) & (res > target) & ~done

    def log_newton(z, rh):
        # Newton on R_t = log(1 + r_t) = p log z_t + log((C + ρI) y)_t − log e_t in log z: every unknown is a
        # relative change, so tasks whose y differ by many orders of magnitude all get relative accuracy
        y = e * z
        s = c @ y + rh * y
        ok = jnp.all(s > 0)
        ss = jnp.where(s > 0, s, 1.0)
        mat = (c + rh * eye) * (y[None, :] / ss[:, None]) + p * eye
        rhs = p * jnp.log(z) + jnp.log(ss) - jnp.log(e)
        delta = -jnp.linalg.solve(mat, rhs)
        ok = ok & jnp.all(jnp.isfinite(delta))
        delta = jnp.clip(jnp.where(jnp.isfinite(delta), delta, 0.0), -30.0, 30.0)
        z_new = jnp.maximum(z * jnp.exp(delta), tiny)
        return z_new, jnp.where(ok, res_max(z_new, rh), jnp.inf)

    def body(state):
        z, it, res, _ = state
        y = e * z
        # 1) the relative (log z) Newton step, 2) the full potential Newton step, each taken when it halves
        # the largest relative residual (a scale-free test); 3) else Armijo backtracking on the potential
        z_rel, res_rel = log_newton(z, rho)
        rel_ok = res_rel < 0.5 * res
        dy, dec2 = newton_dir(z, rho)
        ratio = jnp.where(dy < 0, -y / jnp.where(dy < 0, dy, -1.0), jnp.inf)
        tmax = jnp.minimum(1.0, 0.99 * jnp.min(ratio))
        z_full = jnp.maximum(z + dy / e, tiny)
        res_full = res_max(z_full, rho)
        full = (tmax >= 1.0) & (res_full < 0.5 * res)
        ts = tmax * halvings
        vals = dpsi(z, dy, ts)
        ok = vals <= -0.25 * ts * dec2
        t_ls = jnp.where(jnp.any(ok), ts[jnp.argmax(ok)], 0.0)
        z_ls = jnp.maximum(z + t_ls * dy / e, tiny)
        res_ls = res_max(z_ls, rho)
        z_new = jnp.where(rel_ok, z_rel, jnp.where(full, z_full, z_ls))
        res_new = jnp.where(rel_ok, res_rel, jnp.where(full, res_full, res_ls))
        # stalled: no acceptable step, or no progress at all once the residual is small (rounding floor)
        stalled = ~rel_ok & ~full & ((t_ls == 0) | ((res < 1e-2) & ~(res_ls < res)))
        return z_new, it + 1, res_new, stalled

    z_cold = jnp.ones((n,), dtype)
    if w0 is not None:
        z_w = w0.astype(dtype) * jnp.exp(2.0 / (1.0 + p) * logn)
        valid = jnp.all(z_w > 0) & jnp.all(jnp.isfinite(z_w))
        z_w = jnp.where(valid, z_w, z_cold)
        better = dpsi(z_cold, e * (z_w - z_cold), jnp.ones((1,), dtype))[0] < 0
        z_init = jnp.where(valid & better, z_w, z_cold)
    else:
        z_init = z_cold
    init = (z_init, jnp.zeros([], jnp.int32), res_max(z_init, rho), jnp.zeros([], bool))
    z, it, _, _ = jax.lax.while_loop(cond, body, init)

    # polish without the ridge: relative Newton steps on the exact equation, kept only when they help.
    # (A loop rather than straight-line code: on XLA:CPU a LAPACK call outside any loop made the whole
    # jitted update ~2x slower next to a large Gram matmul.)
    def polish(_, state):
        z, it, res = state
        z_new, res_new = log_newton(z, 0.0)
        take = (res > target) & (res_new < res)
        return jnp.where(take, z_new, z), it + take.astype(jnp.int32), jnp.where(take, res_new, res)

    z, it, _ = jax.lax.fori_loop(0, polish_steps, polish, (z, it, res_max(z, 0.0)))

    r, a = _balance_eval(c, e, z, p, 0.0)
    # rounding: the entries of C (≤ 4ε of the Gram dtype), the evaluation (2√T ε), the map
    # w = z·exp(−2 log n / (1+p)) (relative error ≤ ε (2|exponent| + 2)) and the cast of w
    if p == 1.0:
        expo = jnp.zeros([], dtype)  # w = z / n: one division
    else:
        expo = 2.0 / (1.0 + p) * jnp.max(jnp.where(jnp.isfinite(logn), jnp.abs(logn), 0.0))
    margin = (4.0 * eps_in + 2.0 * math.sqrt(n) * eps + eps * (2.0 * expo + 2.0) + eps_out) * (a + p)
    bound = jnp.where(zero_task, 1.0, jnp.abs(r) + margin)
    if p == 1.0:
        w = z / jnp.where(zero_task, jnp.exp(logref), norms_)
    else:
        w = z * jnp.exp(-2.0 / (1.0 + p) * logn)
    w = jnp.where(any_pos, w, jnp.ones_like(w))
    if out_dtype is not None:
        w = w.astype(out_dtype)
    # a weight that is not a normal number of the output dtype (0, subnormal, inf) cannot carry the solution
    normal = (w >= jnp.finfo(w.dtype).tiny) & (w <= jnp.finfo(w.dtype).max)
    bound = jnp.where(normal | jnp.isnan(w), bound, jnp.maximum(bound, 1.0))
    return SolverResult(w, it, jnp.max(bound))
