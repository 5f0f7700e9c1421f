"""Pytree utilities for updates that carry a leading task axis.

Every multi-task transform in this library receives an updates pytree whose
leaves have shape ``[T, *param_shape]``: row ``t`` is the gradient of task
``t``.  This module holds the pieces they share: validating the task axis,
deciding which leaves are *shared* (trunk) and which are *task-specific*
(heads), global per-task norms, and flattening to a ``[T, P]`` matrix.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

PyTree = Any
SharedSpec = Union[None, bool, PyTree, Callable[[str], bool]]

__all__ = [
    "SharedSpec",
    "leaf_paths",
    "check_task_axis",
    "check_against_params",
    "check_real_float",
    "resolve_shared",
    "split_shared",
    "merge_shared",
    "task_sq_norms",
    "task_norms",
    "task_sq_norms_pair",
    "norms_from_pair",
    "flatten_tasks",
    "sum_tasks",
    "weighted_sum_tasks",
    "is_variable",
    "stacked_zeros",
    "stacked_zeros_tree",
    "check_state_leaves",
    "check_state_like",
    "check_state_matches_init",
]


def is_variable(x: Any) -> bool:
    """True for a Flax NNX ``Variable`` (duck-typed so flax stays optional) that holds a value.

    A Variable whose value is an ``optax.MaskedNode`` (what ``optax.masked`` / ``optax.partition`` make of
    a masked-out parameter of an NNX state) is not one: flattened, it has no leaves, as a bare
    ``MaskedNode`` has, so the masked parameter is skipped like in a plain pytree.
    """
    if not (type(x).__module__.startswith("flax.") and hasattr(x, "get_metadata") and hasattr(x, "get_value")):
        return False
    return not isinstance(x.get_value(), optax.MaskedNode)


def _path_str(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def leaf_paths(tree: PyTree) -> list[str]:
    """'/'-joined key paths of the leaves of ``tree`` (NNX Variables count as leaves)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)
    return [_path_str(p) for p, _ in flat]


def check_real_float(leaf: Any, where: str) -> None:
    """Rejects a leaf whose dtype is not a real floating type (trace time).

    Integer and boolean parameters cannot follow a gradient (they would silently
    never move), and complex ones would get ``x²`` instead of ``|x|²`` in every norm.
    """
    dtype = jnp.result_type(leaf.get_value() if is_variable(leaf) else leaf)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise ValueError(
            f"{where} is complex ({dtype}); complex parameters are not supported (norms and inner "
            "products would use x² instead of |x|²). Split them into real and imaginary parts."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{where} has dtype {dtype}; only real floating-point leaves can be updated by gradients "
            "(an integer or boolean parameter would silently never move). Keep it out of the optimized pytree."
        )


