"""Shared machinery of the loss-weighting methods (EW, GLS, RLW, UW, DWA, IMTL-L, IGBv2, FAMO, STCH).

A loss-weighting method minimises ``Σ_t w_t ℓ_t`` for task weights ``w`` that
are computed from the method's state, the raw task losses ``ℓ`` (``[T]``) and,
for randomised methods, a PRNG key.  Each method's state is a NamedTuple that
implements the *loss-weighting state protocol*:

* ``loss_weights(self, losses=None, key=None) -> [T]``: the weights ``w`` of
  the current step (float32), a pure function of the state and its arguments;
* ``advance(self, losses, key, **extra_args) -> state``: the state after the
  current step (counts, histories, learnable loss parameters);
* class attributes ``needs_losses`` / ``needs_key``: whether ``losses=`` /
  ``key=`` are required.

Every hyperparameter that ``loss_weights`` or ``advance`` needs lives in a state
field, so the weights can be recomputed from the optimizer state alone
(:func:`dbmtl_jax.loss_weighting.loss_weights`) and a checkpoint holds all of it.
``update`` first writes the factory's current values into those fields, so a
value injected by ``optax.inject_hyperparams`` (a schedule, or one set in
``state.hyperparams``) is the one used by the update it is injected for; the
state then holds the values of the last update.

:func:`make_loss_transform` turns such a state into an Optax transform with two
modes (``grads=``):

* ``"per_task"``: ``update`` receives per-task gradients (leaves
  ``[T, *param_shape]``) and returns ``Σ_t w_t g_t``;
* ``"weighted"``: ``update`` receives the plain gradient of
  ``Σ_t stop_gradient(w_t) ℓ_t`` (leaves ``param_shape``, one backward pass)
  and passes it through; it only advances the state.

Both modes advance the state identically, so for the same losses and key they
give the same update.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _numerics as nm

PyTree = Any

GRADS_MODES = ("per_task", "weighted")

__all__ = [
    "GRADS_MODES",
    "InnerAdam",
    "adam_init",
    "adam_step",
    "state_adam_step",
    "check_grads_mode",
    "check_inner_adam",
    "f32",
    "refresh_hparams",
    "clamped_log",
    "make_loss_transform",
]


def check_grads_mode(grads: str, method: Optional[str] = None) -> str:
    if grads not in GRADS_MODES:
        prefix = f"{method}: " if method else ""
        raise ValueError(f"{prefix}unknown grads {grads!r}; expected one of {GRADS_MODES}.")
    return grads


def check_inner_adam(method: str, learning_rate: Any, b1: Any, b2: Any, adam_eps: Any) -> tuple[Any, Any, Any, Any]:
    """Ranges of the inner Adam of a learnable loss parameter (PyTorch's ``torch.optim.Adam`` rules).

    ``learning_rate >= 0`` (0 freezes the parameter; allowed so that an
    ``optax.inject_hyperparams`` schedule may start or end at 0), ``b1, b2`` in
    ``[0, 1)`` (1 would divide by a zero bias correction), ``adam_eps >= 0``.
    Returns the four checked values (traced ones out of range are NaN, see
    :func:`dbmtl_jax.methods._numerics.check_real`).
    """
    learning_rate = nm.check_real(learning_rate, "learning_rate", method, lo=0)
    b1 = nm.check_real(b1, "b1", method, lo=0, hi=1, hi_open=True)
    b2 = nm.check_real(b2, "b2", method, lo=0, hi=1, hi_open=True)
    adam_eps = nm.check_real(adam_eps, "adam_eps", method, lo=0)
    return learning_rate, b1, b2, adam_eps


def f32(x: Any) -> jax.Array:
    """A float hyperparameter as a float32 state field: a copy, never ``x``'s own buffer, so that the state
    and ``optax.inject_hyperparams``' ``hyperparams`` can both be donated to a jitted step."""
    return jnp.array(x, jnp.float32, copy=True)


def refresh_hparams(state: NamedTuple, hparams: Mapping[str, Any]) -> NamedTuple:
    """``state`` with its hyperparameter fields set to ``hparams`` (each cast to its field's dtype).

    Under ``optax.inject_hyperparams`` the factory, and so ``hparams``, carries the values of the
    current step (possibly traced); a field's shape and dtype never change.  Each field is a copy:
    returned as the wrapper's own input, a jitted step would give the state field and
    ``hyperparams`` one buffer, which a donated next step refuses.
    """
    if not hparams:
        return state
    return state._replace(**{k: jnp.array(v, getattr(state, k).dtype, copy=True) for k, v in hparams.items()})


def clamped_log(losses: jax.Array, eps: jax.Array) -> jax.Array:
    """``log(max(ℓ, 0) + ε)``: the log of a loss, finite for zero (and negative) losses."""
    return jnp.log(jnp.maximum(losses, 0) + eps)


class InnerAdam(NamedTuple):
    """Adam moments of a small ``[T]`` parameter vector held inside a method's state."""

    m: jax.Array
    v: jax.Array
    count: jax.Array


def adam_init(num_tasks: int) -> InnerAdam:
    return InnerAdam(
        m=jnp.zeros([num_tasks], jnp.float32), v=jnp.zeros([num_tasks], jnp.float32), count=jnp.zeros([], jnp.int32)
    )


def state_adam_step(
    state: NamedTuple, params: jax.Array, grad: jax.Array, weight_decay: Optional[jax.Array] = None
) -> tuple[jax.Array, InnerAdam]:
    """:func:`adam_step` with the moments and hyperparameters read from a method state's fields
    (``adam``, ``learning_rate``, ``b1``, ``b2``, ``adam_eps`` and, unless given, ``weight_decay``)."""
    wd = state.weight_decay if weight_decay is None else weight_decay
    return adam_step(params, grad, state.adam, state.learning_rate, state.b1, state.b2, state.adam_eps, wd)


def adam_step(
    params: jax.Array,
    grad: jax.Array,
    adam: InnerAdam,
    lr: jax.Array,
    b1: jax.Array,
    b2: jax.Array,
    eps: jax.Array,
    weight_decay: jax.Array,
) -> tuple[jax.Array, InnerAdam]:
    """One Adam step (PyTorch ``torch.optim.Adam`` semantics: L2 ``weight_decay`` added to the gradient)."""
    grad = grad.astype(jnp.float32) + weight_decay * params
    # A non-finite gradient (an overflowing loss) must not poison the state.
    grad = jnp.where(jnp.isfinite(grad), grad, 0.0)
    count = optax.safe_increment(adam.count)
    m = b1 * adam.m + (1 - b1) * grad
    v = b2 * adam.v + (1 - b2) * jnp.square(grad)
    k = count.astype(jnp.float32)
    m_hat = m / (1 - b1**k)
    v_hat = v / (1 - b2**k)
    step = lr * m_hat / (jnp.sqrt(v_hat) + eps)
    step = jnp.where(jnp.isfinite(step), step, 0.0)
    return params - step, InnerAdam(m=m, v=v, count=count)


def _check_plain_grads(updates: PyTree, params: Optional[PyTree], num_tasks: int, name: str) -> None:
    """In ``grads="weighted"`` mode the update leaves must not carry the task axis."""
    if params is None:
        return
    u_flat = jax.tree_util.tree_leaves(updates)
    p_flat = jax.tree_util.tree_leaves(params, is_leaf=ta.is_variable)
    if len(u_flat) != len(p_flat):
        return  # structure mismatches are optax's business, not ours
    for path, u, p in zip(ta.leaf_paths(updates), u_flat, p_flat):
        p_shape = jnp.shape(p.get_value() if ta.is_variable(p) else p)
        u_shape = jnp.shape(u)
        if u_shape == p_shape:
            continue
        if u_shape == (num_tasks,) + tuple(p_shape):
            raise ValueError(
                f"{name}(grads='weighted'): update leaf '{path}' has shape {u_shape} = [T, *param_shape]; "
                "this mode takes the plain gradient of the weighted loss. Pass per-task gradients "
                "with grads='per_task'."
            )
        raise ValueError(
            f"{name}(grads='weighted'): update leaf '{path}' has shape {u_shape} but the parameter has "
            f"shape {p_shape}."
        )


def make_loss_transform(
    num_tasks: int,
    name: str,
    init_state: Callable[[], NamedTuple],
    hparams: Mapping[str, Any],
    *,
    grads: str,
    weight_heads: bool,
    shared: ta.SharedSpec,
    int_minimum: Optional[Mapping[str, int]] = None,
) -> optax.GradientTransformationExtraArgs:
    """Builds the Optax transform of a loss-weighting method.

    Args:
      num_tasks: ``T``.
      name: the method name (for error messages).
      init_state: returns the initial state (it does not depend on the parameters).
      hparams: hyperparameter fields of the state (float or int) and the factory's
        values of them.  They are written into the state (cast to each field's
        dtype) at the *start* of every update, before the weights and the state
        step are computed, so a value injected by ``optax.inject_hyperparams``
        for update k is used in update k, identically in both ``grads`` modes.
        A float one injected out of range arrives as NaN (the factory's
        :func:`dbmtl_jax.methods._numerics.check_real`) and makes its step
        invalid (NaN update, state kept).
      int_minimum: the smallest valid value of the integer fields among
        ``hparams`` (``{"steps_per_epoch": 1}``).  A concrete value out of range
        was rejected by the factory; a value traced under ``jit`` (injected) is
        checked here, and one out of range makes its step invalid (NaN update,
        state kept), as a non-finite loss does.
      grads: ``"per_task"`` or ``"weighted"`` (see the module docstring).
      weight_heads: in ``"per_task"`` mode, whether task-specific (head) leaves
        get ``Σ_t w_t g_t`` (True, the loss-weighting objective) or the plain
        ``Σ_t g_t`` (False).
      shared: which leaves are shared (only used with ``weight_heads=False``).
    """
    check_grads_mode(grads, name)
    nm.check_bool(weight_heads, "weight_heads", name)
    nm.check_shared(shared, name)
    if not weight_heads and grads != "per_task":
        raise ValueError(
            f"{name}: weight_heads=False needs grads='per_task' (the weighted-loss gradient cannot "
            "separate the tasks' head gradients)."
        )
    def init_fn(params: PyTree) -> NamedTuple:
        del params
        # One buffer per leaf (init_state may reuse a zeros array for several fields), so the state
        # can be donated to a jitted step.
        return nm.unalias(init_state())

    def update_fn(
        updates: PyTree,
        state: NamedTuple,
        params: Optional[PyTree] = None,
        *,
        losses: Optional[jax.Array] = None,
        key: Optional[jax.Array] = None,
        **extra_args: Any,
    ) -> tuple[PyTree, NamedTuple]:
        expected = ta.init_shapes(init_fn, None)  # trace time, no computation
        if expected is not None:
            ta.check_state_like(state, expected, name, num_tasks)
        if losses is not None or type(state).needs_losses:
            losses = nm.check_losses(losses, num_tasks, name)
        if type(state).needs_key:
            nm.require_key(key, name)

        # This update's hyperparameters first (optax.inject_hyperparams re-builds the transform with the
        # values of this step): the weights and the state step below read them from the state.
        old_state = state
        state = refresh_hparams(state, hparams)
        hparams_ok = nm.injected_ok(dict(hparams), [(hparams[f], lo) for f, lo in (int_minimum or {}).items()])

        if grads == "per_task":
            ta.check_task_axis(updates, num_tasks, params=params)
            w = state.loss_weights(losses, key)
            if weight_heads:
                out = ta.weighted_sum_tasks(updates, w)  # nm.combine over the leaves
            else:
                mask = ta.resolve_shared(shared, updates if params is None else params)
                g_shared, g_heads, treedef = ta.split_shared(updates, mask)
                out_shared = nm.combine(g_shared, w)
                out_heads = nm.sum_heads(g_heads)
                out = ta.merge_shared(out_shared, out_heads, mask, treedef)
        else:
            _check_plain_grads(updates, params, num_tasks, name)
            out = updates

        new_state = state.advance(losses, key, **extra_args)
        # A NaN or inf loss (or a state it overflows) would stay in the state (DWA's loss history, FAMO's
        # previous losses) behind a finite update, and an injected hyperparameter out of range (steps_per_epoch
        # = 0 would divide by zero, b2 = 1.5 would run): the step is made visibly invalid and the state kept.
        ok = nm.conjoin(nm.all_finite((losses, new_state)), hparams_ok)
        return nm.reject_unless(ok, out, new_state, old_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
