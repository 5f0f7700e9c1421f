"""Semantic segmentation: mean IoU and pixel accuracy from a streamed confusion matrix.

With the confusion matrix ``C[g, p]`` (pixels of true class g predicted as p)
accumulated over the whole test set::

    IoU_c  = C[c, c] / (Σ_p C[c, p] + Σ_g C[g, c] − C[c, c])
    mIoU   = mean of IoU_c over the classes with a non-empty union
    PAcc   = Σ_c C[c, c] / Σ C                          (overall pixel accuracy)

This is the NYUv2/Cityscapes evaluation of LibMTL (``SegMetric``), which the DB-MTL
paper uses (its "class-wise pixel accuracy" PAcc is LibMTL's overall pixel
accuracy; the mean of per-class accuracies is returned as well, as
``mean_class_accuracy``).  Differences from LibMTL, all confined to degenerate
cases where LibMTL returns NaN: classes absent from both prediction and ground
truth are left out of the mean (LibMTL would average a NaN), and an empty
state (no valid pixel) gives NaN for the three summary values (``iou`` stays 0 where undefined).

Ignored pixels: targets outside ``[0, num_classes)`` (LibMTL's rule, which drops
its ``-1`` padding), targets equal to ``ignore_index``, and pixels where
``mask`` is False.  Predicted labels outside ``[0, num_classes)`` (possible only
when integer labels are passed) count as wrong: they add to the true class's
row (a false negative) and to no class's column.

Input that has no right answer makes every float value NaN (not a plausible
number): a non-integer float target (NaN, ±inf, 2.7: a cast would truncate it into a
class) on a pixel ``mask`` keeps, or scores holding a NaN on a valid pixel
(argmax would pick the NaN's class).  Scores must have ``num_classes`` entries on
their class axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from dbmtl_jax.metrics import _stream as st

__all__ = ["SegmentationState", "SegmentationMetric"]


class SegmentationState(NamedTuple):
    """Sufficient statistics of :class:`SegmentationMetric`.

    Attributes:
      confusion: int32 ``[C, C]``; ``confusion[g, p]`` counts valid pixels of true
        class ``g`` predicted as class ``p``.
      missed: int32 ``[C]``; valid pixels of true class ``g`` whose predicted label
        lies outside ``[0, C)``.
      invalid: int32 scalar; pixels with a non-integer target or NaN scores (see the
        module docstring); any makes ``compute`` NaN.
    """

    confusion: chex.Array
    missed: chex.Array
    invalid: chex.Array


@dataclasses.dataclass(frozen=True)
class SegmentationMetric(st.StreamingMetric):
    """Streaming mIoU / pixel accuracy (see the module docstring for the formulas).

    Attributes:
      num_classes: C (13 for NYUv2, 7 for the Cityscapes split of the paper).
      ignore_index: a target label to skip in addition to those outside ``[0, C)``
        (default -1, LibMTL's NYUv2 padding value; 255 is common elsewhere); it may not be
        a class in ``[0, C)``.
      class_axis: the class axis of ``pred`` when it holds scores/logits
        (default -1, channels-last; LibMTL's NCHW layout is ``class_axis=1``).
    """

    num_classes: int
    ignore_index: int = -1
    class_axis: int = -1

    def __post_init__(self) -> None:
        st.check_positive_int(self.num_classes, "num_classes")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"ignore_index must be a Python int, got {self.ignore_index!r}.")
        if 0 <= self.ignore_index < self.num_classes:  # that class could be predicted, never hit: IoU 0 in the mean
            raise ValueError(f"ignore_index {self.ignore_index} is one of the {self.num_classes} classes; pass "
                             "num_classes without the ignored label, e.g. labels 1..C shifted to 0..C-1.")

    def init(self) -> SegmentationState:
        c = self.num_classes
        return SegmentationState(
            confusion=jnp.zeros((c, c), st.COUNT_DTYPE),
            missed=jnp.zeros((c,), st.COUNT_DTYPE),
            invalid=jnp.zeros([], st.COUNT_DTYPE),
        )

    def update(
        self, state: SegmentationState, pred: Any, target: Any, mask: Optional[Any] = None
    ) -> SegmentationState:
        """Add one batch.

        Args:
          state: the running state.
          pred: integer labels with ``target``'s shape, or scores/logits with an
            extra class axis at ``class_axis`` of length ``num_classes`` (argmax is taken).
          target: integer (or integral float) labels, any shape, e.g. ``[N, H, W]``.
          mask: optional bool array broadcastable to ``target``; False skips a pixel.
        """
        target = jnp.asarray(target)
        labels, nan_scores = st.labels_from(pred, target.ndim, self.class_axis, num_classes=self.num_classes)
        if labels.shape != target.shape:
            raise ValueError(f"pred labels have shape {labels.shape} but target has shape {target.shape}.")
        c = self.num_classes
        t, fractional = st.integer_targets(target)
        t = t.reshape(-1)
        p = labels.reshape(-1)
        keep = st.valid_mask(mask, target.shape).reshape(-1)
        valid = (t >= 0) & (t < c) & (t != self.ignore_index) & keep
        invalid = st.count((keep & fractional.reshape(-1)) | (valid & nan_scores.reshape(-1)))
        col = jnp.where((p >= 0) & (p < c), p, c)  # column c collects out-of-range predictions
        sink = c * (c + 1)  # one extra bin collects the ignored pixels
        idx = jnp.where(valid, jnp.clip(t, 0, c - 1) * (c + 1) + col, sink)
        counts = jnp.bincount(idx, length=sink + 1)[:sink].reshape(c, c + 1).astype(st.COUNT_DTYPE)
        return SegmentationState(
            confusion=st.add_counts(state.confusion, counts[:, :c]),
            missed=st.add_counts(state.missed, counts[:, c]),
            invalid=st.add_counts(state.invalid, invalid),
        )

    def compute(self, state: SegmentationState) -> dict[str, jax.Array]:
        """``miou``, ``pixel_accuracy``, ``mean_class_accuracy`` (fractions in [0, 1]),
        ``iou`` (per class, 0 where undefined) and ``class_present`` (bool per class:
        its union is non-empty, i.e. it enters the mIoU); the float values are NaN if
        ``state.invalid > 0`` or a count overflowed int32."""
        conf = state.confusion.astype(st.ACC_DTYPE)
        tp = jnp.diagonal(conf)
        gt_total = jnp.sum(conf, axis=1) + state.missed.astype(st.ACC_DTYPE)
        pred_total = jnp.sum(conf, axis=0)
        union = gt_total + pred_total - tp
        present = union > 0
        iou = st.safe_ratio(tp, union)
        in_gt = gt_total > 0
        class_acc = st.safe_ratio(tp, gt_total)
        bad = (state.invalid > 0) | st.saturated(state.confusion) | st.saturated(state.missed)

        def checked(x: jax.Array) -> jax.Array:
            return jnp.where(bad, jnp.nan, x)

        return {
            "miou": checked(st.safe_ratio(jnp.sum(iou), jnp.sum(present), empty=jnp.nan)),
            "pixel_accuracy": checked(st.safe_ratio(jnp.sum(tp), jnp.sum(gt_total), empty=jnp.nan)),
            "mean_class_accuracy": checked(st.safe_ratio(jnp.sum(class_acc), jnp.sum(in_gt), empty=jnp.nan)),
            "iou": checked(iou),
            "class_present": present,
        }
