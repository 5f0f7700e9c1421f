"""Gradient accumulation of per-task gradients and task losses: ``optax.MultiSteps`` for multi-task transforms.

``optax.MultiSteps`` sizes its accumulator like the parameters; multi-task
transforms receive updates with a leading task axis ``[T, *shape]``, so the
accumulator needs that axis too.  And ``optax.MultiSteps`` accumulates only the
gradients: it calls the inner ``update`` with each micro-batch's *own* extra
arguments and keeps the inner state of the emitting (last) micro-batch only, so
the ``losses=`` of the first ``k − 1`` micro-batches never reach a method whose
state learns from them (UW's log-variances, DWA's loss history, GradNorm's
initial losses) nor the loss check of :func:`dbmtl_jax.skip_invalid_steps`.
Use :class:`TaskMultiSteps` instead, also for the one-backward
``grads="weighted"`` path (``task_axis=False``).

:class:`TaskMultiSteps` averages the per-task gradients *and* the task losses
of ``k`` micro-batches and then makes one update of the inner transformation
(for example ``optax.chain(dbmtl(T), optax.adam(1e-4))``) with the mean
gradient and ``losses=`` the mean losses.

Note that with the log transform, the accumulated quantity is the mean over
micro-batches of ``∇ log(ℓ_t(micro-batch) + ε)``, not the gradient of the log of
the full-batch loss.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax

from dbmtl_jax import task_axis as ta

__all__ = ["TaskMultiSteps", "TaskMultiStepsState"]

#: The extra argument that carries the per-task minimum of the accumulated micro-batches' losses to the inner
#: transform (``skip_invalid_steps`` rejects a negative one with ``log_losses=True``: a negative loss of one
#: micro-batch can hide in a non-negative mean).
MIN_LOSSES_ARG = "micro_batch_min_losses"


class TaskMultiStepsState(NamedTuple):
    """State of :class:`TaskMultiSteps`: ``optax.MultiStepsState``'s five fields, then the loss accumulator.

    Attributes:
      mini_step: micro-batches accumulated since the last emitted update (int32).
      gradient_step: emitted updates (int32).
      inner_opt_state: the inner transformation's state.
      acc_grads: the running mean (or sum, ``use_grad_mean=False``) of the micro-batches' updates,
        ``[T, *param_shape]`` per leaf (``param_shape`` with ``task_axis=False``).
      skip_state: what ``should_skip_update_fn`` returned.
      acc_losses: ``[T]`` running mean (or sum, the gradients' rule) of the ``losses=`` of the
        micro-batches accumulated so far that passed them.
      min_losses: ``[T]`` per-task minimum of those losses.
      loss_count: how many of the accumulated micro-batches passed ``losses=`` (int32).
    """

    mini_step: chex.Array
    gradient_step: chex.Array
    inner_opt_state: Any
    acc_grads: Any
    skip_state: chex.ArrayTree
    acc_losses: chex.Array
    min_losses: chex.Array
    loss_count: chex.Array


class TaskMultiSteps(optax.MultiSteps):
    """Gradient accumulation for multi-task transforms: ``k`` micro-batches, then one update.

    Every micro-batch's ``update(updates, state, params, losses=..., key=...)``
    adds its updates and its ``losses`` (``[num_tasks]``) to running means; at the
    ``k``-th the inner transformation gets the mean updates and ``losses=`` the
    mean losses, and the means restart.  The means follow ``use_grad_mean``
    (``False``: sums, for both).  Pass ``losses=`` with every micro-batch (the
    mean is over the micro-batches that did).  The inner transformation is
    called only at the emitting micro-batch, with that micro-batch's other extra
    arguments: a randomised method (``key=``) draws once per emitted update, from
    the key passed with the last micro-batch, and the keys of the others are
    unused.  On the ``grads="weighted"`` path, where each micro-batch's weighted
    gradient uses that micro-batch's key, pass one key for all ``k``.

    With ``losses=``, the inner transformation also gets the extra argument
    ``micro_batch_min_losses`` (``[T]``, each task's smallest accumulated loss):
    :func:`dbmtl_jax.skip_invalid_steps` inside rejects the emitted update when a
    micro-batch had a negative loss (``log_losses=True``).  A NaN/inf loss or
    gradient of any micro-batch makes the means non-finite, so a guard inside
    rejects the emitted update too (parameters and inner state untouched; the
    accumulator restarts).  A guard *outside* (``skip_invalid_steps(TaskMultiSteps(...))``)
    drops an invalid micro-batch instead and keeps accumulating the others.

    Args:
      opt: the inner transformation, e.g. ``optax.chain(dbmtl(T), optax.adam(1e-4))``.
      num_tasks: ``T``, the size of the updates' leading task axis and of ``losses``.
      every_k_schedule: micro-batches per update, an int or a function of the update count (as in
        ``optax.MultiSteps``).
      use_grad_mean: average (True) or sum the updates and the losses.
      should_skip_update_fn: as in ``optax.MultiSteps``: a skipped micro-batch is not accumulated.
      accumulator_dtype: the updates' accumulator dtype; float32 by default, as in ``optax.MultiSteps``
        (low-precision parameters get a float32 accumulator; the mean is cast back to the updates' dtype
        before the inner transformation).  The losses are accumulated in float32 or wider.
      task_axis: the updates carry the task axis ``[T, *param_shape]`` (per-task gradients, the default).
        ``False`` for plain gradients (a ``grads="weighted"`` loss-weighting method): the accumulator then
        has the parameters' shapes, and the losses are still averaged.
    """

    def __init__(
        self,
        opt: optax.GradientTransformation,
        num_tasks: int,
        every_k_schedule: Union[int, Callable[[jax.Array], jax.Array]],
        use_grad_mean: bool = True,
        should_skip_update_fn: Optional[Callable[..., Any]] = None,
        accumulator_dtype: Optional[Any] = jnp.float32,
        *,
        task_axis: bool = True,
    ):
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}.")
        if not isinstance(task_axis, bool):
            raise TypeError(f"TaskMultiSteps: task_axis must be a bool, got {task_axis!r}.")
        super().__init__(
            opt,
            every_k_schedule,
            use_grad_mean=use_grad_mean,
            should_skip_update_fn=should_skip_update_fn,
            accumulator_dtype=accumulator_dtype,
        )
        self._num_tasks = num_tasks
        self._task_axis = task_axis
        self._loss_dtype = jax.dtypes.canonicalize_dtype(jnp.promote_types(
            jnp.float32 if accumulator_dtype is None else jnp.dtype(accumulator_dtype), jnp.float32
        ))

    def init(self, params: Any) -> TaskMultiStepsState:
        state = super().init(params)
        acc = state.acc_grads
        if self._task_axis:
            # optax's own accumulator dtype (float32 by default), task axis in front.
            acc = jax.tree_util.tree_map(
                lambda a: jnp.zeros((self._num_tasks,) + jnp.shape(a), jnp.asarray(a).dtype), acc
            )
        t = self._num_tasks
        return TaskMultiStepsState(
            *state._replace(acc_grads=acc),
            acc_losses=jnp.zeros([t], self._loss_dtype),
            min_losses=jnp.zeros([t], self._loss_dtype),
            loss_count=jnp.zeros([], jnp.int32),
        )

    def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
        """``(init, update)`` as an ``optax.GradientTransformationExtraArgs``, so that ``optax.chain`` forwards
        ``losses=`` and ``key=`` to it (optax's returns a plain ``GradientTransformation``, which drops them)."""
        return optax.GradientTransformationExtraArgs(init=self.init, update=self.update)

    def _check_losses(self, losses: Any) -> jax.Array:
        losses = jnp.asarray(losses)
        if losses.shape != (self._num_tasks,):
            raise ValueError(
                f"TaskMultiSteps: losses has shape {tuple(losses.shape)}, expected (T,) = "
                f"({self._num_tasks},): one raw loss per task for each micro-batch."
            )
        if not (jnp.issubdtype(losses.dtype, jnp.floating) or jnp.issubdtype(losses.dtype, jnp.integer)):
            raise TypeError(f"TaskMultiSteps: losses must be floating point (or integer), got dtype {losses.dtype}.")
        return losses.astype(self._loss_dtype)

    def _check_updates(self, updates: Any, acc_grads: Any, params: Optional[Any]) -> None:
        u_flat, u_def = jax.tree_util.tree_flatten_with_path(updates)
        a_leaves, a_def = jax.tree_util.tree_flatten(acc_grads)
        if self._task_axis:
            if u_def == a_def and all(jnp.shape(u) == jnp.shape(a)[1:] for (_, u), a in zip(u_flat, a_leaves)):
                path, u = u_flat[0]
                raise ValueError(
                    f"TaskMultiSteps: the updates have their parameters' shapes, without the task axis "
                    f"[T, *param_shape] (leaf '{ta._path_str(path)}' has {tuple(jnp.shape(u))}): pass "
                    "per-task gradients, or task_axis=False for plain gradients (a grads='weighted' method)."
                )
            # The accumulator would broadcast a wrong task axis: one task's gradient copied into every task's row.
            ta.check_task_axis(updates, self._num_tasks, params=params)
        if u_def != a_def:
            raise ValueError(
                f"TaskMultiSteps: the updates' tree structure {u_def} differs from the accumulator's {a_def} "
                "(the parameters given to init)."
            )
        for (path, u), a in zip(u_flat, a_leaves):
            if jnp.shape(u) != jnp.shape(a):
                hint = (" (plain gradients without the task axis: pass task_axis=False)" if self._task_axis
                        else " (per-task gradients: leave task_axis=True)")
                raise ValueError(
                    f"TaskMultiSteps: update leaf '{ta._path_str(path)}' has shape {tuple(jnp.shape(u))} "
                    f"but its accumulator has {tuple(jnp.shape(a))}{hint}."
                )

    def update(
        self, updates: Any, state: TaskMultiStepsState, params: Optional[Any] = None, **extra_args: Any
    ) -> tuple[Any, TaskMultiStepsState]:
        """Accumulates ``updates`` and ``losses=``; every ``k``-th call, one update of the inner transformation."""
        if not isinstance(state, TaskMultiStepsState):
            raise TypeError(
                f"TaskMultiSteps.update needs a TaskMultiStepsState (from TaskMultiSteps.init), got "
                f"{type(state).__name__}: a state of optax.MultiSteps, or a checkpoint written before the loss "
                "accumulator was added (fill acc_losses/min_losses with zeros([T]) and loss_count with 0)."
            )
        self._check_updates(updates, state.acc_grads, params)
        losses = extra_args.pop("losses", None)
        if losses is not None:
            losses = self._check_losses(losses)
        extra_args.pop(MIN_LOSSES_ARG, None)  # ours to set (a TaskMultiSteps inside another)

        k_steps = self._every_k_schedule(state.gradient_step)
        should_skip, skip_state = self._should_skip_update_fn(updates, state.gradient_step, params)
        should_skip = jnp.asarray(should_skip)
        if (should_skip.dtype, should_skip.shape) != (jnp.bool_, ()):
            raise ValueError(
                "The `should_skip_update_fn` function should return a boolean scalar array, but it returned an "
                f"array of dtype {should_skip.dtype} and shape {should_skip.shape}."
            )
        accept = ~should_skip
        emit = accept & (state.mini_step == k_steps - 1)

        acc_grads = jax.tree_util.tree_map(
            lambda u, a: self._acc_update(u.astype(a.dtype), a, n_acc=state.mini_step).astype(a.dtype),
            updates, state.acc_grads,
        )
        acc_losses, min_losses, loss_count = state.acc_losses, state.min_losses, state.loss_count
        inner_args = dict(extra_args)
        if losses is not None:
            acc_losses = self._acc_update(losses, acc_losses, n_acc=loss_count).astype(self._loss_dtype)
            min_losses = jnp.where(loss_count == 0, losses, jnp.minimum(min_losses, losses))
            loss_count = loss_count + 1
            inner_args["losses"] = acc_losses
            inner_args[MIN_LOSSES_ARG] = min_losses

        def do_emit(_: Any) -> tuple[Any, Any]:
            out, new_inner = self._opt.update(
                optax.tree.cast_like(acc_grads, updates), state.inner_opt_state, params, **inner_args
            )
            new_inner = jax.tree_util.tree_map(
                lambda n, o: jnp.asarray(n).astype(jnp.asarray(o).dtype), new_inner, state.inner_opt_state
            )
            return out, new_inner

        def do_wait(_: Any) -> tuple[Any, Any]:
            shapes = jax.eval_shape(do_emit, None)[0]
            return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), state.inner_opt_state

        # The inner transformation runs only at the emitting micro-batch (optax.MultiSteps runs it on every one
        # and keeps its state only at the last).
        new_updates, new_inner = jax.lax.cond(emit, do_emit, do_wait, None)

        def keep(new: Any, old: Any) -> Any:  # a skipped micro-batch leaves everything as it was
            return jnp.where(accept, new, old)

        def restart(x: Any) -> Any:  # selected, not multiplied: a NaN micro-batch must not stay in the sums
            return jnp.where(emit, jnp.zeros_like(x), x)

        new_state = TaskMultiStepsState(
            mini_step=jnp.where(accept, optax.safe_increment(state.mini_step) % k_steps, state.mini_step).astype(
                jnp.int32),
            gradient_step=jnp.where(emit, optax.safe_increment(state.gradient_step), state.gradient_step).astype(
                jnp.int32),
            inner_opt_state=new_inner,
            acc_grads=jax.tree_util.tree_map(lambda n, o: restart(keep(n, o)), acc_grads, state.acc_grads),
            skip_state=skip_state,
            acc_losses=restart(keep(acc_losses, state.acc_losses)),
            min_losses=restart(keep(min_losses, state.min_losses)),
            loss_count=restart(keep(loss_count, state.loss_count)).astype(jnp.int32),
        )
        return new_updates, new_state