def check_task_axis(
    updates: PyTree, num_tasks: Optional[int], name: str = "updates", params: Optional[PyTree] = None
) -> int:
    """Checks that every leaf of ``updates`` has the same leading (task) size.

    Returns that size ``T``.  Raises ``ValueError`` naming the first offending
    leaf when a leaf is a scalar, when leading sizes differ, when they differ
    from ``num_tasks``, when a leaf is not real floating point, or (with
    ``params``) when a leaf is not ``[T, *param_shape]`` for its parameter.
    Runs at trace time (shapes are static).
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(updates)
    if not flat:
        raise ValueError(f"{name} is an empty pytree; there is nothing to update.")
    if params is not None:
        _check_not_param_shaped(updates, params, num_tasks, name)
    sizes = {}
    for path, leaf in flat:
        check_real_float(leaf, f"{name} leaf '{_path_str(path)}'")
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"{name} leaf '{_path_str(path)}' is a scalar and has no leading task axis; "
                f"every leaf must have shape [T, *param_shape]."
            )
        sizes.setdefault(shape[0], _path_str(path))
    if len(sizes) > 1:
        desc = ", ".join(f"'{p}' has {s}" for s, p in sizes.items())
        raise ValueError(f"{name} leaves disagree on the leading task-axis size: {desc}.")
    (t,) = sizes
    if num_tasks is not None and t != num_tasks:
        raise ValueError(
            f"{name} have a leading task axis of size {t} (leaf '{sizes[t]}'), "
            f"but the transform was built for num_tasks={num_tasks}."
        )
    if params is not None:
        check_against_params(updates, params, t, name)
    return int(t)


MISSING_TASK_AXIS_HINT = (
    "it lacks the leading task axis: a plain jax.grad of the summed loss (use "
    "dbmtl_jax.value_and_task_grads for per-task gradients), or optax.MultiSteps around the chain (its "
    "accumulator drops the task axis; use dbmtl_jax.TaskMultiSteps)"
)


def _check_not_param_shaped(updates: PyTree, params: PyTree, num_tasks: Optional[int], name: str) -> None:
    """Raises when an update leaf has exactly its parameter's shape (no task axis), before any size check,
    so that such a gradient is not reported as "a leading task axis of size <param_shape[0]>"."""
    u_flat, _ = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_variable)
    p_flat = jax.tree_util.tree_leaves(params, is_leaf=is_variable)
    if len(u_flat) != len(p_flat):
        return  # a structure mismatch: check_against_params names it
    for (path, u), p in zip(u_flat, p_flat):
        u_shape = tuple(jnp.shape(u.get_value() if is_variable(u) else u))
        p_shape = tuple(jnp.shape(p.get_value() if is_variable(p) else p))
        if u_shape == p_shape:
            want = "[num_tasks, *param_shape]" + ("" if num_tasks is None else f" = {(num_tasks,) + p_shape}")
            raise ValueError(
                f"{name} leaf '{_path_str(path)}' has shape {u_shape}, its parameter's shape; expected {want}: "
                f"{MISSING_TASK_AXIS_HINT}."
            )


def check_against_params(updates: PyTree, params: PyTree, num_tasks: int, name: str = "updates") -> None:
    """Checks that every leaf of ``updates`` is ``[T, *param_shape]`` for its parameter (trace time).

    Without this, a head gradient of shape ``[T, 1, 5]`` for a ``[4, 5]``
    parameter would be summed to ``[1, 5]`` and then silently broadcast onto
    the parameter by the optimizer.
    """
    u_flat, _ = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_variable)
    p_flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)
    if len(u_flat) != len(p_flat):
        raise ValueError(
            f"{name} have {len(u_flat)} leaves but the parameters have {len(p_flat)}; "
            "every parameter needs one [T, *param_shape] update leaf."
        )
    for (path, u), (_, p) in zip(u_flat, p_flat):
        p = p.get_value() if is_variable(p) else p
        u = u.get_value() if is_variable(u) else u
        want = (num_tasks,) + tuple(jnp.shape(p))
        if tuple(jnp.shape(u)) != want:
            hint = " (it lacks the leading task axis)" if tuple(jnp.shape(u)) == tuple(jnp.shape(p)) else ""
            raise ValueError(
                f"{name} leaf '{_path_str(path)}' has shape {tuple(jnp.shape(u))} but its parameter has shape "
                f"{tuple(jnp.shape(p))}; expected [num_tasks, *param_shape] = {want}{hint}."
            )


def resolve_shared(shared: SharedSpec, tree: PyTree) -> PyTree:
    """Turns a ``shared`` specification into a bool pytree with ``tree``'s structure.

    ``shared`` may be ``None`` or ``True`` (every leaf shared), ``False`` (no leaf
    shared), a pytree of bools with the same structure as ``tree``, or a callable
    taking a leaf's '/'-joined path (for example ``"heads/0/kernel"``) and
    returning ``True`` for shared leaves.  Flax NNX Variables in ``tree`` are
    treated as leaves, so the same callable works for ``init`` (Variables) and
    ``update`` (raw arrays).

    A callable that selects no leaf warns (``UserWarning``, once per trace): with
    no shared leaf every method is the plain sum Σ_t g_t, which is what a
    mistyped path prefix gives (``"trunk"`` for an HPS model's ``"encoder/..."``).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)
    if shared is None or shared is True or shared is False:
        value = shared is not False
        return jax.tree_util.tree_unflatten(treedef, [value] * len(flat))
    if callable(shared):
        values = []
        for path, _ in flat:
            p = _path_str(path)
            if p.endswith("/value"):
                p = p[: -len("/value")]
            v = shared(p)
            if not isinstance(v, (bool, jnp.bool_)):
                raise TypeError(f"shared(path) must return a bool; got {type(v).__name__} for '{p}'.")
            values.append(bool(v))
        if flat and not any(values):
            warnings.warn(
                "the shared= predicate selects no leaf, so every leaf is task-specific and the multi-task method "
                "reduces to the plain sum of the task gradients; the leaf paths it was called with are e.g. "
                f"{', '.join(repr(_path_str(p)) for p, _ in flat[:3])}.",
                UserWarning,
                stacklevel=2,
            )
        return jax.tree_util.tree_unflatten(treedef, values)
    mask_flat, mask_def = jax.tree_util.tree_flatten(shared)
    if mask_def.num_leaves != len(flat) or len(mask_flat) != len(flat):
        raise ValueError(
            f"the shared mask has {len(mask_flat)} leaves but the parameters have {len(flat)}; "
            f"it must be a bool pytree with the parameters' structure."
        )
    # Same leaf count is not enough: (True, False) on {"trunk": ..., "heads": ...} would silently pair
    # the flags with the leaves in flattening order.  Accept the parameters' structure with NNX
    # Variables as leaves, or the plain flattening of the parameters.
    if mask_def != treedef and mask_def != jax.tree_util.tree_structure(tree):
        raise ValueError(
            "the shared mask does not have the parameters' structure: mask "
            f"{mask_def} vs parameters {treedef}. Build it with the parameters' containers and keys, "
            "e.g. jax.tree.map(lambda _: True, params), or pass a callable on the leaf path."
        )
    for m in mask_flat:
        if not isinstance(m, (bool, jnp.bool_)):
            raise TypeError(f"the shared mask must hold Python bools; found {type(m).__name__}.")
    return jax.tree_util.tree_unflatten(treedef, [bool(m) for m in mask_flat])


def split_shared(tree: PyTree, mask: PyTree) -> tuple[list, list, Any]:
    """Flattens ``tree`` and returns ``(shared_leaves, head_leaves, treedef)``."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    flags = jax.tree_util.tree_leaves(mask)
    if len(flags) != len(leaves):
        raise ValueError(f"shared mask has {len(flags)} leaves but the tree has {len(leaves)}.")
    shared = [x for x, f in zip(leaves, flags) if f]
    heads = [x for x, f in zip(leaves, flags) if not f]
    return shared, heads, treedef


def merge_shared(shared: list, heads: list, mask: PyTree, treedef: Any) -> PyTree:
    """Inverse of :func:`split_shared`."""
    flags = jax.tree_util.tree_leaves(mask)
    it_s, it_h = iter(shared), iter(heads)
    return jax.tree_util.tree_unflatten(treedef, [next(it_s) if f else next(it_h) for f in flags])


def task_sq_norms(leaves: list, dtype: Any = jnp.float32) -> jax.Array:
    """Squared global L2 norm of each task row over all ``leaves``: shape ``[T]``."""
    total = None
    for x in leaves:
        x = x.astype(jnp.promote_types(x.dtype, dtype))
        s = jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=1)
        total = s if total is None else total + s
    return total


def _overflow_scale(dtype: Any) -> float:
    """``2^-(maxexp/2)``: scaled by it, squares of any representable norm stay finite."""
    return 2.0 ** -(jnp.finfo(dtype).maxexp // 2)


def task_sq_norms_pair(leaves: list, dtype: Any = jnp.float32, *, small: bool = False) -> jax.Array:
    """``[2, T]``: each task row's squared norm, plain and computed on the row times
    ``s = 2^-(maxexp/2)`` (one pass over the leaves, two reductions); see :func:`norms_from_pair`.
    With ``small``, ``[3, T]``: a third reduction on the row times ``1/s``, for norms whose plain
    squares underflow (below ~5e-20 in float32); a caller that streams rows adds it while they are
    at hand instead of passing the rows to :func:`norms_from_pair` later."""
    scale = _overflow_scale(dtype)
    return _scaled_sq_sums(leaves, dtype, (1.0, scale, 1.0 / scale) if small else (1.0, scale))


def _scaled_sq_sums(leaves: list, dtype: Any, factors: tuple) -> jax.Array:
    """``[len(factors), T]``: ``Σ (f·x)²`` over each task row of the leaves, for each factor ``f``.

    Each factor other than 1 goes through ``lax.optimization_barrier`` (a scalar, so nothing else is
    kept from fusing): as a visible constant, XLA's simplifier may rewrite ``(f·x)²`` as ``f²·x²``, and
    ``f²`` is 0 or inf in the dtype (it did for single-element leaves: 0 → NaN, 1e25 → NaN).
    """
    total = None
    for x in leaves:
        x = x.astype(jnp.promote_types(x.dtype, dtype)).reshape(x.shape[0], -1)
        fs = [None if f == 1.0 else jax.lax.optimization_barrier(jnp.asarray(f, x.dtype)) for f in factors]
        s = jnp.stack([jnp.sum(jnp.square(x if f is None else x * f), axis=1) for f in fs])
        total = s if total is None else total + s
    return total


def norms_from_pair(sq_pair: jax.Array, leaves: Optional[list] = None) -> jax.Array:
    """``‖x_t‖`` from :func:`task_sq_norms_pair`'s rows: finite and accurate whenever the true norm is
    representable.

    The plain sum of squares overflows for norms above ~1.8e19 in float32
    although the norm itself is representable; there the down-scaled sum is
    exact (entries small enough to underflow in it are negligible against such
    a norm).  It also underflows, towards 0, for tiny norms: a norm whose plain
    square is below ``s = 2^-(maxexp/2)`` (norm below ~2.3e-10 in float32) is
    taken from the up-scaled sum, the third row of ``sq_pair`` if it has one,
    else recomputed from the rows ``leaves`` (``[T, ...]`` each) inside a
    ``lax.cond``, so that a step without such a norm reads them no third time.
    Without either, tiny norms are the plain ones.
    """
    sq, sq_down = sq_pair[0], sq_pair[1]
    scale = _overflow_scale(sq_pair.dtype)
    norms = jnp.where(jnp.isfinite(sq), jnp.sqrt(sq), jnp.sqrt(sq_down) / scale)
    tiny = sq < scale  # a norm below 2^-(maxexp/4): its squares may have underflowed
    if sq_pair.shape[0] == 3:
        return jnp.where(tiny, jnp.sqrt(sq_pair[2]) * scale, norms)
    if leaves is None:
        return norms

    def rescaled(_: Any) -> jax.Array:
        up = _scaled_sq_sums(leaves, sq_pair.dtype, (1.0 / scale,))[0]
        return jnp.where(tiny, jnp.sqrt(up) * scale, norms)

    return jax.lax.cond(jnp.any(tiny), rescaled, lambda _: norms, None)


def task_norms(tree: PyTree, dtype: Any = jnp.float32) -> jax.Array:
    """Global L2 norm of each task's slice of ``tree``: ``‖g_t‖`` over all leaves, shape ``[T]``.

    Computed in ``dtype`` promoted with the leaves' dtypes, overflow-safe (each
    task's entries are scaled by the largest one before squaring, so norms up
    to the dtype's maximum come out finite), by the methods' one task-norm
    function :func:`dbmtl_jax.methods._numerics.task_norms`.
    """
    from dbmtl_jax.methods import _numerics  # here, not at the top: _numerics imports this module

    return _numerics.task_norms(tree, dtype)


def flatten_tasks(tree: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    """Concatenates every leaf into a ``[T, P]`` matrix; returns it and an inverse.

    The inverse maps a ``[P]`` vector back to the tree without task axis, or a
    ``[T, P]`` matrix back to the tree with it.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    t = leaves[0].shape[0]
    shapes = [x.shape[1:] for x in leaves]
    dtypes = [x.dtype for x in leaves]
    sizes = [math.prod(s) for s in shapes]
    mat = jnp.concatenate([x.reshape(t, -1) for x in leaves], axis=1)

    def unflatten(v: jax.Array) -> PyTree:
        lead = v.shape[:-1]
        out, start = [], 0
        for s, d, n in zip(shapes, dtypes, sizes):
            out.append(v[..., start : start + n].reshape(lead + tuple(s)).astype(d))
            start += n
        return jax.tree_util.tree_unflatten(treedef, out)

    return mat, unflatten


def sum_tasks(tree: PyTree) -> PyTree:
    """Sum over the leading task axis of every leaf."""
    return jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), tree)


