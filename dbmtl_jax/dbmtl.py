"""DB-MTL: dual-balancing multi-task learning as an Optax transform.

Reference: B. Lin, W. Jiang, F. Ye, Y. Zhang, P. Chen, Y.-C. Chen, S. Liu,
J. T. Kwok, "Dual-Balancing for Multi-Task Learning", Algorithm 1.

Given per-task gradients ``g_t = ∇_θ log(ℓ_t + ε)`` of the shared parameters
θ (the *loss-scale* balancing), DB-MTL keeps an exponential moving average of
each task's gradient and rescales every task to the largest EMA norm (the
*gradient-magnitude* balancing)::

    β_k   = β / k^σ                       (k = 1, 2, …; σ = 0: constant β)
    ĝ_t  ← β_k ĝ_t + (1 − β_k) g_t        (ĝ_t starts at 0, no bias correction)
    α     = max_t ‖ĝ_t‖                   (global L2 norm over all shared leaves)
    ũ     = α Σ_t ĝ_t / (‖ĝ_t‖ + ε)

Task-specific (head) parameters ψ get the plain ``Σ_t ∇_ψ log(ℓ_t + ε)``.
The output is meant to be chained into an optimizer, as in the paper::

    tx = optax.chain(dbmtl(num_tasks=3), optax.adam(1e-4))
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _numerics as nm

PyTree = Any
ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]

ALPHA_MODES = ("max", "min", "mean", "median")

__all__ = [
    "DBMTLState", "dbmtl", "ALPHA_MODES", "aggregate_alpha", "beta_at", "check_options", "dbmtl_direction", "ema_step",
    "expected_ema_dtypes",
]


class DBMTLState(NamedTuple):
    """State of :func:`dbmtl`.

    Attributes:
      count: number of updates applied so far (int32 scalar); the next update
        uses ``k = count + 1`` in ``β / k^σ`` and calls a β schedule with ``count``.
      ema: per-task EMA ``ĝ_t`` of the shared leaves, each of shape
        ``[T, *param_shape]``; head leaves hold ``optax.MaskedNode()``.
      norms: ``‖ĝ_t‖`` after the last update, shape ``[T]`` (for logging).
    """

    count: chex.Array
    ema: PyTree
    norms: chex.Array


def aggregate_alpha(norms: jax.Array, alpha: Union[str, float, jax.Array]) -> jax.Array:
    """The update magnitude α from the EMA norms ``[T]`` (paper Fig. 6 ablation)."""
    if isinstance(alpha, str):
        if alpha == "max":
            return jnp.max(norms)
        if alpha == "min":
            return jnp.min(norms)
        if alpha == "mean":
            return jnp.mean(norms)
        if alpha == "median":
            return jnp.median(norms)
        raise ValueError(f"unknown alpha {alpha!r}; expected one of {ALPHA_MODES} or a float constant.")
    return jnp.asarray(alpha, norms.dtype)


def beta_at(beta: ScalarOrSchedule, beta_sigma: Union[float, jax.Array], count: jax.Array, dtype: Any) -> jax.Array:
    """``β_k = β / k^σ`` for the update number ``k = count`` (1, 2, …).

    A schedule ``beta`` is called as Optax calls schedules, with the number of updates already applied,
    ``k − 1`` (0 at the first update): ``β_k = beta(k − 1) / k^σ``.  So ``dbmtl(beta=schedule)`` and
    ``optax.inject_hyperparams(dbmtl)(beta=schedule)`` use the same β at every update (as long as no step is
    rejected: a rejected step advances inject_hyperparams' count, not DB-MTL's).
    """
    beta_k = beta(count - 1) if callable(beta) else beta
    if jnp.shape(beta_k) != ():  # one β for every task and coordinate: a vector would broadcast over the parameters
        what = "the beta schedule" if callable(beta) else "beta"
        raise ValueError(f"DB-MTL: {what} must give a scalar β, got shape {jnp.shape(beta_k)}.")
    return jnp.asarray(beta_k, dtype) / count.astype(dtype) ** jnp.asarray(beta_sigma, dtype)


def options_ok(
    beta_k: jax.Array, beta_sigma: Any, alpha: Any, eps: Any, count: jax.Array
) -> jax.Array:
    """Whether this step's hyperparameters are in range: ``0 ≤ β_k < 1``, ``σ ≥ 0``, a constant ``α``
    finite and > 0, ``ε`` finite and > 0 (a bool, traced under ``jit``).

    :func:`check_options` checks what construction can see; a β schedule, and values traced under
    ``optax.inject_hyperparams`` + ``jit``, are only known per step.  A concrete value out of range
    raises ``ValueError`` naming it and the step; a traced one makes the step invalid (NaN update,
    state kept), as a non-finite gradient does, instead of letting β_k ≥ 1 freeze or reverse the EMA.
    """
    checks = [("beta_k = beta / k^beta_sigma", beta_k, lambda b: (b >= 0) & (b < 1), "in [0, 1)"),
              ("beta_sigma", beta_sigma, lambda v: jnp.isfinite(v) & (v >= 0), "finite and >= 0"),
              ("eps", eps, lambda v: jnp.isfinite(v) & (v > 0), "finite and > 0")]
    if not isinstance(alpha, str):
        checks.append(("alpha", alpha, lambda v: jnp.isfinite(v) & (v > 0), "finite and > 0"))
    ok = jnp.asarray(True)
    for name, value, pred, want in checks:
        good = pred(jnp.asarray(value))
        if not isinstance(good, jax.core.Tracer) and not bool(good):
            k = "" if isinstance(count, jax.core.Tracer) else f" at step k = {int(count)}"
            raise ValueError(f"DB-MTL: {name} must be {want}, got {float(jnp.asarray(value))}{k} "
                             "(from a schedule or a value injected by optax.inject_hyperparams).")
        ok = ok & good
    return ok


def _concrete_scalar(value: Any, name: str) -> Optional[float]:
    """``value`` as a float, or None when it is traced (``inject_hyperparams`` under ``jit``)."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or hasattr(value, "dtype")):
        raise TypeError(f"DB-MTL: {name} must be a real number, got {type(value).__name__} {value!r}.")
    arr = np.asarray(value)
    # jnp.issubdtype: bfloat16 (what inject_hyperparams passes with bfloat16 parameters) is not a NumPy floating
    if arr.shape != () or not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise TypeError(f"DB-MTL: {name} must be a real scalar, got shape {arr.shape} dtype {arr.dtype}.")
    return float(arr)


