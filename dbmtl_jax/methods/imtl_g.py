"""IMTL-G: impartial multi-task learning, gradient part (closed form).

Reference: L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao,
W. Zhang, "Towards Impartial Multi-task Learning", ICLR 2021.

Find weights ``α`` with ``Σ_t α_t = 1`` such that the aggregated gradient
``g = Σ_t α_t g_t`` has equal projections onto all unit task gradients
``u_t = g_t / ‖g_t‖``: ``⟨g, u_1⟩ = ⟨g, u_t⟩`` for every ``t``.  The paper's
closed form (with ``D = [g_1 − g_t]ᵀ``, ``U = [u_1 − u_t]ᵀ``, ``t = 2..T``)::

    α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹,     α_1 = 1 − Σ_{t≥2} α_t

is the solution of the ``T × T`` linear system ``M α = e`` whose rows are
``(u_1 − u_t)ᵀ G`` (``t ≥ 2``) and ``1ᵀ`` (``G`` = matrix of task gradients).
Only the shared parameters are reweighted (as in the paper and LibMTL); head
leaves get the plain ``Σ_t g_t``.

Numerical choices (not in the paper): the system is built from the Gram
matrix of the global shared gradient, normalised to a largest diagonal of 1,
and solved by SVD least squares (``jnp.linalg.lstsq``), which equals the
closed form when ``D Uᵀ`` is invertible and gives the minimum-norm solution
for collinear gradients instead of the NaNs of an explicit inverse.  Tasks
whose gradient is exactly zero have no unit vector; their equal-projection
row is replaced by ``α_t = 0`` and the first nonzero task takes the role of
task 1.  With all gradients zero, ``α = 1/T``.  The residual ``‖Mα − e‖`` is
kept in the state (non-zero only for inconsistent, degenerate systems).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _gradient_common as gc

PyTree = Any

__all__ = ["IMTLGState", "imtl_g", "imtl_g_weights"]


class IMTLGState(NamedTuple):
    """State of :func:`imtl_g`.

    Attributes:
      count: number of updates so far (int32).
      weights: ``α`` of the last update, float32 ``[T]``.
      residual: ``‖Mα − e‖`` of the last solve (float32; 0 when the system is consistent).
    """

    count: chex.Array
    weights: chex.Array
    residual: chex.Array


@gc.full_precision
def imtl_g_weights(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    """IMTL-G weights from a (normalised) Gram matrix: ``(α [T], residual)``."""
    t = gram.shape[0]
    dt = gram.dtype
    diag = jnp.diagonal(gram)
    active = diag > jnp.finfo(dt).tiny
    n = jnp.sqrt(jnp.where(active, diag, 1))
    a = jnp.where(active[:, None], gram / n[:, None], 0)  # a[t, k] = <u_t, g_k>
    ref = jnp.argmax(active)
    eye = jnp.eye(t, dtype=dt)
    m = jnp.where(active[:, None], a[ref][None, :] - a, eye)
    m = jnp.where((jnp.arange(t) == ref)[:, None], jnp.ones_like(m), m)
    b = eye[ref]
    alpha = jnp.where(active, jnp.linalg.lstsq(m, b)[0], 0)
    resid = jnp.linalg.norm(jnp.matmul(m, alpha, precision=gc.HIGHEST) - b)
    any_active = jnp.any(active)
    alpha = jnp.where(any_active, alpha, jnp.full([t], 1.0 / t, dt))
    alpha = jnp.where(jnp.isfinite(alpha), alpha, 0)
    return alpha, jnp.where(any_active, resid, 0)


def imtl_g(num_tasks: int, *, shared: ta.SharedSpec = None) -> optax.GradientTransformationExtraArgs:
    """IMTL-G (Liu et al., ICLR 2021); no hyperparameters.

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      shared: which leaves are shared; default all.  Head leaves get ``Σ_t g_t``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args are ignored.
    """
    gc.check_num_tasks(num_tasks, "imtl_g")

    def init_fn(params: PyTree) -> IMTLGState:
        del params
        return IMTLGState(
            count=jnp.zeros([], jnp.int32),
            weights=jnp.full([num_tasks], 1.0 / num_tasks, jnp.float32),
            residual=jnp.zeros([], jnp.float32),
        )

    def update_fn(
        updates: PyTree, state: IMTLGState, params: Optional[PyTree] = None, **extra: Any
    ) -> tuple[PyTree, IMTLGState]:
        del extra
        g_shared, g_heads, mask, treedef = gc.split_updates(updates, params, shared, num_tasks)
        weights, resid, out_shared = state.weights, state.residual, []
        if g_shared:
            dt = gc.acc_dtype(g_shared)
            gram, _ = gc.normalized_gram(jnp.sum(gc.leaf_grams(g_shared, dt)[0], axis=0))
            alpha, r = imtl_g_weights(gram)
            out_shared = gc.combine(g_shared, alpha)
            weights, resid = alpha.astype(jnp.float32), r.astype(jnp.float32)
        out = ta.merge_shared(out_shared, gc.sum_heads(g_heads), mask, treedef)
        return out, IMTLGState(count=optax.safe_increment(state.count), weights=weights, residual=resid)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
