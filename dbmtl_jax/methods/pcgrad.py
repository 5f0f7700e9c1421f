"""PCGrad: projecting conflicting gradients.

Reference: T. Yu, S. Kumar, A. Gupta, S. Levine, K. Hausman, C. Finn,
"Gradient Surgery for Multi-Task Learning", NeurIPS 2020.

For every task ``i`` (independently), start from ``g_i' = g_i`` and visit the
other tasks ``j ≠ i`` in a random order; whenever ``g_i'`` conflicts with the
*original* ``g_j`` it is projected onto the normal plane of ``g_j``::

    if ⟨g_i', g_j⟩ < 0:   g_i' ← g_i' − ⟨g_i', g_j⟩ / ‖g_j‖² · g_j

The shared update is ``Σ_i g_i'`` (``reduction="sum"``, the official code and
LibMTL) or ``(1/T) Σ_i g_i'`` (``reduction="mean"``, the popular PyTorch
port).  Task-specific (head) leaves get the plain ``Σ_t g_t``.

Implementation: every ``g_i'`` is a linear combination of the original
gradients, so the projections are run on the ``[T, T]`` Gram matrix of the
*global* shared gradient (all shared leaves together) and the update is one
weighted sum per leaf, which is exact and costs ``O(T²P)``.

Random order: task ``i`` visits ``others_i[permutation(split(key, T)[i])]``
(see :func:`dbmtl_jax.methods._gradient_common.task_orders`); a fresh order is
drawn per task at every step from the required ``key=`` extra argument, as in
LibMTL (the official TensorFlow code shuffles once per step for all tasks).
The task itself is not in its own list (the paper's ``j ≠ i``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _gradient_common as gc
from dbmtl_jax.methods import _numerics as nm

PyTree = Any
REDUCTIONS = ("sum", "mean")

__all__ = ["PCGradState", "pcgrad", "pcgrad_coefficients", "REDUCTIONS"]


class PCGradState(NamedTuple):
    """State of :func:`pcgrad`.

    Attributes:
      count: number of updates so far (int32).
      weights: coefficients ``c`` of the last shared update ``Σ_t c_t g_t``, ``[T]`` float32.
      num_projections: number of conflicting pairs projected in the last update (int32).
    """

    count: chex.Array
    weights: chex.Array
    num_projections: chex.Array


@nm.highest_precision
def pcgrad_coefficients(gram: jax.Array, orders: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Projection in Gram space: returns ``(W [T, T], num_projections)``.

    Row ``i`` of ``W`` holds the coefficients of ``g_i' = Σ_k W_ik g_k``.
    ``gram`` may be scaled by any positive constant.
    """
    t = gram.shape[0]
    eye = jnp.eye(t, dtype=gram.dtype)
    if orders.shape[1] == 0:  # a single task: nothing to project
        return eye, jnp.zeros([], jnp.int32)

    def one_task(i: jax.Array, order: jax.Array) -> tuple[jax.Array, jax.Array]:
        def body(p, carry):
            w, n = carry
            j = order[p]
            d = jnp.dot(w, gram[:, j], precision=nm.HIGHEST)
            nj = gram[j, j]
            hit = (d < 0) & (nj > 0)
            coef = jnp.where(hit, d / jnp.where(nj > 0, nj, 1), 0)
            return w - coef * eye[j], n + hit.astype(jnp.int32)

        return jax.lax.fori_loop(0, order.shape[0], body, (eye[i], jnp.zeros([], jnp.int32)))

    w, n = jax.vmap(one_task)(jnp.arange(t), orders)
    return w, jnp.sum(n)


def pcgrad(
    num_tasks: int,
    *,
    shared: ta.SharedSpec = None,
    reduction: str = "sum",
) -> optax.GradientTransformationExtraArgs:
    """PCGrad (Yu et al., NeurIPS 2020).

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      shared: which leaves are shared (see :func:`dbmtl_jax.task_axis.resolve_shared`);
        default all.  Head leaves get ``Σ_t g_t``.
      reduction: ``"sum"`` of the projected gradients (default; official code and
        LibMTL) or ``"mean"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires the
      extra argument ``key=`` (a JAX PRNG key) for the random task orders.
    """
    nm.check_num_tasks(num_tasks, "pcgrad")
    nm.check_choice(reduction, REDUCTIONS, "reduction", "pcgrad")

    def init_state(params: PyTree) -> PCGradState:
        del params
        return PCGradState(
            count=jnp.zeros([], jnp.int32),
            weights=jnp.ones([num_tasks], jnp.float32),
            num_projections=jnp.zeros([], jnp.int32),
        )

    def weighting(gram: jax.Array, state: PCGradState, *, key: jax.Array, **_: Any) -> tuple[jax.Array, dict]:
        w, nproj = pcgrad_coefficients(gram, gc.task_orders(key, num_tasks))
        coeffs = jnp.sum(w, axis=0)
        if reduction == "mean":
            coeffs = coeffs / num_tasks
        return coeffs, dict(weights=coeffs.astype(jnp.float32), num_projections=nproj.astype(jnp.int32))

    return gc.make_gradient_transform(
        "pcgrad", num_tasks, weighting, init_state, shared=shared, needs_key=True, keep_when_no_shared=True
    )
