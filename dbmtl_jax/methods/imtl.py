"""IMTL: the hybrid of IMTL-L (learnable loss scales) and IMTL-G.

Reference: L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao,
W. Zhang, "Towards Impartial Multi-task Learning", ICLR 2021.

IMTL-L replaces each raw task loss ``ℓ_t`` by ``e^{s_t} ℓ_t − s_t`` with a
learnable ``s_t`` (initialised to 0); its gradients are ``e^{s_t} g_t`` for the
model and ``e^{s_t} ℓ_t − 1`` for ``s_t``.  IMTL-G (see :mod:`.imtl_g`) is then
applied to the scaled shared gradients ``ĝ_t = e^{s_t} g_t``::

    shared update = Σ_t α_t e^{s_t} g_t       (α from IMTL-G on {ĝ_t})
    head update   = Σ_t e^{s_t} g_t           (the loss scale is part of the loss)
    s ← s + inner_optimizer(e^{s} ℓ − 1)      (after the update, from the same step)

Inputs: the ``updates`` must be gradients of the *raw* losses ``ℓ_t`` (use
``value_and_task_grads(..., log=False)``) and ``losses=`` the raw losses
(required extra argument).  The step uses the current ``s``; ``s`` is then
updated by one step of ``scale_optimizer`` (state holds ``s`` and the inner
optimizer's state), as LibMTL does through the model optimizer.

Defaults: ``scale_optimizer=None`` means ``optax.adam(1e-4)``, the optimizer
and learning rate LibMTL's NYUv2 recipe trains the loss scales with (the
scales are ordinary parameters there).  ``s`` is clipped to
``±max_log_scale`` (default 30) so that ``e^s`` stays finite in float32, a
guard the paper does not need.  The IMTL-G solve uses the same numerically
safe least-squares system as :func:`dbmtl_jax.methods.imtl_g.imtl_g`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _gradient_common as gc
from dbmtl_jax.methods import _numerics as nm
from dbmtl_jax.methods.imtl_g import imtl_g_weights

PyTree = Any

__all__ = ["IMTLState", "imtl"]


class IMTLState(NamedTuple):
    """State of :func:`imtl`.

    Attributes:
      count: number of updates so far (int32).
      log_scales: the learnable ``s`` (float32 ``[T]``); the next update uses ``e^s``.
      inner_state: state of the inner optimizer of ``s``.
      weights: IMTL-G ``α`` of the last update, float32 ``[T]``.
      residual: least-squares residual of the last IMTL-G solve (float32).
    """

    count: chex.Array
    log_scales: chex.Array
    inner_state: Any
    weights: chex.Array
    residual: chex.Array


def imtl(
    num_tasks: int,
    *,
    shared: ta.SharedSpec = None,
    scale_optimizer: Optional[optax.GradientTransformation] = None,
    max_log_scale: float = 30.0,
) -> optax.GradientTransformationExtraArgs:
    """IMTL = IMTL-L + IMTL-G (Liu et al., ICLR 2021).

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      shared: which leaves are shared; default all.
      scale_optimizer: optax optimizer for the loss scales ``s``; default
        ``optax.adam(1e-4)``.
      max_log_scale: ``s`` is clipped to ``[-max_log_scale, max_log_scale]``; in
        ``(0, 88]`` so that ``e^s`` stays finite in float32.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires the
      extra argument ``losses=`` (raw task losses, shape ``[T]``).
    """
    nm.check_num_tasks(num_tasks, "imtl")
    nm.check_optimizer(scale_optimizer, "scale_optimizer", "imtl")
    max_log_scale = nm.check_real(max_log_scale, "max_log_scale", "imtl", lo=0, hi=88, lo_open=True,
                  note="e^88 is near the float32 maximum")
    inner = optax.adam(1e-4) if scale_optimizer is None else scale_optimizer

    def init_state(params: PyTree) -> IMTLState:
        del params
        s = jnp.zeros([num_tasks], jnp.float32)
        return IMTLState(
            count=jnp.zeros([], jnp.int32),
            log_scales=s,
            inner_state=inner.init(s),
            weights=jnp.full([num_tasks], 1.0 / num_tasks, jnp.float32),
            residual=jnp.zeros([], jnp.float32),
        )

    def scales(state: IMTLState) -> jax.Array:
        return jnp.exp(state.log_scales)

    def weighting(gram: jax.Array, state: IMTLState, **_: Any) -> tuple[jax.Array, dict]:
        # IMTL-G on the gradients of the scaled losses e^s ℓ (renormalised: e^s may be huge)
        sc = scales(state).astype(gram.dtype)
        gram, _ = nm.normalize_gram(gram * sc[:, None] * sc[None, :])
        alpha, r = imtl_g_weights(gram)
        return alpha * sc, dict(weights=alpha.astype(jnp.float32), residual=r.astype(jnp.float32))

    def advance(state: IMTLState, *, losses: jax.Array, **_: Any) -> dict:
        # IMTL-L: one step of the inner optimizer on ∂/∂s (e^s ℓ − s) = e^s ℓ − 1
        s = state.log_scales
        # A non-finite grad_s (a NaN/inf loss, or e^s ℓ past float32) is not zeroed: the step is invalid
        # (make_gradient_transform rejects a non-finite loss and a non-finite advanced state).
        grad_s = (scales(state) * losses.astype(jnp.float32) - 1.0).astype(jnp.float32)
        step, inner_state = inner.update(grad_s, state.inner_state, s)
        new_s = jnp.clip(optax.apply_updates(s, step), -max_log_scale, max_log_scale).astype(jnp.float32)
        return dict(log_scales=new_s, inner_state=inner_state)

    return gc.make_gradient_transform(
        "imtl",
        num_tasks,
        weighting,
        init_state,
        shared=shared,
        heads=scales,
        needs_losses=True,
        keep_when_no_shared=True,
        advance=advance,
        hparams=max_log_scale,
    )
