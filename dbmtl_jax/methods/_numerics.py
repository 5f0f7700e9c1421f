"""The one numerics kit of the multi-task methods (private).

Every method module takes its small numerical building blocks from here, so
that each exists once:

* :func:`highest_precision`: the precision decorator of the small ``T × T``
  solvers (full-float32 matmuls on accelerators).
* argument checks: :func:`check_num_tasks`, :func:`check_int`,
  :func:`check_real`, :func:`check_bool`, :func:`check_choice`,
  :func:`check_optimizer` (construction time; a traced value out of range
  becomes NaN, see :func:`check_real`),
  :func:`check_static` (a tracer is refused), :func:`check_shared` and
  :func:`check_losses` (the ``losses=`` extra argument of ``update``).
* dtypes: :func:`acc_dtype` (float32 or wider), :func:`state_dtype`.
* Gram matrices of per-task gradients (leaves ``[T, *shape]``): :func:`gram`
  (one common overflow-safe scaling, normalised by :func:`normalize_gram`) and
  :func:`task_cosine_gram` (each task scaled by its own largest entry: task
  norms and cosines, exact at any relative scale of the tasks).
* norms: :func:`task_norms` (``‖g_t‖``, global or per leaf; also the public
  :func:`dbmtl_jax.task_axis.task_norms`) and :func:`global_norm` (no task
  axis), both overflow-safe.
* combinations: :func:`combine` (``Σ_t c_t g_t`` per leaf), :func:`combine_per_leaf`,
  :func:`sum_heads` (plain ``Σ_t g_t``), all accumulated in float32 or wider.
* :func:`project_simplex` (``optax.projections.projection_simplex`` on a
  sanitised input) and :func:`safe_div`.
* guarding what a step produces: :func:`all_finite` and :func:`reject_unless`
  (a state that overflowed on finite input is kept as it was and the update is
  NaN, so the step is visibly invalid).

Why not ``optax.tree_utils`` for the norms, scalar products and weighted sums:
those reduce over the whole pytree without a task axis and square the raw
entries (``tree_l2_norm`` overflows in float32 for entries above ~1e19 and
underflows below ~1e-19), while the solvers need the ``[T, T]`` products over
all leaves, scaled by the largest entry first, to stay exact for gradients
anywhere between 1e-10 and 1e10 (``tests/methods/test_solver_scaling_*.py``).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Optional, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.guard import finite_flags, select_step

PyTree = Any
HIGHEST = jax.lax.Precision.HIGHEST
_F = TypeVar("_F", bound=Callable[..., Any])

__all__ = [
    "HIGHEST",
    "highest_precision",
    "is_traced",
    "check_static",
    "check_shared",
    "require_key",
    "low_precision_hint",
    "check_num_tasks",
    "check_int",
    "check_real",
    "nan_unless_in_range",
    "check_bool",
    "check_choice",
    "check_optimizer",
    "check_losses",
    "acc_dtype",
    "state_dtype",
    "max_abs",
    "normalize_gram",
    "gram",
    "task_cosine_gram",
    "task_norms",
    "global_norm",
    "combine",
    "combine_per_leaf",
    "sum_heads",
    "safe_div",
    "all_finite",
    "injected_ok",
    "conjoin",
    "reject_unless",
    "project_simplex",
    "unalias",
]


# ----------------------------------------------------------------------------
# precision
# ----------------------------------------------------------------------------


def highest_precision(fn: _F) -> _F:
    """Traces ``fn`` with full-float32 matmuls (no TF32/bf16 passes on accelerators).

    The solvers work with ``T × T`` matrices (eigh, lstsq, projections, active
    sets), so the cost is negligible, while the default reduced-precision
    matmuls of some GPUs/TPUs (~1e-3 relative) would spoil the KKT conditions
    they are meant to satisfy.
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


# ----------------------------------------------------------------------------
# argument checks (construction time)
# ----------------------------------------------------------------------------


def is_traced(value: Any) -> bool:
    """True for a JAX tracer: a hyperparameter traced under ``jit`` (e.g. ``optax.inject_hyperparams``
    re-building the transform inside a jitted ``update``).  Tracers are not validated."""
    return isinstance(value, jax.core.Tracer)


