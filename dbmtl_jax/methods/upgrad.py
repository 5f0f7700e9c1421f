"""UPGrad: unconflicting projection of gradients (Jacobian descent).

Reference: P. Quinton, V. Rey, "Jacobian Descent for Multi-Objective
Optimization", arXiv:2406.16232, 2024 (TorchJD).

Each task gradient (row of the Jacobian ``J``, ``[T, P]``, all shared leaves
flattened together) is projected onto the dual cone ``{x : Jx ≥ 0}`` of the
rows, and the projections are combined with a preference vector ``p``
(default ``1/T``, TorchJD's mean)::

    d = Σ_i p_i π_J(g_i),      π_J(g_i) = Jᵀ v_i,
    v_i = argmin_{v ≥ p_i e_i}  vᵀ G v        (G = J Jᵀ, Prop. 1 of the paper)

so ``d = Jᵀ (Σ_i v_i)``: the update weights are ``Σ_i v_i`` (each ``v_i`` is
already scaled by ``p_i``).  Every ``π_J(g_i)`` lies in the dual cone, hence
``J d ≥ 0``: no task is conflicted.  When no pair of gradients conflicts
(``G ≥ 0`` entrywise) each projection is the identity and ``d`` is the
(p-weighted) mean of the gradients.

Choices:

* scale: TorchJD's default preference vector is the uniform ``1/T``, so the
  update is on the mean scale (sum scale would be ``pref_vector = 1``).
* the T quadratic programs (TorchJD: ``quadprog``) are solved in-graph as
  NNLS problems ``min_{z ≥ 0} ½ (u_i + z)ᵀ G (u_i + z)`` (``v_i = u_i + z``) by
  the Lawson–Hanson active-set method
  (:func:`dbmtl_jax.methods._qp.nnls_gram`), vmapped over ``i``, with at most
  ``max_iter`` iterations each (default ``4T + 20``).  They are solved in the
  preconditioned variables ``ν_k = z_k ‖g_k‖ / (p_i ‖g_i‖)`` on the matrix of
  cosines between the task gradients, where every number is O(1) whatever
  the relative scale of the tasks, with a stopping rule relative to the
  projection's own norm; so with ``reg_eps = 0`` the projections are exact
  to rounding (tested for task gradients 10^±6 apart).
* as TorchJD, the Gram matrix is normalised by its trace and ``reg_eps``
  (default 1e-4) times the identity is added before solving: in the
  preconditioned variables, task ``k`` gets the ridge
  ``reg_eps · tr(G) / ‖g_k‖²``.  TorchJD also replaces the Gram matrix by
  zeros when its trace is below the absolute ``norm_eps = 1e-4``, which makes
  the result depend on the gradient scale (tiny gradients would get the
  plain mean); this implementation keeps only the scale-free part, treating
  the Gram as zero only when it is exactly zero.
* what ``reg_eps`` costs: the projections solve the regularised problem, so
  ``J d ≥ 0`` only holds up to a relative error of order
  ``reg_eps · tr(G) / ‖g_k‖²`` for task ``k``.  That is negligible for tasks
  of comparable gradient norms, but a task whose squared gradient norm is
  below about ``reg_eps`` times the total (a norm 100× below the others for
  the default 1e-4) is effectively not protected: with one of three random
  task gradients 100× larger than the others, the worst cosine of the update
  with a task was −0.36 over 200 draws (−0.06 at 30×, −0.62 at 1000×; TorchJD
  0.18 solves the same regularised problem).  ``reg_eps = 0`` gives the exact projections
  (``J d ≥ 0`` up to rounding at any scale) at no extra cost; a zero or
  duplicated task gradient is handled by the active set (it never enters).
* residual (``state.residual``): the largest relative KKT residual of the T
  projections (:func:`dbmtl_jax.methods._qp.qp_kkt_residual`, a cosine bound
  including a rounding margin) for the problem actually solved (with the
  ridge when ``reg_eps > 0``).  With ``reg_eps = 0``, a residual ``r`` certifies
  ``⟨g_k, π_J(g_i)⟩ ≥ −r ‖g_k‖ ‖π_J(g_i)‖`` for all ``i, k`` (equality where
  the constraint is active).
* heads: task-specific leaves get the plain ``Σ_t g_t`` (TorchJD's
  ``mtl_backward`` and LibMTL give each head its own task's gradient).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _gradient_common as gc
from dbmtl_jax.methods import _numerics as nm
from dbmtl_jax.methods import _qp

PyTree = Any

__all__ = ["UPGradState", "upgrad", "upgrad_weights", "upgrad_projections"]


class UPGradState(NamedTuple):
    """State of :func:`upgrad`.

    Attributes:
      count: number of updates so far (int32).
      weights: coefficients ``Σ_i v_i`` of the last shared update ``Σ_t w_t g_t``, ``[T]`` float32.
      residual: largest relative KKT residual of the T projections (a cosine bound,
        see the module docstring; float32).
      iterations: largest NNLS iteration count of the T projections (int32).
    """

    count: chex.Array
    weights: chex.Array
    residual: chex.Array
    iterations: chex.Array


@nm.highest_precision
def upgrad_projections(
    gram: jax.Array,
    pref: jax.Array,
    *,
    reg_eps: float = 1e-4,
    max_iter: Optional[int] = None,
    tol: float = 1e-5,
) -> _qp.SolverResult:
    """The ``v_i`` of every projection, ``x = [T, T]`` (row ``i``: ``π_J(p_i g_i) = Jᵀ v_i``).

    ``residual`` and ``iterations`` are per projection (``[T]``).  Each NNLS is
    solved on ``H = C + reg_eps·tr(G)·diag(1/‖g_k‖²)`` (``C`` the cosine matrix,
    which is TorchJD's ``G / tr(G) + reg_eps·I`` in the preconditioned
    variables) with offset ``e_i``; zero task gradients have a zero row and
    column (they never enter).
    """
    n = gram.shape[0]
    dtype = gram.dtype
    cos, nrm = _qp.precondition_gram(gram)
    nz = nrm > 0
    ns = jnp.where(nz, nrm, 1.0)
    m = ns / jnp.max(ns)
    tr = jnp.sum(jnp.where(nz, m * m, 0.0))
    h = cos + jnp.diag(jnp.where(nz, jnp.asarray(reg_eps, dtype) * tr / (m * m), 0.0))
    cap = max_iter or 4 * n + 20
    eye = jnp.eye(n, dtype=dtype)

    def project(ui):
        return _qp.nnls_gram(h, offset=ui, max_iter=cap, tol=tol)

    res = jax.vmap(project)(eye)
    z = jnp.where(nz[:, None] & nz[None, :], res.x * (ns[:, None] / ns[None, :]), 0.0)
    v = pref.astype(dtype)[:, None] * (eye + z)
    return _qp.SolverResult(v, res.iterations, res.residual)


@nm.highest_precision
def upgrad_weights(
    gram: jax.Array,
    pref: jax.Array,
    *,
    reg_eps: float = 1e-4,
    max_iter: Optional[int] = None,
    tol: float = 1e-5,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """UPGrad weights ``Σ_i v_i`` for a Gram matrix ``[T, T]`` and preference vector ``[T]``.

    Returns ``(weights, max_residual, max_iterations)`` (:func:`upgrad_projections`).
    """
    res = upgrad_projections(gram, pref, reg_eps=reg_eps, max_iter=max_iter, tol=tol)
    return jnp.sum(res.x, axis=0), jnp.max(res.residual), jnp.max(res.iterations)


def upgrad(
    num_tasks: int,
    *,
    pref_vector: Optional[Union[Sequence[float], np.ndarray, jax.Array]] = None,
    reg_eps: float = 1e-4,
    max_iter: Optional[int] = None,
    tol: float = 1e-5,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """UPGrad (Quinton & Rey, 2024): mean of the dual-cone projections of the task gradients.

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      pref_vector: finite non-negative weights ``[T]`` combining the
        projections; default ``1/T`` (TorchJD).
      reg_eps: ridge ``>= 0`` added to the trace-normalised Gram matrix
        (TorchJD 1e-4; 0 gives the exact projections, see the module docstring
        for what the ridge costs).
      max_iter: NNLS iteration cap per projection, an int ``>= 1`` (default
        ``4T + 20``).
      tol: relative KKT tolerance in ``(0, 1)`` (a cosine): ``state.residual ≤
        tol`` reports convergence; the active set adds every constraint
        violated by more than ``max(tol / 100, rounding)``.
      shared: which leaves are shared (see :func:`dbmtl_jax.dbmtl`); head
        leaves get ``Σ_t g_t``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args are ignored.
    """
    nm.check_num_tasks(num_tasks, "upgrad")
    reg_eps = nm.check_real(reg_eps, "reg_eps", "upgrad", lo=0)
    nm.check_static(max_iter, "max_iter", "upgrad", "it sizes the solver's loop")
    if max_iter is not None:
        max_iter = nm.check_int(max_iter, "max_iter", "upgrad", lo=1)
    tol = nm.check_real(tol, "tol", "upgrad", lo=0, hi=1, lo_open=True, hi_open=True)
    if pref_vector is None:
        pref = np.full([num_tasks], 1.0 / num_tasks, np.float32)
    else:
        pref_vector = nm.check_real(pref_vector, "pref_vector", "upgrad", lo=0, shapes=((num_tasks,),))
        pref = jnp.asarray(pref_vector, jnp.float32)  # jnp: a traced (injected) preference is fine

    def init_state(params: PyTree) -> UPGradState:
        del params
        return UPGradState(
            count=jnp.zeros([], jnp.int32),
            weights=jnp.asarray(pref, jnp.float32),
            residual=jnp.zeros([], jnp.float32),
            iterations=jnp.zeros([], jnp.int32),
        )

    def weighting(gram: jax.Array, state: UPGradState, **_: Any) -> tuple[jax.Array, dict]:
        w, resid, iters = upgrad_weights(gram, jnp.asarray(pref), reg_eps=reg_eps, max_iter=max_iter, tol=tol)
        fields = dict(
            weights=w.astype(jnp.float32), residual=resid.astype(jnp.float32), iterations=iters.astype(jnp.int32)
        )
        return w, fields

    return gc.make_gradient_transform("upgrad", num_tasks, weighting, init_state, shared=shared,
                                      hparams=(reg_eps, tol, pref_vector))
