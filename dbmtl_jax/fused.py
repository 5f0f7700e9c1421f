"""A fused DB-MTL step: per-task gradients streamed into the EMA, then the optimizer.

Reference: Lin et al., "Dual-Balancing for Multi-Task Learning", Algorithm 1.

``optax.chain(dbmtl(T), optimizer)`` needs the ``[T, P]`` stack of per-task
gradients before the transform can run, so a step writes T×P gradient floats
and reads them back for the EMA, the norms and the weighted sum.  The fused
step computes each task's gradient ``g_t = ∇_θ log(ℓ_t + ε)`` and folds it
straight into its EMA row while it is produced (``chunk_size`` tasks at a time,
``dbmtl_jax.task_gradients._fold_task_grads``), accumulating ``‖ĝ_t‖²`` on the way::

    for each chunk of tasks:  ĝ_t ← β_k ĝ_t + (1 − β_k) g_t,   n_t = ‖ĝ_t‖²
    ũ = max_t ‖ĝ_t‖ · Σ_t ĝ_t / (‖ĝ_t‖ + ε);   heads: Σ_t ∇_ψ log(ℓ_t + ε)
    updates, opt_state = optimizer.update(ũ, opt_state, params)

The update is exactly :func:`dbmtl_jax.dbmtl`'s (every option: β schedules,
σ, the α ablations, ``log=False``) and the state is exactly
``optax.chain(dbmtl(T, shared=...), optimizer).init(params)``, so the fused step
and the transform chain can replace each other mid-run (checkpoints too).

Invalid steps are skipped, as by :func:`dbmtl_jax.skip_invalid_steps`: when a
loss is NaN/inf (or negative with ``log=True``), a gradient is non-finite, a
β schedule or an injected hyperparameter leaves its range (β_k ∉ [0, 1)), or
the optimizer's output is (an update or a state entry: finite inputs can still
overflow Adam's second moment; so the optimizer's state must be finite, as
Adam's, SGD's and most are: a state holding an ``inf`` sentinel belongs in
the chain with :func:`dbmtl_jax.skip_invalid_steps`), the updates are zeros,
the optimizer state and ``count``/``norms`` are kept, and with
``in_place=False`` (default) the EMA is kept bit for bit.  The EMA norms are
computed overflow-safe, so a large but representable gradient is not rejected.

``in_place=True`` writes the EMA rows into the (donated) state buffer as they
are produced: the step then needs only about ``(2·chunk_size + 2) × P``
transient floats beyond the state instead of ``T × P``.  Invalid *losses* are
seen before any row is written, so they still leave the state untouched, but a
non-finite *gradient* with finite losses (an overflow inside the backward pass)
is found only while streaming: rows of earlier tasks, and the finite entries of
the offending rows, have then been advanced.  Such a step still applies no
update and keeps ``count``; ``norms`` are set to NaN to flag it.  Likewise no
copy of the optimizer state is kept in place: an optimizer output that
overflows zeroes the update and flags the step the same way, but the
optimizer state is the one it returned.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.dbmtl import (DBMTLState, ScalarOrSchedule, beta_at, check_options, dbmtl, dbmtl_direction, ema_step,
                             expected_ema_dtypes, options_ok)
from dbmtl_jax.guard import output_ok, select_step
from dbmtl_jax.methods import _numerics as nm
from dbmtl_jax.task_gradients import (
    Model,
    TrunkHeads,
    _check_chunk,
    _deprecated,
    _fold_task_grads,
    _trunk_heads_fold_task_grads,
)

PyTree = Any

__all__ = ["FusedDBMTL", "fused_dbmtl", "fused_trunk_heads_dbmtl"]  # the last deprecated (0.2.0)


class FusedDBMTL(NamedTuple):
    """A fused DB-MTL + optimizer step (see :func:`fused_dbmtl`).

    Attributes:
      init: ``init(params) -> (DBMTLState, opt_state)``, the state of
        ``optax.chain(dbmtl(T, shared=...), optimizer)``.
      update: ``update(state, params, /, *args, **kwargs) -> (losses, updates,
        state)``: losses are the raw ``ℓ_t`` (``(losses, aux)`` with
        ``has_aux``), updates go to ``optax.apply_updates``.
    """

    init: Callable[[PyTree], tuple]
    update: Callable[..., tuple]


def _losses_ok(losses: jax.Array, log: bool) -> jax.Array:
    ok = jnp.all(jnp.isfinite(losses))
    return ok & jnp.all(losses >= 0) if log else ok


def _fold_rows(
    ema: list, sq: jax.Array, start: jax.Array, g_shared: list, beta_k: jax.Array, ok: jax.Array,
    in_place: bool, acc: Any,
) -> tuple[list, jax.Array]:
    """``ĝ_t ← β_k ĝ_t + (1 − β_k) g_t`` for the rows ``start …`` of every EMA leaf (written in place into
    the loop carry), and their squared norms into ``sq`` (``[3, T]``, :func:`ta.task_sq_norms_pair`)."""
    c = g_shared[0].shape[0]
    rows_ok = jnp.ones([c], bool)
    out, news = [], []
    for m, g in zip(ema, g_shared):
        old = jax.lax.dynamic_slice_in_dim(m, start, c, axis=0)
        new = _as_stored(ema_step(old, g, beta_k))
        news.append(new)
        rows_ok = rows_ok & jnp.all(jnp.isfinite(new).reshape(c, -1), axis=1)
        if in_place:  # never write a row of an invalid-loss step, nor a non-finite entry
            new = jnp.where(ok & jnp.isfinite(new), new, old)
        out.append(jax.lax.dynamic_update_slice_in_dim(m, new, start, axis=0))
    # NaN marks a row with a non-finite entry (even where in-place mode did not write it); an inf
    # in the plain or the up-scaled row is only an overflow of the squares (see ta.norms_from_pair).
    sq_rows = jnp.where(rows_ok, ta.task_sq_norms_pair(news, acc, small=True), jnp.nan)
    return out, jax.lax.dynamic_update_slice_in_dim(sq, sq_rows, start, axis=1)


def _as_stored(x: jax.Array) -> jax.Array:
    """``x`` (a value in the EMA's dtype) as the state stores it.

    An EMA narrower than float32 (``ema_dtype=jnp.bfloat16``/``float16``) is computed in float32 where
    the backend lacks that arithmetic (XLA:CPU), and ``xla_allow_excess_precision`` (on by default) lets
    XLA feed that unrounded float32 value to the norms, which read the row again in float32: the norms
    (so α and the 1/(‖ĝ_t‖ + ε) scaling) would be those of a row that is never stored, unlike
    :func:`dbmtl_jax.dbmtl`'s.  The barrier makes every reader take the rounded value (a rounding
    ``lax.reduce_precision`` would flush float16 subnormals on CPU).  An EMA of float32 or wider (the
    default ``ema_dtype``) is returned as it is, so its step traces as before.
    """
    return jax.lax.optimization_barrier(x) if jnp.finfo(x.dtype).bits < 32 else x


def _backup(ema: list, in_place: bool) -> Optional[list]:
    """Exact mode keeps the pre-step EMA to return it if the step turns out invalid (one T×P copy)."""
    return None if in_place else [jnp.copy(m) for m in ema]


def _finish(
    *, state: tuple, params: PyTree, ema_new: list, sq: jax.Array, head_dir: list, ok: jax.Array,
    mask: PyTree, treedef: Any, optimizer: optax.GradientTransformation, alpha: Any, eps: Any,
    backup: Optional[list], acc: Any, count: jax.Array, check_output: bool,
) -> tuple[PyTree, tuple]:
    """Scales the new EMA into the DB-MTL direction, runs the optimizer, and guards the whole step."""
    db, inner = state
    heads_ok = functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(h)) for h in head_dir], jnp.asarray(True))
    # NaN rows flag a non-finite EMA entry; an inf is an overflow of the squares only, recomputed
    # safely inside the applied branch (outside it, the recomputation would copy the EMA).
    valid = ok & ~jnp.any(jnp.isnan(sq)) & heads_ok

    def apply(_: Any) -> tuple:
        norms, shared_dir = dbmtl_direction(ema_new, alpha, eps, acc, sq) if ema_new else (db.norms.astype(acc), [])
        # Straight to the parameter dtype, as dbmtl casts to the gradient's (not through a narrower EMA dtype).
        direction = ta.merge_shared(list(shared_dir), list(head_dir), mask, treedef)
        direction = jax.tree_util.tree_map(lambda d, p: d.astype(p.dtype), direction, params)
        return optimizer.update(direction, inner, params) + (norms,)

    def skip(_: Any) -> tuple:
        return jax.tree_util.tree_map(jnp.zeros_like, params), inner, jnp.full(db.norms.shape, jnp.nan, acc)

    updates, new_inner, norms = jax.lax.cond(valid, apply, skip, None)
    # Guard what was produced too: a direction or an optimizer state (Adam's second moment) can
    # overflow on finite input.  The optimizer state must stay finite (reading the old state to
    # exempt inf sentinels would cost a copy of it; skip_invalid_steps keeps flags for that).  Exact mode rolls the optimizer state back; in place, where no copy
    # of it is kept, the updates are zeroed and the step is flagged (NaN norms) like a mid-stream one.
    out_ok = output_ok(updates, new_inner)[0] if check_output else jnp.asarray(True)
    if backup is None or not check_output:
        updates = jax.tree_util.tree_map(lambda u: jnp.where(out_ok, u, jnp.zeros_like(u)), updates)
    else:
        updates, new_inner = select_step(out_ok, updates, new_inner, inner)
    valid = valid & out_ok
    if backup is None or not ema_new:
        ema_out = ema_new
        # Rows advanced by a step rejected mid-stream: flag it in the norms (see the module docstring).
        new_norms = jnp.where(valid, norms, jnp.where(ok, jnp.nan, db.norms)) if ema_new else db.norms
    else:
        ema_out = jax.lax.cond(valid, lambda: list(ema_new), lambda: list(backup))
        new_norms = jnp.where(valid, norms, db.norms)
    new_db = DBMTLState(
        count=jnp.where(valid, count, db.count),
        ema=jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(db.ema), ema_out),
        norms=new_norms.astype(jnp.float32),
    )
    return updates, (new_db, new_inner)


def _prepare(
    state: tuple, params: PyTree, mask: PyTree, num_tasks: int, beta: ScalarOrSchedule, beta_sigma: Any,
    alpha: Any, eps: Any, ema_dtype: Optional[Any] = None,
) -> tuple:
    """Validates the state against the parameters (shapes, and the EMA dtype against ``ema_dtype``) and this
    step's hyperparameters (:func:`options_ok`); returns ``(ema leaves, acc dtype, k, β_k, options ok, treedef,
    heads)``."""
    if not (isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], DBMTLState)):
        raise TypeError(
            "state must be (DBMTLState, optimizer_state) as returned by init() or by "
            "optax.chain(dbmtl(...), optimizer).init(params)."
        )
    ema = jax.tree_util.tree_leaves(state[0].ema)
    p_shared, p_heads, treedef = ta.split_shared(params, mask)
    stacked = [jax.ShapeDtypeStruct((num_tasks,) + jnp.shape(p), jnp.result_type(p)) for p in p_shared]
    dtypes, note = expected_ema_dtypes(ema_dtype, [s.dtype for s in stacked], ema, exact=True)
    ta.check_state_leaves(params, mask, stacked, ema, "fused DB-MTL", "ema", dtypes, note)
    acc = functools.reduce(jnp.promote_types, [m.dtype for m in ema], jnp.dtype(jnp.float32))
    count = optax.safe_increment(state[0].count)
    beta_k = beta_at(beta, beta_sigma, count, acc)
    return ema, acc, count, beta_k, options_ok(beta_k, beta_sigma, alpha, eps, count), treedef, p_heads


def fused_dbmtl(
    model: Model,
    num_tasks: int,
    optimizer: optax.GradientTransformation,
    *,
    beta: ScalarOrSchedule = 0.9,
    beta_sigma: Union[float, jax.Array] = 0.5,
    alpha: Union[str, float, jax.Array] = "max",
    eps: Union[float, jax.Array] = 1e-8,
    shared: ta.SharedSpec = None,
    ema_dtype: Optional[Any] = None,
    log: bool = True,
    has_aux: bool = False,
    chunk_size: int = 1,
    unroll: Optional[bool] = None,
    in_place: bool = False,
    check_output: bool = True,
) -> FusedDBMTL:
    """DB-MTL (Lin et al., Algorithm 1) + ``optimizer`` as one streamed step.

    ``model`` is ``loss_fn(params, *args, **kwargs) -> [T]`` raw task losses
    (``(losses, aux)`` with ``has_aux``), or a :class:`dbmtl_jax.TrunkHeads`
    spec (each head back-propagated once; ``update(state, params, batch)``, the
    trunk leaves are the shared θ, so no ``shared``, and ``num_tasks`` must be
    its number of heads).  Each task's gradient of ``log(ℓ_t + ε)`` (``ℓ_t``
    with ``log=False``) is folded into the EMA as it is produced; head leaves
    (``shared`` false) get ``Σ_t`` of their gradients.  ``beta``,
    ``beta_sigma``, ``alpha``, ``eps``, ``shared`` and ``ema_dtype`` are
    :func:`dbmtl_jax.dbmtl`'s; the ε of the log is ``eps`` too.

    Args:
      optimizer: the optimizer fed with the DB-MTL direction (Adam in the paper).
      chunk_size: tasks pulled back together (1 was fastest on CPU).
      unroll: unroll the task loop instead of a ``fori_loop`` (faster for
        convolutions on XLA:CPU; compiles more slowly as T grows).  ``None``
        (default): unroll when on CPU and the model has convolutions.
      in_place: update the EMA in the donated state buffer while streaming
        (lowest memory; see the module docstring for what a rejected step keeps).
      check_output: reject a step whose optimizer output (update or state) is
        not finite (default; see the module docstring).  False skips that
        check and its rollback copy of the optimizer state
        (``benchmarks/RESULTS_guard.md`` has the cost).

    Returns:
      :class:`FusedDBMTL` ``(init, update)``; jit ``update`` and donate the state.
      The state is that of ``optax.chain(dbmtl(T, shared=...), optimizer)`` over
      ``params`` (for a spec, ``shared=spec.shared_mask(params)``).
    """
    check_options(num_tasks, alpha, beta=beta, beta_sigma=beta_sigma, eps=eps, ema_dtype=ema_dtype)
    nm.check_shared(shared, "fused_dbmtl")
    _check_chunk(chunk_size)
    kw = dict(beta=beta, beta_sigma=beta_sigma, alpha=alpha, eps=eps, ema_dtype=ema_dtype, log=log,
              chunk_size=chunk_size, unroll=unroll, in_place=in_place, check_output=check_output)
    if isinstance(model, TrunkHeads):
        if num_tasks != model.num_tasks:
            raise ValueError(f"num_tasks is {num_tasks} but the TrunkHeads spec has {model.num_tasks} heads.")
        if shared is not None or has_aux:
            raise ValueError("a TrunkHeads spec fixes the shared leaves (the trunk) and has no aux: "
                             "leave shared and has_aux unset.")
        return _fused_trunk_heads(model, optimizer, **kw)
    return _fused_loss_fn(model, num_tasks, optimizer, shared=shared, has_aux=has_aux, **kw)


def _fused_loss_fn(
    loss_fn: Callable[..., Any], num_tasks: int, optimizer: optax.GradientTransformation, *, beta: ScalarOrSchedule,
    beta_sigma: Any, alpha: Any, eps: Any, shared: ta.SharedSpec, ema_dtype: Optional[Any], log: bool, has_aux: bool,
    chunk_size: int, unroll: Optional[bool], in_place: bool, check_output: bool,
) -> FusedDBMTL:
    """:func:`fused_dbmtl` of a ``loss_fn``."""
    db = dbmtl(num_tasks, beta=beta, beta_sigma=beta_sigma, alpha=alpha, eps=eps, shared=shared, ema_dtype=ema_dtype)

    def init(params: PyTree) -> tuple:
        return db.init(params), optimizer.init(params)

    def update(state: tuple, params: PyTree, /, *args: Any, **kwargs: Any) -> tuple:
        mask = ta.resolve_shared(shared, params)
        ema, acc, count, beta_k, opts_ok, treedef, p_heads = _prepare(state, params, mask, num_tasks, beta,
                                                                       beta_sigma, alpha, eps, ema_dtype)

        def fold(carry: tuple, start: jax.Array, grads: PyTree) -> tuple:
            ema_c, sq, heads, ok = carry
            g_shared, g_heads, _ = ta.split_shared(grads, mask)
            if g_shared:
                ema_c, sq = _fold_rows(ema_c, sq, start, g_shared, beta_k, ok, in_place, acc)
            heads = [h + jnp.sum(g, axis=0).astype(h.dtype) for h, g in zip(heads, g_heads)]
            return ema_c, sq, heads, ok

        def first_carry(losses: jax.Array) -> tuple:
            # Called after the forward pass, before the first row is written.
            if losses.shape != (num_tasks,):
                raise ValueError(f"loss_fn must return {num_tasks} task losses (the task axis), got shape "
                                 f"{losses.shape}.")
            heads0 = [jnp.zeros(jnp.shape(h), jnp.promote_types(jnp.result_type(h), jnp.float32)) for h in p_heads]
            return ema, jnp.zeros([3, num_tasks], acc), heads0, _losses_ok(losses, log) & opts_ok

        grads_fn = _fold_task_grads(loss_fn, fold, log=log, eps=eps, has_aux=has_aux, chunk_size=chunk_size,
                                    unroll=unroll)
        backup = _backup(ema, in_place)
        out, (ema_new, sq, head_dir, ok) = grads_fn(first_carry, params, *args, **kwargs)
        updates, new_state = _finish(
            state=state, params=params, ema_new=ema_new, sq=sq, head_dir=head_dir, ok=ok, mask=mask,
            treedef=treedef, optimizer=optimizer, alpha=alpha, eps=eps, backup=backup, acc=acc, count=count,
            check_output=check_output,
        )
        return out, updates, new_state

    return FusedDBMTL(init, update)


def _fused_trunk_heads(
    spec: TrunkHeads, optimizer: optax.GradientTransformation, *, beta: ScalarOrSchedule, beta_sigma: Any,
    alpha: Any, eps: Any, ema_dtype: Optional[Any], log: bool, chunk_size: int, unroll: Optional[bool],
    in_place: bool, check_output: bool,
) -> FusedDBMTL:
    """:func:`fused_dbmtl` of a :class:`TrunkHeads` spec: trunk leaves are the shared θ, head ``t`` gets its own
    task's gradient ``∇_ψt log(ℓ_t + ε)``; ``update(state, params, batch)``."""
    num_tasks = spec.num_tasks
    db_kw = dict(beta=beta, beta_sigma=beta_sigma, alpha=alpha, eps=eps, ema_dtype=ema_dtype)

    def init(params: PyTree) -> tuple:
        return dbmtl(num_tasks, shared=spec.shared_mask(params), **db_kw).init(params), optimizer.init(params)

    def update(state: tuple, params: PyTree, batch: Any) -> tuple:
        mask = spec.shared_mask(params)
        ema, acc, count, beta_k, opts_ok, treedef, _ = _prepare(state, params, mask, num_tasks, beta, beta_sigma,
                                                                 alpha, eps, ema_dtype)
        trunk_params, head_params = spec.parts(params)

        def in_params_order(trunk: PyTree, heads: Sequence[PyTree]) -> tuple[list, list]:
            # (trunk leaves, head leaves) in the leaf order of params, which the EMA state follows.
            return ta.split_shared(spec.whole(params, trunk, heads), mask)[:2]

        def fold(carry: tuple, start: jax.Array, grads: PyTree) -> tuple:
            ema_c, sq, ok = carry
            ema_c, sq = _fold_rows(ema_c, sq, start, in_params_order(grads, head_params)[0], beta_k, ok, in_place,
                                   acc)
            return ema_c, sq, ok

        def first_carry(losses: jax.Array) -> tuple:
            return ema, jnp.zeros([3, num_tasks], acc), _losses_ok(losses, log) & opts_ok

        grads_fn = _trunk_heads_fold_task_grads(spec.trunk_fn, spec.head_loss_fns, fold, log=log, eps=eps,
                                                chunk_size=chunk_size, unroll=unroll)
        backup = _backup(ema, in_place)
        losses, head_grads, (ema_new, sq, ok) = grads_fn(first_carry, trunk_params, head_params, batch)
        updates, new_state = _finish(
            state=state, params=params, ema_new=ema_new, sq=sq, head_dir=in_params_order(trunk_params, head_grads)[1],
            ok=ok, mask=mask, treedef=treedef, optimizer=optimizer, alpha=alpha, eps=eps, backup=backup,
            count=count, acc=acc, check_output=check_output,
        )
        return losses, updates, new_state

    return FusedDBMTL(init, update)


def fused_trunk_heads_dbmtl(
    trunk_fn: Callable[[PyTree, Any], Any],
    head_loss_fns: Sequence[Callable[[PyTree, Any, Any], jax.Array]],
    optimizer: optax.GradientTransformation,
    **kwargs: Any,
) -> FusedDBMTL:
    """Deprecated: ``fused_dbmtl(TrunkHeads(trunk_fn, head_loss_fns), len(head_loss_fns), optimizer, **kwargs)``."""
    _deprecated("dbmtl_jax.fused_trunk_heads_dbmtl", "dbmtl_jax.fused_dbmtl(dbmtl_jax.TrunkHeads(trunk_fn, "
                "head_loss_fns), num_tasks, optimizer, ...)")
    return fused_dbmtl(TrunkHeads(trunk_fn, head_loss_fns), len(head_loss_fns), optimizer, **kwargs)
