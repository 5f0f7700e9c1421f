"""Surface normal prediction: angular error statistics, with a streamed median.

For every valid pixel the angle between predicted and true normal (degrees) is
``θ = 2·atan2(‖n̂ − m̂‖, ‖n̂ + m̂‖)`` with ``n̂, m̂`` the unit vectors (Kahan's
formula: accurate at all angles, unlike ``acos`` of the cosine near 0° and 180°).
Reported over all valid pixels of the test set:

* ``mean``: the exact mean angle (streamed sum / count);
* ``median``: from a histogram of angles over [0°, 180°] with ``bin_width``
  degrees per bin (default 0.01° → 18,000 int32 bins, 72 kB).  Within a bin the
  values are assumed evenly spread, and np.median's convention is followed (mean
  of the two middle values for an even count), so the result is within
  ``bin_width`` of the exact median;
* ``within_<t>``: the exact fraction (in [0, 1]) of pixels with ``θ < t`` for each
  threshold (default 11.25°, 22.5°, 30°), strict ``<`` as in LibMTL.

This is LibMTL's NYUv2 ``NormalMetric`` up to three documented choices: valid
pixels are those whose ground-truth normal is non-zero (LibMTL tests that the
components' *sum* is non-zero, which also drops the rare valid normals whose
components cancel), intersected with an optional ``mask``; both vectors are
normalised (LibMTL assumes a unit ground truth); a zero-length *prediction* on a
valid pixel counts as 90° (LibMTL would produce NaN).  Empty state (no valid pixel): every value NaN, ``count`` 0.
A NaN or infinite component in a prediction on a valid pixel makes that pixel's
angle NaN, and then every value NaN (the median and the fractions too, which a
histogram and counts could not show on their own).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from dbmtl_jax.metrics import _stream as st

__all__ = ["NormalState", "NormalMetric", "angular_error"]


class NormalState(NamedTuple):
    """Sufficient statistics of :class:`NormalMetric`.

    Attributes:
      hist: int32 ``[num_bins]`` histogram of angles (bin ``b`` covers
        ``[b·w, (b+1)·w)`` degrees; 180° goes in the last bin).
      angle_sum: float32 sum of the angles (degrees).
      within: int32 ``[len(thresholds)]`` counts of angles below each threshold.
    """

    hist: chex.Array
    angle_sum: chex.Array
    within: chex.Array


def _unit(v: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """``v / ‖v‖`` along ``axis`` (pre-scaled by the max |component| so 1e±30 inputs survive) and ``v ≠ 0``.

    A vector with a NaN component is not "zero": it normalises to NaN.
    """
    big = jnp.max(jnp.abs(v), axis=axis, keepdims=True)
    nonzero = big != 0
    v = v / jnp.where(nonzero, big, 1.0)
    norm = jnp.sqrt(jnp.sum(v * v, axis=axis, keepdims=True))
    return v / jnp.where(nonzero, norm, 1.0), jnp.squeeze(nonzero, axis)


def angular_error(pred: Any, target: Any, axis: int = -1) -> jax.Array:
    """Per-pixel angle in degrees between ``pred`` and ``target`` vectors along ``axis``.

    Scale-invariant in both arguments; 90° where ``pred`` is the zero vector (a
    zero ``target`` gives an arbitrary angle; :class:`NormalMetric` treats such
    pixels as invalid); NaN where either vector has a NaN or infinite component.
    Computed in float32 or wider.
    """
    pred = jnp.asarray(pred)
    target = jnp.asarray(target)
    dtype = jnp.promote_types(jnp.promote_types(pred.dtype, target.dtype), st.ACC_DTYPE)
    p, p_ok = _unit(pred.astype(dtype), axis)
    t, _ = _unit(target.astype(dtype), axis)
    diff = jnp.sqrt(jnp.sum((p - t) ** 2, axis=axis))
    summ = jnp.sqrt(jnp.sum((p + t) ** 2, axis=axis))
    angle = jnp.degrees(2.0 * jnp.arctan2(diff, summ))
    return jnp.where(p_ok, angle, jnp.asarray(90.0, dtype))


@dataclasses.dataclass(frozen=True)
class NormalMetric(st.StreamingMetric):
    """Streaming normal-angle mean / median / within-t° (see the module docstring).

    Attributes:
      bin_width: histogram resolution in degrees (default 0.01°); bounds the
        median's error.
      thresholds: the "within t°" thresholds in degrees.
      axis: the vector axis of ``pred`` and ``target`` (default -1, channels-last;
        LibMTL's NCHW layout is ``axis=1``).
    """

    bin_width: float = 0.01
    thresholds: tuple[float, ...] = (11.25, 22.5, 30.0)
    axis: int = -1

    def __post_init__(self) -> None:
        if not (isinstance(self.bin_width, (int, float)) and 0 < self.bin_width <= 180):
            raise ValueError(f"bin_width must be a float in (0, 180] degrees, got {self.bin_width!r}.")
        ts = self.thresholds
        if isinstance(ts, (str, bytes)) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) for t in ts
        ):
            raise TypeError(f"thresholds must be a sequence of numbers (degrees), got {ts!r}.")
        ts = tuple(float(t) for t in ts)
        bad = [t for t in ts if not 0 < t <= 180]  # also catches NaN
        if bad:
            raise ValueError(f"thresholds must lie in (0, 180] degrees, got {bad}.")
        keys = [f"within_{t:g}" for t in ts]
        if len(set(keys)) != len(keys):
            raise ValueError(f"thresholds {ts} give repeated result names {keys}; each value would overwrite another.")
        object.__setattr__(self, "thresholds", ts)

    @property
    def num_bins(self) -> int:
        return int(math.ceil(180.0 / self.bin_width - 1e-9))

    def init(self) -> NormalState:
        return NormalState(
            hist=jnp.zeros((self.num_bins,), st.COUNT_DTYPE),
            angle_sum=jnp.zeros([], st.ACC_DTYPE),
            within=jnp.zeros((len(self.thresholds),), st.COUNT_DTYPE),
        )

    def update(self, state: NormalState, pred: Any, target: Any, mask: Optional[Any] = None) -> NormalState:
        """Add one batch.

        Args:
          state: the running state.
          pred: predicted normals, same shape as ``target`` (e.g. ``[N, H, W, 3]``; 3 components
            on ``axis``), not necessarily unit length.
          target: ground-truth normals; the zero vector marks a missing value.
          mask: optional bool array broadcastable to the pixel shape (``target``'s
            shape without ``axis``); False skips a pixel.
        """
        pred = jnp.asarray(pred)
        target = jnp.asarray(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred has shape {pred.shape} but target has shape {target.shape}.")
        if target.ndim == 0:
            raise ValueError("target must have a vector axis.")
        if target.shape[self.axis] != 3:  # e.g. NCHW normals read with the default axis=-1: angles over W
            raise ValueError(f"target of shape {target.shape} has {target.shape[self.axis]} components on its vector "
                             f"axis {self.axis}; surface normals have 3 (NCHW normals need axis=1).")
        angle = angular_error(pred, target, self.axis)
        valid = jnp.any(target != 0, axis=self.axis) & jnp.all(jnp.isfinite(target), axis=self.axis)
        valid = valid & st.valid_mask(mask, angle.shape)
        nb = self.num_bins
        b = jnp.clip(jnp.floor(angle / self.bin_width), 0, nb - 1).astype(jnp.int32)
        hist = jnp.bincount(jnp.where(valid, b, nb).reshape(-1), length=nb + 1)[:nb]
        within = [st.count(valid & (angle < t)) for t in self.thresholds]
        within = jnp.stack(within) if within else jnp.zeros((0,), st.COUNT_DTYPE)
        return NormalState(
            hist=st.add_counts(state.hist, hist.astype(st.COUNT_DTYPE)),
            angle_sum=state.angle_sum + st.masked_sum(angle, valid),
            within=st.add_counts(state.within, within),
        )

    def _value_at_rank(self, cum: jax.Array, rank: jax.Array) -> jax.Array:
        """Histogram estimate of the ``rank``-th smallest angle (0-based), values spread evenly in each bin."""
        b = jnp.searchsorted(cum, rank, side="right")
        b = jnp.clip(b, 0, cum.shape[0] - 1)
        in_bin = cum[b] - jnp.where(b > 0, cum[jnp.maximum(b - 1, 0)], 0)
        offset = (rank - (cum[b] - in_bin)).astype(st.ACC_DTYPE) + 0.5
        frac = st.safe_ratio(offset, in_bin, empty=0.5)
        return (b.astype(st.ACC_DTYPE) + jnp.clip(frac, 0.0, 1.0)) * self.bin_width

    def compute(self, state: NormalState) -> dict[str, jax.Array]:
        """``mean``, ``median`` (degrees), ``within_<t>`` (fractions, e.g. ``within_11.25``), ``count``;
        all but ``count`` NaN when no valid pixel was seen, once a valid pixel's angle was NaN (its sum is
        then NaN) or the count overflowed int32 (``count`` is then ``2**31 - 1``)."""
        cum, over = st.cumulative_counts(state.hist)
        over = over | st.saturated(state.within)
        bad = jnp.isnan(state.angle_sum) | over
        n = cum[-1]
        lo = jnp.maximum(n - 1, 0) // 2
        hi = jnp.maximum(n, 1) // 2
        median = 0.5 * (self._value_at_rank(cum, lo) + self._value_at_rank(cum, hi))
        out = {
            "mean": jnp.where(over, jnp.nan, st.safe_ratio(state.angle_sum, n, empty=jnp.nan)),
            "median": jnp.where(bad, jnp.nan, jnp.where(n > 0, median, jnp.nan)).astype(st.ACC_DTYPE),
        }
        for i, t in enumerate(self.thresholds):
            out[f"within_{t:g}"] = jnp.where(bad, jnp.nan, st.safe_ratio(state.within[i], n, empty=jnp.nan))
        out["count"] = jnp.where(over, st.COUNT_MAX, n)
        return out