def check_options(
    num_tasks: Any,
    alpha: Any,
    *,
    beta: Any = 0.9,
    beta_sigma: Any = 0.0,
    eps: Any = 1e-8,
    ema_dtype: Any = None,
) -> None:
    """Validates the options shared by :func:`dbmtl` and the fused step; errors name the option and its range.

    Traced values (``optax.inject_hyperparams`` under ``jit``) and β schedules
    cannot be checked here: :func:`options_ok` checks them at every step.
    """
    if num_tasks is None:
        raise ValueError(
            "num_tasks is required: the per-task EMA state (one row per task) is allocated by init(params), "
            "which sees only the parameters, and the task count cannot be inferred from them; the state's "
            "shape must be fixed before the first jitted step (and for checkpoints). "
            "Pass it, e.g. optax.chain(dbmtl(num_tasks=3), optax.adam(1e-4))."
        )
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(
            f"num_tasks must be a positive Python int (it sizes the EMA state), got {num_tasks!r}; "
            "under optax.inject_hyperparams pass static_args=('num_tasks',)."
        )
    if isinstance(alpha, str):
        if alpha not in ALPHA_MODES:
            raise ValueError(f"unknown alpha {alpha!r}; expected one of {ALPHA_MODES} or a float constant.")
    elif not (isinstance(alpha, (int, float)) or hasattr(alpha, "dtype")) or isinstance(alpha, bool):
        raise TypeError(f"alpha must be one of {ALPHA_MODES} or a float constant, got {type(alpha).__name__}.")
    else:
        a = _concrete_scalar(alpha, "alpha")
        if a is not None and not (0 < a < np.inf):
            raise ValueError(f"DB-MTL: a constant alpha must be finite and > 0 (it is the update's norm), got {a}"
                             f"{nm.low_precision_hint(alpha)}.")
    if not callable(beta):
        b = _concrete_scalar(beta, "beta")
        if b is not None and not 0 <= b < 1:
            raise ValueError(
                f"DB-MTL: beta must be in [0, 1) (β weights the old EMA value; β ≥ 1 freezes or reverses "
                f"the average), got {b}{nm.low_precision_hint(beta)}."
            )
    sigma = _concrete_scalar(beta_sigma, "beta_sigma")
    if sigma is not None and not 0 <= sigma < np.inf:
        raise ValueError(f"DB-MTL: beta_sigma must be finite and >= 0 (β_k = β / k^σ must stay ≤ β), got {sigma}"
                         f"{nm.low_precision_hint(beta_sigma)}.")
    e = _concrete_scalar(eps, "eps")
    if e is not None and not 0 < e < np.inf:
        raise ValueError(f"DB-MTL: eps must be finite and > 0 (it keeps ĝ/(‖ĝ‖ + ε) and log(ℓ + ε) finite), got {e}"
                         f"{nm.low_precision_hint(eps)}.")
    if isinstance(ema_dtype, jax.Array):
        raise ValueError(
            f"DB-MTL: ema_dtype must be a dtype (jnp.float32, 'bfloat16', ...), got a JAX array ({ema_dtype!r}). "
            "optax.inject_hyperparams calls every callable argument as a schedule, a dtype class such as "
            "jnp.bfloat16 included, unless it is in static_args: pass static_args=('num_tasks', 'alpha', "
            "'shared', 'ema_dtype')."
        )
    if ema_dtype is not None and not jnp.issubdtype(jnp.dtype(ema_dtype), jnp.floating):
        raise ValueError(f"DB-MTL: ema_dtype must be a real floating dtype, got {jnp.dtype(ema_dtype)}.")


