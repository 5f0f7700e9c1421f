"""Evaluation metrics for multi-task learning.

* :func:`delta_p` / :func:`delta_p_per_task`: the relative improvement over
  single-task learning, Eq. (3)–(4) of Lin et al., "Dual-Balancing for
  Multi-Task Learning".
* Streaming, jit-able task metrics with an ``init`` / ``update`` / ``compute``
  protocol over NamedTuple states of sufficient statistics (so a test set never
  has to sit in memory; states from several shards combine with ``merge``):
  :class:`SegmentationMetric` (mIoU, pixel accuracy), :class:`DepthMetric`
  (absolute / relative error), :class:`NormalMetric` (mean / median angle,
  within 11.25°/22.5°/30°), :class:`Accuracy`, :class:`MeanAbsoluteError`,
  :class:`BinaryAUC`; plus the exact in-memory :func:`binary_auc` and the
  per-pixel :func:`angular_error`.

Example::

    seg = SegmentationMetric(num_classes=13)
    update = jax.jit(seg.update)
    state = seg.init()
    for batch in test_set:
        state = update(state, logits_fn(batch), batch["seg"])
    seg.compute(state)   # {"miou": ..., "pixel_accuracy": ..., ...}
"""

from dbmtl_jax.metrics.classification import Accuracy, AccuracyState, AUCState, BinaryAUC, binary_auc
from dbmtl_jax.metrics.delta_p import delta_p, delta_p_per_task
from dbmtl_jax.metrics.depth import DepthMetric, DepthState
from dbmtl_jax.metrics.normals import NormalMetric, NormalState, angular_error
from dbmtl_jax.metrics.regression import MAEState, MeanAbsoluteError
from dbmtl_jax.metrics.segmentation import SegmentationMetric, SegmentationState

__all__ = [
    "delta_p",
    "delta_p_per_task",
    "SegmentationMetric",
    "SegmentationState",
    "DepthMetric",
    "DepthState",
    "NormalMetric",
    "NormalState",
    "angular_error",
    "Accuracy",
    "AccuracyState",
    "MeanAbsoluteError",
    "MAEState",
    "BinaryAUC",
    "AUCState",
    "binary_auc",
]
