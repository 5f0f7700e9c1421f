"""MTAdam: Adam with per-task moments and task-gradient magnitude balancing.

Reference: I. Malkiel, L. Wolf, "MTAdam: Automatic Balancing of Multiple
Training Loss Terms", EMNLP 2021 (arXiv:2006.14683).

Per group of shared parameters (default: per parameter tensor, as the
official optimizer) keep a moving average ``n_t`` of each task's gradient norm
(``n_t = ‖g_t‖`` at the first step, then ``n_t ← β₃ n_t + (1 − β₃) ‖g_t‖``)
and rescale every task gradient to the anchor's magnitude, the anchor being
the first task with ``n_t > norm_eps`` (normally task 0)::

    g̃_t = ρ_t · n_anchor / n_t · g_t                 (g̃_t = g_t where n_t ≤ norm_eps)
    m_t ← β₁ m_t + (1 − β₁) g̃_t,   v_t ← β₂ v_t + (1 − β₂) g̃_t²
    d_t = √v_t / √(1 − β₂^k) + ε,    D = max_t d_t    (elementwise)
    update = Σ_t m_t / (1 − β₁^k) / D

``ρ_t`` are the optional per-task ranks of the official code (default 1).
Head leaves follow plain Adam on ``Σ_t g_t`` (what the official per-task
moments reduce to when a parameter receives the gradient of a single task).

MTAdam is an *optimizer*: like ``optax.scale_by_adam``, this transform returns
the Adam direction without the learning rate and sign, so chain it with
``optax.scale_by_learning_rate(lr)`` or ``optax.sgd(lr)`` — **not** with another
adaptive optimizer.  Defaults (official code): ``b1=0.9, b2=0.999, b3=0.9,
eps=1e-8, norm_eps=1e-10``; ``granularity="leaf"`` (per parameter tensor,
official) or ``"global"`` (one norm per task over all shared leaves).
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

__all__ = ["MTAdamState", "mtadam"]


class MTAdamState(NamedTuple):
    """State of :func:`mtadam`.

    Attributes:
      count: number of updates so far (int32).
      norms: moving averages of the task-gradient norms, ``[G, T]`` (float32, or the
        widest shared parameter dtype).
      mu: per-task first moments of the shared leaves, ``[T, *shape]`` (heads: ``MaskedNode``).
      nu: per-task second moments of the shared leaves, ``[T, *shape]``.
      mu_heads: first moments of the head leaves, ``[*shape]`` (shared: ``MaskedNode``).
      nu_heads: second moments of the head leaves.
    """

    count: chex.Array
    norms: chex.Array
    mu: PyTree
    nu: PyTree
    mu_heads: PyTree
    nu_heads: PyTree


def mtadam(
    num_tasks: int,
    *,
    shared: ta.SharedSpec = None,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9,
    eps: float = 1e-8,
    norm_eps: float = 1e-10,
    ranks: Optional[Union[Sequence[float], jax.Array]] = None,
    granularity: str = "leaf",
) -> optax.GradientTransformationExtraArgs:
    """MTAdam (Malkiel & Wolf, 2021) as an Adam-direction transform.

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      shared: which leaves are shared; default all.  Heads follow plain Adam.
      b1, b2: Adam moment rates; b3: rate of the gradient-norm moving average
        (all in ``[0, 1)``, the weight of the old value).
      eps: Adam's ε ``> 0``.
      norm_eps: norms at or below this ``>= 0`` threshold are not rescaled (official 1e-10).
      ranks: optional per-task multipliers ``ρ >= 0`` (``[T]``); default ones.
      granularity: ``"leaf"`` (default) or ``"global"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; chain with
      ``optax.scale_by_learning_rate(lr)``.
    """
    nm.check_num_tasks(num_tasks, "mtadam")
    nm.check_shared(shared, "mtadam")
    nm.check_choice(granularity, gc.GRANULARITIES, "granularity", "mtadam")
    b1, b2, b3 = (nm.check_real(b, name, "mtadam", lo=0, hi=1, hi_open=True)
                  for name, b in (("b1", b1), ("b2", b2), ("b3", b3)))
    eps = nm.check_real(eps, "eps", "mtadam", lo=0, lo_open=True, note="it guards the Adam denominator")
    norm_eps = nm.check_real(norm_eps, "norm_eps", "mtadam", lo=0)
    if ranks is not None:
        ranks = nm.check_real(ranks, "ranks", "mtadam", lo=0, shapes=((num_tasks,),), note="a negative rank flips the task")
    rank_arr = jnp.ones([num_tasks], jnp.float32) if ranks is None else jnp.asarray(ranks, jnp.float32)
    if rank_arr.shape != (num_tasks,):
        raise ValueError(f"mtadam: ranks must have shape [{num_tasks}], got {rank_arr.shape}.")

    def num_groups(tree: PyTree) -> int:
        if granularity == "global":
            return 1
        return max(1, sum(bool(f) for f in jax.tree_util.tree_leaves(ta.resolve_shared(shared, tree))))

    def init_fn(params: PyTree) -> MTAdamState:
        mask = ta.resolve_shared(shared, params)
        return MTAdamState(
            count=jnp.zeros([], jnp.int32),
            norms=jnp.zeros([num_groups(params), num_tasks], nm.state_dtype(params, mask)),
            mu=ta.stacked_zeros_tree(params, mask, num_tasks),
            nu=ta.stacked_zeros_tree(params, mask, num_tasks),
            mu_heads=gc.zeros_tree(params, mask, want_shared=False),
            nu_heads=gc.zeros_tree(params, mask, want_shared=False),
        )

    def update_fn(
        updates: PyTree, state: MTAdamState, params: Optional[PyTree] = None, **extra: Any
    ) -> tuple[PyTree, MTAdamState]:
        del extra
        g_shared, g_heads, mask, treedef = gc.split_updates(updates, params, shared, num_tasks)
        mu_l = jax.tree_util.tree_leaves(state.mu)
        nu_l = jax.tree_util.tree_leaves(state.nu)
        ta.check_state_leaves(updates, mask, g_shared, mu_l, "mtadam", "mu")
        muh_l = jax.tree_util.tree_leaves(state.mu_heads)
        nuh_l = jax.tree_util.tree_leaves(state.nu_heads)
        if len(muh_l) != len(g_heads):
            raise ValueError(
                f"mtadam: updates have {len(g_heads)} head leaves but the state has {len(muh_l)}; "
                "the shared mask or the parameter structure changed since init."
            )
        groups = 1 if granularity == "global" else max(1, len(g_shared))
        if state.norms.shape != (groups, num_tasks):
            raise ValueError(
                f"mtadam: state.norms has shape {state.norms.shape} but the updates need {(groups, num_tasks)}."
            )

        count = optax.safe_increment(state.count)
        sdt = state.norms.dtype
        k = count.astype(sdt)
        bc1 = 1 - jnp.asarray(b1, sdt) ** k
        bc2 = 1 - jnp.asarray(b2, sdt) ** k
        first = state.count == 0

        norms = state.norms
        out_shared, new_mu, new_nu = [], [], []
        if g_shared:
            dt = nm.acc_dtype(g_shared)
            cur = nm.task_norms(g_shared, dt, per_leaf=granularity == "leaf")
            cur = cur[None] if granularity == "global" else cur
            n = jnp.where(first, cur, b3 * state.norms.astype(dt) + (1 - b3) * cur)
            ok = n > norm_eps
            has_anchor = jnp.any(ok, axis=1, keepdims=True)
            anchor = jnp.take_along_axis(n, jnp.argmax(ok, axis=1)[:, None], axis=1)
            ratio = jnp.minimum(nm.safe_div(jnp.broadcast_to(anchor, n.shape), n), jnp.finfo(dt).max / 4)
            scale = jnp.where(ok & has_anchor, rank_arr.astype(dt)[None] * ratio, 1)
            norms = n.astype(state.norms.dtype)
            for i, (g, m, v) in enumerate(zip(g_shared, mu_l, nu_l)):
                acc = jnp.promote_types(m.dtype, dt)
                s = scale[0 if granularity == "global" else i].astype(acc)
                gt = g.astype(acc) * s.reshape((num_tasks,) + (1,) * (g.ndim - 1))
                m = b1 * m.astype(acc) + (1 - b1) * gt
                v = b2 * v.astype(acc) + (1 - b2) * gt * gt
                denom = jnp.max(jnp.sqrt(v) / jnp.sqrt(bc2.astype(acc)) + eps, axis=0)
                out_shared.append((jnp.sum(m, axis=0) / bc1.astype(acc) / denom).astype(g.dtype))
                new_mu.append(m.astype(mu_l[i].dtype))
                new_nu.append(v.astype(nu_l[i].dtype))

        out_heads, new_muh, new_nuh = [], [], []
        for g, m, v in zip(g_heads, muh_l, nuh_l):
            acc = jnp.promote_types(m.dtype, jnp.promote_types(g.dtype, jnp.float32))
            gs = jnp.sum(g.astype(acc), axis=0)
            m = b1 * m.astype(acc) + (1 - b1) * gs
            v = b2 * v.astype(acc) + (1 - b2) * gs * gs
            out_heads.append((m / bc1.astype(acc) / (jnp.sqrt(v) / jnp.sqrt(bc2.astype(acc)) + eps)).astype(g.dtype))
            new_muh.append(m.astype(muh_l[len(new_muh)].dtype))
            new_nuh.append(v.astype(nuh_l[len(new_nuh)].dtype))

        out = ta.merge_shared(out_shared, out_heads, mask, treedef)

        def rebuild(tree: PyTree, leaves: list) -> PyTree:
            return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), leaves)

        new_state = MTAdamState(
            count=count,
            norms=norms,
            mu=rebuild(state.mu, new_mu),
            nu=rebuild(state.nu, new_nu),
            mu_heads=rebuild(state.mu_heads, new_muh),
            nu_heads=rebuild(state.nu_heads, new_nuh),
        )
        # Finite gradients can still overflow the second moments (squares of entries above ~1e19 in
        # float32): an inf there makes the update a silent m / inf = 0, now and at every later step.  Such a
        # step (or one with a non-finite gradient) is made visibly invalid and the state kept, as GradNorm's.
        ok = nm.conjoin(nm.all_finite(new_state), nm.injected_ok((b1, b2, b3, eps, norm_eps, ranks)))
        return nm.reject_unless(ok, out, new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
