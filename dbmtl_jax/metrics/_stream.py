"""Shared plumbing of the streaming metrics (private).

Every metric of :mod:`dbmtl_jax.metrics` is a frozen dataclass holding its static
configuration, with the clu/optax-like protocol::

    state = metric.init()
    state = metric.update(state, pred, target, mask=None)   # once per batch, jit-able
    values = metric.compute(state)                          # dict of scalars / small arrays

States are NamedTuples of sufficient statistics (counts, sums, histograms) with
shapes and dtypes fixed at ``init``; they are additive, so two states of the same
metric (e.g. from two hosts) combine with :meth:`StreamingMetric.merge`.
Counts are int32, exact below 2**31 - 1 per cell (and per total that ``compute``
forms): a count that would pass it saturates at ``COUNT_MAX`` (``add_counts``,
also in ``merge``) and ``compute`` then returns NaN for the values it enters
(a wrapped, negative count would give a plausible number).  Float sums are float32.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

ACC_DTYPE = jnp.float32
COUNT_DTYPE = jnp.int32
COUNT_MAX = int(jnp.iinfo(COUNT_DTYPE).max)


class StreamingMetric:
    """Mixin giving :meth:`merge` and a one-shot ``__call__`` to the metric dataclasses."""

    def init(self) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def update(self, state: Any, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def compute(self, state: Any) -> dict[str, jax.Array]:  # pragma: no cover - overridden
        raise NotImplementedError

    def merge(self, a: Any, b: Any) -> Any:
        """The state of the union of the data behind ``a`` and ``b`` (counts saturate, see ``add_counts``)."""

        def add(x: jax.Array, y: jax.Array) -> jax.Array:
            return add_counts(x, y) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer) else jnp.add(x, y)

        return jax.tree_util.tree_map(add, a, b)

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, jax.Array]:
        """One-shot evaluation: ``compute(update(init(), *args, **kwargs))``."""
        return self.compute(self.update(self.init(), *args, **kwargs))


def valid_mask(mask: Optional[Any], shape: tuple[int, ...], name: str = "mask") -> jax.Array:
    """``mask`` (broadcastable to ``shape`` under NumPy rules) as a bool array of ``shape``; all True if None."""
    if mask is None:
        return jnp.ones(shape, bool)
    mask = jnp.asarray(mask)
    try:
        return jnp.broadcast_to(mask, shape).astype(bool)
    except ValueError as err:
        raise ValueError(f"{name} of shape {mask.shape} does not broadcast to {shape}.") from err


def safe_ratio(num: jax.Array, den: jax.Array, empty: float = 0.0) -> jax.Array:
    """``num / den`` in float32, with ``empty`` where ``den == 0`` (no 0/0 warning, no gradient trouble).

    A metric's summary values pass ``empty=jnp.nan``: nothing seen is no score, not a perfect or a worst one."""
    num = jnp.asarray(num, ACC_DTYPE)
    den = jnp.asarray(den, ACC_DTYPE)
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), jnp.asarray(empty, ACC_DTYPE))


def count(valid: jax.Array) -> jax.Array:
    """Number of True entries as an int32 scalar."""
    return jnp.sum(valid, dtype=COUNT_DTYPE)


def add_counts(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a + b`` for non-negative int32 counts, saturating at ``COUNT_MAX`` instead of wrapping.

    With ``a, b >= 0`` the int32 sum wraps exactly when it comes out below ``a``; a
    saturated count stays saturated.
    """
    total = a + b
    return jnp.where(total < a, jnp.asarray(COUNT_MAX, COUNT_DTYPE), total)


def saturated(counts: jax.Array) -> jax.Array:
    """Whether any of ``counts`` reached ``COUNT_MAX`` (may have overflowed): a bool scalar."""
    return jnp.any(counts == COUNT_MAX)


def cumulative_counts(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Running int32 totals of the non-negative 1-D ``counts``, and whether a count or a total overflowed.

    The running total of non-negative terms wraps exactly where it first decreases.
    """
    cum = jnp.cumsum(counts, dtype=COUNT_DTYPE)
    return cum, saturated(counts) | saturated(cum) | jnp.any(cum[1:] < cum[:-1])


def masked_sum(x: jax.Array, valid: jax.Array) -> jax.Array:
    """``Σ x[valid]`` in float32 (invalid entries, even NaN ones, contribute 0)."""
    return jnp.sum(jnp.where(valid, x.astype(ACC_DTYPE), 0.0), dtype=ACC_DTYPE)


def check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive Python int, got {value!r}.")


def labels_from(
    pred: Any, target_ndim: int, class_axis: int, name: str = "pred", num_classes: Optional[int] = None
) -> tuple[jax.Array, jax.Array]:
    """Integer labels from ``pred``, and where they are not to be trusted.

    Argmax over ``class_axis`` if ``pred`` has one more axis than the target (whose
    length must be ``num_classes`` when given); the second array (the target's
    shape) is True where those scores hold a NaN (argmax would pick the NaN's
    class).  Integer / bool labels are taken as they are (the second array all False).
    """
    pred = jnp.asarray(pred)
    if pred.ndim == target_ndim + 1:
        if num_classes is not None and pred.shape[class_axis] != num_classes:
            raise ValueError(
                f"{name} of shape {pred.shape} has {pred.shape[class_axis]} scores on its class axis "
                f"{class_axis}, but num_classes is {num_classes}."
            )
        labels = jnp.argmax(pred, axis=class_axis).astype(jnp.int32)
        if jnp.issubdtype(pred.dtype, jnp.inexact):
            return labels, jnp.any(jnp.isnan(pred), axis=class_axis)
        return labels, jnp.zeros(labels.shape, bool)
    if pred.ndim == target_ndim:
        if not (jnp.issubdtype(pred.dtype, jnp.integer) or pred.dtype == jnp.bool_):
            raise TypeError(
                f"{name} has the target's rank but dtype {pred.dtype}; pass integer labels, or scores/logits "
                "with an extra class axis."
            )
        return pred.astype(jnp.int32), jnp.zeros(pred.shape, bool)
    raise ValueError(
        f"{name} must have the target's rank ({target_ndim}, integer labels) or one more axis (scores over "
        f"classes), got rank {pred.ndim}."
    )


def integer_targets(target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``target`` as int32 labels, and True where a float target is not an integer (NaN, ±inf, 2.7, ...).

    Casting would truncate such a value into a plausible class (NaN into class 0).
    """
    if jnp.issubdtype(target.dtype, jnp.inexact):
        bad = ~jnp.isfinite(target) | (target != jnp.round(target))
        return jnp.where(bad, -1, target).astype(jnp.int32), bad
    return target.astype(jnp.int32), jnp.zeros(target.shape, bool)
