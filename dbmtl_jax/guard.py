"""Skip invalid multi-task steps without losing anything.

``skip_invalid_steps(tx)`` wraps a whole optimizer (for example
``optax.chain(dbmtl(3), optax.adam(1e-4))``) the way ``optax.apply_if_finite``
does, but it also looks at the task losses: a step is *invalid* when any
per-task gradient is NaN/inf, or when a loss passed as ``losses=`` is NaN/inf or,
with ``log_losses=True``, negative (``log(ℓ + ε)`` is undefined there, yet its
gradient ``∇ℓ / (ℓ + ε)`` would still be finite and silently wrong).

An invalid step returns zero updates and leaves the inner state (EMA, Adam
moments, counts, learnable weights) exactly as it was; the skip is counted in
``SkipState``.  With ``debug=True`` an invalid step raises an error naming the
offending task and the step instead (through ``jax.debug.callback``, so it works
under ``jit``).
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.multi_steps import MIN_LOSSES_ARG

__all__ = ["SkipState", "skip_invalid_steps", "InvalidStepError", "reraise_invalid_step"]

PyTree = Any


class InvalidStepError(FloatingPointError):
    """Raised in ``debug=True`` mode when a step has invalid losses or gradients."""


class _QuietInvalidStep(logging.Filter):
    """Drops JAX's "jax.debug.callback failed" log record (with its whole host traceback) when the
    callback's error is our :class:`InvalidStepError`: under ``jit`` the error reaches the caller anyway,
    as ``JaxRuntimeError`` carrying the message (or as ``InvalidStepError`` through
    :func:`reraise_invalid_step`).  Other callback failures are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, InvalidStepError)


logging.getLogger("jax._src.debugging").addFilter(_QuietInvalidStep())


class SkipState(NamedTuple):
    """State of :func:`skip_invalid_steps`.

    Attributes:
      inner_state: the wrapped optimizer's state, untouched by skipped steps.
      inner_finite: per floating leaf of ``inner_state``, whether it is all finite
        (kept so that the output check need not read the old state: a leaf that
        holds an ``inf`` by design, a sentinel, is not blamed on a step).
      step: steps seen, valid or not (int32).
      num_skipped: total skipped steps (int32); an invalid step that
        ``max_consecutive_skips`` applies is not counted.
      consecutive_skipped: invalid steps since the last valid one (int32),
        the applied ones included.
      last_valid: whether the last step was valid (bool; an invalid step that
        ``max_consecutive_skips`` applies is not).
    """

    inner_state: PyTree
    inner_finite: tuple
    step: chex.Array
    num_skipped: chex.Array
    consecutive_skipped: chex.Array
    last_valid: chex.Array


_PLAIN_HINT = "pass task_axis=False for plain gradients (e.g. a grads='weighted' loss-weighting method)"


def _check_inputs(updates: PyTree, losses: Optional[jax.Array], task_axis: bool,
                  params: Optional[PyTree] = None, min_losses: Optional[jax.Array] = None) -> None:
    """Trace-time checks of what the flags are computed from: with ``task_axis``, one leading size ``T``
    shared by every update leaf and ``losses`` of shape ``(T,)``; without, a 1-D ``losses``."""
    if task_axis:
        sizes: dict = {}
        for path, x in jax.tree_util.tree_flatten_with_path(updates)[0]:
            name = ta._path_str(path)
            if jnp.ndim(x) == 0:
                raise ValueError(
                    f"skip_invalid_steps: updates have no common task axis (leaf '{name}' is a scalar): "
                    f"{_PLAIN_HINT}."
                )
            sizes.setdefault(jnp.shape(x)[0], name)
        if len(sizes) > 1:
            desc = ", ".join(f"'{p}' has {s}" for s, p in sizes.items())
            raise ValueError(
                f"skip_invalid_steps: updates have no common task axis (leading sizes differ: {desc}): "
                f"{_PLAIN_HINT}."
            )
        if losses is not None and sizes:
            (t,) = sizes
            if losses.shape != (t,):
                if _param_shaped(updates, params):
                    hint = f": the updates have their parameters' shapes, no task axis; {_PLAIN_HINT}"
                else:
                    hint = (", one raw loss per task (T is the update leaves' leading size; for plain gradients, "
                            "pass task_axis=False)")
                raise ValueError(
                    f"skip_invalid_steps: losses has shape {tuple(losses.shape)}, expected (T,) = ({t},){hint}."
                )
    elif losses is not None and losses.ndim != 1:
        raise ValueError(
            f"skip_invalid_steps: losses has shape {tuple(losses.shape)}, expected a 1-D vector of the raw "
            "task losses, [T]."
        )
    if min_losses is not None and losses is not None and min_losses.shape != losses.shape:
        raise ValueError(
            f"skip_invalid_steps: {MIN_LOSSES_ARG} has shape {tuple(min_losses.shape)}, expected that of "
            f"losses, {tuple(losses.shape)}."
        )


