"""MoCo: multi-objective gradient correction with tracked gradients.

Reference: H. D. Fernando, H. Shen, M. Liu, S. Chaudhury, K. Murugesan,
T. Chen, "Mitigating Gradient Bias in Multi-objective Learning: A Provably
Convergent Approach", ICLR 2023.

MoCo tracks every task gradient with a variable ``y_t`` (state) and runs a
projected-gradient step on the MGDA weights ``λ`` (state) at each iteration
``k = 1, 2, …``::

    β_k = β / k^{β_σ},   γ_k = γ / k^{γ_σ}
    y_t ← y_t − β_k (y_t − h_t)
    λ   ← Π_Δ(λ − γ_k (Y Yᵀ + ρ I) λ)           (Y: rows y_t; Π_Δ: simplex projection)
    shared update = Σ_t λ_t y_t

with ``y = 0`` and ``λ = 1/T`` initially.  ``Y Yᵀ`` is over the global shared
gradient (all shared leaves).  The paper's projection of ``y_t`` onto a bounded
set (a device of its convergence analysis) is omitted, as in LibMTL.  Head leaves get the plain ``Σ_t g_t`` (the
weights act on the shared parameters only, as in LibMTL).

Defaults (LibMTL, from the authors' code): ``beta=0.5, beta_sigma=0.5,
gamma=0.1, gamma_sigma=0.5, rho=0.0``.  Variants:

* ``lambda_update="project"`` (default): the paper's Euclidean projection onto
  the simplex.  ``"softmax"``: ``λ ← softmax(λ − γ_k (Y Yᵀ + ρ I) λ)`` as in
  LibMTL / the authors' code.
* ``grad_transform="none"`` (default): ``h_t = g_t`` (the paper).
  ``"normalize_loss"``: ``h_t = ℓ_t g_t / ‖g_t‖`` as in LibMTL / the authors'
  code; it needs the ``losses=`` extra argument (``h_t = 0`` where ``g_t = 0``).
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

PyTree = Any
LAMBDA_UPDATES = ("project", "softmax")
GRAD_TRANSFORMS = ("none", "normalize_loss")

__all__ = ["MoCoState", "moco", "LAMBDA_UPDATES", "GRAD_TRANSFORMS"]


class MoCoState(NamedTuple):
    """State of :func:`moco`.

    Attributes:
      count: number of updates so far (int32); the next uses ``k = count + 1``.
      y: tracking variables of the shared leaves, ``[T, *shape]`` (heads: ``MaskedNode``).
      lambd: the task weights ``λ`` on the simplex, ``[T]`` (float32, or the widest
        shared parameter dtype).
    """

    count: chex.Array
    y: PyTree
    lambd: chex.Array


def moco(
    num_tasks: int,
    *,
    shared: ta.SharedSpec = None,
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    gamma: float = 0.1,
    gamma_sigma: float = 0.5,
    rho: float = 0.0,
    lambda_update: str = "project",
    grad_transform: str = "none",
) -> optax.GradientTransformationExtraArgs:
    """MoCo (Fernando et al., ICLR 2023).

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      shared: which leaves are shared; default all.  Head leaves get ``Σ_t g_t``.
      beta, beta_sigma: tracking rate ``β_k = β / k^{β_σ}``; ``β`` in ``(0, 1]`` (the
        weight of the new gradient: 0 never tracks, above 1 overshoots),
        ``β_σ >= 0`` (so that ``β_k <= β``).
      gamma, gamma_sigma: λ step size ``γ_k = γ / k^{γ_σ}``; ``γ >= 0`` (0 freezes λ
        at 1/T), ``γ_σ >= 0``.
      rho: ℓ2 regularisation ``ρ >= 0`` of the λ subproblem.
      lambda_update: ``"project"`` (paper, default) or ``"softmax"`` (LibMTL).
      grad_transform: ``"none"`` (paper, default) or ``"normalize_loss"`` (LibMTL;
        needs ``losses=``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    nm.check_num_tasks(num_tasks, "moco")
    nm.check_shared(shared, "moco")
    nm.check_choice(lambda_update, LAMBDA_UPDATES, "lambda_update", "moco")
    nm.check_choice(grad_transform, GRAD_TRANSFORMS, "grad_transform", "moco")
    beta = nm.check_real(beta, "beta", "moco", lo=0, hi=1, lo_open=True, note="the weight of the new gradient in y")
    beta_sigma = nm.check_real(beta_sigma, "beta_sigma", "moco", lo=0)
    gamma = nm.check_real(gamma, "gamma", "moco", lo=0)
    gamma_sigma = nm.check_real(gamma_sigma, "gamma_sigma", "moco", lo=0)
    rho = nm.check_real(rho, "rho", "moco", lo=0, note="a negative ridge makes the λ step ascend")

    def init_fn(params: PyTree) -> MoCoState:
        mask = ta.resolve_shared(shared, params)
        return MoCoState(
            count=jnp.zeros([], jnp.int32),
            y=ta.stacked_zeros_tree(params, mask, num_tasks),
            lambd=jnp.full([num_tasks], 1.0 / num_tasks, nm.state_dtype(params, mask)),
        )

    def update_fn(
        updates: PyTree, state: MoCoState, params: Optional[PyTree] = None, *, losses: Any = None, **extra: Any
    ) -> tuple[PyTree, MoCoState]:
        del extra
        g_shared, g_heads, mask, treedef = gc.split_updates(updates, params, shared, num_tasks)
        if grad_transform == "normalize_loss":
            losses = nm.check_losses(losses, num_tasks, "moco (grad_transform='normalize_loss')")
        y_l = jax.tree_util.tree_leaves(state.y)
        ta.check_state_leaves(updates, mask, g_shared, y_l, "moco", "y")
        ta.check_state_matches_init(state, init_fn, updates, params, "moco", num_tasks)  # the [T] fields

        count = optax.safe_increment(state.count)
        k = count.astype(jnp.float32)
        beta_k = jnp.asarray(beta, jnp.float32) / k ** jnp.asarray(beta_sigma, jnp.float32)
        gamma_k = jnp.asarray(gamma, jnp.float32) / k ** jnp.asarray(gamma_sigma, jnp.float32)

        lambd, new_y, out_shared, finite = state.lambd, [], [], None
        if g_shared:
            dt = nm.acc_dtype(list(g_shared) + list(y_l))
            h = [g.astype(dt) for g in g_shared]
            if grad_transform == "normalize_loss":
                n = nm.task_norms(g_shared, dt)
                c = nm.safe_div(losses.astype(dt), n)
                h = [x * c.reshape((num_tasks,) + (1,) * (x.ndim - 1)) for x in h]
            new_y = [y.astype(dt) - beta_k.astype(dt) * (y.astype(dt) - x) for y, x in zip(y_l, h)]
            gram, scale = nm.gram(new_y, num_tasks, dt)
            # A NaN/inf gradient never enters y: it makes the normalised Gram matrix non-finite (its scale
            # may overflow legitimately, ‖y‖² past float32, which the λ step below handles).
            finite = jnp.all(jnp.isfinite(gram))
            lam = state.lambd.astype(dt)
            gk = gamma_k.astype(dt)
            step = jnp.matmul(gram * scale + rho * jnp.eye(num_tasks, dtype=dt), lam, precision=nm.HIGHEST)
            z = lam - gk * step
            # For ‖y‖ above ~1e19 (float32) the raw Y Yᵀ overflows (inf, and 0·inf = NaN) and z is no longer
            # finite: the projection (or softmax) would read its entries as ties and reset λ.  Both maps are
            # invariant to a common shift of z, so drop γ s min_t (G̃λ)_t: the task(s) with the smallest
            # (Y Yᵀ λ)_t keep a finite entry, the others are pushed down by their difference (inf: excluded).
            v = jnp.matmul(gram, lam, precision=nm.HIGHEST)
            dv = v - jnp.min(v)
            push = jnp.where((dv > 0) & (gk > 0), gk * (scale * dv), 0.0)
            z = jnp.where(jnp.all(jnp.isfinite(z)), z, lam - gk * rho * lam - push)
            if lambda_update == "project":
                lambd = nm.project_simplex(z)
            else:
                big = jnp.finfo(dt).max / 4
                z = jnp.where(jnp.isnan(z), -big, jnp.clip(z, -big, big))
                lambd = jax.nn.softmax(z)
            lambd = lambd.astype(state.lambd.dtype)
            out_shared = [c.astype(g.dtype) for c, g in zip(nm.combine(new_y, lambd.astype(dt)), g_shared)]
            new_y = [y.astype(old.dtype) for y, old in zip(new_y, y_l)]
        out = ta.merge_shared(out_shared, nm.sum_heads(g_heads), mask, treedef)
        y_tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state.y), new_y)
        new_state = MoCoState(count=count, y=y_tree, lambd=lambd)
        ok = nm.conjoin(finite, nm.injected_ok((beta, beta_sigma, gamma, gamma_sigma, rho)))
        return nm.reject_unless(ok, out, new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
