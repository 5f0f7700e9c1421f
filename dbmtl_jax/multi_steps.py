"""Gradient accumulation of per-task gradients: ``optax.MultiSteps`` with a task axis.

``optax.MultiSteps`` sizes its accumulator like the parameters; multi-task
transforms receive updates with a leading task axis ``[T, *shape]``, so the
accumulator needs that axis too.  :class:`TaskMultiSteps` is
``optax.MultiSteps`` with exactly that change: it averages the per-task
gradients of ``k`` micro-batches and then makes one update of the inner
transformation (for example ``optax.chain(dbmtl(T), optax.adam(1e-4))``).

Note that with the log transform, the accumulated quantity is the mean over
micro-batches of ``∇ log(ℓ_t(micro-batch) + ε)``, not the gradient of the log of
the full-batch loss.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

from dbmtl_jax import task_axis as ta

__all__ = ["TaskMultiSteps"]


class TaskMultiSteps(optax.MultiSteps):
    """``optax.MultiSteps`` whose gradient accumulator carries a leading task axis of size ``num_tasks``.

    ``accumulator_dtype`` defaults to float32, as in ``optax.MultiSteps`` (low-precision parameters get a float32
    accumulator; the summed gradient is cast back to the updates' dtype before the inner transformation).
    """

    def __init__(
        self,
        opt: optax.GradientTransformation,
        num_tasks: int,
        every_k_schedule: Union[int, Callable[[jax.Array], jax.Array]],
        use_grad_mean: bool = True,
        should_skip_update_fn: Optional[Callable[..., Any]] = None,
        accumulator_dtype: Optional[Any] = jnp.float32,
    ):
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}.")
        super().__init__(
            opt,
            every_k_schedule,
            use_grad_mean=use_grad_mean,
            should_skip_update_fn=should_skip_update_fn,
            accumulator_dtype=accumulator_dtype,
        )
        self._num_tasks = num_tasks

    def init(self, params: Any) -> optax.MultiStepsState:
        state = super().init(params)
        # optax's own accumulator dtype (its update casts the accumulator to accumulator_dtype, float32 by
        # default, so a parameter-dtype accumulator would make its lax.cond branches disagree), task axis in front.
        acc = jax.tree_util.tree_map(
            lambda a: jnp.zeros((self._num_tasks,) + jnp.shape(a), jnp.asarray(a).dtype), state.acc_grads
        )
        return state._replace(acc_grads=acc)

    def update(self, updates: Any, state: optax.MultiStepsState, params: Optional[Any] = None,
               **extra_args: Any) -> tuple[Any, optax.MultiStepsState]:
        """``optax.MultiSteps.update`` after checking the task axis (the accumulator would broadcast a
        wrong one: one task's gradient, or none, copied into every task's row)."""
        ta.check_task_axis(updates, self._num_tasks, params=params)
        return super().update(updates, state, params, **extra_args)