def expected_ema_dtypes(
    ema_dtype: Optional[Any], ref_dtypes: list, ema_leaves: list, *, exact: bool
) -> tuple[list, str]:
    """The EMA dtype each shared leaf's state must have, and where it comes from (for the error message).

    ``ema_dtype``, or else the parameter dtype (``ref_dtypes``) promoted to at least float32.  With
    ``exact=False`` (no ``params`` passed: ``ref_dtypes`` are the update dtypes, which may be narrower than
    the parameters') an EMA at least that wide is accepted.  A state of another dtype (a checkpoint of a run
    with another ``ema_dtype``) would otherwise silently keep its precision.
    """
    if ema_dtype is not None:
        return [jnp.dtype(ema_dtype)] * len(ema_leaves), f"ema_dtype={jnp.dtype(ema_dtype)}"
    wants = [jnp.promote_types(d, jnp.float32) for d in ref_dtypes]
    if not exact:
        wants = [None if jnp.promote_types(m.dtype, w) == m.dtype else w for m, w in zip(ema_leaves, wants)]
    return wants, "ema_dtype=None: the parameter dtype promoted to at least float32"


def ema_step(old: jax.Array, grad: jax.Array, beta_k: jax.Array) -> jax.Array:
    """``ĝ ← β_k ĝ + (1 − β_k) g`` in the EMA's dtype (the one place of the EMA maths, shared with the fused step)."""
    return beta_k.astype(old.dtype) * old + (1 - beta_k).astype(old.dtype) * grad.astype(old.dtype)


def dbmtl_direction(
    ema: list, alpha: Union[str, float, jax.Array], eps: Union[float, jax.Array], acc: Any,
    sq_pair: Optional[jax.Array] = None,
    valid: Optional[jax.Array] = None,
) -> tuple[jax.Array, list]:
    """``(‖ĝ_t‖, [α Σ_t ĝ_t / (‖ĝ_t‖ + ε) per leaf])`` from the updated EMA leaves ``[T, *shape]``.

    The one place of the rescaling maths, shared by :func:`dbmtl` and the fused
    step (which passes the ``[3, T]`` squared norms it accumulated while
    streaming, :func:`dbmtl_jax.task_axis.task_sq_norms_pair`).  Norms stay
    finite and accurate whenever the true norm is representable.  The directions are in
    ``promote_types(ema dtype, acc)``; with ``valid`` False they are NaN.
    """
    norms = ta.norms_from_pair(ta.task_sq_norms_pair(ema, acc) if sq_pair is None else sq_pair, ema)
    scale = aggregate_alpha(norms, alpha) / (norms + jnp.asarray(eps, acc))
    if valid is not None:
        scale = jnp.where(valid, scale, jnp.nan)
    return norms, [jnp.tensordot(scale.astype(jnp.promote_types(m.dtype, acc)), m, axes=(0, 0)) for m in ema]