def weighted_sum_tasks(tree: PyTree, weights: jax.Array) -> PyTree:
    """``Σ_t w_t x_t`` for every leaf, computed in float32 or wider and cast back.

    The methods' one combination, :func:`dbmtl_jax.methods._numerics.combine`, on the leaves of ``tree``.
    """
    from dbmtl_jax.methods import _numerics  # here, not at the top: _numerics imports this module

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return jax.tree_util.tree_unflatten(treedef, _numerics.combine(leaves, jnp.asarray(weights)))


def stacked_zeros(leaf: Any, num_tasks: int, dtype: Any = None) -> Any:
    """Zeros of shape ``[T, *leaf.shape]`` for per-task optimizer state.

    The dtype is ``dtype``, or the leaf's dtype promoted to at least float32.
    The leaf's sharding is kept with the task axis prepended and unsharded: for
    a Flax NNX Variable its sharding metadata (``out_sharding`` and the older
    names) gets a leading ``None``; an array placed with a ``NamedSharding``
    gives a state array with ``PartitionSpec(None, *spec)``.
    """
    if is_variable(leaf):
        updates = {}
        for key, spec in leaf.get_metadata().items():
            if key in ("out_sharding", "sharding", "sharding_names", "optimizer_sharding") and spec is not None:
                updates[key] = (None,) + tuple(spec)
        return leaf.replace(stacked_zeros(leaf.get_value(), num_tasks, dtype), **updates)
    value = jnp.asarray(leaf)
    dtype = jnp.promote_types(value.dtype, jnp.float32) if dtype is None else dtype
    shape = (num_tasks,) + tuple(value.shape)
    sharding = getattr(value, "sharding", None) if not isinstance(value, jax.core.Tracer) else None
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (value.ndim - len(sharding.spec))
        target = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *spec))
        return jax.device_put(jnp.zeros(shape, dtype), target)
    return jnp.zeros(shape, dtype)


