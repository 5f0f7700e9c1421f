"""Small dense solvers and pytree helpers for the solver-based methods (private).

The solver-based gradient-balancing methods (MGDA, CAGrad, Nash-MTL, UPGrad,
FairGrad) only need the ``[T, T]`` Gram matrix ``G = J Jᵀ`` of the global
shared gradient ``J`` (``[T, P]``, all shared leaves flattened together) to pick
their task coefficients; the update is then one weighted sum per leaf.  This
module holds:

* :func:`shared_gram`: the Gram matrix of the shared leaves, computed in
  float32 or wider after dividing by ``max |J|`` and then normalised to mean
  diagonal 1, together with the factor that undoes the normalisation.  All
  solvers below work on the normalised matrix, so they see O(1) numbers for
  gradients scaled anywhere from 1e-10 to 1e10.
* :func:`project_simplex`: Euclidean projection onto the probability simplex.
* :func:`nnls_gram`: ``argmin_{x ≥ 0} ½ xᵀHx + cᵀx`` (a non-negative least
  squares problem in Gram form) by the Lawson–Hanson active-set method.
* :func:`min_norm_simplex`: the min-norm point of the convex hull of the task
  gradients (MGDA), exactly via NNLS or by Frank–Wolfe.
* :func:`power_balance`: the positive solution of ``G w = w^{-p}`` (Nash-MTL
  for ``p = 1``, FairGrad for ``p = 1/α``) by damped Newton on a strictly
  convex potential.

Every solver runs under ``jax.jit`` with a fixed iteration cap
(``lax.while_loop``) and returns its iteration count and a residual so that
callers can store them in their optimizer state.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, TypeVar

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = [
    "highest_precision",
    "SolverResult",
    "compute_dtype",
    "shared_gram",
    "project_simplex",
    "nnls_gram",
    "min_norm_simplex",
    "min_norm_kkt_gap",
    "power_balance",
    "power_balance_residual",
    "weighted_sum",
    "global_norm",
    "check_positive_int",
    "check_nonnegative",
    "MIN_NORM_SOLVERS",
]

MIN_NORM_SOLVERS = ("active_set", "frank_wolfe")
_HIGHEST = jax.lax.Precision.HIGHEST
_F = TypeVar("_F", bound=Callable[..., Any])


def highest_precision(fn: _F) -> _F:
    """Traces ``fn`` with full-float32 matmuls (no TF32/bf16 passes on accelerators).

    The solvers work with T×T matrices, so the cost is negligible, while the
    default reduced-precision matmuls of some GPUs/TPUs (~1e-3 relative) would
    spoil the KKT conditions they are meant to satisfy.
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


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
# argument checks
# ----------------------------------------------------------------------------


def check_positive_int(value: Any, name: str) -> int:
    """Raises ValueError unless ``value`` is a positive Python int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive Python int, got {value!r}.")
    return value


def check_nonnegative(value: Any, name: str) -> float:
    """Raises ValueError unless ``value`` is a finite non-negative number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite non-negative float, got {value!r}.")
    return float(value)


# ----------------------------------------------------------------------------
# pytree helpers
# ----------------------------------------------------------------------------


def compute_dtype(leaves: Sequence[jax.Array]) -> Any:
    """float32, or float64 when a leaf is float64 (x64 mode)."""
    dtype = jnp.float32
    for x in leaves:
        dtype = jnp.promote_types(dtype, x.dtype)
    return dtype


def shared_gram(leaves: Sequence[jax.Array], num_tasks: int, dtype: Any = None) -> tuple[jax.Array, jax.Array]:
    """Normalised Gram matrix of the global shared gradient.

    Returns ``(gram, scale)`` with ``J Jᵀ = scale · gram`` where ``J`` is the
    ``[T, P]`` concatenation of ``leaves`` (each ``[T, *shape]``).  ``gram`` has
    mean diagonal 1 unless ``J`` is all zeros, in which case ``gram = 0`` and
    ``scale = 1``.  The leaves are divided by ``max |J|`` before the products
    so that neither overflow nor underflow occurs for huge or tiny gradients.
    """
    if dtype is None:
        dtype = compute_dtype(leaves)
    if not leaves:
        return jnp.zeros((num_tasks, num_tasks), dtype), jnp.ones([], dtype)
    amax = jnp.zeros([], dtype)
    for x in leaves:
        amax = jnp.maximum(amax, jnp.max(jnp.abs(x)).astype(dtype))
    amax = jnp.where(jnp.isfinite(amax) & (amax > 0), amax, jnp.ones([], dtype))
    inv = 1.0 / amax
    gram = jnp.zeros((num_tasks, num_tasks), dtype)
    for x in leaves:
        m = x.reshape(num_tasks, -1).astype(dtype) * inv
        gram = gram + jnp.matmul(m, m.T, precision=_HIGHEST)
    gram = 0.5 * (gram + gram.T)
    md = jnp.mean(jnp.diagonal(gram))
    md = jnp.where(md > 0, md, jnp.ones([], dtype))
    return gram / md, amax * amax * md


