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

Rank-deficient Gram matrices (collinear or zero gradients) are handled as in
the official code: eigenvalues ``λ ≤ max(λ) · T · ε_machine`` are dropped —
here by masking (``1/√λ → 0``) instead of truncation, so shapes stay static
under ``jit``.  The decomposition is ``jnp.linalg.eigh`` of the Gram matrix
of the global shared gradient normalised to a largest diagonal of 1 (``α``
is invariant to that scale); LibMTL's version calls ``torch.symeig``, removed
in PyTorch 2.  With all gradients zero the update is zero.  Head leaves get
the plain ``Σ_t g_t`` (the weights act on the shared parameters only, as in
LibMTL and the official code).
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
SCALE_MODES = ("min", "median", "rmse")

__all__ = ["AlignedMTLState", "aligned_mtl", "aligned_mtl_weights", "SCALE_MODES"]


class AlignedMTLState(NamedTuple):
    """State of :func:`aligned_mtl`.

    Attributes:
      count: number of updates so far (int32).
      weights: ``α`` of the last update, float32 ``[T]``.
      rank: numerical rank of the last Gram matrix (int32).
      eigenvalues: eigenvalues of the last normalised Gram matrix, ascending,
        float32 ``[T]`` (for logging the conditioning).
    """

    count: chex.Array
    weights: chex.Array
    rank: chex.Array
    eigenvalues: chex.Array


@gc.full_precision
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
    b = jnp.matmul(v * inv[None, :], v.T, precision=gc.HIGHEST)
    alpha = jnp.sum(b, axis=1)
    alpha = jnp.where(jnp.isfinite(alpha), alpha, 0)
    return alpha, rank, lam


def aligned_mtl(
    num_tasks: int,
    *,
    shared: ta.SharedSpec = None,
    scale_mode: str = "min",
) -> optax.GradientTransformationExtraArgs:
    """Aligned-MTL (Senushkin et al., CVPR 2023).

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      shared: which leaves are shared; default all.  Head leaves get ``Σ_t g_t``.
      scale_mode: ``"min"`` (default, paper), ``"median"`` or ``"rmse"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args are ignored.
    """
    gc.check_num_tasks(num_tasks, "aligned_mtl")
    gc.check_choice(scale_mode, SCALE_MODES, "scale_mode", "aligned_mtl")

    def init_fn(params: PyTree) -> AlignedMTLState:
        del params
        return AlignedMTLState(
            count=jnp.zeros([], jnp.int32),
            weights=jnp.ones([num_tasks], jnp.float32),
            rank=jnp.zeros([], jnp.int32),
            eigenvalues=jnp.zeros([num_tasks], jnp.float32),
        )

    def update_fn(
        updates: PyTree, state: AlignedMTLState, params: Optional[PyTree] = None, **extra: Any
    ) -> tuple[PyTree, AlignedMTLState]:
        del extra
        g_shared, g_heads, mask, treedef = gc.split_updates(updates, params, shared, num_tasks)
        weights, rank, lam, out_shared = state.weights, state.rank, state.eigenvalues, []
        if g_shared:
            dt = gc.acc_dtype(g_shared)
            gram, _ = gc.normalized_gram(jnp.sum(gc.leaf_grams(g_shared, dt)[0], axis=0))
            alpha, rank, lam = aligned_mtl_weights(gram, scale_mode)
            out_shared = gc.combine(g_shared, alpha)
            weights, lam = alpha.astype(jnp.float32), lam.astype(jnp.float32)
        out = ta.merge_shared(out_shared, gc.sum_heads(g_heads), mask, treedef)
        return out, AlignedMTLState(
            count=optax.safe_increment(state.count), weights=weights, rank=rank, eigenvalues=lam
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