def stacked_zeros_tree(params: PyTree, mask: PyTree, num_tasks: int, dtype: Any = None) -> PyTree:
    """:func:`stacked_zeros` for the shared leaves of ``params``, ``optax.MaskedNode()`` for heads."""
    flat, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_variable)
    flags = jax.tree_util.tree_leaves(mask)
    out = [stacked_zeros(p, num_tasks, dtype) if f else optax.MaskedNode() for p, f in zip(flat, flags)]
    return jax.tree_util.tree_unflatten(treedef, out)


def check_state_like(state: PyTree, expected: PyTree, method: str, num_tasks: int) -> None:
    """Checks that ``state`` has the leaves, and leaf shapes, of ``expected`` (trace time).

    ``expected`` is what the method's ``init`` gives for these parameters, typically
    ``jax.eval_shape(init, params)`` (no computation).  A state of another run (another ``num_tasks``,
    shared mask or parameter structure, restored by a checkpointer that does not check shapes, as
    ``flax.serialization.from_bytes``) would otherwise fail with a raw JAX error or, for a ``[1]`` field,
    broadcast silently over the tasks.  Raises ``ValueError`` naming the field and both shapes.
    """
    e_flat = jax.tree_util.tree_flatten_with_path(expected)[0]
    s_flat = jax.tree_util.tree_leaves(state)
    hint = ("a checkpoint of another run (another num_tasks, shared mask or parameter structure)? "
            "flax.serialization.from_bytes restores without checking shapes.")
    if len(s_flat) != len(e_flat):
        raise ValueError(
            f"{method}: the state has {len(s_flat)} array leaves but this {method} (num_tasks={num_tasks}) keeps "
            f"{len(e_flat)} ({type(expected).__name__}); the state of another transform, or {hint}"
        )
    for (path, e), s in zip(e_flat, s_flat):
        if tuple(jnp.shape(s)) != tuple(e.shape):
            field = jax.tree_util.keystr(path, simple=True, separator=".")
            raise ValueError(
                f"{method}: state field '{field}' has shape {tuple(jnp.shape(s))} but this {method} "
                f"(num_tasks={num_tasks}) expects {tuple(e.shape)}: {hint}"
            )


