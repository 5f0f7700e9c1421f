"""MetaBalance: adapting the gradient magnitudes of auxiliary tasks to the main task.

Reference: Y. He, X. Feng, C. Cheng, G. Ji, Y. Guo, J. Caverlee,
"MetaBalance: Improving Multi-Task Recommendations via Adapting Gradient
Magnitudes of Auxiliary Tasks", The Web Conference (WWW) 2022.

One task is the *main* (target) task (``main_task``, default the first); all
others are auxiliary.  Per group of shared parameters keep moving averages of
the task-gradient norms (state, initialised to 0, no bias correction)::

    m_t ← β m_t + (1 − β) ‖g_t‖
    g_t ← r (m_main / m_t) g_t + (1 − r) g_t        (the relax factor r)
    update = Σ_t g_t

The main task's factor is 1.  ``strategy`` picks one of the paper's three
strategies: ``"adapt"`` rescales every auxiliary gradient (default, the
official code); ``"reduce"`` only those with ``m_t > m_main``; ``"enlarge"``
only those with ``m_t < m_main``.

Defaults: ``relax_factor=0.7`` and ``beta=0.9`` (paper and official code).
``granularity="leaf"`` keeps one norm per parameter tensor (the official
optimizer works per parameter tensor); ``"global"`` uses one norm over all
shared leaves.  Head leaves get the plain ``Σ_t g_t`` (MetaBalance is meant
for the shared parameters).  Where ``m_t = 0`` the task gradient is zero and
its factor is irrelevant (it is set to ``1 − r``).
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
STRATEGIES = ("adapt", "reduce", "enlarge")

__all__ = ["MetaBalanceState", "metabalance", "STRATEGIES"]


class MetaBalanceState(NamedTuple):
    """State of :func:`metabalance`.

    Attributes:
      count: number of updates so far (int32).
      norms: moving averages ``m`` of the task-gradient norms, ``[G, T]`` (float32,
        or the widest shared parameter dtype)
        (``G = 1`` global, else one row per shared leaf).
      factors: the factors applied in the last update, float32 ``[G, T]``.
    """

    count: chex.Array
    norms: chex.Array
    factors: chex.Array


def metabalance(
    num_tasks: int,
    *,
    shared: ta.SharedSpec = None,
    relax_factor: float = 0.7,
    beta: float = 0.9,
    main_task: int = 0,
    strategy: str = "adapt",
    granularity: str = "leaf",
) -> optax.GradientTransformationExtraArgs:
    """MetaBalance (He et al., WWW 2022).

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      shared: which leaves are shared; default all.  Head leaves get ``Σ_t g_t``.
      relax_factor: ``r`` in [0, 1]; 0 leaves the gradients unchanged, 1 matches
        the auxiliary norms to the main task exactly.  Default 0.7.
      beta: moving-average rate β in [0, 1) (weight of the old value); default 0.9.
      main_task: index of the main task; default 0.
      strategy: ``"adapt"`` (default), ``"reduce"`` or ``"enlarge"``.
      granularity: ``"leaf"`` (default, per parameter tensor) or ``"global"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args are ignored.
    """
    nm.check_num_tasks(num_tasks, "metabalance")
    nm.check_shared(shared, "metabalance")
    nm.check_choice(strategy, STRATEGIES, "strategy", "metabalance")
    nm.check_choice(granularity, gc.GRANULARITIES, "granularity", "metabalance")
    relax_factor = nm.check_real(relax_factor, "relax_factor", "metabalance", lo=0, hi=1)
    beta = nm.check_real(beta, "beta", "metabalance", lo=0, hi=1, hi_open=True,
                  note="the weight of the old value; 1 freezes the norms at 0")
    nm.check_static(main_task, "main_task", "metabalance", "it is an index")
    main_task = nm.check_int(main_task, "main_task", "metabalance", lo=0, hi=num_tasks - 1)

    def num_groups(tree: PyTree) -> int:
        if granularity == "global":
            return 1
        return max(1, sum(bool(f) for f in jax.tree_util.tree_leaves(ta.resolve_shared(shared, tree))))

    def init_fn(params: PyTree) -> MetaBalanceState:
        g = num_groups(params)
        dt = nm.state_dtype(params, ta.resolve_shared(shared, params))
        return MetaBalanceState(
            count=jnp.zeros([], jnp.int32),
            norms=jnp.zeros([g, num_tasks], dt),
            factors=jnp.ones([g, num_tasks], jnp.float32),
        )

    def update_fn(
        updates: PyTree, state: MetaBalanceState, params: Optional[PyTree] = None, **extra: Any
    ) -> tuple[PyTree, MetaBalanceState]:
        del extra
        g_shared, g_heads, mask, treedef = gc.split_updates(updates, params, shared, num_tasks)
        groups = 1 if granularity == "global" else max(1, len(g_shared))
        if state.norms.shape != (groups, num_tasks):
            raise ValueError(
                f"metabalance: state.norms has shape {state.norms.shape} but the updates need "
                f"{(groups, num_tasks)}; the shared mask or parameter structure changed since init."
            )
        norms, factors, out_shared, finite = state.norms, state.factors, [], None
        if g_shared:
            dt = nm.acc_dtype(g_shared)
            cur = nm.task_norms(g_shared, dt, per_leaf=granularity == "leaf")
            cur = cur[None] if granularity == "global" else cur
            m = beta * norms.astype(dt) + (1 - beta) * cur
            finite = jnp.all(jnp.isfinite(m))  # a NaN/inf gradient never enters the moving norms
            m_main = m[:, main_task : main_task + 1]
            ratio = nm.safe_div(jnp.broadcast_to(m_main, m.shape), m)
            ratio = jnp.minimum(ratio, jnp.finfo(dt).max / 4)
            f = relax_factor * ratio + (1 - relax_factor)
            if strategy == "reduce":
                f = jnp.where(m > m_main, f, 1)
            elif strategy == "enlarge":
                f = jnp.where(m < m_main, f, 1)
            f = f.at[:, main_task].set(1)
            if granularity == "global":
                out_shared = nm.combine(g_shared, f[0])
            else:
                out_shared = nm.combine_per_leaf(g_shared, f)
            norms, factors = m.astype(state.norms.dtype), f.astype(jnp.float32)
        out = ta.merge_shared(out_shared, nm.sum_heads(g_heads), mask, treedef)
        new_state = MetaBalanceState(count=optax.safe_increment(state.count), norms=norms, factors=factors)
        return nm.reject_unless(nm.conjoin(finite, nm.injected_ok((relax_factor, beta))), out, new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
