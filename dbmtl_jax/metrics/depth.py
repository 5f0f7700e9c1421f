"""Depth estimation: absolute and relative error over valid pixels.

Over all valid pixels ``i`` of the whole test set (a pixel-level mean, not a mean
of per-image or per-batch means)::

    AErr = Σ_i |d̂_i − d_i| / n          RErr = Σ_i |d̂_i − d_i| / |d_i| / n

Valid pixels follow LibMTL's NYUv2 ``DepthMetric``: ground-truth depth ``!= 0``
(missing depth is stored as 0), intersected with an optional ``mask``.  LibMTL
averages per-batch means weighted by the number of valid pixels in the batch,
which is the same pixel-level mean.  Additions here: non-finite targets are also
invalid, the relative error divides by ``|d|`` (identical for depths, which are
positive), and an empty state (no valid pixel) gives NaN for both errors, not a perfect 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from dbmtl_jax.metrics import _stream as st

__all__ = ["DepthState", "DepthMetric"]


class DepthState(NamedTuple):
    """Sufficient statistics of :class:`DepthMetric` (float32 sums, int32 count)."""

    abs_sum: chex.Array
    rel_sum: chex.Array
    count: chex.Array


@dataclasses.dataclass(frozen=True)
class DepthMetric(st.StreamingMetric):
    """Streaming depth AErr / RErr (see the module docstring)."""

    def init(self) -> DepthState:
        zero = jnp.zeros([], st.ACC_DTYPE)
        return DepthState(abs_sum=zero, rel_sum=zero, count=jnp.zeros([], st.COUNT_DTYPE))

    def update(self, state: DepthState, pred: Any, target: Any, mask: Optional[Any] = None) -> DepthState:
        """Add one batch.

        Args:
          state: the running state.
          pred: predicted depth, same shape as ``target`` (e.g. ``[N, H, W, 1]``).
          target: ground-truth depth; 0 marks a missing value.
          mask: optional bool array broadcastable to ``target``; False skips a pixel.
        """
        pred = jnp.asarray(pred)
        target = jnp.asarray(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred has shape {pred.shape} but target has shape {target.shape}.")
        t = target.astype(jnp.promote_types(target.dtype, st.ACC_DTYPE))
        valid = (t != 0) & jnp.isfinite(t) & st.valid_mask(mask, target.shape)
        err = jnp.abs(pred.astype(t.dtype) - t)
        rel = err / jnp.where(valid, jnp.abs(t), 1.0)
        return DepthState(
            abs_sum=state.abs_sum + st.masked_sum(err, valid),
            rel_sum=state.rel_sum + st.masked_sum(rel, valid),
            count=st.add_counts(state.count, st.count(valid)),
        )

    def compute(self, state: DepthState) -> dict[str, jax.Array]:
        """``abs_err`` and ``rel_err`` (NaN when no valid pixel was seen or the count overflowed int32)
        and ``count``."""
        over = st.saturated(state.count)
        return {
            "abs_err": jnp.where(over, jnp.nan, st.safe_ratio(state.abs_sum, state.count, empty=jnp.nan)),
            "rel_err": jnp.where(over, jnp.nan, st.safe_ratio(state.rel_sum, state.count, empty=jnp.nan)),
            "count": state.count,
        }
