"""Shared plumbing of the gradient methods (private).

A gradient method receives per-task gradients (every update leaf ``[T,
*param_shape]``), validates the task axis, splits the leaves into shared and
task-specific (head) leaves, picks task coefficients for the shared leaves and
merges ``Σ_t c_t g_t`` with the head update.  This module holds that plumbing
(:func:`split_updates`, :func:`zeros_tree`, :func:`require_key`,
:func:`task_orders`) and :func:`make_gradient_transform`,
the one transform of the methods that are a *weighting* of the Gram matrix of
the shared task gradients (the view of TorchJD: an aggregator is a weighting
``G ↦ w``, the update is ``Σ_t w_t g_t``), so that such a method module holds
only its weighting, its NamedTuple state and its docstring.  The numerics
(Gram matrices, combinations, checks) are in :mod:`dbmtl_jax.methods._numerics`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _numerics as nm
from dbmtl_jax.methods._numerics import require_key

PyTree = Any

GRANULARITIES = ("global", "leaf")

__all__ = [
    "GRANULARITIES",
    "require_key",
    "split_updates",
    "zeros_tree",
    "task_orders",
    "GRAMS",
    "make_gradient_transform",
]


def split_updates(
    updates: PyTree, params: Optional[PyTree], shared: ta.SharedSpec, num_tasks: int
) -> tuple[list, list, PyTree, Any]:
    """Validates the task axis and splits ``updates`` into shared and head leaves."""
    ta.check_task_axis(updates, num_tasks, params=params)
    mask = ta.resolve_shared(shared, updates if params is None else params)
    g_shared, g_heads, treedef = ta.split_shared(updates, mask)
    return g_shared, g_heads, mask, treedef


def zeros_tree(params: PyTree, mask: PyTree, want_shared: bool) -> PyTree:
    """``[*shape]`` float32-or-wider zeros for the leaves selected by ``mask == want_shared``."""
    flat, treedef = jax.tree_util.tree_flatten(params, is_leaf=ta.is_variable)
    flags = jax.tree_util.tree_leaves(mask)

    def z(p: Any) -> jax.Array:
        v = jnp.asarray(p.get_value() if ta.is_variable(p) else p)
        return jnp.zeros(v.shape, jnp.promote_types(v.dtype, jnp.float32))

    out = [z(p) if f == want_shared else optax.MaskedNode() for p, f in zip(flat, flags)]
    return jax.tree_util.tree_unflatten(treedef, out)


def task_orders(key: jax.Array, num_tasks: int) -> jax.Array:
    """Random order of the *other* tasks for every task: int32 ``[T, T-1]``.

    Row ``i`` is ``others_i[jax.random.permutation(jax.random.split(key, T)[i], T-1)]``
    with ``others_i = [j for j in range(T) if j != i]`` (this exact recipe is
    part of the contract, so results are reproducible from ``key``).
    """
    t = num_tasks
    if t == 1:
        return jnp.zeros((1, 0), jnp.int32)
    keys = jax.random.split(key, t)
    base = jnp.arange(t - 1, dtype=jnp.int32)

    def row(i: jax.Array, k: jax.Array) -> jax.Array:
        others = base + (base >= i).astype(jnp.int32)
        return others[jax.random.permutation(k, t - 1)]

    return jax.vmap(row)(jnp.arange(t, dtype=jnp.int32), keys)


# ----------------------------------------------------------------------------
# the shared transform of the Gram-space methods
# ----------------------------------------------------------------------------

GRAMS = ("scaled", "leaf", "cosine")
Weighting = Callable[..., tuple[jax.Array, Mapping[str, Any]]]


def make_gradient_transform(
    name: str,
    num_tasks: int,
    weighting: Weighting,
    init_state: Callable[[PyTree], NamedTuple],
    *,
    shared: ta.SharedSpec,
    gram: str = "scaled",
    heads: Union[str, Callable[[NamedTuple], jax.Array]] = "sum",
    needs_losses: bool = False,
    needs_key: bool = False,
    keep_when_no_shared: bool = False,
    refresh: Optional[Callable[[NamedTuple], jax.Array]] = None,
    stale: Optional[Callable[[NamedTuple], tuple[jax.Array, Mapping[str, Any]]]] = None,
    advance: Optional[Callable[..., Mapping[str, Any]]] = None,
    postprocess: Optional[Callable[[list], list]] = None,
    accept: Optional[Callable[[jax.Array], jax.Array]] = None,
    hparams: Any = (),
    int_minimum: Sequence[tuple[Any, int]] = (),
) -> optax.GradientTransformationExtraArgs:
    """The Optax transform of a method that is a *weighting* of the task Gram matrix (TorchJD's view).

    ``update`` does, for every such method: validate the task axis, split the
    leaves into shared and head leaves (``shared``), form the Gram matrix of
    the shared task gradients, call ``weighting``, combine ``Σ_t w_t g_t`` over
    the shared leaves, give the heads their update, merge, and advance the state.
    A step whose Gram matrix is not finite (a NaN or inf shared gradient) is
    rejected: NaN update, old state (no NaN enters a method's state).

    Args:
      name: the method name (error messages).
      num_tasks: ``T``.
      weighting: ``weighting(gram, state, *, losses, key) -> (weights, fields)``:
        the task coefficients of the shared update (``[T]``, or ``[L, T]`` one
        row per shared leaf with ``gram="leaf"``; ``[1, T]`` is one row for all
        leaves) and the state fields to replace (``count`` is incremented here).
        ``gram`` is, by ``gram=``: ``"scaled"``: the ``[T, T]`` Gram matrix
        normalised to mean diagonal 1 (:func:`dbmtl_jax.methods._numerics.gram`);
        ``"leaf"``: one such matrix per shared leaf, ``[L, T, T]``;
        ``"cosine"``: ``(cos, norms)`` (:func:`dbmtl_jax.methods._numerics.task_cosine_gram`).
        ``losses`` is validated (``[T]``, float32 or wider) when
        ``needs_losses``, and a step with a non-finite loss is rejected (NaN
        update, old state); else passed as given; ``key`` likewise with ``needs_key``.
      init_state: ``init_state(params)``, the initial NamedTuple state.
      shared: which leaves are shared (see :func:`dbmtl_jax.task_axis.resolve_shared`).
      heads: the head (task-specific) leaves get ``"sum"`` (``Σ_t g_t``),
        ``"weighted"`` (``Σ_t w_t g_t`` with the shared weights) or
        ``Σ_t c_t g_t`` with ``c = heads(state)``.
      keep_when_no_shared: with no shared leaves, skip the weighting and keep the
        state's fields (else the weighting runs on the all-zero Gram matrix).
      refresh, stale: recompute the weights only when ``refresh(state)`` (a
        traced bool) holds; otherwise ``stale(state)`` gives ``(weights,
        fields)`` and the Gram matrix is not formed (``lax.cond``).
      advance: ``advance(state, *, losses, key) -> fields``, a state update that
        does not need the gradients (run on every update); a non-finite field
        it returns makes the step invalid (NaN update, old state).
      postprocess: applied to the combined shared leaves (e.g. norm clipping).
      accept: ``accept(weights) -> bool`` (traced): a step whose weights fail it
        is rejected as a whole: every update leaf NaN and the *old* state kept
        (:func:`dbmtl_jax.methods._numerics.reject_unless`), so
        :func:`dbmtl_jax.skip_invalid_steps` skips it and the next step starts
        from where this one did.  For weights that a finite Gram matrix can still
        make meaningless (underflowed to 0).
      hparams: the hyperparameters the factory checked (the values
        :func:`dbmtl_jax.methods._numerics.check_real` returned): one injected
        out of range (NaN) makes the step invalid in the same way, as does a
        traced integer of ``int_minimum`` (``(value, lo)`` pairs) below ``lo``.
    """
    nm.check_choice(gram, GRAMS, "gram", name)
    nm.check_shared(shared, name)

    def form_gram(g_shared: list) -> Any:
        if gram == "cosine":
            return nm.task_cosine_gram(g_shared, num_tasks)
        return nm.gram(g_shared, num_tasks, per_leaf=gram == "leaf")[0]

    def init_fn(params: PyTree) -> NamedTuple:
        # One buffer per leaf (init_state may reuse an array for several fields, as CAGrad's uniform
        # weights), so the state can be donated to a jitted step.
        return nm.unalias(init_state(params))

    def update_fn(
        updates: PyTree,
        state: NamedTuple,
        params: Optional[PyTree] = None,
        *,
        losses: Any = None,
        key: Any = None,
        **extra_args: Any,
    ) -> tuple[PyTree, NamedTuple]:
        del extra_args
        g_shared, g_heads, mask, treedef = split_updates(updates, params, shared, num_tasks)
        ta.check_state_matches_init(state, init_fn, updates, params, name, num_tasks)
        if needs_losses:
            losses = nm.check_losses(losses, num_tasks, name)
        if needs_key:
            key = require_key(key, name)
        fields: dict = {}
        weights, gram_ok = None, None
        if g_shared or not keep_when_no_shared:

            def fresh(_: Any = None) -> tuple[jax.Array, Mapping[str, Any], jax.Array]:
                # A non-finite shared gradient makes the Gram matrix non-finite: such a step is rejected
                # (NaN update, state kept) before it enters any state (GradVac's cosine targets, ...).
                g = form_gram(g_shared)
                return (*weighting(g, state, losses=losses, key=key), nm.all_finite(g))

            if refresh is None:
                weights, new, gram_ok = fresh()
            else:
                weights, new, gram_ok = jax.lax.cond(
                    refresh(state), fresh, lambda _: (*stale(state), jnp.asarray(True)), None)
            fields.update(new)
        if weights is None:
            out_shared = []
        elif weights.ndim == 1:
            out_shared = nm.combine(g_shared, weights)
        elif gram == "leaf":
            out_shared = nm.combine_per_leaf(g_shared, weights)
        else:
            out_shared = nm.combine(g_shared, weights[0])
        if postprocess is not None:
            out_shared = postprocess(out_shared)
        if heads == "sum":
            out_heads = nm.sum_heads(g_heads)
        elif heads == "weighted":
            out_heads = nm.combine(g_heads, weights)
        else:
            out_heads = nm.combine(g_heads, heads(state))
        advanced_ok = None
        if advance is not None:
            advanced = advance(state, losses=losses, key=key)
            # guard what is produced: a finite input can still overflow the advanced fields (IMTL's e^s ℓ)
            advanced_ok = nm.all_finite(advanced)
            fields.update(advanced)
        out = ta.merge_shared(out_shared, out_heads, mask, treedef)
        new_state = state._replace(count=optax.safe_increment(state.count), **fields)
        accepted = None if accept is None or weights is None else accept(weights)
        losses_ok = jnp.all(jnp.isfinite(losses)) if needs_losses else None  # a NaN/inf loss: invalid step
        ok = nm.conjoin(accepted, gram_ok, losses_ok, advanced_ok, nm.injected_ok(hparams, int_minimum))
        return nm.reject_unless(ok, out, new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