def _prefix(method: Optional[str]) -> str:
    return f"{method}: " if method else ""


def check_static(value: Any, option: str, method: str, why: str) -> Any:
    """Raises ``ValueError`` when ``value`` is traced; returns it otherwise (concrete arrays unchanged).

    For a hyperparameter that Python code must see as a number (a branch, an index, an iteration cap):
    ``optax.inject_hyperparams`` passes every numeric argument not in ``static_args`` as a tracer inside
    a jitted ``update``, which would otherwise fail with a raw tracer error.  ``why`` says what it
    decides (e.g. ``"it selects the rescaling formula"``).
    """
    if is_traced(value):
        raise ValueError(
            f"{method}: {option} must be static under optax.inject_hyperparams ({why}); add it to static_args, "
            f"e.g. optax.inject_hyperparams(factory, static_args=('num_tasks', '{option}')) "
            f"(dbmtl_jax.methods.STATIC_ARGS['{method}'] lists every such argument)."
        )
    return value


def check_shared(shared: Any, method: str) -> Any:
    """Refuses a ``shared=`` that is a JAX array, what ``optax.inject_hyperparams`` passes when it calls a
    callable ``shared`` (a path predicate) as a schedule; returns ``shared`` otherwise.

    A bool pytree, a callable, ``None``, ``True`` and ``False`` are valid.  A predicate that returns a
    Python bool for the step count (``lambda p: p != "head"``) cannot be told from ``shared=True``: the
    documented recipe, ``static_args`` with ``"shared"``, is the only complete protection.
    """
    if isinstance(shared, jax.Array):
        raise ValueError(
            f"{method}: shared must be None, a bool, a bool pytree or a callable on leaf paths, got a JAX array "
            f"({shared!r}). optax.inject_hyperparams calls every callable argument as a schedule (with the step "
            f"count) unless it is in static_args: add 'shared' to static_args "
            f"(dbmtl_jax.methods.STATIC_ARGS['{method}'])."
        )
    return shared


def low_precision_hint(value: Any) -> str:
    """For a value out of range that arrived as a float narrower than float32: why, and the fix.

    ``optax.inject_hyperparams`` (``hyperparam_dtype=None``) casts float hyperparameters to the
    parameters' dtype, so with float16/bfloat16 parameters ``eps=1e-8`` becomes 0 and ``0.9999`` becomes
    1.  Returns ``""`` for any other value.
    """
    dtype = getattr(value, "dtype", None)
    try:
        narrow = dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32
    except TypeError:
        return ""
    if not narrow:
        return ""
    return (f"; the value arrived as {jnp.dtype(dtype).name}, where it may have been rounded: "
            "optax.inject_hyperparams casts hyperparameters to the parameters' dtype unless given "
            "hyperparam_dtype=jnp.float32")


def check_num_tasks(num_tasks: Any, method: Optional[str] = None) -> int:
    """``num_tasks`` must be a positive (Python or NumPy) int: it sizes the state.  Returns it as an int."""
    if isinstance(num_tasks, (bool, np.bool_)) or not isinstance(num_tasks, numbers.Integral) or num_tasks < 1:
        raise ValueError(
            f"{_prefix(method)}num_tasks must be a positive Python int (it sizes the state), got {num_tasks!r}; "
            "under optax.inject_hyperparams pass static_args=('num_tasks',)."
        )
    return int(num_tasks)


def check_int(
    value: Any,
    option: str,
    method: Optional[str] = None,
    *,
    lo: int = 1,
    hi: Optional[int] = None,
    type_error: type = TypeError,
) -> Any:
    """An integer hyperparameter in ``[lo, hi]`` (``hi=None``: no upper bound), returned as a Python int.

    A concrete integer array or NumPy integer (what ``optax.inject_hyperparams``
    passes at init) is converted; a tracer (the same wrapper's calls inside
    ``update``, which only refresh float hyperparameters) is returned as is.
    A non-integer (bools included) raises ``type_error`` (``TypeError`` by
    default; the balance solvers raise ``ValueError`` for every bad value), an
    out-of-range int ``ValueError``; the message names ``method`` and ``option``.
    """
    if is_traced(value):
        return value
    if hasattr(value, "dtype") and jnp.ndim(value) == 0 and jnp.issubdtype(value.dtype, jnp.integer):
        value = int(value)
    rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise type_error(f"{_prefix(method)}{option} must be an int {rng}, got {type(value).__name__} {value!r}.")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{_prefix(method)}{option} must be an int {rng}, got {value!r}.")
    return value


