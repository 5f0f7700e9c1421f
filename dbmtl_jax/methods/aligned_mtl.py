"""Aligned-MTL: aligning the principal components of the task gradients.

Reference: D. Senushkin, N. Patakin, A. Kuznetsov, A. Konushin,
"Independent Component Alignment for Multi-Task Learning", CVPR 2023.

With the task-gradient matrix ``G`` (rows ``g_t``) and the eigendecomposition
of its Gram matrix ``G Gᵀ = V Λ Vᵀ`` (``Λ = Σ²``, the squared singular values),
the gradient system is replaced by the aligned, well-conditioned
``Ĝ = σ V Σ⁻¹ Vᵀ G`` whose singular values all equal ``σ``; the update is the
sum of its rows::

    α = σ V Σ⁻¹ Vᵀ 1,      shared update = Σ_t α_t g_t

Scale ``σ`` (``scale_mode``): ``"min"`` — the smallest (nonzero) singular value
(the paper's choice and the official default); ``"median"`` — the lower median
of the nonzero singular values; ``"rmse"`` — ``sqrt(mean Λ)`` over the nonzero
eigenvalues (the official code's alternatives).

Equal projections: the aligned rows are orthogonal with norm ``σ``, so the
update ``d = Ĝᵀ1`` has ``ĝ_t · d = σ²`` for every task (on the range of
``G Gᵀ`` when it is rank deficient: ``σ² (P1)_t``).

Solver (``solver``):

* ``"jacobi"`` (default, exact): the Gram matrix is assembled from task
  norms and cosines (each task's gradient divided by its own largest entry,
  :func:`dbmtl_jax.methods._numerics.task_cosine_gram`), the cosine matrix is
  factored by pivoted Cholesky and the graded factor diagonalised by
  one-sided Jacobi rotations (:func:`aligned_mtl_weights_exact`).  The
  singular values then have *relative* accuracy, so a task whose gradient
  is 1e-6 times another's keeps its own direction instead of being dropped;
  the rank is decided on the scale-free cosines (``T ε`` on the pivots;
  dependent or zero gradients), and a direction that is only rounding noise
  is a null direction.  At most ``max_sweeps`` (default 30) sweeps, each
  ``T − 1`` rounds of ``⌈T/2⌉`` parallel rotations; typically 2–6 sweeps.
* ``"eigh"`` (fast path, the official recipe): ``jnp.linalg.eigh`` of the
  Gram matrix normalised to a largest diagonal of 1, eigenvalues
  ``λ ≤ max(λ) · T · ε`` dropped (masked, so shapes stay static under
  ``jit``).  Its absolute error ``ε λ_max`` loses tasks whose gradients are
  below ~``√ε`` (float32: ~3e-4) of the largest and reports them as rank
  deficiency; the residual then says so (it is at least 1 when the rank is
  below the rank of the cosine matrix).

The state keeps the rank, the eigenvalues (of ``G Gᵀ / max_t ‖g_t‖²``), and
a residual: a bound on the equal-projection error
``max_t |ĝ_t·d / σ² − (P1)_t|``, evaluated against the unrotated Gram
matrix plus rounding margins that grow with cancellation (see
:func:`aligned_mtl_weights_exact`); nearly dependent task gradients, which
a Gram matrix resolves only to an angle ``~√ε``, show as a large residual.
With all gradients zero the update is zero (rank 0, residual 1).  Head
leaves get the plain ``Σ_t g_t`` (the weights act on the shared parameters
only, as in LibMTL and the official code).  LibMTL's version calls
``torch.symeig``, removed in PyTorch 2.  Hyperparameters are checked when
the transform is built: a value out of range raises ``ValueError`` naming
the option and the accepted values.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _gradient_common as gc
from dbmtl_jax.methods import _numerics as nm

PyTree = Any
SCALE_MODES = ("min", "median", "rmse")
SOLVERS = ("jacobi", "eigh")

__all__ = [
    "AlignedMTLState",
    "AlignedSolve",
    "aligned_mtl",
    "aligned_mtl_weights",
    "aligned_mtl_weights_exact",
    "SCALE_MODES",
    "SOLVERS",
]


class AlignedMTLState(NamedTuple):
    """State of :func:`aligned_mtl`.

    Attributes:
      count: number of updates so far (int32).
      weights: ``α`` of the last update, float32 ``[T]``.
      rank: numerical rank of the last Gram matrix (int32).
      eigenvalues: eigenvalues of the last normalised Gram matrix, ascending,
        float32 ``[T]`` (for logging the conditioning; 0 for null directions).
      residual: a bound on the equal-projection error of the last update
        (float32; see the module docstring).
    """

    count: chex.Array
    weights: chex.Array
    rank: chex.Array
    eigenvalues: chex.Array
    residual: chex.Array


@nm.highest_precision
def aligned_mtl_weights(gram: jax.Array, scale_mode: str = "min") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Aligned-MTL weights from a Gram matrix: ``(α [T], rank, eigenvalues)``."""
    t = gram.shape[0]
    dt = gram.dtype
    gram = 0.5 * (gram + gram.T)
    lam, v = jnp.linalg.eigh(gram)  # ascending
    tol = jnp.max(lam) * t * jnp.finfo(dt).eps
    valid = lam > jnp.maximum(tol, 0)
    rank = jnp.sum(valid).astype(jnp.int32)
    safe = jnp.where(valid, lam, 1)
    if scale_mode == "min":
        scale2 = jnp.min(jnp.where(valid, lam, jnp.inf))
    elif scale_mode == "median":
        # valid eigenvalues are the top `rank` of the ascending list; lower median
        idx = t - rank + (rank - 1) // 2
        scale2 = lam[jnp.clip(idx, 0, t - 1)]
    else:  # rmse
        scale2 = jnp.sum(jnp.where(valid, lam, 0)) / jnp.maximum(rank, 1).astype(dt)
    scale2 = jnp.where(rank > 0, scale2, 0)
    inv = jnp.where(valid, jnp.sqrt(jnp.maximum(scale2, 0)) / jnp.sqrt(safe), 0)
    b = jnp.matmul(v * inv[None, :], v.T, precision=nm.HIGHEST)
    alpha = jnp.sum(b, axis=1)
    alpha = jnp.where(jnp.isfinite(alpha), alpha, 0)
    return alpha, rank, lam


