"""GradNorm: learnable task weights that equalise weighted gradient norms.

Reference: Z. Chen, V. Badrinarayanan, C.-Y. Lee, A. Rabinovich, "GradNorm:
Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
Networks", ICML 2018.

Task weights ``w_t`` (state, initialised to 1) scale the task losses.  At every
step, with ``n_t = ‖g_t‖`` and the raw losses ``ℓ_t`` (``losses=``, required)::

    G_t = w_t n_t,            Ḡ = mean_t G_t
    L̃_t = ℓ_t / ℓ_t(0),      r_t = L̃_t / mean_t L̃_t      (relative inverse training rate)
    L_grad = Σ_t |G_t − Ḡ r_t^α|                          (Ḡ r_t^α held constant)
    ∂L_grad/∂w_t = sign(G_t − Ḡ r_t^α) n_t
    update = Σ_t w_t g_t                                   (shared and head leaves)
    w ← inner_optimizer step on ∂L_grad/∂w;  w ← max(w, min_weight);  w ← T w / Σ w

"Multi-step" in one call: the paper alternates a network step and a weight
step computed from the same backward pass; here ``update`` returns the
network update with the current weights and then updates the weights from the
same per-task gradients, so the new weights act from the next step on.

Choices and defaults:

* ``alpha=1.5`` (LibMTL's default and the value the paper uses on NYUv2; the
  paper tunes α per task set).
* The norms ``n_t`` are taken over the full shared gradient (all shared
  leaves, or the subset selected by ``norm_leaves``).  The paper uses the
  last shared layer to save compute; pass ``norm_leaves=lambda path: ...`` to
  do the same.  All the gradients are already available here, so the full
  norm costs nothing extra.
* ``ℓ_t(0)`` are the losses of the first update (state), per task the first
  non-zero one; LibMTL uses the first epoch's average and runs equal weights
  during that epoch.
* ``weight_optimizer=None`` means ``optax.adam(1e-4)``: LibMTL trains the
  weights with the model's optimizer (its NYUv2 recipe: Adam, 1e-4).  The
  weights are used directly (the paper), not through LibMTL's softmax.
* ``weight_heads=True``: the weights scale whole losses, so head gradients
  are weighted too (the DB-MTL paper counts GradNorm among the methods whose
  weights affect the task-specific parameters).
* Guards: ``min_weight`` (1e-6) keeps weights positive before the
  renormalisation; until a task's loss is first non-zero its ratio ``L̃_t`` is 1.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _gradient_common as gc
from dbmtl_jax.methods import _numerics as nm

PyTree = Any

__all__ = ["GradNormState", "gradnorm"]


class GradNormState(NamedTuple):
    """State of :func:`gradnorm`.

    Attributes:
      count: number of updates so far (int32).
      weights: task weights ``w`` for the next update, ``[T]`` summing to ``T``.
      initial_losses: ``ℓ(0)``, ``[T]`` (set by the first update).
      inner_state: state of ``weight_optimizer``.
      gradnorm_loss: ``L_grad`` of the last update.

    The float fields are float32, or the widest shared parameter dtype.
    """

    count: chex.Array
    weights: chex.Array
    initial_losses: chex.Array
    inner_state: Any
    gradnorm_loss: chex.Array


def gradnorm(
    num_tasks: int,
    *,
    shared: ta.SharedSpec = None,
    alpha: float = 1.5,
    weight_optimizer: Optional[optax.GradientTransformation] = None,
    norm_leaves: Optional[Callable[[str], bool]] = None,
    weight_heads: bool = True,
    min_weight: float = 1e-6,
) -> optax.GradientTransformationExtraArgs:
    """GradNorm (Chen et al., ICML 2018).

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      shared: which leaves are shared; default all.
      alpha: the restoring-force exponent α ``>= 0`` (0 equalises the weighted norms;
        a negative α would push the slowest task's weight down); default 1.5.
      weight_optimizer: optax optimizer of the weights; default ``optax.adam(1e-4)``.
      norm_leaves: callable on a shared leaf's '/'-joined path selecting the
        leaves whose norm defines ``n_t``; default all shared leaves.
      weight_heads: weight head gradients by ``w`` too (default True).
      min_weight: floor ``> 0`` on the weights before renormalisation.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires the
      extra argument ``losses=`` (raw task losses, shape ``[T]``).
    """
    nm.check_num_tasks(num_tasks, "gradnorm")
    nm.check_shared(shared, "gradnorm")
    alpha = nm.check_real(alpha, "alpha", "gradnorm", lo=0)
    min_weight = nm.check_real(min_weight, "min_weight", "gradnorm", lo=0, lo_open=True)
    nm.check_optimizer(weight_optimizer, "weight_optimizer", "gradnorm")
    nm.check_bool(weight_heads, "weight_heads", "gradnorm")
    if norm_leaves is not None and not callable(norm_leaves):
        hint = ""
        if isinstance(norm_leaves, (bool, jax.Array)):
            hint = (" (optax.inject_hyperparams calls a callable argument as a schedule unless it is in "
                    "static_args: add 'norm_leaves' to static_args)")
        raise TypeError(f"gradnorm: norm_leaves must be None or a callable on a leaf path, got {norm_leaves!r}"
                        f"{hint}.")
    inner = optax.adam(1e-4) if weight_optimizer is None else weight_optimizer

    def init_fn(params: PyTree) -> GradNormState:
        dt = nm.state_dtype(params, ta.resolve_shared(shared, params))
        w = jnp.ones([num_tasks], dt)
        return GradNormState(
            count=jnp.zeros([], jnp.int32),
            weights=w,
            initial_losses=jnp.ones([num_tasks], dt),
            inner_state=inner.init(w),
            gradnorm_loss=jnp.zeros([], dt),
        )

    def update_fn(
        updates: PyTree, state: GradNormState, params: Optional[PyTree] = None, *, losses: Any = None, **extra: Any
    ) -> tuple[PyTree, GradNormState]:
        del extra
        g_shared, g_heads, mask, treedef = gc.split_updates(updates, params, shared, num_tasks)
        ta.check_state_matches_init(state, init_fn, updates, params, "gradnorm", num_tasks)
        sdt = state.weights.dtype
        losses = nm.check_losses(losses, num_tasks, "gradnorm").astype(sdt)
        w = state.weights
        out_shared = nm.combine(g_shared, w)
        out_heads = nm.combine(g_heads, w) if weight_heads else nm.sum_heads(g_heads)
        out = ta.merge_shared(out_shared, out_heads, mask, treedef)

        if norm_leaves is None:
            sel = list(g_shared)
        else:
            paths = [p for p, f in zip(ta.leaf_paths(updates), jax.tree_util.tree_leaves(mask)) if f]
            sel = [g for p, g in zip(paths, g_shared) if norm_leaves(p)]
            if g_shared and not sel:
                raise ValueError("gradnorm: norm_leaves selected none of the shared leaves.")
        if sel:
            n = nm.task_norms(sel, nm.acc_dtype(sel)).astype(sdt)
        else:
            n = jnp.zeros([num_tasks], sdt)

        # ℓ_t(0) is each task's first non-zero loss: a task at exactly 0 on the first step (already solved,
        # or a masked batch) would otherwise have no training rate for the whole run.
        init_l = jnp.where((state.count == 0) | (state.initial_losses == 0), losses, state.initial_losses)
        rel = jnp.where(init_l != 0, nm.safe_div(losses, init_l), 1.0)
        mean_rel = jnp.mean(rel)
        r = jnp.where(mean_rel > 0, nm.safe_div(rel, mean_rel), 1.0)
        gw = w * n
        target = jnp.mean(gw) * jnp.maximum(r, 0) ** alpha
        diff = gw - target
        loss = jnp.sum(jnp.abs(diff))
        grad_w = jnp.sign(diff) * n
        step, inner_state = inner.update(grad_w, state.inner_state, w)
        new_w = jnp.maximum(optax.apply_updates(w, step), min_weight)
        new_w = (num_tasks * new_w / jnp.sum(new_w)).astype(sdt)
        new_state = GradNormState(
            count=optax.safe_increment(state.count),
            weights=new_w,
            initial_losses=init_l.astype(sdt),
            inner_state=inner_state,
            gradnorm_loss=loss.astype(sdt),
        )
        # Finite gradients can still overflow the weight step: Adam's second moment squares the
        # gradient norms (above ~1e19 in float32), and an inf there would freeze the weights for
        # good.  Such a step (or one with a non-finite loss) is made visibly invalid, state kept.
        # +inf in grad_w would be clipped to min_weight, unseen; a NaN loss would only make r = 1, unseen
        ok = nm.all_finite((grad_w, new_state, losses))
        return nm.reject_unless(nm.conjoin(ok, nm.injected_ok((alpha, min_weight))), out, new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
