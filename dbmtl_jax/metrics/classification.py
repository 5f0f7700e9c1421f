"""Classification: accuracy, and binary ROC AUC (streamed histogram or exact).

Accuracy: ``correct / count`` over valid samples (Office-31 / Office-Home in the
DB-MTL paper, Table 4); ``pred`` is either labels or scores with a class axis
(argmax, first maximum on ties).  A valid sample whose scores hold a NaN, whose
float target is not an integer (NaN, ±inf, 2.7), or (with scores over C classes) whose
target lies outside ``[0, C)`` (a -1 "ignore" label: use ``mask``; one sigmoid logit
per sample: argmax is always 0) makes the accuracy NaN.

Binary AUC (Mann–Whitney form, ties counted one half)::

    AUC = P(s⁺ > s⁻) + ½ P(s⁺ = s⁻)      over all (positive, negative) pairs

* :class:`BinaryAUC` streams two histograms (positives, negatives) of the score
  over ``score_range`` with ``num_bins`` equal bins (scores outside the range are
  clipped into the end bins).  Pairs in different bins are ordered exactly;
  pairs sharing a bin count one half, so the error is at most
  ``½ Σ_b pos_b·neg_b / (P·N)``, which ``compute`` reports as ``auc_error_bound``.
  Use ``score_range=(0, 1)`` for probabilities and a range such as
  ``(-20, 20)`` for logits.
* :func:`binary_auc` is the exact value from average ranks, for sets that fit in
  memory (O(n log n), jit-able).

Both return 0.5 (chance) when there is no positive or no negative sample,
instead of NaN or an error (scikit-learn raises).  Labels are bool or 0/1; a
valid sample with another label (-1, 2, 0.5, NaN) or a NaN score makes the AUC
NaN (casting -1/+1 labels to bool would call every sample positive).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from dbmtl_jax.metrics import _stream as st

__all__ = ["AccuracyState", "Accuracy", "AUCState", "BinaryAUC", "binary_auc"]


class AccuracyState(NamedTuple):
    """int32 counts of correct and of valid samples, and of valid samples with NaN scores or a
    non-integer target (any makes the accuracy NaN)."""

    correct: chex.Array
    count: chex.Array
    invalid: chex.Array


@dataclasses.dataclass(frozen=True)
class Accuracy(st.StreamingMetric):
    """Streaming classification accuracy.

    Attributes:
      class_axis: the class axis of ``pred`` when it holds scores/logits (default -1).
    """

    class_axis: int = -1

    def init(self) -> AccuracyState:
        zero = jnp.zeros([], st.COUNT_DTYPE)
        return AccuracyState(correct=zero, count=zero, invalid=zero)

    def update(self, state: AccuracyState, pred: Any, target: Any, mask: Optional[Any] = None) -> AccuracyState:
        """Add one batch: ``pred`` labels shaped like ``target`` or scores with an extra class axis;
        ``mask`` (broadcastable to ``target``) False skips a sample."""
        target = jnp.asarray(target)
        labels, nan_scores = st.labels_from(pred, target.ndim, self.class_axis)
        if labels.shape != target.shape:
            raise ValueError(f"pred labels have shape {labels.shape} but target has shape {target.shape}.")
        t, no_answer = st.integer_targets(target)
        pred = jnp.asarray(pred)
        if pred.ndim == target.ndim + 1:  # scores: no class outside [0, C) can be predicted
            no_answer = no_answer | (t < 0) | (t >= pred.shape[self.class_axis])
        valid = st.valid_mask(mask, target.shape)
        hit = valid & (labels == t)
        return AccuracyState(
            correct=st.add_counts(state.correct, st.count(hit)),
            count=st.add_counts(state.count, st.count(valid)),
            invalid=st.add_counts(state.invalid, st.count(valid & (nan_scores | no_answer))),
        )

    def compute(self, state: AccuracyState) -> dict[str, jax.Array]:
        """``accuracy`` (fraction in [0, 1]; NaN when empty, if ``state.invalid > 0`` or if the count
        overflowed int32) and ``count``."""
        acc = st.safe_ratio(state.correct, state.count, empty=jnp.nan)
        bad = (state.invalid > 0) | st.saturated(state.count)
        return {"accuracy": jnp.where(bad, jnp.nan, acc), "count": state.count}


class AUCState(NamedTuple):
    """int32 ``[num_bins]`` score histograms of the positive and the negative samples, and the
    count of valid samples with a NaN score or a label other than 0/1 (any makes the AUC NaN)."""

    pos_hist: chex.Array
    neg_hist: chex.Array
    invalid: chex.Array


def _labels_bool(labels: Any, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``labels`` as bool, and True where a label is neither 0 nor 1 (-1, 2, 0.5, NaN)."""
    labels = jnp.asarray(labels)
    if labels.shape != shape:
        raise ValueError(f"labels have shape {labels.shape} but scores have shape {shape}.")
    if labels.dtype == jnp.bool_:
        return labels, jnp.zeros(shape, bool)
    return labels == 1, (labels != 0) & (labels != 1)