def _param_shaped(updates: PyTree, params: Optional[PyTree]) -> bool:
    """Whether every update leaf has its parameter's shape (plain gradients, no task axis)."""
    if params is None:
        return False
    u_leaves, u_def = jax.tree_util.tree_flatten(updates)
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    return u_def == p_def and all(jnp.shape(u) == jnp.shape(p) for u, p in zip(u_leaves, p_leaves))


def _check_output_shapes(out: PyTree, params: Optional[PyTree]) -> None:
    """Trace-time: every output update leaf has its parameter's shape (a leaf that kept the task axis,
    ``[T, *shape]``, would broadcast into its parameter and give it a task axis of its own)."""
    if params is None:
        return
    o_flat, o_def = jax.tree_util.tree_flatten_with_path(out)
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    if o_def != p_def:
        return
    for (path, o), p in zip(o_flat, p_leaves):
        if hasattr(o, "shape") and hasattr(p, "shape") and tuple(o.shape) != tuple(p.shape):
            raise ValueError(
                f"skip_invalid_steps: the update of leaf '{ta._path_str(path)}' has shape {tuple(o.shape)} "
                f"but its parameter has shape {tuple(p.shape)}. A leaf whose per-task gradients "
                "([T, *param_shape]) bypassed the multi-task transform keeps its task axis (optax.masked or "
                "optax.multi_transform around the method): mark heads with the method's shared= instead, and "
                "put optax.multi_transform after the method (README, 'Composing with optax')."
            )