def _round_robin(n: int) -> np.ndarray:
    """Pairings of ``m = n + n % 2`` columns into ``m − 1`` rounds of ``m / 2`` disjoint pairs (circle method)."""
    m = n + n % 2
    players = list(range(m))
    rounds = []
    for _ in range(m - 1):
        rounds.append([(players[i], players[m - 1 - i]) for i in range(m // 2)])
        players = [players[0], players[-1]] + players[1:-1]
    return np.asarray(rounds, np.int32).reshape(m - 1, m // 2, 2)


class AlignedSolve(NamedTuple):
    """Result of :func:`aligned_mtl_weights_exact` (see there)."""

    alpha: jax.Array
    rank: jax.Array
    eigenvalues: jax.Array
    residual: jax.Array
    sweeps: jax.Array


def _pivoted_cholesky(c: jax.Array, tol: jax.Array) -> jax.Array:
    """``F`` with ``F Fᵀ ≈ C`` by Cholesky with diagonal pivoting, stopped when the largest remaining
    Schur-complement diagonal is ``≤ tol`` (the later columns are zero).  Exactly dependent rows of ``C``
    give exactly dependent rows of ``F`` (their Schur complements vanish exactly)."""
    t = c.shape[0]

    def step(k, state):
        s, f, done = state
        dg = jnp.where(done, -jnp.inf, jnp.diagonal(s))
        p = jnp.argmax(dg)
        piv = dg[p]
        ok = piv > tol
        col = jnp.where(ok & ~done, s[:, p] / jnp.sqrt(jnp.where(ok, piv, 1)), 0)
        f = f.at[:, k].set(col)
        s = s - col[:, None] * col[None, :]
        return s, f, done | ((jnp.arange(t) == p) & ok)

    _, f, _ = jax.lax.fori_loop(0, t, step, (c, jnp.zeros_like(c), jnp.zeros((t,), bool)))
    return f


@nm.highest_precision
def aligned_mtl_weights_exact(
    cos: jax.Array, norms: jax.Array, scale_mode: str = "min", *, max_sweeps: int = 30
) -> AlignedSolve:
    """Aligned-MTL weights from task cosines and norms, accurate at any relative task scale.

    ``G / max_t G_tt = D C D`` with ``D = diag(norms) / max(norms)`` and
    ``C`` = ``cos`` (:func:`dbmtl_jax.methods._numerics.task_cosine_gram`).  ``C`` is
    factored as ``C ≈ F Fᵀ`` by Cholesky with diagonal pivoting, truncated
    once the remaining Schur complement is ``≤ T ε`` (the numerical rank is
    decided on the scale-free ``C``; exactly dependent task gradients give
    exactly dependent rows of ``F``).  The rows of ``B = D F`` are then
    orthogonalised by one-sided (Hestenes) Jacobi rotations ``Q B = S`` in
    parallel round-robin sweeps, until
    ``max_{i≠j} |s_iᵀs_j| ≤ T ε ‖s_i‖‖s_j‖`` or ``max_sweeps``; a row that is
    rounding noise of its summands, ``‖s_k‖ ≤ 4 T ε Σ_t |Q_kt| ‖b_t‖``, is a
    null direction and is zeroed at once so that it cannot pollute the
    others.  ``G = Qᵀ Σ² Q`` with ``Σ = diag ‖s_k‖``: rotations acting on whole
    rows keep each row's own scale, so the singular values come out with
    *relative* accuracy ``~ε κ(F)`` however graded ``D`` is (Demmel &
    Veselić, "Jacobi's method is more accurate than QR", SIAM J. Matrix Anal.
    Appl. 13, 1992), whereas ``eigh`` of ``G`` (tridiagonal QR) has absolute
    error ``ε λ_max``, which wipes out tasks ~``√ε`` times smaller than the
    largest.  ``rank`` counts the non-null rows and ``α = σ Qᵀ Σ⁻¹ Q 1`` over
    them.  Relative task scales down to about ``1e-18`` (float32: squared
    row norms must stay normal numbers) are supported.

    Residual (equal projections): with the aligned rows
    ``ĝ_t = σ (G^{−½} J)_t`` and the update ``d = Jᵀα``, every task should
    see ``ĝ_t · d = σ² (P 1)_t`` (``P`` the projector on the range of ``G``;
    ``σ²`` for every task at full rank).  The residual is
    ``max_t |ĝ_t·d / σ² − (P1)_t|`` evaluated with the *unrotated* ``B`` (so
    lost orthogonality shows), plus the rounding margin
    ``(2ε + max|F Fᵀ − C|) · max_k (Σ_t |Q_kt| ‖b_t‖ / σ_k)²`` that grows when a
    direction is formed by cancellation (nearly dependent task gradients,
    which a Gram matrix resolves only to an angle ``~√ε``), plus
    ``max_{null j} 4 T ε Σ_t |Q_jt| ‖b_t‖ / min_k σ_k`` (a null direction's
    rounding noise may have tilted a genuine direction that is smaller still).

    Returns:
      :class:`AlignedSolve` with ``alpha [T]``, ``rank`` (int32), the
      eigenvalues ``σ_k²`` of ``G / max_t G_tt`` ascending (0 for the null
      directions), ``residual`` and ``sweeps`` (int32).
    """
    t = cos.shape[0]
    dt = cos.dtype
    eps = jnp.finfo(dt).eps
    nz = norms > 0
    c = jnp.where(nz[:, None] & nz[None, :], cos, 0)
    f = _pivoted_cholesky(c, t * eps * jnp.maximum(jnp.max(jnp.diagonal(c)), 0))
    fac_err = jnp.max(jnp.abs(jnp.matmul(f, f.T, precision=nm.HIGHEST) - c))
    nmax = jnp.max(jnp.where(nz, norms, 0))
    d = jnp.where(nz, norms / jnp.where(nmax > 0, nmax, 1), 0)
    b0 = d[:, None] * f

    sched = jnp.asarray(_round_robin(t))
    m = t + t % 2
    thresh = t * eps
    null_tol = 4 * t * eps
    row_norms = jnp.zeros((m,), dt).at[:t].set(jnp.sqrt(jnp.sum(b0 * b0, axis=1)))

    def is_null(bm, q):
        return jnp.sqrt(jnp.sum(bm * bm, axis=1)) <= null_tol * (jnp.abs(q) @ row_norms)

    def rotate(x, pairs):
        bm, q = x
        i, j = pairs[:, 0], pairs[:, 1]
        bi, bj = bm[i], bm[j]
        a = jnp.sum(bi * bi, axis=1)
        b = jnp.sum(bj * bj, axis=1)
        cc = jnp.sum(bi * bj, axis=1)
        act = (a > 0) & (b > 0) & (jnp.abs(cc) > thresh * jnp.sqrt(a) * jnp.sqrt(b))
        zeta = (b - a) / (2 * jnp.where(act, cc, 1))
        tn = jnp.where(zeta == 0, 1, jnp.sign(zeta) / (jnp.abs(zeta) + jnp.sqrt(1 + zeta * zeta)))
        cs = jnp.where(act, 1 / jnp.sqrt(1 + tn * tn), 1)[:, None]
        sn = jnp.where(act, tn / jnp.sqrt(1 + tn * tn), 0)[:, None]
        qi, qj = q[i], q[j]
        bm = bm.at[i].set(cs * bi - sn * bj).at[j].set(sn * bi + cs * bj)
        q = q.at[i].set(cs * qi - sn * qj).at[j].set(sn * qi + cs * qj)
        return jnp.where(is_null(bm, q)[:, None], 0, bm), q

    def off(bm):
        g = jnp.matmul(bm, bm.T, precision=nm.HIGHEST)
        nrm = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0))
        den = nrm[:, None] * nrm[None, :]
        rel = jnp.where(den > 0, jnp.abs(g) / jnp.where(den > 0, den, 1), 0)
        return jnp.max(jnp.where(jnp.eye(bm.shape[0], dtype=bool), 0, rel))

    def cond(state):
        _, _, k, o = state
        return (k < max_sweeps) & (o > thresh)

    def body(state):
        bm, q, k, _ = state
        bm, q = jax.lax.fori_loop(0, m - 1, lambda r, x: rotate(x, sched[r]), (bm, q))
        return bm, q, k + 1, off(bm)

    # pad to an even number of rows with a zero row (never rotated)
    bstart = jnp.zeros((m, t), dt).at[:t].set(b0)
    qstart = jnp.eye(m, dtype=dt)
    bm, q, sweeps, _ = jax.lax.while_loop(cond, body, (bstart, qstart, jnp.zeros([], jnp.int32), off(bstart)))
    size = (jnp.abs(q) @ row_norms)[:t]
    bm, q = bm[:t], q[:t, :t]
    sig = jnp.sqrt(jnp.sum(bm * bm, axis=1))
    valid = sig > null_tol * size
    rank = jnp.sum(valid).astype(jnp.int32)
    sig_safe = jnp.where(valid, sig, 1)
    lam = jnp.sort(jnp.where(valid, sig * sig, 0))
    if scale_mode == "min":
        scale = jnp.min(jnp.where(valid, sig, jnp.inf))
    elif scale_mode == "median":
        idx = t - rank + (rank - 1) // 2
        scale = jnp.sqrt(lam[jnp.clip(idx, 0, t - 1)])
    else:  # rmse
        scale = jnp.sqrt(jnp.sum(lam) / jnp.maximum(rank, 1).astype(dt))
    scale = jnp.where(rank > 0, scale, 0)
    q1 = jnp.where(valid, jnp.sum(q, axis=1), 0)
    alpha = q.T @ (jnp.where(valid, scale / sig_safe, 0) * q1)
    alpha = jnp.where(jnp.isfinite(alpha), alpha, 0)
    # equal projections with the unrotated factor: (Q B0)(B0ᵀ α) / (Σ σ) against Q 1, mapped back by Qᵀ
    proj = (q @ b0) @ (b0.T @ alpha)
    lhs = jnp.where(valid, proj / (sig_safe * jnp.where(scale > 0, scale, 1)), 0)
    eq = jnp.max(jnp.abs(q.T @ (lhs - q1)))
    cancel = jnp.max(jnp.where(valid, jnp.square(size / sig_safe), 0))
    # a null row was up to null_tol·size_k of noise before it was zeroed; rotated against a genuine row
    # of comparable norm it may have tilted it by about that ratio
    floor = jnp.max(jnp.where(valid, 0, null_tol * size))
    tilt = jnp.max(jnp.where(valid, floor / sig_safe, 0))
    residual = jnp.where(rank > 0, eq + (2 * eps + fac_err) * cancel + tilt, 1)
    residual = jnp.where(jnp.isfinite(residual), residual, jnp.inf)
    return AlignedSolve(alpha, rank, lam, residual.astype(dt), sweeps)


def _eigh_solve(cos: jax.Array, norms: jax.Array, scale_mode: str) -> AlignedSolve:
    """The official recipe (``eigh`` of the normalised Gram matrix) with the same residual."""
    t = cos.shape[0]
    dt = cos.dtype
    eps = jnp.finfo(dt).eps
    nz = norms > 0
    nmax = jnp.max(jnp.where(nz, norms, 0))
    d = jnp.where(nz, norms / jnp.where(nmax > 0, nmax, 1), 0)
    c = jnp.where(nz[:, None] & nz[None, :], cos, 0)
    h0 = d[:, None] * c * d[None, :]
    alpha, rank, lam = aligned_mtl_weights(h0, scale_mode)
    # residual with eigh's own factors, against the assembled H
    lam_e, v = jnp.linalg.eigh(0.5 * (h0 + h0.T))
    valid = lam_e > jnp.maximum(jnp.max(lam_e) * t * eps, 0)
    sig = jnp.sqrt(jnp.where(valid, lam_e, 1))
    if scale_mode == "min":
        scale = jnp.min(jnp.where(valid, sig, jnp.inf))
    elif scale_mode == "median":
        scale = jnp.sqrt(jnp.sort(jnp.where(valid, lam_e, 0))[jnp.clip(t - rank + (rank - 1) // 2, 0, t - 1)])
    else:
        scale = jnp.sqrt(jnp.sum(jnp.where(valid, lam_e, 0)) / jnp.maximum(rank, 1).astype(dt))
    q = v.T
    q1 = jnp.where(valid, jnp.sum(q, axis=1), 0)
    lhs = jnp.where(valid, (q @ (h0 @ alpha)) / (sig * jnp.where(scale > 0, scale, 1)), 0)
    eq = jnp.max(jnp.abs(q.T @ (lhs - q1)))
    # directions that the gradients have but eigh lost (rank below that of the cosine matrix)
    f = _pivoted_cholesky(c, t * eps * jnp.maximum(jnp.max(jnp.diagonal(c)), 0))
    rank_c = jnp.sum(jnp.any(f != 0, axis=0)).astype(jnp.int32)
    cancel = jnp.max(jnp.where(valid, 1 / jnp.where(valid, lam_e, 1), 0))
    residual = jnp.where(rank > 0, eq + 2 * eps * cancel, 1)
    residual = jnp.where(rank < rank_c, jnp.maximum(residual, 1), residual)
    residual = jnp.where(jnp.isfinite(residual), residual, jnp.inf)
    lam_sorted = jnp.sort(jnp.where(valid, lam_e, 0))
    return AlignedSolve(alpha, rank, lam_sorted, residual.astype(dt), jnp.zeros([], jnp.int32))


def aligned_mtl(
    num_tasks: int,
    *,
    shared: ta.SharedSpec = None,
    scale_mode: str = "min",
    solver: str = "jacobi",
    max_sweeps: int = 30,
) -> optax.GradientTransformationExtraArgs:
    """Aligned-MTL (Senushkin et al., CVPR 2023): ``α = σ V Σ⁻¹ Vᵀ 1``, update ``Σ_t α_t g_t``.

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      shared: which leaves are shared; default all.  Head leaves get ``Σ_t g_t``.
      scale_mode: ``"min"`` (default, paper), ``"median"`` or ``"rmse"``.
      solver: ``"jacobi"`` (default; exact at any relative scale of the task
        gradients) or ``"eigh"`` (the official recipe; fast path).
      max_sweeps: cap on the Jacobi sweeps, an int ≥ 1 (``"jacobi"`` only).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args are ignored.

    Raises:
      ValueError: a hyperparameter out of range (the message names it).
    """
    name = "aligned_mtl"
    nm.check_num_tasks(num_tasks, name)
    nm.check_choice(scale_mode, SCALE_MODES, "scale_mode", name)
    nm.check_choice(solver, SOLVERS, "solver", name)
    max_sweeps = nm.check_int(max_sweeps, "max_sweeps", name, lo=1, type_error=ValueError)

    def init_state(params: PyTree) -> AlignedMTLState:
        del params
        return AlignedMTLState(
            count=jnp.zeros([], jnp.int32),
            weights=jnp.ones([num_tasks], jnp.float32),
            rank=jnp.zeros([], jnp.int32),
            eigenvalues=jnp.zeros([num_tasks], jnp.float32),
            residual=jnp.zeros([], jnp.float32),
        )

    def weighting(gram: tuple, state: AlignedMTLState, **_: Any) -> tuple[jax.Array, dict]:
        cos, norms = gram
        if solver == "jacobi":
            res = aligned_mtl_weights_exact(cos, norms, scale_mode, max_sweeps=max_sweeps)
        else:
            res = _eigh_solve(cos, norms, scale_mode)
        return res.alpha, dict(
            weights=res.alpha.astype(jnp.float32),
            rank=res.rank,
            eigenvalues=res.eigenvalues.astype(jnp.float32),
            residual=res.residual.astype(jnp.float32),
        )

    return gc.make_gradient_transform(
        name, num_tasks, weighting, init_state, shared=shared, gram="cosine", keep_when_no_shared=True,
        int_minimum=((max_sweeps, 1),),
    )