def weighted_sum(leaves: Sequence[jax.Array], weights: jax.Array) -> list[jax.Array]:
    """``Σ_t w_t x_t`` for every leaf, computed in float32 or wider, cast back."""
    out = []
    for x in leaves:
        acc = jnp.promote_types(x.dtype, jnp.float32)
        out.append(jnp.tensordot(weights.astype(acc), x.astype(acc), axes=(0, 0), precision=_HIGHEST).astype(x.dtype))
    return out


def global_norm(leaves: Sequence[jax.Array], dtype: Any = jnp.float32) -> jax.Array:
    """L2 norm over all ``leaves`` (no task axis), overflow-safe via max scaling."""
    if not leaves:
        return jnp.zeros([], dtype)
    amax = jnp.zeros([], dtype)
    for x in leaves:
        amax = jnp.maximum(amax, jnp.max(jnp.abs(x)).astype(dtype))
    safe = jnp.where(jnp.isfinite(amax) & (amax > 0), amax, jnp.ones([], dtype))
    sq = sum(jnp.sum(jnp.square(x.astype(dtype) / safe)) for x in leaves)
    return jnp.where(amax > 0, safe * jnp.sqrt(sq), jnp.zeros([], dtype))


# ----------------------------------------------------------------------------
# simplex projection
# ----------------------------------------------------------------------------


def project_simplex(v: jax.Array) -> jax.Array:
    """Euclidean projection of ``v`` (``[n]``) onto ``{x ≥ 0, Σx = 1}`` (sort-based)."""
    n = v.shape[-1]
    u = jnp.sort(v)[::-1]
    css = jnp.cumsum(u) - 1.0
    idx = jnp.arange(1, n + 1, dtype=v.dtype)
    positive = u - css / idx > 0
    rho = jnp.maximum(jnp.sum(positive), 1)
    theta = css[rho - 1] / rho.astype(v.dtype)
    return jnp.maximum(v - theta, 0.0)


# ----------------------------------------------------------------------------
# NNLS (Lawson–Hanson active set, Gram form)
# ----------------------------------------------------------------------------


def _restricted_solve(h: jax.Array, c: jax.Array, passive: jax.Array, ridge: jax.Array) -> jax.Array:
    """Solves ``H_PP s_P = -c_P`` with ``s = 0`` off the passive set ``P``."""
    n = h.shape[0]
    both = passive[:, None] & passive[None, :]
    a = jnp.where(both, h, 0.0) + jnp.diag(jnp.where(passive, ridge, 1.0))
    b = jnp.where(passive, -c, 0.0)
    s = jnp.linalg.solve(a, b)
    s = jnp.where(jnp.isfinite(s), s, 0.0)
    return jnp.where(passive, s, 0.0) * jnp.ones((n,), h.dtype)


