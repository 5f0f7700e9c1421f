"""Private helpers shared by the projection / closed-form / stateful gradient methods.

Most of these methods only ever form linear combinations of the task gradients
``g_1 … g_T`` of the shared parameters.  They are therefore computed in *Gram
space*: the ``[T, T]`` Gram matrix ``G_ij = ⟨g_i, g_j⟩`` (summed over all shared
leaves, without concatenating them) drives a small solver that returns mixing
coefficients ``c``, and the update is ``Σ_t c_t g_t`` leaf by leaf.  The Gram
matrix is formed from gradients pre-divided by their largest absolute entry and
then rescaled so that its largest diagonal entry is 1, which keeps float32
reductions finite for gradients anywhere between 1e-10 and 1e10; all the
solvers used here are invariant to that common scale.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dbmtl_jax import task_axis as ta

PyTree = Any
HIGHEST = jax.lax.Precision.HIGHEST

GRANULARITIES = ("global", "leaf")
_F = TypeVar("_F", bound=Callable[..., Any])

__all__ = [
    "GRANULARITIES",
    "full_precision",
    "check_num_tasks",
    "check_choice",
    "check_real",
    "check_bool",
    "check_optimizer",
    "is_traced",
    "require_losses",
    "require_key",
    "acc_dtype",
    "split_updates",
    "state_dtype",
    "zeros_tree",
    "max_abs",
    "leaf_grams",
    "normalized_gram",
    "leaf_task_norms",
    "task_norms",
    "combine",
    "combine_per_leaf",
    "task_orders",
    "project_simplex",
    "safe_div",
    "sum_heads",
]


def full_precision(fn: _F) -> _F:
    """Traces ``fn`` with full-float32 matmuls (accelerators default to TF32/bf16 passes).

    Used for the small ``T × T`` solvers (eigh, lstsq, projections), where the
    cost is negligible and ~1e-3 relative matmul errors would be visible.
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def check_num_tasks(num_tasks: Any, method: str) -> int:
    """Validates ``num_tasks`` (a static positive Python int)."""
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(
            f"{method}: num_tasks must be a positive Python int (it sizes the state), got {num_tasks!r}; "
            "under optax.inject_hyperparams pass static_args=('num_tasks',)."
        )
    return num_tasks


def check_choice(value: Any, options: Sequence[str], option: str, method: str) -> str:
    """Raises ``ValueError`` naming ``option`` when ``value`` is not one of ``options``."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{method}: unknown {option}={value!r}; expected one of {tuple(options)}.")
    return value


def is_traced(value: Any) -> bool:
    """True for a JAX tracer: a hyperparameter traced under ``jit`` (e.g. ``optax.inject_hyperparams``
    re-building the transform inside a jitted ``update``).  Tracers are not validated."""
    return isinstance(value, jax.core.Tracer)


def _range_text(lo: Optional[float], hi: Optional[float], lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return ""


def check_real(
    value: Any,
    option: str,
    method: str,
    *,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    lo_open: bool = False,
    hi_open: bool = False,
    shapes: Sequence[tuple] = ((),),
    note: str = "",
) -> Any:
    """Validates a real-valued hyperparameter and returns it unchanged.

    ``value`` may be a Python number, a NumPy scalar or a concrete JAX array
    (what ``optax.inject_hyperparams`` passes at ``init``) whose shape is one of
    ``shapes`` (default: a scalar); every entry must be finite and lie in the
    range ``lo .. hi`` (bounds excluded with ``lo_open`` / ``hi_open``).  A
    tracer is returned unchecked.  Raises ``TypeError`` for a non-number and
    ``ValueError`` (``"<method>: <option> must be ..."``) for a bad shape or value;
    ``note`` is appended to the message (why the range).
    """
    if is_traced(value):
        return value
    rng = _range_text(lo, hi, lo_open, hi_open)
    shapes = [tuple(s) for s in shapes]
    what = f"a finite number {rng}".rstrip()
    arrays = " or ".join(str(s) for s in shapes if s)
    if arrays:
        entries = f"an array of shape {arrays} of finite numbers {rng}".rstrip()
        what = f"{what} or {entries}" if () in shapes else entries
    suffix = f" ({note})" if note else ""
    arr = None
    if not isinstance(value, (bool, np.bool_, str, bytes)) and value is not None:
        try:
            arr = np.asarray(value)
        except Exception:  # noqa: BLE001 - anything that is not array-like is the wrong type
            arr = None
    if arr is None or arr.dtype.kind not in "iuf":
        raise TypeError(f"{method}: {option} must be {what}, got {type(value).__name__} {value!r}.")
    if arr.shape not in shapes:
        shown = " or ".join((["be a scalar"] if () in shapes else []) + ([f"have shape {arrays}"] if arrays else []))
        raise ValueError(f"{method}: {option} must {shown}, got shape {arr.shape}.")
    x = arr.astype(np.float64)
    ok = np.isfinite(x)
    if lo is not None:
        ok &= (x > lo) if lo_open else (x >= lo)
    if hi is not None:
        ok &= (x < hi) if hi_open else (x <= hi)
    if not np.all(ok):
        shown = repr(arr.item()) if arr.ndim == 0 else repr(arr.tolist())
        raise ValueError(f"{method}: {option} must be {what}, got {shown}{suffix}.")
    return value


def check_bool(value: Any, option: str, method: str) -> bool:
    """A Python (or NumPy) bool flag; ``TypeError`` naming ``option`` otherwise."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{method}: {option} must be a bool, got {type(value).__name__} {value!r}.")
    return bool(value)


