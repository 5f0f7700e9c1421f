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
  NNLS problems ``min_{z ≥ 0} ½ zᵀGz + zᵀ(G u_i)`` (``v_i = u_i + z``) by the
  Lawson–Hanson active-set method, vmapped over ``i``, with at most
  ``max_iter`` iterations each (default ``4T + 20``).  The largest KKT
  residual over the T problems and the largest iteration count are stored.
* as TorchJD, the Gram matrix is normalised by its trace and ``reg_eps``
  (default 1e-4) times the identity is added before solving.  TorchJD also
  replaces the Gram matrix by zeros when its trace is below the absolute
  ``norm_eps = 1e-4``, which makes the result depend on the gradient scale
  (tiny gradients would get the plain mean); this implementation keeps only
  the scale-free part, treating the Gram as zero only when it is exactly zero.
  Because of ``reg_eps``, ``J d ≥ 0`` holds up to ``O(reg_eps)`` relative to
  ``‖g‖²``; ``reg_eps = 0`` makes it exact (up to rounding).
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
from dbmtl_jax.methods import _qp

PyTree = Any

__all__ = ["UPGradState", "upgrad", "upgrad_weights"]


class UPGradState(NamedTuple):
    """State of :func:`upgrad`.

    Attributes:
      count: number of updates so far (int32).
      weights: coefficients ``Σ_i v_i`` of the last shared update ``Σ_t w_t g_t``, ``[T]`` float32.
      residual: largest relative KKT residual of the T projections (float32).
      iterations: largest NNLS iteration count of the T projections (int32).
    """

    count: chex.Array
    weights: chex.Array
    residual: chex.Array
    iterations: chex.Array


@_qp.highest_precision
def upgrad_weights(
    gram: jax.Array,
    pref: jax.Array,
    *,
    reg_eps: float = 1e-4,
    max_iter: Optional[int] = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """UPGrad weights ``Σ_i v_i`` for a Gram matrix ``[T, T]`` and preference vector ``[T]``.

    Returns ``(weights, max_residual, max_iterations)``.
    """
    n = gram.shape[0]
    dtype = gram.dtype
    trace = jnp.trace(gram)
    g = jnp.where(trace > 0, gram / jnp.where(trace > 0, trace, 1.0), 0.0)
    g = g + jnp.asarray(reg_eps, dtype) * jnp.eye(n, dtype=dtype)
    u = jnp.diag(pref.astype(dtype))
    cap = max_iter or 4 * n + 20

    def project(ui):
        res = _qp.nnls_gram(g, g @ ui, max_iter=cap)
        return ui + res.x, res.residual, res.iterations

    v, resid, iters = jax.vmap(project)(u)
    return jnp.sum(v, axis=0), jnp.max(resid), jnp.max(iters)


def upgrad(
    num_tasks: int,
    *,
    pref_vector: Optional[Union[Sequence[float], np.ndarray, jax.Array]] = None,
    reg_eps: float = 1e-4,
    max_iter: Optional[int] = None,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """UPGrad (Quinton & Rey, 2024): mean of the dual-cone projections of the task gradients.

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      pref_vector: non-negative weights ``[T]`` combining the projections;
        default ``1/T`` (TorchJD).
      reg_eps: ridge added to the trace-normalised Gram matrix (TorchJD 1e-4).
      max_iter: NNLS iteration cap per projection (default ``4T + 20``).
      shared: which leaves are shared (see :func:`dbmtl_jax.dbmtl`); head
        leaves get ``Σ_t g_t``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args are ignored.
    """
    _qp.check_positive_int(num_tasks, "num_tasks")
    reg_eps = _qp.check_nonnegative(reg_eps, "reg_eps")
    if max_iter is not None:
        _qp.check_positive_int(max_iter, "max_iter")
    if pref_vector is None:
        pref = np.full([num_tasks], 1.0 / num_tasks, np.float32)
    else:
        pref = np.asarray(pref_vector, np.float32)
        if pref.shape != (num_tasks,):
            raise ValueError(f"pref_vector must have shape ({num_tasks},), got {pref.shape}.")
        if not np.all(np.isfinite(pref)) or np.any(pref < 0):
            raise ValueError("pref_vector must be finite and non-negative.")

    def init_fn(params: PyTree) -> UPGradState:
        del params
        return UPGradState(
            count=jnp.zeros([], jnp.int32),
            weights=jnp.asarray(pref, jnp.float32),
            residual=jnp.zeros([], jnp.float32),
            iterations=jnp.zeros([], jnp.int32),
        )

    def update_fn(
        updates: PyTree, state: UPGradState, params: Optional[PyTree] = None, **extra_args: Any
    ) -> tuple[PyTree, UPGradState]:
        del extra_args
        ta.check_task_axis(updates, num_tasks)
        mask = ta.resolve_shared(shared, updates if params is None else params)
        g_shared, g_heads, treedef = ta.split_shared(updates, mask)
        gram, _ = _qp.shared_gram(g_shared, num_tasks)
        w, resid, iters = upgrad_weights(gram, jnp.asarray(pref), reg_eps=reg_eps, max_iter=max_iter)
        out_shared = _qp.weighted_sum(g_shared, w)
        out_heads = [jnp.sum(g, axis=0) for g in g_heads]
        out = ta.merge_shared(out_shared, out_heads, mask, treedef)
        new_state = UPGradState(
            count=optax.safe_increment(state.count),
            weights=w.astype(jnp.float32),
            residual=resid.astype(jnp.float32),
            iterations=iters.astype(jnp.int32),
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
