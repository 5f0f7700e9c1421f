"""GradDrop: gradient sign dropout, applied to the shared parameters.

Reference: Z. Chen, J. Ngiam, Y. Huang, T. Luong, H. Kretzschmar, Y. Chai,
D. Anguelov, "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient
Sign Dropout", NeurIPS 2020.

For every coordinate of the shared gradient compute the sign purity::

    P = ½ (1 + Σ_t g_t / Σ_t |g_t|)          (P = ½ where Σ_t |g_t| = 0)

draw ``U ~ Uniform[0, 1)`` and keep the positive task gradients when ``U < P``
and the negative ones otherwise (``M_t = [g_t > 0][U < P] + [g_t < 0][U ≥ P]``);
the update is ``Σ_t (ℓ_t + (1 − ℓ_t) M_t) g_t`` with leak ``ℓ_t`` (0: full
dropout, 1: plain sum).

Variant: the paper applies GradDrop to the gradients of a shared
*activation* layer (and LibMTL requires representation gradients).  An optax
transform sees parameter gradients only, so here the sign purity is computed
per *parameter coordinate* of every shared leaf.  The paper's optional
multiplication by the input sign (for batch-separated inputs) does not apply
to parameter gradients and is omitted.  Head leaves get the plain ``Σ_t g_t``.

Randomness: the uniform draw of shared leaf number ``l`` (counting shared
leaves in flattening order) is
``jax.random.uniform(jax.random.fold_in(key, l), param_shape, float32)`` with
``key=`` the required extra argument.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _gradient_common as gc
from dbmtl_jax.methods import _numerics as nm

PyTree = Any

__all__ = ["GradDropState", "graddrop"]


class GradDropState(NamedTuple):
    """State of :func:`graddrop`.

    Attributes:
      count: number of updates so far (int32).
      kept_fraction: fraction of nonzero shared task-gradient entries kept in
        the last update (float32; 1 when there were none).
    """

    count: chex.Array
    kept_fraction: chex.Array


def graddrop(
    num_tasks: int,
    *,
    shared: ta.SharedSpec = None,
    leak: Union[float, Sequence[float], jax.Array] = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """GradDrop (Chen et al., NeurIPS 2020), parameter-space variant.

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      shared: which leaves are shared; default all.  Head leaves get ``Σ_t g_t``.
      leak: leak ``ℓ`` in [0, 1], a scalar or one value per task (``[T]``);
        default 0.0 (the paper's and LibMTL's default).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires the
      extra argument ``key=`` (a JAX PRNG key).
    """
    nm.check_num_tasks(num_tasks, "graddrop")
    nm.check_shared(shared, "graddrop")
    leak = nm.check_real(leak, "leak", "graddrop", lo=0, hi=1, shapes=((), (num_tasks,)),
                  note="0 is full sign dropout, 1 the plain sum")
    leak_arr = jnp.asarray(leak, jnp.float32)
    if leak_arr.ndim == 0:
        leak_arr = jnp.full([num_tasks], leak_arr)
    if leak_arr.shape != (num_tasks,):
        raise ValueError(f"graddrop: leak must be a scalar or have shape [{num_tasks}], got {leak_arr.shape}.")

    def init_fn(params: PyTree) -> GradDropState:
        del params
        return GradDropState(count=jnp.zeros([], jnp.int32), kept_fraction=jnp.ones([], jnp.float32))

    def update_fn(
        updates: PyTree, state: GradDropState, params: Optional[PyTree] = None, *, key: Any = None, **extra: Any
    ) -> tuple[PyTree, GradDropState]:
        del extra
        g_shared, g_heads, mask, treedef = gc.split_updates(updates, params, shared, num_tasks)
        ta.check_state_matches_init(state, init_fn, updates, params, "graddrop", num_tasks)
        key = gc.require_key(key, "graddrop")
        out_shared = []
        kept = jnp.zeros([], jnp.float32)
        nonzero = jnp.zeros([], jnp.float32)
        finite = jnp.asarray(True)  # a NaN/inf shared gradient (or a sum past the dtype's range): the step is invalid
        for l, g in enumerate(g_shared):
            acc = jnp.promote_types(g.dtype, jnp.float32)
            x = g.astype(acc)
            total = jnp.sum(x, axis=0)
            purity = 0.5 * (1.0 + nm.safe_div(total, jnp.sum(jnp.abs(x), axis=0)))
            u = jax.random.uniform(jax.random.fold_in(key, l), g.shape[1:], jnp.float32).astype(acc)
            keep = ((x > 0) & (u < purity)[None]) | ((x < 0) & (u >= purity)[None])
            lk = leak_arr.astype(acc).reshape((num_tasks,) + (1,) * (g.ndim - 1))
            factor = lk + (1 - lk) * keep.astype(acc)
            out_shared.append(jnp.sum(factor * x, axis=0).astype(g.dtype))
            # The input sum too: under jit XLA turns ``0 · x`` of a dropped entry into 0, which hides a NaN.
            finite = finite & jnp.all(jnp.isfinite(total)) & jnp.all(jnp.isfinite(out_shared[-1]))
            kept = kept + jnp.sum(keep).astype(jnp.float32)
            nonzero = nonzero + jnp.sum(x != 0).astype(jnp.float32)
        out = ta.merge_shared(out_shared, nm.sum_heads(g_heads), mask, treedef)
        frac = jnp.where(nonzero > 0, kept / jnp.maximum(nonzero, 1.0), 1.0)
        new_state = GradDropState(count=optax.safe_increment(state.count), kept_fraction=frac)
        return nm.reject_unless(nm.conjoin(finite, nm.injected_ok(leak)), out, new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