def check_optimizer(value: Any, option: str, method: str) -> Any:
    """``None`` or an Optax ``GradientTransformation`` (anything with callable ``init`` and ``update``)."""
    if value is not None and not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        raise TypeError(
            f"{method}: {option} must be None or an optax.GradientTransformation "
            f"(e.g. optax.adam(1e-4)), got {type(value).__name__} {value!r}."
        )
    return value


def require_losses(losses: Any, num_tasks: int, method: str) -> jax.Array:
    """The ``losses=`` extra argument as a float ``[T]`` vector (float32 or wider)."""
    if losses is None:
        raise ValueError(
            f"{method} needs the task losses: call update(..., losses=<array of shape [{num_tasks}]>)."
        )
    losses = jnp.asarray(losses)
    if losses.shape != (num_tasks,):
        raise ValueError(f"{method}: losses= must have shape [{num_tasks}] (one per task), got {losses.shape}.")
    if not jnp.issubdtype(losses.dtype, jnp.floating):
        losses = losses.astype(jnp.float32)
    return losses.astype(jnp.promote_types(losses.dtype, jnp.float32))


def require_key(key: Any, method: str) -> jax.Array:
    """The ``key=`` extra argument (a JAX PRNG key, new-style or raw uint32)."""
    if key is None:
        raise ValueError(f"{method} is randomised and needs a PRNG key: call update(..., key=jax.random.key(...)).")
    return key


def acc_dtype(leaves: Sequence[jax.Array]) -> Any:
    """Accumulation dtype: the leaves' common dtype promoted to at least float32."""
    dt = jnp.float32
    for x in leaves:
        dt = jnp.promote_types(dt, x.dtype)
    return dt


def state_dtype(params: PyTree, mask: PyTree) -> Any:
    """Dtype for small float state (norms, targets, weights): float32 or the widest shared dtype."""
    flat = jax.tree_util.tree_leaves(params, is_leaf=ta.is_variable)
    flags = jax.tree_util.tree_leaves(mask)
    dt = jnp.dtype(jnp.float32)
    for p, f in zip(flat, flags):
        if f:
            v = p.get_value() if ta.is_variable(p) else p
            dt = jnp.promote_types(dt, jnp.asarray(v).dtype)
    return dt


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


