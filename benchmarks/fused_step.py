"""A fused DB-MTL + Adam step: per-task gradients streamed into the EMA (proof of concept).

The library path (``value_and_task_grads`` / ``trunk_heads_task_grads`` → ``dbmtl``
transform) hands the transform a ``[T, P]`` gradient stack, so a step holds
T×P gradient floats besides the T×P EMA.  Here the trunk gradients of each
chunk of ``c`` tasks go straight into the EMA rows through
:func:`dbmtl_jax.task_gradients.trunk_heads_fold_task_grads` (a
``dynamic_update_slice`` into the donated EMA buffer inside a ``fori_loop``),
and the squared norms of the new rows are accumulated on the way.  The
transient memory is then one chunk's gradients and new EMA rows (XLA's CPU
backend does not fuse a large ``dynamic_update_slice`` with the elementwise
update that feeds it, so both are alive: about ``2c × P``) + ``P`` for the
update; ``c = 1`` is also the fastest setting on CPU.

The update is exactly DB-MTL's (Lin et al., Algorithm 1; ``β`` constant,
``α = max`` as in :func:`dbmtl_jax.dbmtl` with its defaults): the state is the
library's ``optax.chain(dbmtl(T, shared=trunk), adam)`` state, so the two paths
are interchangeable and are compared in ``tests/test_bench_suite.py``.
One difference: the library transform keeps its EMA when the new norms are
non-finite; this step writes the EMA rows in place while streaming, so it has
no such guard (a benchmark, not a library path).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import dbmtl_jax
from dbmtl_jax.dbmtl import DBMTLState
from dbmtl_jax.task_gradients import trunk_heads_fold_task_grads

from models import Problem, is_shared

__all__ = ["build_fused"]

PyTree = Any


def build_fused(problem: Problem, *, chunk_size: int, learning_rate: float = 1e-4, beta: float = 0.9,
                eps: float = 1e-8, unroll: bool = False) -> tuple:
    """``(init, step)`` of the fused DB-MTL + Adam step (same state as the library chain)."""
    num_tasks = problem.num_tasks
    tx = optax.chain(dbmtl_jax.dbmtl(num_tasks, beta=beta, shared=is_shared, eps=eps), optax.adam(learning_rate))
    adam = optax.adam(learning_rate)

    def fold(carry: tuple, start: jax.Array, grads: PyTree) -> tuple:
        ema_leaves, sq, beta_k = carry
        g_leaves = jax.tree_util.tree_leaves(grads)
        c = g_leaves[0].shape[0]
        sq_rows = jnp.zeros([c], jnp.float32)
        new_leaves = []
        for m, g in zip(ema_leaves, g_leaves):
            b = beta_k.astype(m.dtype)
            new = b * jax.lax.dynamic_slice_in_dim(m, start, c, axis=0) + (1 - b) * g.astype(m.dtype)
            sq_rows = sq_rows + jnp.sum(jnp.square(new.astype(jnp.float32)).reshape(c, -1), axis=1)
            new_leaves.append(jax.lax.dynamic_update_slice_in_dim(m, new, start, axis=0))
        sq = jax.lax.dynamic_update_slice_in_dim(sq, sq_rows, start, axis=0)
        return new_leaves, sq, beta_k

    grads = trunk_heads_fold_task_grads(problem.trunk_fn, problem.head_loss_fns, fold, chunk_size=chunk_size,
                                        unroll=unroll)

    def step(params: PyTree, state: tuple, batch: Any) -> tuple:
        db, adam_state = state
        count = optax.safe_increment(db.count)
        beta_k = jnp.asarray(beta, jnp.float32)
        ema_leaves, ema_def = jax.tree_util.tree_flatten(db.ema["trunk"])
        carry = (ema_leaves, jnp.zeros([num_tasks], jnp.float32), beta_k)
        losses, head_grads, (ema_leaves, sq, _) = grads(carry, params["trunk"], params["heads"], batch)
        norms = jnp.sqrt(sq)
        scale = jnp.max(norms) / (norms + eps)
        out_trunk = [jnp.tensordot(scale.astype(m.dtype), m, axes=(0, 0)) for m in ema_leaves]
        updates = {"trunk": jax.tree_util.tree_unflatten(ema_def, out_trunk), "heads": tuple(head_grads)}
        ema = {"trunk": jax.tree_util.tree_unflatten(ema_def, ema_leaves), "heads": db.ema["heads"]}
        updates, adam_state = adam.update(updates, adam_state, params)
        new_db = DBMTLState(count=count, ema=ema, norms=norms)
        return optax.apply_updates(params, updates), (new_db, adam_state), losses

    return tx.init, step