def init_shapes(init: Callable[..., PyTree], *args: Any) -> Optional[PyTree]:
    """``jax.eval_shape(init, *args)``, or ``None`` where ``init`` cannot be traced here.

    Under ``optax.inject_hyperparams`` the transform is rebuilt inside ``update`` with the injected values
    traced; an ``init`` that reads one of them as a Python value (IGBv2's ``seed`` and ``init_alpha``, used
    only at ``init``) cannot be re-derived then, and the state's shapes are not checked for that update.
    """
    try:
        return jax.eval_shape(init, *args)
    except jax.errors.JAXTypeError:
        return None


def check_state_matches_init(
    state: PyTree, init: Callable[[PyTree], PyTree], updates: PyTree, params: Optional[PyTree], method: str,
    num_tasks: int,
) -> None:
    """:func:`check_state_like` against ``jax.eval_shape(init, params)`` (trace time, no computation;
    skipped where :func:`init_shapes` cannot trace ``init``).

    Without ``params``, ``init`` sees parameters shaped like the (validated) ``[T, *param_shape]`` update
    leaves minus the task axis.
    """
    like = params
    if like is None:
        like = jax.tree_util.tree_map(lambda u: jax.ShapeDtypeStruct(jnp.shape(u)[1:], jnp.result_type(u)), updates)
    expected = init_shapes(init, like)
    if expected is not None:
        check_state_like(state, expected, method, num_tasks)


