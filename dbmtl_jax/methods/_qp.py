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
  convex potential, in variables scaled per task, with a residual that is a
  bound; :func:`task_cosine_gram` gives it ``G`` as task norms and cosines,
  each task's gradient divided by its own largest entry, so that it is exact
  at any relative scale of the task gradients.

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
    "task_cosine_gram",
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


def task_cosine_gram(leaves: Sequence[jax.Array], num_tasks: int, dtype: Any = None) -> tuple[jax.Array, jax.Array]:
    """Per-task preconditioned Gram matrix of the global shared gradient: ``(cos, norms)``.

    ``J Jᵀ = diag(norms) · cos · diag(norms)`` with ``norms_t = ‖g_t‖`` and
    ``cos`` the matrix of cosines between the task gradients (unit diagonal),
    ``J`` the ``[T, P]`` concatenation of ``leaves``.  Every task's row is
    divided by its *own* largest absolute entry before the products, so each
    entry of ``cos`` is accurate to rounding relative to 1 whatever the
    relative scale of the task gradients.  (A Gram matrix normalised by one
    common factor, as :func:`shared_gram`, keeps the small tasks only to
    ``eps · max_t ‖g_t‖²`` absolute: in float32 a task 1e-4 times smaller than
    the largest is lost.)  A task with an all-zero gradient gets norm 0 and a
    zero row and column in ``cos`` (diagonal included); a NaN/inf entry makes
    its task's norm NaN.  Computed in ``dtype`` (default: float32 or wider,
    :func:`compute_dtype`).
    """
    if dtype is None:
        dtype = compute_dtype(leaves)
    t = num_tasks
    mats = [x.reshape(t, -1) for x in leaves if x.size]
    if not mats:
        return jnp.zeros((t, t), dtype), jnp.zeros((t,), dtype)
    amax = jnp.zeros((t,), dtype)
    for m in mats:
        amax = jnp.maximum(amax, jnp.max(jnp.abs(m), axis=1).astype(dtype))
    finite = jnp.isfinite(amax)
    inv = 1.0 / jnp.where(finite & (amax > 0), amax, 1.0)
    acc = jnp.zeros((t, t), dtype)
    for m in mats:
        y = m.astype(dtype) * inv[:, None]
        acc = acc + jnp.matmul(y, y.T, precision=_HIGHEST)
    acc = 0.5 * (acc + acc.T)
    r = jnp.sqrt(jnp.maximum(jnp.diagonal(acc), 0.0))
    nonzero = finite & (amax > 0) & (r > 0)
    rs = jnp.where(nonzero, r, 1.0)
    sq = jnp.where(nonzero, jnp.diagonal(acc), 1.0)
    # √(M_ii M_jj) rather than √M_ii √M_jj: identical rows give a cosine of exactly 1
    cos = acc / jnp.sqrt(sq[:, None] * sq[None, :])
    both = nonzero[:, None] & nonzero[None, :]
    cos = jnp.where(both, jnp.clip(cos, -1.0, 1.0), 0.0)
    cos = jnp.where(jnp.eye(t, dtype=bool) & both, 1.0, cos)
    bad = ~finite | jnp.isnan(r)
    norms = jnp.where(bad, jnp.nan, jnp.where(nonzero, amax * rs, 0.0))
    return cos, norms


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

    With ``norms`` (see :func:`task_cosine_gram`), ``gram`` is the cosine
    matrix ``C`` and ``G = diag(norms) C diag(norms)``; the products are formed
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
    matrix) with ``norms = n`` (:func:`task_cosine_gram`, the accurate route
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