@highest_precision
def nnls_gram(
    h: jax.Array,
    c: jax.Array,
    *,
    max_iter: int,
    tol: float = 1e-5,
    ridge: float = 1e-7,
) -> SolverResult:
    """``argmin_{x ≥ 0} ½ xᵀHx + cᵀx`` for a symmetric PSD ``H`` (Lawson–Hanson).

    The classical active-set method for non-negative least squares, written
    on the Gram matrix: grow the passive set ``P`` by the coordinate with the
    most negative gradient, solve the equality-constrained problem on ``P``,
    and step back towards the previous feasible point whenever that solution
    leaves the orthant.  Each iteration is one ``|T|×|T|`` linear solve; the
    loop stops when the KKT conditions hold to ``tol`` (relative to ``max|c|``)
    or after ``max_iter`` iterations, keeping the last feasible iterate.

    ``ridge`` (relative to the mean diagonal of ``H``) is added to the
    restricted systems only, to keep them solvable in floating point.

    Residual: ``max(max_i (−∇_i)_+, max_{x_i > 0} |∇_i|) / max|c|`` with
    ``∇ = Hx + c`` (0 exactly at the KKT point).
    """
    n = h.shape[0]
    dtype = h.dtype
    cscale = jnp.maximum(jnp.max(jnp.abs(c)), jnp.finfo(dtype).tiny)
    hscale = jnp.maximum(jnp.mean(jnp.abs(jnp.diagonal(h))), jnp.finfo(dtype).tiny)
    tol_w = jnp.asarray(tol, dtype) * cscale
    rdg = jnp.asarray(ridge, dtype) * hscale

    def cond(state):
        _, _, it, done = state
        return (~done) & (it < max_iter)

    def body(state):
        x, passive, it, _ = state
        s = _restricted_solve(h, c, passive, rdg)
        feasible = jnp.all(jnp.where(passive, s > 0, True))
        # feasible: accept s, then add the most violating coordinate (or stop)
        w = -(h @ s + c)
        cand = (~passive) & (w > tol_w)
        finished = ~jnp.any(cand)
        j = jnp.argmax(jnp.where(cand, w, -jnp.inf))
        add = (jnp.arange(n) == j) & ~finished
        # infeasible: move from x towards s until the first coordinate hits 0
        bad = passive & (s <= 0)
        denom = x - s
        ratio = jnp.where(bad & (denom > 0), x / jnp.where(denom > 0, denom, 1.0), jnp.where(bad, 0.0, jnp.inf))
        k = jnp.argmin(ratio)
        alpha = jnp.clip(ratio[k], 0.0, 1.0)
        x_bt = jnp.where(passive, x + alpha * (s - x), 0.0)
        p_bt = passive & (x_bt > 0) & (jnp.arange(n) != k)
        x_bt = jnp.where(p_bt, x_bt, 0.0)
        x_new = jnp.where(feasible, s, x_bt)
        p_new = jnp.where(feasible, passive | add, p_bt)
        return x_new, p_new, it + 1, feasible & finished

    x0 = jnp.zeros((n,), dtype)
    p0 = jnp.zeros((n,), bool)
    x, _, it, _ = jax.lax.while_loop(cond, body, (x0, p0, jnp.zeros([], jnp.int32), jnp.zeros([], bool)))
    grad = h @ x + c
    dual = jnp.max(jnp.maximum(-grad, 0.0))
    comp = jnp.max(jnp.where(x > 0, jnp.abs(grad), 0.0))
    return SolverResult(x, it, jnp.maximum(dual, comp) / cscale)


# ----------------------------------------------------------------------------
# min-norm point of the convex hull (MGDA)
# ----------------------------------------------------------------------------


@highest_precision
def min_norm_kkt_gap(gram: jax.Array, lam: jax.Array) -> jax.Array:
    """Frank–Wolfe gap ``λᵀGλ − min_t (Gλ)_t`` (≥ 0; 0 iff ``λ`` is a min-norm point)."""
    g = gram @ lam
    return jnp.maximum(jnp.dot(lam, g) - jnp.min(g), 0.0)


def _best_pair(gram: jax.Array) -> jax.Array:
    """Min-norm point over all segments ``[g_i, g_j]`` (and vertices), as weights ``[T]``."""
    n = gram.shape[0]
    d = jnp.diagonal(gram)
    v11, v22, v12 = d[:, None], d[None, :], gram
    denom = v11 + v22 - 2.0 * v12
    gamma = jnp.where(denom > 0, (v22 - v12) / jnp.where(denom > 0, denom, 1.0), 1.0)
    gamma = jnp.clip(gamma, 0.0, 1.0)
    cost = gamma**2 * v11 + 2.0 * gamma * (1.0 - gamma) * v12 + (1.0 - gamma) ** 2 * v22
    flat = jnp.argmin(cost.reshape(-1))
    i, j = flat // n, flat % n
    g = gamma.reshape(-1)[flat]
    eye = jnp.eye(n, dtype=gram.dtype)
    return g * eye[i] + (1.0 - g) * eye[j]