def dbmtl(
    num_tasks: Optional[int] = None,
    *,
    beta: ScalarOrSchedule = 0.9,
    beta_sigma: Union[float, jax.Array] = 0.5,
    alpha: Union[str, float, jax.Array] = "max",
    eps: Union[float, jax.Array] = 1e-8,
    shared: ta.SharedSpec = None,
    ema_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
    """DB-MTL gradient-magnitude balancing (Lin et al., Algorithm 1, steps 7–9).

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
        It sizes the EMA state, so it is static (see ``optax.inject_hyperparams``
        below).
      beta: EMA forgetting rate β ∈ [0, 1), a float or an optax schedule.  A
        schedule is called, as Optax calls schedules, with the number of updates
        already applied (0 at the first update; rejected steps do not count), so
        update k uses ``schedule(k − 1) / k^σ``; ``optax.inject_hyperparams`` gives
        the same values.  A schedule value, or an injected traced one, outside
        [0, 1) makes its step invalid: NaN update, state kept (eagerly, an
        error).  β weights the old value: ``ĝ ← β_k ĝ + (1 − β_k) g``.  The paper sets no default: it grid-searches β ∈ {0.1, 0.5, 0.9} × σ ∈ {0, 0.5}
        per data set (Sec. 4.1) and reports the β/k^0.5 family insensitive to β
        (Fig. 5).
      beta_sigma: σ ≥ 0 in ``β_k = β / k^σ`` with ``k = 1, 2, …``; 0 keeps β
        constant.  Default 0.5 (since 0.2.0): the EMA is a momentum on the
        direction, and a constant β stacked on a momentum optimizer (Adam's b1,
        SGD momentum) lags; the decaying β did not fail in the settings where
        the constant one did (evidence: ``results/README.md``).  LibMTL's
        setting, and this library's default before 0.2.0, is
        ``beta=0.9, beta_sigma=0.0``.  Select (β, σ) on validation
        (``dbmtl-jax select``).
      alpha: ``"max"`` (DB-MTL), ``"min"``, ``"mean"``, ``"median"`` of the EMA
        norms, or a float constant (the paper's Fig. 6 ablation).  With two
        tasks ``"median"`` is ``"mean"``.  Under Adam a constant factor on the
        shared update cancels (up to Adam's ε), so α acts through how it
        changes over steps.
      eps: ε in ``ĝ_t / (‖ĝ_t‖ + ε)``.
      shared: which leaves are shared parameters θ.  ``None`` (default): all.  A
        pytree of bools with the parameters' structure, or a callable taking a
        leaf's '/'-joined path (``"heads/0/kernel"``) and returning True for
        shared leaves.  Non-shared (head) leaves get ``Σ_t g_t``.
      ema_dtype: dtype of the EMA state; default: the parameter dtype promoted
        to at least float32 (so bf16 parameters get float32 state).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.  ``update(updates, state,
      params=None, **extra_args)`` takes updates whose leaves are
      ``[T, *param_shape]`` and returns updates of shape ``param_shape``.
      Extra args (``losses=``, ``key=``) are accepted and ignored, so the
      transform is interchangeable with the other methods of this library.

    Under ``optax.inject_hyperparams`` pass
    ``static_args=("num_tasks", "alpha", "shared", "ema_dtype")``
    (``dbmtl_jax.methods.STATIC_ARGS["dbmtl"]``): ``inject_hyperparams`` calls
    every callable argument as a schedule with the step count, so a ``shared``
    predicate or a dtype class (``jnp.bfloat16``) left out is evaluated on the
    count (``lambda p: p != "head"`` gives True: every leaf shared; one that
    arrives as a JAX array is refused).  With float16/bfloat16 parameters add
    ``hyperparam_dtype=jnp.float32`` (else β, σ, ε are cast to that dtype).  With
    an injected schedule, wrap the whole chain in
    :func:`dbmtl_jax.skip_invalid_steps`, not ``optax.apply_if_finite`` after this
    transform: ``inject_hyperparams``' own count, which drives the schedule,
    advances on a rejected step too; or give the schedule to ``beta`` here.
    """
    check_options(num_tasks, alpha, beta=beta, beta_sigma=beta_sigma, eps=eps, ema_dtype=ema_dtype)
    nm.check_shared(shared, "dbmtl")
    if ema_dtype is not None:
        ema_dtype = jnp.dtype(ema_dtype)

    def init_fn(params: PyTree) -> DBMTLState:
        for path, leaf in zip(ta.leaf_paths(params), jax.tree_util.tree_leaves(params, is_leaf=ta.is_variable)):
            ta.check_real_float(leaf, f"parameter '{path}'")
        mask = ta.resolve_shared(shared, params)
        return DBMTLState(
            count=jnp.zeros([], jnp.int32),
            ema=ta.stacked_zeros_tree(params, mask, num_tasks, ema_dtype),
            norms=jnp.zeros([num_tasks], jnp.float32),
        )

    def update_fn(
        updates: PyTree, state: DBMTLState, params: Optional[PyTree] = None, **extra_args: Any
    ) -> tuple[PyTree, DBMTLState]:
        del extra_args
        ta.check_task_axis(updates, num_tasks, params=params)
        mask = ta.resolve_shared(shared, updates if params is None else params)
        g_shared, g_heads, treedef = ta.split_shared(updates, mask)
        ema_leaves = jax.tree_util.tree_leaves(state.ema)
        ref = [g.dtype for g in g_shared] if params is None else [jnp.result_type(p) for p in
                                                                   ta.split_shared(params, mask)[0]]
        dtypes, note = expected_ema_dtypes(ema_dtype, ref, ema_leaves, exact=params is not None)
        ta.check_state_leaves(updates, mask, g_shared, ema_leaves, "DB-MTL", "ema", dtypes, note)
        ta.check_state_matches_init(state, init_fn, updates, params, "DB-MTL", num_tasks)  # norms: [T]

        count = optax.safe_increment(state.count)
        # Scalars in the widest EMA dtype (float64 under jax_enable_x64), at least float32.
        acc = functools.reduce(jnp.promote_types, [m.dtype for m in ema_leaves], jnp.dtype(jnp.float32))
        beta_k = beta_at(beta, beta_sigma, count, acc)

        # A non-finite gradient, or a hyperparameter out of range this step (a schedule, an injected
        # value), never enters the EMA: the state is kept as it was and the update is NaN, for a wrapper
        # such as optax.apply_if_finite or skip_invalid_steps to reject.  The check reads the gradients
        # first, so the EMA update stays one elementwise pass (in place when the state is donated).
        valid = functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(g)) for g in g_shared], jnp.asarray(True))
        valid = valid & options_ok(beta_k, beta_sigma, alpha, eps, count)
        # The heads' plain sum has no state, but a non-finite one (a NaN head gradient, or T finite ones
        # summing past the dtype's range) makes the step invalid, and an invalid step keeps the EMA.
        out_heads = [jnp.sum(g, axis=0) for g in g_heads]
        valid = functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(h)) for h in out_heads], valid)
        new_ema = [jnp.where(valid, ema_step(m, g, beta_k), m) for g, m in zip(g_shared, ema_leaves)]
        # An EMA narrower than its gradient (ema_dtype=float16 under float32 gradients) can overflow on a
        # finite gradient (1e6 does not fit float16): such a step is invalid too, and its EMA is not kept
        # (an inf in the EMA would make every later step NaN).  Same-dtype EMAs cannot overflow (a convex
        # combination of finite values), so only then is the EMA read again.
        narrow_ema = [jnp.finfo(m.dtype).max < jnp.finfo(g.dtype).max for g, m in zip(g_shared, ema_leaves)]
        if any(narrow_ema):
            ema_ok = functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(e)) for e, n in
                                                        zip(new_ema, narrow_ema) if n], jnp.asarray(True))
            new_ema = [jnp.where(ema_ok, e, m) for e, m in zip(new_ema, ema_leaves)]
            valid = valid & ema_ok
        if new_ema:
            norms, directions = dbmtl_direction(new_ema, alpha, eps, acc, valid=valid)
            out_shared = [d.astype(g.dtype) for g, d in zip(g_shared, directions)]
            # Guard what is produced too: finite gradients can give a direction that overflows the
            # parameters' dtype (α Σ_t ĝ_t/‖ĝ_t‖ reaches T·α; float16 tops out at 65504).  Such a step is
            # invalid like a non-finite input: NaN update, EMA, count and norms kept.  Only a narrowing
            # cast can overflow here (the norms are overflow-safe), so only then is the EMA selected
            # again, which keeps the common same-dtype step one elementwise pass over the EMA.
            narrowing = [jnp.finfo(o.dtype).max < jnp.finfo(d.dtype).max for o, d in zip(out_shared, directions)]
            if any(narrowing):
                fits = functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(o)) for o, n in
                                                          zip(out_shared, narrowing) if n], jnp.asarray(True))
                fits = fits | ~valid  # an invalid step is already NaN and keeps its state
                new_ema = [jnp.where(fits, e, m) for e, m in zip(new_ema, ema_leaves)]
                out_shared = [jnp.where(fits, o, jnp.nan) for o in out_shared]
                valid = valid & fits
        else:
            norms, out_shared = state.norms, []
        out = ta.merge_shared(out_shared, out_heads, mask, treedef)

        if new_ema:
            count = jnp.where(valid, count, state.count)
            norms = jnp.where(valid, norms, state.norms)
        ema_tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state.ema), new_ema)
        return out, DBMTLState(count=count, ema=ema_tree, norms=norms.astype(jnp.float32))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