def check_state_leaves(
    updates: PyTree, mask: PyTree, g_shared: list, state_leaves: list, method: str, what: str,
    dtypes: Optional[list] = None, dtype_note: str = "",
) -> None:
    """Checks that per-shared-leaf ``[T, *shape]`` state matches the shared update leaves (trace time).

    With ``dtypes`` (one expected dtype per state leaf, ``None`` for any), a state leaf of another dtype
    is a ``ValueError`` too (``dtype_note`` says where the expected dtype comes from).
    """
    if len(state_leaves) != len(g_shared):
        raise ValueError(
            f"updates have {len(g_shared)} shared leaves but the {method} state ({what}) has "
            f"{len(state_leaves)}; the shared mask or the parameter structure changed since init."
        )
    paths = [p for p, f in zip(leaf_paths(updates), jax.tree_util.tree_leaves(mask)) if f]
    for path, g, m in zip(paths, g_shared, state_leaves):
        if g.shape != m.shape:
            hint = " (does this leaf lack the leading task axis?)" if g.ndim + 1 == m.ndim else ""
            raise ValueError(
                f"update leaf '{path}' has shape {g.shape} but its {method} state ({what}) has shape "
                f"{m.shape} = [num_tasks, *param_shape]{hint}."
            )
    for path, m, want in zip(paths, state_leaves, dtypes or []):
        if want is not None and jnp.dtype(m.dtype) != jnp.dtype(want):
            raise ValueError(
                f"the {method} state ({what}) of leaf '{path}' has dtype {jnp.dtype(m.dtype)} but this transform keeps "
                f"it in {jnp.dtype(want)} ({dtype_note}): a checkpoint of another run? Build the transform with the "
                f"dtype of the state to continue it, or cast the restored state to {jnp.dtype(want)}."
            )