def _frank_wolfe(gram: jax.Array, *, max_iter: int, tol: float) -> SolverResult:
    """Away-step Frank–Wolfe with exact line search for ``min_{λ∈Δ} ½ λᵀGλ``."""
    n = gram.shape[0]
    eye = jnp.eye(n, dtype=gram.dtype)

    def cond(state):
        _, it, gap = state
        return (gap > tol) & (it < max_iter)

    def body(state):
        lam, it, _ = state
        g = gram @ lam
        s = jnp.argmin(g)
        a = jnp.argmax(jnp.where(lam > 0, g, -jnp.inf))
        fw_gap = jnp.dot(lam - eye[s], g)
        away_gap = jnp.dot(eye[a] - lam, g)
        use_fw = fw_gap >= away_gap
        d = jnp.where(use_fw, eye[s] - lam, lam - eye[a])
        la = lam[a]
        step_max = jnp.where(use_fw, 1.0, jnp.where(la < 1, la / jnp.where(la < 1, 1.0 - la, 1.0), 1.0))
        num = -jnp.dot(d, g)
        den = jnp.dot(d, gram @ d)
        step = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), step_max)
        step = jnp.clip(step, 0.0, step_max)
        lam = jnp.maximum(lam + step * d, 0.0)
        lam = lam / jnp.sum(lam)
        return lam, it + 1, min_norm_kkt_gap(gram, lam)

    lam0 = _best_pair(gram)
    lam, it, gap = jax.lax.while_loop(cond, body, (lam0, jnp.zeros([], jnp.int32), min_norm_kkt_gap(gram, lam0)))
    return SolverResult(lam, it, gap)


@highest_precision
def min_norm_simplex(
    gram: jax.Array,
    *,
    solver: str = "active_set",
    max_iter: Optional[int] = None,
    tol: float = 1e-5,
) -> SolverResult:
    """``argmin_{λ ∈ Δ} λᵀGλ``: the min-norm point ``Σ λ_t g_t`` of the convex hull.

    ``"active_set"`` (exact): with ``u = λ / (1 + λᵀGλ)`` the problem is the
    NNLS ``min_{u ≥ 0} ‖Jᵀu‖² + (1ᵀu − 1)²`` (Gram ``G + 11ᵀ``, linear term
    ``−1``), solved by :func:`nnls_gram`; ``λ = u / 1ᵀu``.
    ``"frank_wolfe"``: Frank–Wolfe with exact line search from the best pair
    of tasks (as the official MGDA code's FW variant), with away steps
    (Lacoste-Julien & Jaggi, 2015) so that interior solutions converge
    linearly rather than zig-zagging.  For the all-zero Gram
    matrix every ``λ`` is optimal and the uniform one is returned.  Residual:
    :func:`min_norm_kkt_gap` relative to the mean diagonal of ``G``.
    """
    n = gram.shape[0]
    dtype = gram.dtype
    if solver not in MIN_NORM_SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {MIN_NORM_SOLVERS}.")
    md = jnp.mean(jnp.diagonal(gram))
    zero = ~(md > 0)
    g = gram / jnp.where(zero, 1.0, md)
    if solver == "active_set":
        res = nnls_gram(g + jnp.ones((n, n), dtype), -jnp.ones((n,), dtype), max_iter=max_iter or 4 * n + 20, tol=tol)
        total = jnp.sum(res.x)
        lam = jnp.where(total > 0, res.x / jnp.where(total > 0, total, 1.0), jnp.full((n,), 1.0 / n, dtype))
        it = res.iterations
    else:
        res = _frank_wolfe(g, max_iter=max_iter or 250, tol=tol)
        lam, it = res.x, res.iterations
    lam = jnp.where(zero, jnp.full((n,), 1.0 / n, dtype), lam)
    return SolverResult(lam, it, min_norm_kkt_gap(g, lam))


# ----------------------------------------------------------------------------
# G w = w^{-p} on the positive orthant (Nash-MTL, FairGrad)
# ----------------------------------------------------------------------------


@highest_precision
def power_balance_residual(gram: jax.Array, w: jax.Array, p: float) -> jax.Array:
    """``max_t |w_t^p (G w)_t − 1|``: 0 exactly when ``G w = w^{-p}``."""
    w = jnp.maximum(w, jnp.finfo(w.dtype).tiny)
    return jnp.max(jnp.abs(w**p * (gram @ w) - 1.0))