def _range_text(lo: Optional[float], hi: Optional[float], lo_open: bool, hi_open: bool, interval: bool) -> str:
    if interval:
        left = "-inf" if lo is None else format(lo, "g")
        right = "inf" if hi is None else format(hi, "g")
        return f"in {'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"
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
    type_error: type = TypeError,
    interval: bool = False,
) -> Any:
    """Validates a real-valued hyperparameter and returns it unchanged.

    ``value`` may be a Python number, a NumPy scalar or a concrete JAX array of
    any integer or floating dtype, bfloat16 and float16 included (what
    ``optax.inject_hyperparams`` passes at ``init``) whose shape is one of
    ``shapes`` (default: a scalar); every entry must be finite and lie in the
    range ``lo .. hi`` (bounds excluded with ``lo_open`` / ``hi_open``).
    Raises ``type_error`` (default ``TypeError``) for a non-number and
    ``ValueError`` (``"<method>: <option> must be ..."``) for a bad shape or
    value; ``note`` is appended to the message (why the range).
    ``interval=True`` writes the range as an interval (``in [0, inf)``)
    rather than as a comparison (``>= 0``).  A float16/bfloat16 value out of
    range gets :func:`low_precision_hint` appended.

    A tracer (a value injected by ``optax.inject_hyperparams`` under ``jit``)
    cannot raise: it is returned as is when every entry is finite and in range,
    and as all NaN otherwise (:func:`nan_unless_in_range`), so the step that
    uses the *returned* value is invalid (NaN update, state kept) instead of
    running with a meaningless one.  Callers must use the returned value.
    """
    if is_traced(value):
        return nan_unless_in_range(value, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)
    rng = _range_text(lo, hi, lo_open, hi_open, interval)
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
    if arr is None or not (jnp.issubdtype(arr.dtype, jnp.integer) or jnp.issubdtype(arr.dtype, jnp.floating)):
        raise type_error(f"{method}: {option} must be {what}, got {type(value).__name__} {value!r}.")
    if arr.shape not in shapes:
        shown = " or ".join((["be a scalar"] if () in shapes else []) + ([f"have shape {arrays}"] if arrays else []))
        raise ValueError(f"{method}: {option} must {shown}, got shape {arr.shape}.")
    if not np.all(_in_range(arr.astype(np.float64), np.isfinite, lo, hi, lo_open, hi_open)):
        shown = repr(arr.item()) if arr.ndim == 0 else repr(arr.tolist())
        raise ValueError(f"{method}: {option} must be {what}, got {shown}{suffix}{low_precision_hint(arr)}.")
    return value


