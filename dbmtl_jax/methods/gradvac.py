"""GradVac: gradient vaccine with adaptive per-pair similarity targets.

Reference: Z. Wang, Y. Tsvetkov, O. Firat, Y. Cao, "Gradient Vaccine:
Investigating and Improving Multi-task Optimization in Massively Multilingual
Models", ICLR 2021.

For every task ``i`` start from ``g_i' = g_i`` and visit the other tasks
``j ≠ i`` in a random order.  With ``φ = cos(g_i', g_j)`` and the EMA target
``φ̂_ij`` (state, initialised to 0)::

    if φ < φ̂_ij:
        g_i' ← g_i' + ‖g_i'‖ (φ̂_ij √(1−φ²) − φ √(1−φ̂_ij²)) / (‖g_j‖ √(1−φ̂_ij²)) · g_j
    φ̂_ij ← (1 − β) φ̂_ij + β φ

which raises the cosine between ``g_i'`` and ``g_j`` to ``φ̂_ij``.  The shared
update is ``Σ_i g_i'``; head leaves get the plain ``Σ_t g_t``.

Defaults and variants:

* ``beta=0.01``: the paper's value (β = 1e-2).  LibMTL's and TorchJD's default
  is 0.5; pass ``beta=0.5`` to reproduce them.
* ``ema_update="always"``: the paper's Algorithm 1 updates ``φ̂_ij`` for every
  visited pair.  LibMTL updates it only when the target was violated
  (``ema_update="on_violation"``).
* ``granularity="global"``: one cosine per task pair over all shared leaves
  (LibMTL's default "whole_model").  ``"leaf"`` runs the procedure separately on
  every shared leaf with its own targets (LibMTL's "all_matrix"; the paper's
  finer-grained variants are per layer).
* Numerical guards: ``eps`` (default 1e-8, as LibMTL) is added to the
  denominators, measured relative to the largest task-gradient norm (the Gram
  matrix is normalised), so the method is invariant to the gradient scale;
  ``1 − φ²`` is clipped at 0.

The random order of task ``i`` is the same recipe as PCGrad
(:func:`dbmtl_jax.methods._gradient_common.task_orders` on the required
``key=``); with ``granularity="leaf"`` all leaves use the same orders.
Computation happens on the ``[T, T]`` Gram matrix (``g_i'`` is a linear
combination of the original gradients), exact and ``O(T²P)``.
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
EMA_UPDATES = ("always", "on_violation")

__all__ = ["GradVacState", "gradvac", "gradvac_coefficients", "EMA_UPDATES"]


class GradVacState(NamedTuple):
    """State of :func:`gradvac`.

    Attributes:
      count: number of updates so far (int32).
      targets: EMA cosine targets ``φ̂``, ``[G, T, T]`` (float32, or the widest
        shared parameter dtype) with ``G = 1``
        (global) or the number of shared leaves (``granularity="leaf"``);
        ``targets[g, i, j]`` is the target of ``g_i`` towards ``g_j``.
      weights: coefficients ``c`` of the last update ``Σ_t c_t g_t``, float32
        ``[G, T]``.
    """

    count: chex.Array
    targets: chex.Array
    weights: chex.Array


@nm.highest_precision
def gradvac_coefficients(
    gram: jax.Array,
    targets: jax.Array,
    orders: jax.Array,
    beta: jax.Array,
    eps: float,
    ema_update: str,
) -> tuple[jax.Array, jax.Array]:
    """GradVac in Gram space for one group: returns ``(W [T, T], new_targets [T, T])``.

    ``gram`` should be normalised to a largest diagonal of 1 (``eps`` is absolute).
    """
    t = gram.shape[0]
    eye = jnp.eye(t, dtype=gram.dtype)
    beta = jnp.asarray(beta, gram.dtype)
    if orders.shape[1] == 0:  # a single task: nothing to align
        return eye, targets.astype(gram.dtype)

    def one_task(i: jax.Array, order: jax.Array, tgt_row: jax.Array) -> tuple[jax.Array, jax.Array]:
        def body(p, carry):
            w, row = carry
            j = order[p]
            gw = jnp.dot(gram, w, precision=nm.HIGHEST)
            ni = jnp.sqrt(jnp.maximum(jnp.dot(w, gw, precision=nm.HIGHEST), 0))
            nj = jnp.sqrt(jnp.maximum(gram[j, j], 0))
            phi = gw[j] / (ni * nj + eps)
            phi = jnp.clip(phi, -1.0, 1.0)
            tgt = row[j]
            hit = phi < tgt
            s_phi = jnp.sqrt(jnp.maximum(1 - phi * phi, 0))
            s_tgt = jnp.sqrt(jnp.maximum(1 - tgt * tgt, 0))
            coef = ni * (tgt * s_phi - phi * s_tgt) / (nj * s_tgt + eps)
            w = w + jnp.where(hit, coef, 0) * eye[j]
            new = (1 - beta) * tgt + beta * phi
            if ema_update == "on_violation":
                new = jnp.where(hit, new, tgt)
            return w, row.at[j].set(new)

        return jax.lax.fori_loop(0, order.shape[0], body, (eye[i], tgt_row))

    return jax.vmap(one_task)(jnp.arange(t), orders, targets.astype(gram.dtype))


def gradvac(
    num_tasks: int,
    *,
    shared: ta.SharedSpec = None,
    beta: float = 0.01,
    ema_update: str = "always",
    granularity: str = "global",
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """GradVac (Wang et al., ICLR 2021).

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      shared: which leaves are shared; default all.  Head leaves get ``Σ_t g_t``.
      beta: EMA rate β in ``(0, 1]`` of the cosine targets (weight of the new value;
        0 would freeze the targets at 0); paper 0.01, LibMTL 0.5.
      ema_update: ``"always"`` (paper) or ``"on_violation"`` (LibMTL).
      granularity: ``"global"`` (whole shared model, default) or ``"leaf"``.
      eps: denominator guard ``> 0``, relative to the largest task-gradient norm.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires the
      extra argument ``key=`` (a JAX PRNG key) for the random task orders.
    """
    nm.check_num_tasks(num_tasks, "gradvac")
    nm.check_choice(ema_update, EMA_UPDATES, "ema_update", "gradvac")
    nm.check_choice(granularity, gc.GRANULARITIES, "granularity", "gradvac")
    beta = nm.check_real(beta, "beta", "gradvac", lo=0, hi=1, lo_open=True,
                  note="the weight of the new cosine; 0 freezes the targets")
    eps = nm.check_real(eps, "eps", "gradvac", lo=0, lo_open=True)

    def num_groups(params: PyTree) -> int:
        if granularity == "global":
            return 1
        mask = ta.resolve_shared(shared, params)
        return max(1, sum(bool(f) for f in jax.tree_util.tree_leaves(mask)))

    def init_state(params: PyTree) -> GradVacState:
        g = num_groups(params)
        dt = nm.state_dtype(params, ta.resolve_shared(shared, params))
        return GradVacState(
            count=jnp.zeros([], jnp.int32),
            targets=jnp.zeros([g, num_tasks, num_tasks], dt),
            weights=jnp.ones([g, num_tasks], jnp.float32),
        )

    def weighting(gram: jax.Array, state: GradVacState, *, key: jax.Array, **_: Any) -> tuple[jax.Array, dict]:
        grams = gram[None] if gram.ndim == 2 else gram  # [G, T, T]
        if state.targets.shape != grams.shape:
            raise ValueError(
                f"gradvac: state.targets has shape {state.targets.shape} but the updates need "
                f"{grams.shape}; the shared mask or parameter structure changed since init."
            )
        # eps is relative to the largest task-gradient norm: unit largest diagonal
        grams, _ = nm.normalize_gram(grams, by="max")
        orders = gc.task_orders(key, num_tasks)
        w, new_t = jax.vmap(lambda gm, tg: gradvac_coefficients(gm, tg, orders, beta, eps, ema_update))(
            grams, state.targets
        )
        coeffs = jnp.sum(w, axis=1)  # [G, T]
        return coeffs, dict(targets=new_t.astype(state.targets.dtype), weights=coeffs.astype(jnp.float32))

    return gc.make_gradient_transform(
        "gradvac",
        num_tasks,
        weighting,
        init_state,
        shared=shared,
        gram="leaf" if granularity == "leaf" else "scaled",
        needs_key=True,
        keep_when_no_shared=True,
        hparams=(beta, eps),
    )