@highest_precision
def power_balance(
    gram: jax.Array,
    p: float,
    *,
    w0: Optional[jax.Array] = None,
    ridge: float = 1e-6,
    max_iter: int = 50,
    tol: float = 1e-12,
    num_backtracks: int = 30,
) -> SolverResult:
    """Positive solution of ``(G + ridge·I) w = w^{-p}`` by damped Newton.

    ``w`` is the unique minimiser of the strictly convex potential
    ``φ(w) = ½ wᵀ(G + ridge·I)w − Σ_t h(w_t)`` on ``w > 0`` with
    ``h(w) = log w`` (``p = 1``) or ``w^{1−p} / (1−p)``, since ``∇φ = 0`` is the
    balance equation.  Newton steps use the Hessian ``G + ridge·I +
    diag(p w^{−p−1})``; far from the solution the step is cut to stay inside
    the orthant and backtracked (Armijo, ``num_backtracks`` halvings evaluated
    together); once the Newton decrement is small, full steps are taken.  The
    start is the better (lower ``φ``) of the orthogonal-gradients solution
    ``w_t = (G_tt + ridge)^{−1/(1+p)}`` and ``w0`` (a warm start, if given).

    The ridge (in units of ``G``, which callers normalise to mean diagonal 1)
    makes the problem solvable when ``G`` is singular (a zero or linearly
    dependent task gradient), where the exact equation has no solution.
    Residual: :func:`power_balance_residual` on ``G`` without the ridge.
    """
    n = gram.shape[0]
    dtype = gram.dtype
    if not p > 0:
        raise ValueError(f"the exponent p must be positive, got {p!r}.")
    reg = gram + jnp.asarray(ridge, dtype) * jnp.eye(n, dtype=dtype)
    tiny = jnp.finfo(dtype).tiny
    halvings = 0.5 ** jnp.arange(num_backtracks, dtype=dtype)

    def h(w):
        if p == 1.0:
            return jnp.log(w)
        return w ** (1.0 - p) / (1.0 - p)

    def phi(w):
        ok = jnp.all(w > 0)
        val = 0.5 * jnp.dot(w, reg @ w) - jnp.sum(h(jnp.where(w > 0, w, 1.0)))
        return jnp.where(ok, val, jnp.inf)

    def cond(state):
        _, it, dec2, stalled = state
        return (it < max_iter) & (dec2 > tol) & ~stalled

    def body(state):
        w, it, _, _ = state
        grad = reg @ w - w ** (-p)
        hess = reg + jnp.diag(p * w ** (-p - 1.0))
        dx = -jnp.linalg.solve(hess, grad)
        dx = jnp.where(jnp.isfinite(dx), dx, 0.0)
        dec2 = -jnp.dot(grad, dx)
        ratio = jnp.where(dx < 0, -w / jnp.where(dx < 0, dx, -1.0), jnp.inf)
        tmax = jnp.minimum(1.0, 0.99 * jnp.min(ratio))
        ts = tmax * halvings
        cands = w[None, :] + ts[:, None] * dx[None, :]
        vals = jax.vmap(phi)(cands)
        ok = vals <= phi(w) - 0.25 * ts * dec2
        t_ls = jnp.where(jnp.any(ok), ts[jnp.argmax(ok)], 0.0)
        t = jnp.where((dec2 < 1e-2) & (tmax >= 1.0), 1.0, t_ls)
        w_new = jnp.maximum(w + t * dx, tiny)
        return w_new, it + 1, dec2, t == 0

    w_a = (jnp.diagonal(gram) + ridge) ** (-1.0 / (1.0 + p))
    w_a = jnp.where(jnp.isfinite(w_a), w_a, 1.0)
    if w0 is not None:
        w0 = w0.astype(dtype)
        valid = jnp.all(w0 > 0) & jnp.all(jnp.isfinite(w0))
        use_b = valid & (phi(jnp.where(valid, w0, w_a)) < phi(w_a))
        w_init = jnp.where(use_b, w0, w_a)
    else:
        w_init = w_a
    init = (w_init, jnp.zeros([], jnp.int32), jnp.full([], jnp.inf, dtype), jnp.zeros([], bool))
    w, it, _, _ = jax.lax.while_loop(cond, body, init)
    return SolverResult(w, it, power_balance_residual(gram, w, p))