@dataclasses.dataclass(frozen=True)
class BinaryAUC(st.StreamingMetric):
    """Streaming binary ROC AUC from score histograms (see the module docstring).

    Attributes:
      num_bins: number of equal-width score bins (default 10,000).
      score_range: ``(low, high)`` covered by the bins (default ``(0, 1)``).
    """

    num_bins: int = 10_000
    score_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        st.check_positive_int(self.num_bins, "num_bins")
        low, high = (float(v) for v in self.score_range)
        if not low < high:
            raise ValueError(f"score_range must be (low, high) with low < high, got {self.score_range!r}.")
        object.__setattr__(self, "score_range", (low, high))

    def init(self) -> AUCState:
        zeros = jnp.zeros((self.num_bins,), st.COUNT_DTYPE)
        return AUCState(pos_hist=zeros, neg_hist=zeros, invalid=jnp.zeros([], st.COUNT_DTYPE))

    def update(self, state: AUCState, scores: Any, labels: Any, mask: Optional[Any] = None) -> AUCState:
        """Add one batch: ``scores`` (higher = more positive) and ``labels`` (bool or 0/1) of the same
        shape; ``mask`` (broadcastable) False skips a sample.  A kept sample with a NaN score or
        another label is counted in ``invalid`` and left out of the histograms."""
        scores = jnp.asarray(scores)
        labels, bad_label = _labels_bool(labels, scores.shape)
        s = scores.astype(jnp.promote_types(scores.dtype, st.ACC_DTYPE))
        kept = st.valid_mask(mask, scores.shape)
        bad = kept & (jnp.isnan(s) | bad_label)
        valid = kept & ~bad
        low, high = self.score_range
        nb = self.num_bins
        pos_s = (s - low) / (high - low) * nb
        b = jnp.clip(jnp.floor(jnp.where(valid, pos_s, 0.0)), 0, nb - 1).astype(jnp.int32)
        pos = jnp.bincount(jnp.where(valid & labels, b, nb).reshape(-1), length=nb + 1)[:nb]
        neg = jnp.bincount(jnp.where(valid & ~labels, b, nb).reshape(-1), length=nb + 1)[:nb]
        return AUCState(
            pos_hist=st.add_counts(state.pos_hist, pos.astype(st.COUNT_DTYPE)),
            neg_hist=st.add_counts(state.neg_hist, neg.astype(st.COUNT_DTYPE)),
            invalid=st.add_counts(state.invalid, st.count(bad)),
        )

    def compute(self, state: AUCState) -> dict[str, jax.Array]:
        """``auc``, ``auc_error_bound`` (max |auc − exact AUC| due to binning), ``num_pos``, ``num_neg``;
        ``auc`` and the bound are NaN if ``state.invalid > 0`` or a count overflowed int32 (the
        overflowed count then reads ``2**31 - 1``)."""
        pos = state.pos_hist.astype(st.ACC_DTYPE)
        neg = state.neg_hist.astype(st.ACC_DTYPE)
        cum_pos, over_pos = st.cumulative_counts(state.pos_hist)
        cum_neg, over_neg = st.cumulative_counts(state.neg_hist)
        bad = over_pos | over_neg | (state.invalid > 0)
        num_pos = jnp.where(over_pos, st.COUNT_MAX, cum_pos[-1])
        num_neg = jnp.where(over_neg, st.COUNT_MAX, cum_neg[-1])
        neg_below = jnp.cumsum(neg) - neg
        # Normalise each factor first so the products stay well inside float32.
        p = st.safe_ratio(pos, num_pos)
        q = st.safe_ratio(neg, num_neg)
        q_below = st.safe_ratio(neg_below, num_neg)
        defined = (num_pos > 0) & (num_neg > 0)
        auc = jnp.sum(p * (q_below + 0.5 * q))
        return {
            "auc": jnp.where(bad, jnp.nan, jnp.where(defined, auc, 0.5)),
            "auc_error_bound": jnp.where(bad, jnp.nan, jnp.where(defined, 0.5 * jnp.sum(p * q), 0.0)),
            "num_pos": num_pos,
            "num_neg": num_neg,
        }


def binary_auc(scores: Any, labels: Any, mask: Optional[Any] = None) -> jax.Array:
    """Exact binary ROC AUC (ties count one half) of in-memory ``scores``/``labels``; jit-able.

    ``AUC = (Σ_{positives} rank − P(P+1)/2) / (P·N)`` with 1-based average ranks
    over the valid samples.  0.5 when there is no positive or no negative sample; NaN when a
    sample ``mask`` keeps has a NaN score or a label other than 0/1.
    """
    scores = jnp.asarray(scores)
    labels, bad_label = _labels_bool(labels, scores.shape)
    s = scores.astype(jnp.promote_types(scores.dtype, st.ACC_DTYPE)).reshape(-1)
    kept = st.valid_mask(mask, scores.shape).reshape(-1)
    bad = jnp.any(kept & (jnp.isnan(s) | bad_label.reshape(-1)))
    valid = kept & ~jnp.isnan(s)
    pos = valid & labels.reshape(-1)
    # Invalid samples are sent to +inf, at the end of the sorted order; capping ``last`` at
    # the number of valid samples keeps them out of the ranks of valid +inf scores.
    key = jnp.where(valid, s, jnp.inf)
    srt = jnp.sort(key)
    first = jnp.searchsorted(srt, key, side="left")
    last = jnp.minimum(jnp.searchsorted(srt, key, side="right"), jnp.sum(valid, dtype=jnp.int32))
    rank = 0.5 * (first + last + 1).astype(st.ACC_DTYPE)  # average 1-based rank among ties
    n_pos = jnp.sum(pos, dtype=st.ACC_DTYPE)
    n_neg = jnp.sum(valid & ~pos, dtype=st.ACC_DTYPE)
    u = jnp.sum(jnp.where(pos, rank, 0.0)) - 0.5 * n_pos * (n_pos + 1.0)
    defined = (n_pos > 0) & (n_neg > 0)
    return jnp.where(bad, jnp.nan, jnp.where(defined, st.safe_ratio(u, n_pos * n_neg), 0.5))
