"""ExcessMTL: task weighting by estimated excess risks.

Reference: Y. He, S. Zhou, G. Zhang, H. Yun, Y. Xu, B. Zeng, T. Chilimbi,
H. Zhao, "Robust Multi-Task Learning with Excess Risks", ICML 2024.

ExcessMTL raises the weight of tasks that are far from convergence, measured
by their *excess risk* ``ℓ_t(θ) − ℓ_t(θ_t*)``, rather than by their loss (which
also contains the irreducible, label-noise part).  A second-order Taylor
expansion around the task optimum gives ``ℓ_t(θ) − ℓ_t(θ*) ≈ ½ g_tᵀ H_t⁻¹ g_t``;
the Hessian is approximated by the diagonal AdaGrad-style statistic
(square root of the accumulated squared gradients, an empirical-Fisher
estimate).  Per step k (``g_t`` = task t's shared gradient)::

    A_t ← A_t + g_t ⊙ g_t                      (accumulators, in the state)
    e_t = Σ g_t ⊙ g_t / sqrt(A_t + eps)        (excess-risk estimate, ½ dropped)
    r_t = e_t / e_t^{(0)}                       (scale normalisation by the first estimate)
    w_t ← w_t · exp(η r_t),  w ← T · w / Σ w    (exponentiated-gradient step)

and the update is ``Σ_t w_t g_t``.

Choices, following the authors' code (their LibMTL fork, also in LibMTL):

* ``robust_step_size`` η = 1e-2 and ``eps`` = 1e-7 (official defaults).
* the accumulators and the estimate use the *shared* leaves only (all of them,
  flattened together).  The factor ½ of the Taylor term cancels in ``r_t``.
* the first update records ``e^{(0)}`` and leaves the weights at 1 (the
  official code skips the weight update on its first call).  A task whose
  first estimate is exactly 0 (an all-zero gradient) records its baseline at
  its first non-zero estimate and contributes ``r_t = 0`` until then, instead
  of dividing by zero.  The paper's Appendix C.1 variant that averages the
  baseline over a warm-up period is not implemented.
* scale: the weights start at 1 and are renormalised to sum to T, as the
  official code (the paper states them on the simplex, i.e. divided by T),
  so the update is on the scale of the plain sum of task gradients.
* heads: the official code back-propagates ``Σ_t w_t ℓ_t``, so head leaves get
  ``Σ_t w_t g_t`` (``weight_heads=True``, default).
* the multiplicative update is kept in log space (``log w``, re-centred each
  step) so that it cannot overflow; weights that underflow stay finite.

Unsure: the paper's Algorithm 1 is stated per step with stochastic gradients
as here; whether the accumulators should be reset per epoch is not specified
by the code (they are not).
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

__all__ = ["ExcessMTLState", "excessmtl"]

_LOG_FLOOR = -1e4


class ExcessMTLState(NamedTuple):
    """State of :func:`excessmtl`.

    Attributes:
      count: number of updates so far (int32).
      sq_sum: accumulated squared task gradients ``A_t`` of the shared leaves,
        each ``[T, *param_shape]`` (float32 or wider); head leaves hold
        ``optax.MaskedNode()``.
      initial_excess: the baseline ``e_t^{(0)}``, ``[T]`` float32 (0: not yet set).
      excess: the last excess-risk estimate ``e_t``, ``[T]`` float32.
      log_weights: ``log(w_t / T)`` re-centred to max 0, ``[T]`` float32.
      weights: the task weights ``w_t`` of the last update (sum T), ``[T]`` float32.
    """

    count: chex.Array
    sq_sum: PyTree
    initial_excess: chex.Array
    excess: chex.Array
    log_weights: chex.Array
    weights: chex.Array


def excessmtl(
    num_tasks: int,
    *,
    robust_step_size: float = 1e-2,
    eps: float = 1e-7,
    weight_heads: bool = True,
    shared: ta.SharedSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """ExcessMTL (He et al., ICML 2024): exponentiated-gradient weights from excess risks.

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      robust_step_size: the step size η ``>= 0`` of the weight update (official 1e-2;
        0 keeps equal weights).
      eps: ``eps > 0`` in ``sqrt(A_t + eps)`` (official 1e-7).
      weight_heads: weight task-specific leaves by ``w`` (official) rather
        than summing them.
      shared: which leaves are shared (see :func:`dbmtl_jax.dbmtl`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args are ignored.
    """
    nm.check_num_tasks(num_tasks, "excessmtl")
    nm.check_shared(shared, "excessmtl")
    robust_step_size = nm.check_real(robust_step_size, "robust_step_size", "excessmtl", lo=0)
    eps = nm.check_real(eps, "eps", "excessmtl", lo=0, lo_open=True,
                  note="0 gives 0/0 for a coordinate whose gradients were all 0")
    nm.check_bool(weight_heads, "weight_heads", "excessmtl")

    def init_fn(params: PyTree) -> ExcessMTLState:
        mask = ta.resolve_shared(shared, params)
        return ExcessMTLState(
            count=jnp.zeros([], jnp.int32),
            sq_sum=ta.stacked_zeros_tree(params, mask, num_tasks),
            initial_excess=jnp.zeros([num_tasks], jnp.float32),
            excess=jnp.zeros([num_tasks], jnp.float32),
            log_weights=jnp.zeros([num_tasks], jnp.float32),
            weights=jnp.ones([num_tasks], jnp.float32),
        )

    def update_fn(
        updates: PyTree, state: ExcessMTLState, params: Optional[PyTree] = None, **extra_args: Any
    ) -> tuple[PyTree, ExcessMTLState]:
        del extra_args
        g_shared, g_heads, mask, treedef = gc.split_updates(updates, params, shared, num_tasks)
        sq_leaves = jax.tree_util.tree_leaves(state.sq_sum)
        ta.check_state_leaves(updates, mask, g_shared, sq_leaves, "ExcessMTL", "sq_sum")
        ta.check_state_matches_init(state, init_fn, updates, params, "excessmtl", num_tasks)  # the [T] fields
        new_sq = []
        excess = jnp.zeros([num_tasks], jnp.float32)
        for g, a in zip(g_shared, sq_leaves):
            g2 = jnp.square(g.astype(a.dtype))
            a_new = a + g2
            new_sq.append(a_new)
            e = jnp.sum((g2 / jnp.sqrt(a_new + eps)).reshape(num_tasks, -1), axis=1)
            excess = excess + e.astype(jnp.float32)

        base = state.initial_excess
        have = base > 0
        ratio = jnp.where(have, excess / jnp.where(have, base, 1.0), 0.0)
        new_base = jnp.where(have, base, excess)
        logits = state.log_weights + robust_step_size * ratio
        logits = jnp.maximum(logits - jnp.max(logits), _LOG_FLOOR)
        weights = num_tasks * jax.nn.softmax(logits)

        out_shared = nm.combine(g_shared, weights)
        out_heads = nm.combine(g_heads, weights) if weight_heads else nm.sum_heads(g_heads)
        out = ta.merge_shared(out_shared, out_heads, mask, treedef)
        new_state = ExcessMTLState(
            count=optax.safe_increment(state.count),
            sq_sum=jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state.sq_sum), new_sq),
            initial_excess=new_base,
            excess=excess,
            log_weights=logits,
            weights=weights.astype(jnp.float32),
        )
        # The running sums of squares overflow (inf) for gradient entries above ~1e19 in float32, and
        # an inf would silence those entries' excess-risk terms for good: such a step (or one with a
        # non-finite gradient) is made visibly invalid and the state kept.
        ok = nm.conjoin(nm.all_finite(new_state), nm.injected_ok((robust_step_size, eps)))
        return nm.reject_unless(ok, out, new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
