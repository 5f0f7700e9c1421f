"""The cheap path of the loss-weighting methods: one forward, one backward pass.

Loss-weighting methods (``ew``, ``gls``, ``rlw``, ``uw``, ``dwa``, ``imtl_l``,
``igbv2``, ``famo``, ``stch``) only reweight the task losses: their update is
``Σ_t w_t ∇ℓ_t = ∇ Σ_t stop_gradient(w_t) ℓ_t``.  So instead of T per-task
gradients, differentiate the weighted loss once, with the weights read from the
optimizer state, and build the method with ``grads="weighted"``::

    tx = optax.chain(dbmtl_jax.methods.get_method("dwa", 3, grads="weighted",
                                                  steps_per_epoch=100),
                     optax.adam(1e-4))
    opt_state = tx.init(params)
    step_grad = value_and_weighted_grad(loss_fn)       # loss_fn(params, batch) -> [T]

    @jax.jit
    def step(params, opt_state, batch, key):
        losses, grads = step_grad(opt_state, params, batch, key=key)
        updates, opt_state = tx.update(grads, opt_state, params, losses=losses, key=key)
        return optax.apply_updates(params, updates), opt_state

The weights are a pure function of the method's state (found anywhere inside
the Optax state: ``chain``, ``inject_hyperparams``, ``masked``, ``MultiSteps``,
...), the losses of the current batch and, for randomised methods (``rlw``,
``igbv2``), the key; ``update`` recomputes what it needs from the same
arguments, so the key given to :func:`loss_weights` must be the one given to
``update``.

Gradient accumulation: ``optax.MultiSteps`` averages the gradients of its
micro-batches but forwards only the last micro-batch's extra arguments, so the
method's state (loss histories, learned loss scales) would see one micro-batch's
``losses`` in ``k``.  Use ``dbmtl_jax.TaskMultiSteps(tx, num_tasks, k,
task_axis=False)``: it averages the ``losses`` too and passes the mean with the
mean gradient (pass one ``key`` for the ``k`` micro-batches of a randomised
method: each micro-batch's weights use its own key, the update the last one's).
Likewise ``skip_invalid_steps(tx, task_axis=False)``: the weighted gradient has
no task axis.

FAMO needs the losses *after* the parameter update.  Either call
:func:`observe_losses` with them (a second forward pass on the same batch, as
in the official FAMO code), or do nothing and FAMO uses the next step's losses
instead (the lagged variant; see :mod:`dbmtl_jax.methods.famo`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from dbmtl_jax.task_gradients import (
    Model,
    TrunkHeads,
    _check_argnums,
    _check_differentiable,
    _check_eps,
    _check_spec_call,
    _cotangent_scale,
    _resolve_argnums,
    _scale_rows,
    _transform,
)

PyTree = Any

__all__ = [
    "is_loss_weighting_state",
    "find_loss_weighting_state",
    "loss_weights",
    "weighted_loss",
    "observe_losses",
    "value_and_weighted_grad",
]


def is_loss_weighting_state(x: Any) -> bool:
    """True for the state of a loss-weighting method (a NamedTuple with ``loss_weights``)."""
    return isinstance(x, tuple) and hasattr(x, "_fields") and callable(getattr(type(x), "loss_weights", None))


def find_loss_weighting_state(opt_state: PyTree) -> Any:
    """Returns the single loss-weighting state inside an Optax state tree.

    Raises ``ValueError`` when there is none or more than one.
    """
    if is_loss_weighting_state(opt_state):
        return opt_state
    leaves = jax.tree_util.tree_leaves(opt_state, is_leaf=is_loss_weighting_state)
    found = [x for x in leaves if is_loss_weighting_state(x)]
    if not found:
        raise ValueError(
            "no loss-weighting state found in the optimizer state; build the transform with one of "
            "ew, gls, rlw, uw, dwa, imtl_l, igbv2, famo, stch."
        )
    if len(found) > 1:
        names = ", ".join(type(x).__name__ for x in found)
        raise ValueError(f"the optimizer state holds {len(found)} loss-weighting states ({names}); expected one.")
    return found[0]


def loss_weights(opt_state: PyTree, losses: Optional[jax.Array] = None, key: Optional[jax.Array] = None) -> jax.Array:
    """The task weights ``w`` (``[T]``, float32) of the current step.

    Args:
      opt_state: an Optax state containing exactly one loss-weighting state.
      losses: the raw task losses ``[T]`` of the current batch (required by
        every method except ``ew`` and ``rlw``).
      key: PRNG key (required by ``rlw`` and ``igbv2``); pass the same key to
        ``update``.

    The weights use the hyperparameters stored in the method's state: those of
    the last ``update`` (or of ``init``).  Under ``optax.inject_hyperparams`` a
    new value for the coming update (a schedule's next value, or one set in
    ``state.hyperparams``) reaches the method only inside that ``update``, which
    uses it at once.  So on the cheap path a changing hyperparameter that
    enters the weights (DWA's ``temperature``, STCH's ``mu`` or epoch counts,
    an ``eps``) acts on the differentiated loss one step after it acts on
    ``update``; one used only by the state's own step (the Adam of UW's and
    IMTL-L's log-variances) is used at once on both paths.
    """
    state = find_loss_weighting_state(opt_state)
    name = type(state).__name__
    if losses is None and type(state).needs_losses:
        raise ValueError(f"{name}: loss_weights needs the raw task losses (losses=[T]).")
    if key is None and type(state).needs_key:
        raise ValueError(f"{name}: loss_weights needs a PRNG key (key=...), the same one given to update.")
    if losses is not None:
        losses = jnp.asarray(losses)
        if losses.ndim != 1:
            raise ValueError(f"{name}: losses must be a [T] vector, got shape {losses.shape}.")
        t = getattr(state, "num_tasks", None)
        if t is not None and losses.shape[0] != t:
            raise ValueError(f"{name}: losses has {losses.shape[0]} entries but the method was built for {t} tasks.")
        losses = losses.astype(jnp.promote_types(losses.dtype, jnp.float32))
    return state.loss_weights(losses, key)


def weighted_loss(opt_state: PyTree, losses: jax.Array, key: Optional[jax.Array] = None, *, log: bool = False,
                  eps: float = 1e-8) -> jax.Array:
    """``Σ_t stop_gradient(w_t) ℓ_t`` (float32 or wider): differentiate this once for the cheap path.

    With ``log=True`` the objective is ``Σ_t stop_gradient(w_t) log(ℓ_t + ε)`` (the weights still come from the
    raw losses), whose gradient is the weighted sum of the per-task gradients that
    ``value_and_task_grads(log=True)`` returns: a method's ``+log`` variant in one backward pass (and, as there,
    a loss with ``ℓ_t + ε ≤ 0`` gives a NaN gradient, not the finite, wrong-signed ``1/(ℓ_t + ε)``)."""
    eps = _check_eps(eps, "weighted_loss")
    losses = jnp.asarray(losses)
    w = jax.lax.stop_gradient(loss_weights(opt_state, jax.lax.stop_gradient(losses), key))
    acc = jnp.promote_types(losses.dtype, jnp.float32)
    return jnp.sum(w.astype(acc) * _transform(losses.astype(acc), log, eps))


def observe_losses(opt_state: PyTree, next_losses: jax.Array) -> PyTree:
    """Feeds the losses measured *after* the parameter update to the method (FAMO).

    Returns ``opt_state`` with its loss-weighting state replaced by
    ``state.observe(next_losses)`` when the method defines ``observe`` (FAMO),
    unchanged otherwise.  Call it after ``optax.apply_updates`` with the losses
    of the same batch at the new parameters.
    """
    find_loss_weighting_state(opt_state)  # exactly one, or a clear error

    def f(x: Any) -> Any:
        if is_loss_weighting_state(x) and callable(getattr(type(x), "observe", None)):
            return x.observe(next_losses)
        return x

    if is_loss_weighting_state(opt_state):
        return f(opt_state)
    return jax.tree_util.tree_map(f, opt_state, is_leaf=is_loss_weighting_state)


def value_and_weighted_grad(model: Model, argnums: int = 0, *, has_aux: bool = False, log: bool = False,
                            eps: float = 1e-8) -> Callable[..., Any]:
    """One-backward-pass gradient of the loss-weighted objective ``Σ_t stop_gradient(w_t) ℓ_t``.

    Args:
      model: ``loss_fn`` returning the ``[T]`` vector of raw task losses (or
        ``(losses, aux)`` with ``has_aux=True``), or a
        :class:`dbmtl_jax.TrunkHeads` spec (called as ``(params, batch)``;
        ``argnums`` 0, no ``has_aux``).
      argnums: which positional argument of ``loss_fn`` to differentiate.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      log, eps: differentiate ``Σ_t w_t log(ℓ_t + ε)`` instead (the method's
        ``+log`` variant, the same update as the per-task path of
        ``value_and_task_grads(log=True)``); the weights and the returned
        ``losses`` stay the raw ones.

    float16 losses: the cotangent ``w_t`` (``w_t/(ℓ_t + ε)`` with ``log``) that
    reaches each loss would overflow float16 past 65504; it is divided by one
    power of two that brings the largest to ≤ 1024, and the gradient multiplied
    back in float32.  A task whose cotangent is below ~1e-10 of the largest then
    falls under float16's range and contributes nothing (in a shared layer it
    would be lost to rounding anyway).

    Returns:
      ``wrapped(opt_state, *args, key=None, **kwargs)`` returning
      ``(losses, grads)`` (or ``((losses, aux), grads)``) where ``grads`` is the
      gradient of ``Σ_t stop_gradient(w_t) ℓ_t`` with the weights
      ``w = loss_weights(opt_state, losses, key)`` (no task axis).  ``key`` is
      consumed here and not passed to ``loss_fn``.  Feed ``grads`` and
      ``losses`` (and ``key``) to a transform built with ``grads="weighted"``.
    """
    argnums = _check_argnums(argnums)
    eps = _check_eps(eps, "value_and_weighted_grad")
    if isinstance(model, TrunkHeads):
        _check_spec_call(argnums, has_aux)
        loss_fn = model.losses
    else:
        loss_fn = model

    def wrapped(opt_state: PyTree, *args: Any, key: Optional[jax.Array] = None, **kwargs: Any) -> Any:
        i = _resolve_argnums(argnums, args)  # a negative argnums counts from the end, as in jax.grad
        _check_differentiable(args[i], "value_and_weighted_grad")
        args = list(args)

        def f(p: PyTree) -> Any:
            call_args = args[:i] + [p] + args[i + 1 :]
            out = loss_fn(*call_args, **kwargs)
            losses, aux = out if has_aux else (out, None)
            losses = jnp.asarray(losses)
            if losses.ndim != 1:
                raise ValueError(f"loss_fn must return a [T] vector of task losses, got shape {losses.shape}.")
            objective = weighted_loss(opt_state, losses, key, log=log, eps=eps)
            if jnp.dtype(losses.dtype) != jnp.float16:
                return objective, (losses, aux, None)
            # float16 losses: the cotangent w_t (w_t / (ℓ_t + ε) under the log) that reaches each loss may
            # overflow float16; pull back objective / R instead and multiply the gradient by R (a power of two).
            w = loss_weights(opt_state, jax.lax.stop_gradient(losses), key).astype(jnp.float32)
            cot = w / (losses.astype(jnp.float32) + eps) if log else w
            scale = _cotangent_scale(jnp.max(jnp.abs(cot)))
            return objective / scale, (losses, aux, scale)

        grads, (losses, aux, scale) = jax.grad(f, has_aux=True)(args[i])
        grads = grads if scale is None else _scale_rows(grads, scale)
        return ((losses, aux), grads) if has_aux else (losses, grads)

    return wrapped
