"""Regression: mean absolute error per target, streamed.

``MAE_j = scale_j · Σ_n |ŷ_nj − y_nj| / n_j`` over the valid samples of target ``j``
(QM9 in the DB-MTL paper, Table 3, has 11 targets).  ``scale`` converts units;
for LibMTL's QM9 protocol (targets standardised for training, MAE reported in
original units, energies in meV) pass ``scale = std_j · 1000`` for the energy
targets and ``std_j`` for the others, or de-standardise before ``update``.
Each target keeps its own count, so a ``mask`` can mark missing labels per
target.  A target with no valid entry: MAE NaN (and ``mean_mae`` NaN).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np

from dbmtl_jax.metrics import _stream as st

__all__ = ["MAEState", "MeanAbsoluteError"]


def _as_nested_tuple(arr: np.ndarray) -> Union[float, tuple]:
    """A float for a 0-d array, else nested tuples of floats (hashable, same shape under np.asarray)."""
    if arr.ndim == 0:
        return float(arr)
    return tuple(_as_nested_tuple(a) for a in arr)


class MAEState(NamedTuple):
    """Per-target float32 sums of absolute errors and int32 counts, both of shape ``target_shape``."""

    abs_sum: chex.Array
    count: chex.Array


@dataclasses.dataclass(frozen=True)
class MeanAbsoluteError(st.StreamingMetric):
    """Streaming per-target MAE.

    Attributes:
      target_shape: the trailing shape of one sample's targets: ``()`` for a
        single target, ``(11,)`` for QM9.  ``pred``/``target`` are
        ``[*batch, *target_shape]``; all leading axes are summed over.
      scale: multiplier applied to each target's MAE in ``compute``: a float or a
        sequence broadcastable to ``target_shape`` (default 1).
    """

    target_shape: tuple[int, ...] = ()
    scale: Union[float, Sequence[float], None] = None

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.target_shape)
        if any(d < 1 for d in shape):
            raise ValueError(f"target_shape must hold positive ints, got {self.target_shape!r}.")
        object.__setattr__(self, "target_shape", shape)
        if self.scale is not None:
            arr = np.asarray(self.scale, np.float64)
            try:
                np.broadcast_to(arr, shape)
            except ValueError as err:
                raise ValueError(f"scale of shape {arr.shape} does not broadcast to target_shape {shape}.") from err
            # keep the dataclass hashable (usable as a static jit argument)
            object.__setattr__(self, "scale", _as_nested_tuple(arr))

    def init(self) -> MAEState:
        return MAEState(
            abs_sum=jnp.zeros(self.target_shape, st.ACC_DTYPE), count=jnp.zeros(self.target_shape, st.COUNT_DTYPE)
        )

    def update(self, state: MAEState, pred: Any, target: Any, mask: Optional[Any] = None) -> MAEState:
        """Add one batch of ``[*batch, *target_shape]`` predictions and targets; ``mask`` broadcastable
        to that shape (False skips an entry); non-finite targets are skipped."""
        pred = jnp.asarray(pred)
        target = jnp.asarray(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred has shape {pred.shape} but target has shape {target.shape}.")
        k = len(self.target_shape)
        if target.shape[target.ndim - k :] != self.target_shape or target.ndim < k:
            raise ValueError(
                f"target has shape {target.shape}; expected [*batch, *target_shape] with target_shape "
                f"{self.target_shape}."
            )
        dtype = jnp.promote_types(target.dtype, st.ACC_DTYPE)
        t = target.astype(dtype)
        valid = jnp.isfinite(t) & st.valid_mask(mask, target.shape)
        err = jnp.where(valid, jnp.abs(pred.astype(dtype) - t), 0.0)
        batch_axes = tuple(range(target.ndim - k))
        return MAEState(
            abs_sum=state.abs_sum + jnp.sum(err, axis=batch_axes, dtype=st.ACC_DTYPE),
            count=st.add_counts(state.count, jnp.sum(valid, axis=batch_axes, dtype=st.COUNT_DTYPE)),
        )

    def compute(self, state: MAEState) -> dict[str, jax.Array]:
        """``mae`` (shape ``target_shape``, scaled; NaN for a target with no valid entry or whose count
        overflowed int32), ``mean_mae`` (mean over targets: NaN if any is), ``count``."""
        mae = jnp.where(state.count == st.COUNT_MAX, jnp.nan, st.safe_ratio(state.abs_sum, state.count, empty=jnp.nan))
        if self.scale is not None:
            mae = mae * jnp.asarray(self.scale, st.ACC_DTYPE)
        return {"mae": mae, "mean_mae": jnp.mean(mae), "count": state.count}