def _invalid_flags(
    updates: PyTree, losses: Optional[jax.Array], log_losses: bool, task_axis: bool,
    min_losses: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
    """``(grad_bad, loss_bad)``: per-task flags of non-finite gradients (``[T]``, or ``[1]``
    without a task axis) and of invalid losses (``[T]``, or ``[1]`` without losses).  ``min_losses``
    (from :class:`~dbmtl_jax.TaskMultiSteps`) are the accumulated micro-batches' smallest losses: with
    ``log_losses``, a negative one is invalid even when the mean ``losses`` are not."""
    grad_bad = jnp.zeros([1], bool)
    for x in jax.tree_util.tree_leaves(updates):
        if task_axis:
            grad_bad = grad_bad | jnp.any(~jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
        else:
            grad_bad = grad_bad | jnp.any(~jnp.isfinite(x))
    loss_bad = jnp.zeros([1], bool)
    if losses is not None:
        loss_bad = ~jnp.isfinite(losses)
        if log_losses:
            loss_bad = loss_bad | (losses < 0)
            if min_losses is not None:
                loss_bad = loss_bad | (min_losses < 0)
    return grad_bad, loss_bad


def _raise(grad_bad: np.ndarray, loss_bad: np.ndarray, losses: Optional[np.ndarray], step: np.ndarray,
           min_losses: Optional[np.ndarray] = None) -> None:
    if not (np.any(grad_bad) or np.any(loss_bad)):
        return
    parts = []
    if np.any(loss_bad) and losses is not None:
        tasks = [int(i) for i in np.flatnonzero(loss_bad)]

        def describe(t: int) -> str:
            text = f"task {t}: {float(losses[t])!r}"
            if min_losses is not None and np.isfinite(losses[t]) and losses[t] >= 0 and min_losses[t] < 0:
                text += f" on average, {float(min_losses[t])!r} in an accumulated micro-batch"
            return text

        parts.append(f"task(s) {tasks} have a NaN/inf/negative loss (" + ", ".join(map(describe, tasks)) + ")")
    if np.any(grad_bad):
        # A NaN loss usually makes every task's gradient NaN (0 · NaN in the pull-back), so the
        # loss flags above are the better pointer to the culprit.
        parts.append(f"task(s) {[int(i) for i in np.flatnonzero(grad_bad)]} have a NaN/inf gradient")
    raise InvalidStepError(f"invalid multi-task step {int(step)}: " + "; ".join(parts) + ".")


def _report(fn: Callable[..., None], *args: Any) -> None:
    """Calls ``fn`` on the host now when the values are concrete, else through an ordered debug callback."""
    if any(isinstance(a, jax.core.Tracer) for a in args):
        jax.debug.callback(fn, *args, ordered=True)
    else:
        fn(*[None if a is None else np.asarray(a) for a in args])


def reraise_invalid_step(step_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a (jitted) training step so that ``debug=True`` failures arrive as :class:`InvalidStepError`.

    Under ``jit`` the error is raised inside a host callback, and JAX delivers
    every such error as ``jax.errors.JaxRuntimeError`` with the original
    message inside.  The wrapper waits for the step's outputs (debugging
    gives up asynchronous dispatch anyway) and re-raises an
    :class:`InvalidStepError` with that message; other errors pass through.
    """

    @functools.wraps(step_fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return jax.block_until_ready(step_fn(*args, **kwargs))
        except jax.errors.JaxRuntimeError as err:
            text = str(err)
            marker = f"{InvalidStepError.__name__}: "
            if marker not in text:
                raise
            message = text.split(marker, 1)[1].strip().splitlines()[0]
            raise InvalidStepError(message) from err

    return wrapped


def _raise_output(bad: np.ndarray, step: np.ndarray) -> None:
    if np.any(bad):
        raise InvalidStepError(
            f"invalid multi-task step {int(step)}: the inputs were finite but the transform produced a "
            "non-finite update or state (an overflow inside it)."
        )


def _is_float(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def finite_flags(tree: PyTree) -> tuple:
    """One bool per floating leaf of ``tree``: all its entries are finite."""
    return tuple(jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if _is_float(x))


def output_ok(updates: PyTree, new_state: PyTree, old_flags: Optional[tuple] = None) -> tuple[jax.Array, tuple]:
    """``(ok, flags)``: ok when every update is finite and every floating state leaf is finite, except
    leaves that were already non-finite before the step (``old_flags``, from :func:`finite_flags`; a
    state may hold an ``inf`` sentinel by design).  ``flags`` are the new state's :func:`finite_flags`.
    """
    ok = jnp.asarray(True)
    for u in jax.tree_util.tree_leaves(updates):
        if _is_float(u):
            ok = ok & jnp.all(jnp.isfinite(u))
    flags = finite_flags(new_state)
    if old_flags is None:
        old_flags = (jnp.asarray(True),) * len(flags)
    for was_finite, is_finite in zip(old_flags, flags):
        ok = ok & (is_finite | ~was_finite)
    return ok, flags


def select_step(apply: jax.Array, updates: PyTree, new_state: PyTree, old_state: PyTree) -> tuple[PyTree, PyTree]:
    """``(updates, new_state)`` when ``apply``, else ``(zeros, old_state)``, by elementwise selects
    (the old state stays alive until the select: the price of a rollback)."""
    updates = jax.tree_util.tree_map(lambda u: jnp.where(apply, u, jnp.zeros_like(u)), updates)
    state = jax.tree_util.tree_map(lambda n, o: jnp.where(apply, n, o), new_state, old_state)
    return updates, state


def _with_extra_args(inner: Any) -> optax.GradientTransformationExtraArgs:
    """``inner`` as a transform that receives the extra arguments when its ``update`` takes them.

    ``optax.with_extra_args_support`` drops them for anything that is not a ``GradientTransformationExtraArgs``,
    including an ``optax.MultiSteps`` / :class:`~dbmtl_jax.TaskMultiSteps` object, whose ``update`` forwards them
    (``skip_invalid_steps(TaskMultiSteps(chain(uw, adam), ...))`` gave UW no ``losses``).
    """
    if isinstance(inner, optax.GradientTransformationExtraArgs):
        return inner
    try:
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD
                           for p in inspect.signature(inner.update).parameters.values())
    except (TypeError, ValueError):
        takes_kwargs = False
    if takes_kwargs:
        return optax.GradientTransformationExtraArgs(inner.init, inner.update)
    return optax.with_extra_args_support(inner)


def skip_invalid_steps(
    inner: optax.GradientTransformation,
    *,
    log_losses: bool = True,
    task_axis: bool = True,
    debug: bool = False,
    max_consecutive_skips: Optional[int] = None,
    check_output: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that invalid steps are skipped (or raise, with ``debug=True``).

    Args:
      inner: the optimizer to protect, usually ``optax.chain(method, adam)``.
      log_losses: treat negative losses as invalid (they are when the method takes
        ``log(ℓ + ε)``, as DB-MTL does).
      task_axis: the updates carry a leading task axis (per-task gradients,
        ``[T, *param_shape]``), so a non-finite gradient can be blamed on its
        task; every leaf must then share the leading size ``T`` and ``losses``
        must have shape ``(T,)`` (a ``ValueError`` otherwise).  Set False when the
        inner transform takes one already-combined gradient (a
        ``grads="weighted"`` loss-weighting method); ``losses`` must then be 1-D.
      debug: raise :class:`InvalidStepError` naming the task(s) and the step
        instead of skipping.
      check_output: also reject a step whose *output* is not finite (an update,
        or a state entry that turned non-finite: finite inputs can overflow
        inside, e.g. Adam's second moment).  Rolling the state back needs the
        old state alive until the check, so the new state cannot be written in
        place: this costs time and (T + 2)·P transient floats
        (``benchmarks/RESULTS_guard.md``).  False checks the inputs only.
      max_consecutive_skips: after this many consecutive invalid steps, apply the
        update anyway (like ``optax.apply_if_finite``), so a persistent problem
        shows up as NaN parameters instead of a silently frozen model.  ``None``:
        always skip.

    The validity check uses the updates' leading task axis and, when given, the
    ``losses=`` extra argument (and ``micro_batch_min_losses=``, which
    :class:`~dbmtl_jax.TaskMultiSteps` passes with the mean losses of its
    micro-batches, so that one micro-batch's negative loss is seen).  When
    ``params`` is given, every update the inner transform returns must have its
    parameter's shape: a leaf that kept its task axis (it bypassed the
    multi-task transform, e.g. under ``optax.masked``) raises a ``ValueError``
    instead of growing its parameter a task axis.
    """
    inner = _with_extra_args(inner)

    def init_fn(params: PyTree) -> SkipState:
        inner_state = inner.init(params)
        # Distinct buffers for each counter, so that the state can be donated to a jitted step.
        return SkipState(inner_state, finite_flags(inner_state), *(jnp.zeros([], jnp.int32) for _ in range(3)),
                         jnp.array(True))

    def update_fn(updates: PyTree, state: SkipState, params: Optional[PyTree] = None, **extra_args: Any):
        losses = extra_args.get("losses")
        losses = None if losses is None else jnp.asarray(losses)
        min_losses = extra_args.get(MIN_LOSSES_ARG)
        min_losses = None if min_losses is None else jnp.asarray(min_losses)
        _check_inputs(updates, losses, task_axis, params, min_losses)
        grad_bad, loss_bad = _invalid_flags(updates, losses, log_losses, task_axis, min_losses)
        invalid = jnp.any(grad_bad) | jnp.any(loss_bad)
        step = optax.safe_increment(state.step)
        if debug:
            _report(_raise, grad_bad, loss_bad, losses, step, min_losses)
        apply = ~invalid
        if max_consecutive_skips is not None:
            apply = apply | (state.consecutive_skipped >= max_consecutive_skips)

        def do_apply(_):
            return inner.update(updates, state.inner_state, params, **extra_args)

        out_shapes = jax.eval_shape(do_apply, None)[0]
        _check_output_shapes(out_shapes, params)

        def do_skip(_):
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out_shapes)
            return zeros, state.inner_state

        new_updates, new_inner = jax.lax.cond(apply, do_apply, do_skip, None)
        # Guard what the inner transform produced too: finite inputs can still overflow inside it
        # (a norm, Adam's second moment), and a non-finite update or a state entry that turned
        # non-finite must not be applied.
        if check_output:
            out_ok, new_flags = output_ok(new_updates, new_inner, state.inner_finite)
            out_bad = ~out_ok
        else:
            new_flags, out_bad = state.inner_finite, jnp.asarray(False)
        if debug and check_output:
            _report(_raise_output, out_bad & ~invalid, step)
        invalid = invalid | out_bad
        if max_consecutive_skips is not None:
            keep_new = ~invalid | (state.consecutive_skipped >= max_consecutive_skips)
        else:
            keep_new = ~invalid
        if check_output:
            new_updates, new_inner = select_step(keep_new, new_updates, new_inner, state.inner_state)
        return new_updates, SkipState(
            inner_state=new_inner,
            inner_finite=tuple(jnp.where(keep_new, n, o) for n, o in zip(new_flags, state.inner_finite)),
            step=step,
            num_skipped=state.num_skipped + (invalid & ~keep_new).astype(jnp.int32),  # not the forced ones
            consecutive_skipped=jnp.where(invalid, state.consecutive_skipped + 1, 0).astype(jnp.int32),
            last_valid=~invalid,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