def sum_heads(leaves: Sequence[jax.Array]) -> list:
    """Plain ``Σ_t g_t`` per leaf, accumulated in float32 or wider, cast back."""
    return [jnp.sum(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=0).astype(x.dtype) for x in leaves]


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den != 0``, else 0 (no NaN/Inf leaks through ``where``)."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def max_abs(leaves: Sequence[jax.Array], dtype: Any) -> jax.Array:
    """Largest absolute entry over ``leaves`` (1 when all are zero), as ``dtype``."""
    m = jnp.zeros([], dtype)
    for x in leaves:
        if x.size:
            m = jnp.maximum(m, jnp.max(jnp.abs(x)).astype(dtype))
    return jnp.where(m > 0, m, jnp.ones([], dtype))


def leaf_grams(leaves: Sequence[jax.Array], dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Per-leaf Gram matrices of ``g / a`` with ``a`` the largest absolute entry.

    Returns ``(grams [L, T, T], a)``: ``grams[l] = X_l X_lᵀ / a²`` with ``X_l``
    leaf ``l`` reshaped to ``[T, -1]``.
    """
    a = max_abs(leaves, dtype)
    out = []
    for x in leaves:
        y = (x.astype(dtype) / a).reshape(x.shape[0], -1)
        out.append(jnp.matmul(y, y.T, precision=HIGHEST))
    return jnp.stack(out), a


def leaf_task_norms(leaves: Sequence[jax.Array], dtype: Any) -> jax.Array:
    """``‖g_t‖`` of every task on every leaf, ``[L, T]`` in ``dtype`` (each leaf pre-scaled by its max)."""
    out = []
    for x in leaves:
        a = max_abs([x], dtype)
        y = (x.astype(dtype) / a).reshape(x.shape[0], -1)
        out.append(a * jnp.sqrt(jnp.sum(y * y, axis=1)))
    return jnp.stack(out)


def task_norms(leaves: Sequence[jax.Array], dtype: Any) -> jax.Array:
    """Global ``‖g_t‖`` over all ``leaves``, ``[T]`` in ``dtype`` (pre-scaled by the global max)."""
    a = max_abs(leaves, dtype)
    total = None
    for x in leaves:
        y = (x.astype(dtype) / a).reshape(x.shape[0], -1)
        s = jnp.sum(y * y, axis=1)
        total = s if total is None else total + s
    return a * jnp.sqrt(total)


def normalized_gram(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rescales a Gram matrix to a largest diagonal of 1; returns ``(gram / s, s)`` (``s = 1`` for zeros)."""
    s = jnp.max(jnp.diagonal(gram, axis1=-2, axis2=-1), axis=-1)
    s = jnp.where(s > 0, s, jnp.ones_like(s))
    return gram / s[..., None, None], s


def combine(leaves: Sequence[jax.Array], coeffs: jax.Array) -> list:
    """``Σ_t c_t g_t`` for every leaf, computed in float32 or wider, cast back to the leaf dtype."""
    out = []
    for x in leaves:
        acc = jnp.promote_types(jnp.promote_types(x.dtype, jnp.float32), coeffs.dtype)
        out.append(jnp.tensordot(coeffs.astype(acc), x.astype(acc), axes=(0, 0), precision=HIGHEST).astype(x.dtype))
    return out


def combine_per_leaf(leaves: Sequence[jax.Array], coeffs: jax.Array) -> list:
    """Like :func:`combine` with one coefficient row per leaf: ``coeffs`` is ``[L, T]``."""
    return [combine([x], coeffs[i])[0] for i, x in enumerate(leaves)]


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


def project_simplex(v: jax.Array) -> jax.Array:
    """Euclidean projection of ``v`` ``[T]`` onto the probability simplex (sort-based, exact)."""
    t = v.shape[0]
    big = jnp.finfo(v.dtype).max / 4
    v = jnp.where(jnp.isnan(v), -big, jnp.clip(v, -big, big))
    # shift by the max so that huge entries do not lose the simplex offset to rounding
    v = v - jnp.max(v)
    u = jnp.sort(v)[::-1]
    css = jnp.cumsum(u) - 1.0
    idx = jnp.arange(1, t + 1, dtype=v.dtype)
    cond = u - css / idx > 0
    rho = jnp.max(jnp.where(cond, jnp.arange(t), 0))
    theta = css[rho] / (rho + 1).astype(v.dtype)
    return jnp.maximum(v - theta, 0)