def nan_unless_in_range(
    value: Any,
    *,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> jax.Array:
    """``value`` (floating; an integer array becomes float32) when every entry is finite and in ``lo .. hi``,
    else the same shape of NaN: the traced half of :func:`check_real`, which a step cannot raise from."""
    x = jnp.asarray(value)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    ok = _in_range(x, jnp.isfinite, lo, hi, lo_open, hi_open)
    return jnp.where(jnp.all(ok), x, jnp.asarray(jnp.nan, x.dtype))


def _in_range(x: Any, isfinite: Callable[[Any], Any], lo: Optional[float], hi: Optional[float], lo_open: bool,
              hi_open: bool) -> Any:
    """Entrywise: finite and within ``lo .. hi`` (NumPy or JAX, by ``isfinite``)."""
    ok = isfinite(x)
    if lo is not None:
        ok &= (x > lo) if lo_open else (x >= lo)
    if hi is not None:
        ok &= (x < hi) if hi_open else (x <= hi)
    return ok


def check_bool(value: Any, option: str, method: str, *, type_error: type = TypeError) -> bool:
    """A Python (or NumPy) bool flag; ``type_error`` (default ``TypeError``) naming ``option`` otherwise."""
    if not isinstance(value, (bool, np.bool_)):
        raise type_error(f"{method}: {option} must be True or False (a bool), got {type(value).__name__} {value!r}.")
    return bool(value)


def check_choice(value: Any, options: Sequence[str], option: str, method: str) -> str:
    """Raises ``ValueError`` naming ``option`` when ``value`` is not one of ``options``."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{method}: unknown {option}={value!r}; expected one of {tuple(options)}.")
    return value


def check_optimizer(value: Any, option: str, method: str) -> Any:
    """``None`` or an Optax ``GradientTransformation`` (anything with callable ``init`` and ``update``)."""
    if value is not None and not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        raise TypeError(
            f"{method}: {option} must be None or an optax.GradientTransformation "
            f"(e.g. optax.adam(1e-4)), got {type(value).__name__} {value!r}."
        )
    return value


def _forward_hint(arg: str) -> str:
    """Where a missing extra argument often went: Flax's ``TrainState.apply_gradients`` drops it."""
    return ("(flax's TrainState.apply_gradients does not forward extra arguments: call "
            f"state.tx.update(grads, state.opt_state, state.params, {arg}=...) and state.replace(...))")


def require_key(key: Any, method: str) -> Any:
    """The ``key=`` extra argument of a randomised method (a JAX PRNG key, new-style or raw uint32); a
    ``ValueError`` when it is missing.  Used by both the loss-weighting and the gradient methods."""
    if key is None:
        raise ValueError(
            f"{method} is randomised and needs a PRNG key: call update(..., key=jax.random.key(...)) "
            f"{_forward_hint('key')}."
        )
    return key


def check_losses(losses: Any, num_tasks: int, method: str) -> jax.Array:
    """The ``losses=`` extra argument of ``update``: the raw task losses as a ``[T]`` vector.

    ``None`` raises ``ValueError`` (call it only where the losses are needed); a
    wrong shape ``ValueError``; a dtype that is neither floating point nor
    integer (bool, complex) ``TypeError``.  Returned as float32 or wider
    (integers become float32).  Used by both the loss-weighting and the
    gradient methods, so they accept and reject the same ``losses``.
    """
    if losses is None:
        raise ValueError(
            f"{method} needs the raw task losses: call update(..., losses=<array of shape [{num_tasks}]>) "
            f"{_forward_hint('losses')}."
        )
    losses = jnp.asarray(losses)
    if losses.shape != (num_tasks,):
        raise ValueError(
            f"{method}: losses must be a [T] vector of the raw task losses (losses=, one per task) "
            f"with T = {num_tasks}, got shape {losses.shape}."
        )
    if jnp.issubdtype(losses.dtype, jnp.integer):
        return losses.astype(jnp.float32)
    if not jnp.issubdtype(losses.dtype, jnp.floating):
        raise TypeError(f"{method}: losses must be floating point (or integer), got dtype {losses.dtype}.")
    return losses.astype(jnp.promote_types(losses.dtype, jnp.float32))


# ----------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------


def acc_dtype(leaves: Sequence[jax.Array]) -> Any:
    """Accumulation dtype: float32, or the leaves' common dtype when wider (float64 under x64)."""
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


# ----------------------------------------------------------------------------
# Gram matrices and norms (overflow-safe)
# ----------------------------------------------------------------------------


def max_abs(leaves: Sequence[jax.Array], dtype: Any) -> jax.Array:
    """Largest absolute entry over ``leaves`` as ``dtype``; 1 when it is zero or not finite.

    The common divisor of the overflow-safe products below: with it, squares of
    gradients anywhere between 1e-19 and 1e19 neither overflow nor underflow in
    float32.  (A NaN/inf entry is left to propagate into the result.)
    """
    m = jnp.zeros([], dtype)
    for x in leaves:
        if x.size:
            m = jnp.maximum(m, jnp.max(jnp.abs(x)).astype(dtype))
    return jnp.where(jnp.isfinite(m) & (m > 0), m, jnp.ones([], dtype))


def normalize_gram(g: jax.Array, by: str = "mean") -> tuple[jax.Array, jax.Array]:
    """Rescales a Gram matrix (or a stack ``[..., T, T]``) to unit mean (``by="mean"``) or largest
    (``by="max"``) diagonal; returns ``(g / s, s)``, ``s = 1`` where the diagonal is zero."""
    d = jnp.diagonal(g, axis1=-2, axis2=-1)
    s = jnp.mean(d, axis=-1) if by == "mean" else jnp.max(d, axis=-1)
    s = jnp.where(s > 0, s, jnp.ones_like(s))
    return g / s[..., None, None], s


def gram(
    leaves: Sequence[jax.Array], num_tasks: int, dtype: Any = None, *, per_leaf: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Normalised Gram matrix of the per-task gradient ``J`` (``[T, P]``, the leaves flattened together).

    Returns ``(g, scale)`` with ``J Jᵀ = scale · g`` and ``g`` of mean diagonal 1
    (:func:`normalize_gram`); ``g = 0``, ``scale = 1`` when ``J`` is all zeros or
    there are no leaves.  The leaves (each ``[T, *shape]``) are multiplied by
    ``1 / max |J|`` (:func:`max_abs`) before the products, so neither overflow
    nor underflow occurs for huge or tiny gradients, and the products are
    symmetrised.  With ``per_leaf=True`` the result is one Gram matrix per leaf,
    ``[L, T, T]`` (same common prescaling, each normalised on its own, ``scale``
    ``[L]``).  Computed in ``dtype`` (default: :func:`acc_dtype`).  Every
    solver using it is invariant to the common scale (the weights depend on
    ``J Jᵀ`` up to a positive factor).
    """
    if dtype is None:
        dtype = acc_dtype(leaves)
    if not leaves:
        return jnp.zeros((num_tasks, num_tasks), dtype), jnp.ones([], dtype)
    amax = max_abs(leaves, dtype)
    inv = 1.0 / amax
    mats = []
    for x in leaves:
        m = x.reshape(num_tasks, -1).astype(dtype) * inv
        mats.append(jnp.matmul(m, m.T, precision=HIGHEST))
    if per_leaf:
        g = jnp.stack(mats)
    else:
        g = mats[0]
        for m in mats[1:]:
            g = g + m
    g = 0.5 * (g + jnp.swapaxes(g, -1, -2))
    g, md = normalize_gram(g)
    return g, amax * amax * md


def task_cosine_gram(leaves: Sequence[jax.Array], num_tasks: int, dtype: Any = None) -> tuple[jax.Array, jax.Array]:
    """Per-task preconditioned Gram matrix of the global shared gradient: ``(cos, norms)``.

    ``J Jᵀ = diag(norms) · cos · diag(norms)`` with ``norms_t = ‖g_t‖`` and
    ``cos`` the matrix of cosines between the task gradients (unit diagonal),
    ``J`` the ``[T, P]`` concatenation of ``leaves``.  Every task's row is
    divided by its *own* largest absolute entry before the products, so each
    entry of ``cos`` is accurate to rounding relative to 1 whatever the
    relative scale of the task gradients.  (A Gram matrix normalised by one
    common factor, as :func:`gram`, keeps the small tasks only to
    ``eps · max_t ‖g_t‖²`` absolute: in float32 a task 1e-4 times smaller than
    the largest is lost.)  A task with an all-zero gradient gets norm 0 and a
    zero row and column in ``cos`` (diagonal included); a NaN/inf entry makes
    its task's norm NaN.  Computed in ``dtype`` (default: :func:`acc_dtype`).
    """
    if dtype is None:
        dtype = acc_dtype(leaves)
    t = num_tasks
    mats = [x.reshape(t, -1) for x in leaves if x.size]
    if not mats:
        return jnp.zeros((t, t), dtype), jnp.zeros((t,), dtype)
    amax = jnp.zeros((t,), dtype)
    for m in mats:
        amax = jnp.maximum(amax, jnp.max(jnp.abs(m), axis=1).astype(dtype))
    finite = jnp.isfinite(amax)
    inv = 1.0 / jnp.where(finite & (amax > 0), amax, 1.0)
    acc = jnp.zeros((t, t), dtype)
    for m in mats:
        y = m.astype(dtype) * inv[:, None]
        acc = acc + jnp.matmul(y, y.T, precision=HIGHEST)
    acc = 0.5 * (acc + acc.T)
    r = jnp.sqrt(jnp.maximum(jnp.diagonal(acc), 0.0))
    nonzero = finite & (amax > 0) & (r > 0)
    rs = jnp.where(nonzero, r, 1.0)
    sq = jnp.where(nonzero, jnp.diagonal(acc), 1.0)
    # √(M_ii M_jj) rather than √M_ii √M_jj: identical rows give a cosine of exactly 1
    cos = acc / jnp.sqrt(sq[:, None] * sq[None, :])
    both = nonzero[:, None] & nonzero[None, :]
    cos = jnp.where(both, jnp.clip(cos, -1.0, 1.0), 0.0)
    cos = jnp.where(jnp.eye(t, dtype=bool) & both, 1.0, cos)
    bad = ~finite | jnp.isnan(r)
    norms = jnp.where(bad, jnp.nan, jnp.where(nonzero, amax * rs, 0.0))
    return cos, norms


def task_norms(tree: PyTree, dtype: Any = None, *, per_leaf: bool = False) -> jax.Array:
    """``‖g_t‖`` of every task over all leaves of ``tree`` (``[T]``), or per leaf (``[L, T]``).

    ``tree`` is a pytree (or a list) of ``[T, *shape]`` leaves.  Computed in
    ``dtype`` promoted with the leaves' dtypes (``None``: :func:`acc_dtype`,
    float32 or wider).  Overflow-safe: the leaves are divided by their largest
    absolute entry (:func:`max_abs`; per leaf with ``per_leaf=True``) before
    squaring.  This is the one task-norm function: the public
    :func:`dbmtl_jax.task_axis.task_norms` calls it.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if dtype is None:
        dtype = acc_dtype(leaves)
    else:
        dtype = functools.reduce(jnp.promote_types, [x.dtype for x in leaves], jnp.dtype(dtype))

    def sq(x: jax.Array, a: jax.Array) -> jax.Array:
        y = (x.astype(dtype) / a).reshape(x.shape[0], -1)
        return jnp.sum(y * y, axis=1)

    if per_leaf:
        out = []
        for x in leaves:
            a = max_abs([x], dtype)
            out.append(a * jnp.sqrt(sq(x, a)))
        return jnp.stack(out)
    a = max_abs(leaves, dtype)
    total = None
    for x in leaves:
        s = sq(x, a)
        total = s if total is None else total + s
    return a * jnp.sqrt(total)


def global_norm(leaves: Sequence[jax.Array], dtype: Any = jnp.float32) -> jax.Array:
    """L2 norm over all ``leaves`` (no task axis), overflow-safe via :func:`max_abs` scaling.

    Zero-size leaves contribute nothing; a NaN entry gives NaN (not 0), an inf one inf."""
    leaves = [x for x in leaves if x.size]
    if not leaves:
        return jnp.zeros([], dtype)
    safe = max_abs(leaves, dtype)
    sq = sum(jnp.sum(jnp.square(x.astype(dtype) / safe)) for x in leaves)
    return safe * jnp.sqrt(sq)


# ----------------------------------------------------------------------------
# combinations
# ----------------------------------------------------------------------------


def combine(leaves: Sequence[jax.Array], coeffs: jax.Array) -> list:
    """``Σ_t c_t g_t`` for every leaf (``[T, *shape] → [*shape]``), computed in float32 or wider
    (the wider of the leaf's and the coefficients' dtypes), cast back to the leaf dtype."""
    out = []
    for x in leaves:
        acc = jnp.promote_types(jnp.promote_types(x.dtype, jnp.float32), coeffs.dtype)
        out.append(jnp.tensordot(coeffs.astype(acc), x.astype(acc), axes=(0, 0), precision=HIGHEST).astype(x.dtype))
    return out


def combine_per_leaf(leaves: Sequence[jax.Array], coeffs: jax.Array) -> list:
    """Like :func:`combine` with one coefficient row per leaf: ``coeffs`` is ``[L, T]``."""
    return [combine([x], coeffs[i])[0] for i, x in enumerate(leaves)]


def sum_heads(leaves: Sequence[jax.Array]) -> list:
    """Plain ``Σ_t g_t`` per leaf, accumulated in float32 or wider, cast back."""
    return [jnp.sum(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=0).astype(x.dtype) for x in leaves]


def all_finite(tree: PyTree) -> jax.Array:
    """Whether every entry of every floating leaf of ``tree`` is finite (a traced bool)."""
    return functools.reduce(jnp.logical_and, finite_flags(tree), jnp.asarray(True))


def injected_ok(hparams: PyTree, int_minimum: Sequence[tuple[Any, int]] = ()) -> Optional[jax.Array]:
    """Whether the traced (injected) values among ``hparams`` are all finite and every traced integer of
    ``int_minimum`` (``(value, lo)`` pairs) is ``>= lo``; ``None`` when nothing is traced.

    :func:`check_real` turns a traced hyperparameter out of range into NaN (:func:`check_int` cannot: it
    returns a traced integer as is); a method passes the values it checked here and, when the result is
    not ``None``, makes its step invalid with :func:`reject_unless` unless it holds (a NaN hyperparameter
    need not reach the update, e.g. through a comparison or an untaken ``lax.cond`` branch).  ``None``
    leaves a step built from concrete values unchanged.
    """
    oks = [all_finite(x) for x in jax.tree_util.tree_leaves(hparams) if is_traced(x)]
    oks += [jnp.all(v >= lo) for v, lo in int_minimum if is_traced(v)]
    return conjoin(*oks)


def conjoin(*oks: Optional[jax.Array]) -> Optional[jax.Array]:
    """The logical and of the ``oks`` that are not ``None`` (``None`` when all are)."""
    present = [ok for ok in oks if ok is not None]
    return functools.reduce(jnp.logical_and, present) if present else None


def reject_unless(ok: Optional[jax.Array], updates: PyTree, new_state: Any, old_state: Any) -> tuple[PyTree, Any]:
    """``(updates, new_state)`` when ``ok`` (or ``ok is None``: nothing to check), else ``(NaN updates, old_state)``.

    For state that a finite input can still overflow (a running sum of squared
    gradients, an inner optimizer's second moment): a non-finite entry would
    stay in the state for good while the updates looked fine.  The step is made
    visibly invalid instead, as a non-finite gradient makes it, and the state is
    kept, so :func:`dbmtl_jax.skip_invalid_steps` (or ``optax.apply_if_finite``)
    rejects it and the next step starts from the old state.
    """
    if ok is None:
        return updates, new_state
    _, state = select_step(ok, updates, new_state, old_state)
    return jax.tree_util.tree_map(lambda u: jnp.where(ok, u, jnp.asarray(jnp.nan, u.dtype)), updates), state


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den != 0``, else 0 (no NaN/Inf leaks through ``where``)."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


# ----------------------------------------------------------------------------
# simplex projection
# ----------------------------------------------------------------------------


def project_simplex(v: jax.Array) -> jax.Array:
    """Euclidean projection of ``v`` (``[T]``) onto ``{x ≥ 0, Σx = 1}``.

    The exact sort-based projection of ``optax.projections.projection_simplex``
    on a sanitised input: NaN entries count as ``-∞`` (they get weight 0),
    entries are clipped to ``±max/4`` of the dtype, and ``v`` is shifted by its
    maximum (the projection is shift-invariant), so huge entries do not lose
    the simplex offset to rounding and the result is always a finite point of
    the simplex.
    """
    big = jnp.finfo(v.dtype).max / 4
    v = jnp.where(jnp.isnan(v), -big, jnp.clip(v, -big, big))
    return optax.projections.projection_simplex(v - jnp.max(v))


def unalias(tree: PyTree) -> PyTree:
    """Copies leaves that occur more than once in ``tree`` (the same array object), so that every state field
    is its own buffer and the state can be donated to a jitted step (an ``init`` may reuse one zeros array)."""
    seen: set[int] = set()

    def f(x: Any) -> Any:
        if id(x) in seen:
            return jnp.copy(x)
        seen.add(id(x))
        return x

    return jax.tree_util.tree_map(f, tree)
