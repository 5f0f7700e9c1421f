"""Tests of the streaming task metrics of dbmtl_jax.metrics against independent NumPy references.

Every streamed result (several batches through a jitted ``update``) is compared with a NumPy
computation on the concatenated data; properties and degenerate cases are checked separately.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dbmtl_jax.metrics import (
    Accuracy,
    BinaryAUC,
    DepthMetric,
    MeanAbsoluteError,
    NormalMetric,
    SegmentationMetric,
    angular_error,
    binary_auc,
)


def _signature(state):
    return jax.tree_util.tree_map(lambda x: (jnp.shape(x), jnp.asarray(x).dtype), state)


_JITTED: dict = {}


def _jitted(metric, method):
    """One jitted function per (metric config, method), shared by all tests to keep compiles few."""
    key = (metric, method)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(getattr(metric, method))
    return _JITTED[key]


def run(metric, *args):
    """One-shot evaluation (init, update, compute) under jit, as NumPy values."""
    return _np(_jitted(metric, "__call__")(*args))


def stream(metric, batches):
    """Feed ``batches`` (tuples of update args) through a jitted ``update``; checks the state never changes form."""
    update = _jitted(metric, "update")
    state = metric.init()
    sig = _signature(state)
    for args in batches:
        state = update(state, *args)
        assert _signature(state) == sig
        assert type(state) is type(metric.init())
    return _np(_jitted(metric, "compute")(state))


def _np(d):
    return {k: np.asarray(v) for k, v in d.items()}


def _all_finite(d):
    return all(np.all(np.isfinite(np.asarray(v, np.float64))) for v in d.values())


# --- segmentation -------------------------------------------------------------------------------


def ref_segmentation(pred, target, num_classes, ignore_index=-1, mask=None):
    """Per-class set counting (no confusion matrix), float64."""
    valid = (target >= 0) & (target < num_classes) & (target != ignore_index)
    if mask is not None:
        valid &= mask
    ious, accs = [], []
    for c in range(num_classes):
        inter = np.sum(valid & (target == c) & (pred == c))
        union = np.sum(valid & ((target == c) | (pred == c)))
        if union > 0:
            ious.append(inter / union)
        in_gt = np.sum(valid & (target == c))
        if in_gt > 0:
            accs.append(inter / in_gt)
    n = np.sum(valid)
    return {
        "miou": np.mean(ious) if ious else 0.0,
        "pixel_accuracy": np.sum(valid & (pred == target)) / n if n else 0.0,
        "mean_class_accuracy": np.mean(accs) if accs else 0.0,
    }


def test_segmentation_streamed_matches_numpy_on_concatenation():
    rng = np.random.default_rng(0)
    c = 6
    batches, preds, targets, masks = [], [], [], []
    for _ in range(4):
        logits = rng.normal(size=(2, 8, 9, c)).astype(np.float32)
        target = rng.integers(-1, c + 1, size=(2, 8, 9))  # -1 ignored, c out of range
        target[target == 2] = 255  # class 2 never in the ground truth
        mask = rng.random((2, 8, 9)) < 0.9
        batches.append((logits, target, mask))
        preds.append(logits.argmax(-1))
        targets.append(target)
        masks.append(mask)
    metric = SegmentationMetric(num_classes=c, ignore_index=255)
    got = (stream(metric, batches))
    want = ref_segmentation(np.concatenate(preds), np.concatenate(targets), c, 255, np.concatenate(masks))
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, err_msg=k)
    assert got["class_present"].all()  # class 2 is predicted, so its union is non-empty
    assert got["iou"][2] == 0.0


def test_segmentation_absent_classes_left_out_and_empty_is_nan():
    c = 5
    target = np.array([[0, 0, 1, 1], [1, 0, -1, -1]])
    pred = np.array([[0, 1, 1, 1], [1, 0, 3, 4]])  # predictions at ignored pixels do not count
    got = run(SegmentationMetric(c), pred, target)
    # class 0: tp 2, union 3; class 1: tp 3, union 4; classes 2-4 absent -> left out
    assert got["miou"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    np.testing.assert_array_equal(got["class_present"], [True, True, False, False, False])
    assert got["pixel_accuracy"] == pytest.approx(5 / 6)
    as_float = run(SegmentationMetric(c), pred, target.astype(np.float32))  # LibMTL stores labels as floats
    assert as_float["miou"] == got["miou"]
    # nothing seen is no score (it read 0, a worst score that looked like a result)
    empty = _np(_jitted(SegmentationMetric(c), "compute")(SegmentationMetric(c).init()))
    assert np.isnan([empty["miou"], empty["pixel_accuracy"], empty["mean_class_accuracy"]]).all()
    np.testing.assert_array_equal(empty["iou"], np.zeros(c))
    all_ignored = run(SegmentationMetric(c), pred, np.full_like(target, -1))
    assert np.isnan(all_ignored["miou"]) and np.isnan(all_ignored["pixel_accuracy"])


def test_segmentation_perfect_prediction_nchw_and_out_of_range_labels():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 4, size=(3, 5, 6))
    logits_nchw = np.moveaxis(np.eye(4)[target], -1, 1)  # [N, C, H, W]
    got = run(SegmentationMetric(4, class_axis=1), logits_nchw, target)
    assert got["miou"] == pytest.approx(1.0) and got["pixel_accuracy"] == pytest.approx(1.0)
    # An out-of-range predicted label is a miss for the true class and no other class's false positive.
    pred = target.copy()
    pred[0, 0, 0] = 7
    got = run(SegmentationMetric(4), pred, target)
    want = ref_segmentation(pred, target, 4)
    assert got["miou"] == pytest.approx(want["miou"]) and got["miou"] < 1.0
    assert got["pixel_accuracy"] == pytest.approx(want["pixel_accuracy"])


def test_segmentation_merge_equals_single_stream_and_errors():
    rng = np.random.default_rng(2)
    metric = SegmentationMetric(3)
    a = (rng.integers(0, 3, (4, 4)), rng.integers(0, 3, (4, 4)))
    b = (rng.integers(0, 3, (4, 4)), rng.integers(0, 3, (4, 4)))
    update = _jitted(metric, "update")
    merged = metric.merge(update(metric.init(), *a), update(metric.init(), *b))
    both = update(update(metric.init(), *a), *b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, merged, both)
    with pytest.raises(TypeError, match="integer labels"):
        metric.update(metric.init(), np.zeros((4, 4), np.float32), a[1])
    with pytest.raises(ValueError, match="rank"):
        metric.update(metric.init(), np.zeros((4,), np.int32), a[1])
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetric(0)


def test_segmentation_scores_must_have_num_classes_entries():
    """Logits over 14 (or 5) classes for a 13-class metric gave a plausible mIoU."""
    rng = np.random.default_rng(13)
    target = rng.integers(0, 13, (2, 4, 5))
    for c in (5, 14):
        with pytest.raises(ValueError, match="num_classes is 13"):
            SegmentationMetric(13).update(SegmentationMetric(13).init(), rng.normal(size=(2, 4, 5, c)), target)
    with pytest.raises(ValueError, match="num_classes is 13"):  # NCHW scores read with the default class_axis=-1
        SegmentationMetric(13).update(SegmentationMetric(13).init(), rng.normal(size=(2, 13, 4, 5)), target)


def test_nan_scores_and_non_integer_targets_make_argmax_metrics_nan():
    """argmax picks a NaN's class and a cast truncates 2.7 to 2 (NaN to class 0): both gave plausible values."""
    rng = np.random.default_rng(14)
    logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
    target = rng.integers(0, 3, (2, 4, 5)).astype(np.float32)
    target[0, 0, 1] = -1  # ignored
    metric = SegmentationMetric(3)
    assert _all_finite({k: v for k, v in run(metric, logits, target).items() if k != "class_present"})
    float_keys = ("miou", "pixel_accuracy", "mean_class_accuracy", "iou")
    cases = []
    nan_scores = logits.copy()
    nan_scores[1, 2, 3, 0] = np.nan
    cases.append((nan_scores, target))
    for value in (np.nan, 1.5, -0.5):
        bad = target.copy()
        bad[1, 2, 3] = value
        cases.append((logits, bad))
    for pred, tgt in cases:
        got = stream(metric, [(pred[:1], tgt[:1]), (pred[1:], tgt[1:])])
        assert all(np.all(np.isnan(got[k])) for k in float_keys)
    # the same inputs on a pixel that is masked out or ignored do not count
    keep = np.ones(target.shape, bool)
    keep[1, 2, 3] = False
    for pred, tgt in cases:
        assert np.isfinite(run(metric, pred, tgt, keep)["miou"])
    ignored = target.copy()
    ignored[1, 2, 3] = -1
    assert np.isfinite(run(metric, nan_scores, ignored)["miou"])
    # accuracy: the same rules, per sample
    acc = Accuracy()
    scores, labels = logits[0, 0], target[0, 0].copy()  # [5, 3], [5]
    labels[1] = 2
    assert np.isfinite(run(acc, scores, labels)["accuracy"])
    bad_scores = scores.copy()
    bad_scores[2, 1] = np.nan
    assert np.isnan(run(acc, bad_scores, labels)["accuracy"])
    assert np.isfinite(run(acc, bad_scores, labels, np.arange(5) != 2)["accuracy"])
    for value in (np.nan, 0.5):
        bad_labels = labels.copy()
        bad_labels[3] = value
        assert np.isnan(run(acc, scores, bad_labels)["accuracy"])


def test_infinite_float_targets_and_targets_outside_the_score_classes_make_argmax_metrics_nan():
    """Audit 43: an inf float target was cast into an ignored label (mIoU) or a plausible wrong one (accuracy);
    with scores over C classes, accuracy counted a target outside [0, C) (a -1 "ignore" label, or labels read
    against one sigmoid logit per sample, where argmax is always 0) as a plain miss."""
    rng = np.random.default_rng(15)
    logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
    target = rng.integers(0, 3, (2, 4, 5)).astype(np.float32)
    seg = SegmentationMetric(3)
    assert np.isfinite(run(seg, logits, target)["miou"])
    for value in (np.inf, -np.inf):
        bad = target.copy()
        bad[1, 2, 3] = value
        assert np.isnan(run(seg, logits, bad)["miou"])
        keep = np.ones(target.shape, bool)
        keep[1, 2, 3] = False
        assert np.isfinite(run(seg, logits, bad, keep)["miou"])
    acc = Accuracy()
    scores, labels = logits[0, 0], target[0, 0].astype(np.int32)  # [5, 3], [5]
    assert np.isfinite(run(acc, scores, labels)["accuracy"])
    for value in (-1, 3):
        bad = labels.copy()
        bad[2] = value
        assert np.isnan(run(acc, scores, bad)["accuracy"])
        assert run(acc, scores, bad, np.arange(5) != 2)["accuracy"] == pytest.approx(
            np.mean(scores.argmax(-1)[np.arange(5) != 2] == labels[np.arange(5) != 2]))
        assert np.isfinite(run(acc, scores.argmax(-1), bad)["accuracy"])  # labels: no class count to check
    assert np.isnan(run(acc, scores[:, :1], (labels > 0).astype(np.int32))["accuracy"])  # one logit per sample
    bad = labels.astype(np.float32)
    bad[0] = np.inf
    assert np.isnan(run(acc, scores.argmax(-1), bad)["accuracy"])


def test_segmentation_ignore_index_inside_the_classes_raises():
    """Audit 43: ignore_index=0 with num_classes including 0 put class 0 (never a target, sometimes predicted)
    into the mIoU with IoU 0."""
    for ignore in (0, 2):
        with pytest.raises(ValueError, match=f"ignore_index {ignore} is one of the 3 classes"):
            SegmentationMetric(3, ignore_index=ignore)
    for ignore in (-1, 3, 255):
        SegmentationMetric(3, ignore_index=ignore)

# --- depth --------------------------------------------------------------------------------------


def ref_depth(pred, target, mask=None):
    valid = (target != 0) & np.isfinite(target)
    if mask is not None:
        valid &= mask
    err = np.abs(pred - target)[valid].astype(np.float64)
    return {"abs_err": err.mean(), "rel_err": (err / np.abs(target[valid])).mean(), "count": valid.sum()}


def libmtl_style_depth(batches):
    """LibMTL's aggregation: per-batch means over valid pixels, averaged weighted by valid-pixel counts."""
    abs_rec, rel_rec, sizes = [], [], []
    for pred, gt in batches:
        m = gt != 0
        e = np.abs(pred[m] - gt[m]).astype(np.float64)
        abs_rec.append(e.sum() / m.sum())
        rel_rec.append((e / gt[m]).sum() / m.sum())
        sizes.append(m.sum())
    sizes = np.array(sizes)
    return np.sum(np.array(abs_rec) * sizes) / sizes.sum(), np.sum(np.array(rel_rec) * sizes) / sizes.sum()


def _depth_batches(rng, n=4):
    out = []
    for i in range(n):
        target = rng.uniform(0.5, 10.0, size=(2, 6, 7, 1)).astype(np.float32)
        target[rng.random(target.shape) < 0.1 * (i + 1)] = 0.0  # varying number of missing pixels
        pred = (target + rng.normal(scale=0.5, size=target.shape)).astype(np.float32)
        out.append((pred, target))
    return out


def test_depth_streamed_matches_numpy_and_libmtl_aggregation():
    rng = np.random.default_rng(3)
    batches = _depth_batches(rng)
    got = (stream(DepthMetric(), batches))
    want = ref_depth(np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    np.testing.assert_allclose(got["abs_err"], want["abs_err"], rtol=1e-5)
    np.testing.assert_allclose(got["rel_err"], want["rel_err"], rtol=1e-5)
    assert got["count"] == want["count"]
    lib_abs, lib_rel = libmtl_style_depth(batches)
    np.testing.assert_allclose([got["abs_err"], got["rel_err"]], [lib_abs, lib_rel], rtol=1e-5)


def test_depth_mask_nan_targets_empty_and_scales():
    rng = np.random.default_rng(4)
    pred, target = _depth_batches(rng, 1)[0]
    mask = rng.random(target.shape) < 0.5
    t_nan = target.copy()
    t_nan[0, 0, 0, 0] = np.nan
    got = run(DepthMetric(), pred, t_nan, mask)
    want = ref_depth(pred, t_nan, mask)
    np.testing.assert_allclose([got["abs_err"], got["rel_err"]], [want["abs_err"], want["rel_err"]], rtol=1e-5)
    empty = run(DepthMetric(), pred, np.zeros_like(target))  # no valid pixel: no score, not a perfect 0
    assert np.isnan(empty["abs_err"]) and np.isnan(empty["rel_err"]) and empty["count"] == 0
    base = run(DepthMetric(), pred, target)
    for scale in (1e-10, 1e10):
        s = run(DepthMetric(), pred * np.float32(scale), target * np.float32(scale))
        assert _all_finite(s)
        np.testing.assert_allclose(s["rel_err"], base["rel_err"], rtol=1e-4)  # scale invariant
        np.testing.assert_allclose(s["abs_err"], base["abs_err"] * scale, rtol=1e-4)


# --- surface normals ----------------------------------------------------------------------------


def ref_angles(pred, target):
    p = pred.astype(np.float64)
    t = target.astype(np.float64)
    p = p / np.linalg.norm(p, axis=-1, keepdims=True)
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    return np.degrees(np.arccos(np.clip(np.sum(p * t, -1), -1, 1)))


def _normal_batch(rng, shape=(2, 5, 6), noise=0.4):
    target = rng.normal(size=shape + (3,))
    target /= np.linalg.norm(target, axis=-1, keepdims=True)
    pred = target + rng.normal(scale=noise, size=target.shape)
    target[rng.random(shape) < 0.1] = 0.0  # missing normals
    return pred.astype(np.float32), target.astype(np.float32)


@pytest.mark.parametrize("num_batches", [3, 4])  # odd and even total counts (median convention)


def test_normals_streamed_matches_numpy(num_batches):
    rng = np.random.default_rng(5 + num_batches)
    batches = [_normal_batch(rng) for _ in range(num_batches)]
    batches[0][1][0, 0, 0] = [0.6, -0.6, 0.0]  # components sum to 0 but the normal is valid
    metric = NormalMetric()
    got = (stream(metric, batches))
    pred = np.concatenate([b[0] for b in batches])
    target = np.concatenate([b[1] for b in batches])
    valid = np.any(target != 0, -1)
    ang = ref_angles(pred[valid], target[valid])
    assert got["count"] == valid.sum()
    np.testing.assert_allclose(got["mean"], ang.mean(), atol=2e-3)
    assert abs(got["median"] - np.median(ang)) <= metric.bin_width + 1e-4
    for t in (11.25, 22.5, 30.0):
        assert got[f"within_{t:g}"] == pytest.approx(np.mean(ang < t), abs=1e-6)


def test_normals_median_resolution_is_bin_width():
    rng = np.random.default_rng(6)
    metric = NormalMetric(bin_width=2.0)
    target = np.array([[0.0, 0.0, 1.0]] * 51, np.float32)
    for n in (1, 2, 7, 50, 51):  # one shape, the first n pixels valid: odd and even counts
        theta = np.radians(rng.uniform(0, 179, size=51))
        pred = np.stack([np.sin(theta), np.zeros(51), np.cos(theta)], -1).astype(np.float32)
        got = run(metric, pred, target, np.arange(51) < n)
        assert got["count"] == n
        assert abs(got["median"] - np.median(np.degrees(theta[:n]))) <= metric.bin_width + 1e-4, n


def test_normals_properties_exact_zero_small_angles_and_scales():
    rng = np.random.default_rng(7)
    pred, target = _normal_batch(rng)
    valid = np.any(target != 0, -1)
    metric = NormalMetric()
    # identical normals: zero error, everything within 11.25°
    same = run(metric, np.where(valid[..., None], target, np.float32(1.0)), target)
    assert same["mean"] < 1e-3 and same["within_11.25"] == 1.0
    # a zero prediction counts as 90 degrees
    zero = run(metric, np.zeros_like(pred), target)
    assert zero["mean"] == pytest.approx(90.0) and zero["median"] == pytest.approx(90.0, abs=0.01)
    assert zero["within_30"] == 0.0
    # small angles are resolved (acos of a float32 cosine cannot resolve 1e-3 degrees); 180° too
    eps = np.radians(1e-3)
    p = np.array([[np.sin(eps), 0.0, np.cos(eps)], [0.0, 0.0, -2.0]], np.float32)
    t = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], np.float32)
    np.testing.assert_allclose(jax.jit(angular_error)(p, t), [1e-3, 180.0], rtol=1e-2)
    # scale invariance over 1e-10 .. 1e10 in either argument; all-zero targets -> empty, finite
    base = run(metric, pred, target)
    for sp, stt in ((1e-10, 1.0), (1e10, 1.0), (1.0, 1e-10), (1e10, 1e-10)):
        s = run(metric, pred * np.float32(sp), target * np.float32(stt))
        assert _all_finite(s)
        for k in base:
            np.testing.assert_allclose(s[k], base[k], rtol=1e-4, atol=1e-3, err_msg=k)
    empty = run(metric, pred, np.zeros_like(target))  # no valid pixel: no score, not a perfect 0
    assert empty["count"] == 0 and all(np.isnan(v) for k, v in empty.items() if k != "count")


def test_normals_nan_prediction_makes_every_value_nan():
    """A NaN prediction on a valid pixel used to count as a zero vector (90°): every value stayed finite."""
    rng = np.random.default_rng(12)
    pred, target = _normal_batch(rng)
    valid = np.any(target != 0, -1)
    i = tuple(np.argwhere(valid)[0])
    bad = pred.copy()
    bad[i + (0,)] = np.nan
    np.testing.assert_array_equal(np.isnan(np.asarray(jax.jit(angular_error)(bad, target))), np.isnan(bad).any(-1))
    got = run(NormalMetric(), bad, target)
    assert got["count"] == valid.sum()
    for k in ("mean", "median", "within_11.25", "within_22.5", "within_30"):
        assert np.isnan(got[k]), k
    # the same NaN on an invalid (zero-normal) or masked-out pixel does not count
    mask = np.ones(valid.shape, bool)
    mask[i] = False
    assert _all_finite(run(NormalMetric(), bad, target, mask))
    on_missing = pred.copy()
    on_missing[tuple(np.argwhere(~valid)[0])] = np.nan
    assert _all_finite(run(NormalMetric(), on_missing, target))


def test_normals_channel_first_and_mask():
    rng = np.random.default_rng(8)
    pred, target = _normal_batch(rng)
    mask = rng.random(target.shape[:-1]) < 0.5
    last = run(NormalMetric(), pred, target, mask)
    first = run(NormalMetric(axis=1), np.moveaxis(pred, -1, 1), np.moveaxis(target, -1, 1), mask)
    for k in last:
        np.testing.assert_allclose(first[k], last[k], rtol=1e-6, err_msg=k)
    valid = np.any(target != 0, -1) & mask
    np.testing.assert_allclose(last["mean"], ref_angles(pred[valid], target[valid]).mean(), atol=2e-3)


def test_normals_vector_axis_must_have_three_components():
    """Audit 43: NCHW normals with the default axis=-1 gave angles between W-long vectors, without an error."""
    rng = np.random.default_rng(16)
    pred, target = _normal_batch(rng)
    nchw = np.moveaxis(pred, -1, 1), np.moveaxis(target, -1, 1)
    metric = NormalMetric()
    with pytest.raises(ValueError, match=r"has 6 components on its vector axis -1; surface normals have 3"):
        metric.update(metric.init(), *nchw)
    with pytest.raises(ValueError, match="components on its vector axis"):
        metric.update(metric.init(), pred[..., :2], target[..., :2])
    assert run(NormalMetric(axis=1), *nchw)["mean"] == pytest.approx(run(metric, pred, target)["mean"], rel=1e-6)


def test_normals_thresholds_are_checked():
    assert NormalMetric(thresholds=[5, 45]).thresholds == (5.0, 45.0)
    assert NormalMetric(thresholds=()).thresholds == ()
    for bad in [(0.0,), (-5.0,), (200.0,), (float("nan"),)]:
        with pytest.raises(ValueError, match=r"\(0, 180\]"):
            NormalMetric(thresholds=bad)
    with pytest.raises(TypeError, match="sequence of numbers"):
        NormalMetric(thresholds="30")  # would be (3.0, 0.0)
    with pytest.raises(ValueError, match="repeated"):
        NormalMetric(thresholds=(11.25, 11.25))  # within_11.25 would be written twice


# --- classification accuracy ---------------------------------------------------------------------


def test_accuracy_streamed_matches_numpy_logits_labels_mask():
    rng = np.random.default_rng(9)
    batches = [
        (rng.normal(size=(16, 5)).astype(np.float32), rng.integers(0, 5, 16), rng.random(16) < 0.8)
        for _ in range(3)
    ]
    got = (stream(Accuracy(), batches))
    pred = np.concatenate([b[0] for b in batches]).argmax(-1)
    target = np.concatenate([b[1] for b in batches])
    mask = np.concatenate([b[2] for b in batches])
    assert got["accuracy"] == pytest.approx(np.mean(pred[mask] == target[mask]))
    assert got["count"] == mask.sum()
    labels = run(Accuracy(), pred, target, mask)
    assert labels["accuracy"] == got["accuracy"]
    empty = _np(_jitted(Accuracy(), "compute")(Accuracy().init()))
    assert np.isnan(empty["accuracy"]) and empty["count"] == 0


# --- regression MAE -----------------------------------------------------------------------------


def test_mae_streamed_per_target_matches_numpy_with_mask_and_scale():
    rng = np.random.default_rng(10)
    scale = [1.0, 1000.0, 0.5]
    metric = MeanAbsoluteError(target_shape=(3,), scale=scale)
    batches = []
    for _ in range(3):
        target = rng.normal(size=(4, 5, 3)).astype(np.float32)  # two batch axes
        mask = rng.random((4, 5, 3)) < 0.7
        batches.append(((target + rng.normal(size=target.shape)).astype(np.float32), target, mask))
    got = (stream(metric, batches))
    pred = np.concatenate([b[0] for b in batches]).reshape(-1, 3)
    target = np.concatenate([b[1] for b in batches]).reshape(-1, 3)
    mask = np.concatenate([b[2] for b in batches]).reshape(-1, 3)
    want = np.array([np.abs(pred[mask[:, j], j] - target[mask[:, j], j]).mean() for j in range(3)]) * scale
    np.testing.assert_allclose(got["mae"], want, rtol=1e-5)
    np.testing.assert_allclose(got["mean_mae"], want.mean(), rtol=1e-5)
    np.testing.assert_array_equal(got["count"], mask.sum(0))
    assert hash(metric) == hash(MeanAbsoluteError(target_shape=(3,), scale=scale))


def test_mae_scalar_target_scales_empty_and_errors():
    rng = np.random.default_rng(11)
    pred, target = rng.normal(size=(2, 7)), rng.normal(size=(2, 7))
    for s in (1e-10, 1.0, 1e10):
        got = run(MeanAbsoluteError(), pred * s, target * s)
        assert _all_finite(got)
        np.testing.assert_allclose(got["mae"], np.abs(pred - target).mean() * s, rtol=1e-5)
    empty = _np(_jitted(MeanAbsoluteError((2,)), "compute")(MeanAbsoluteError((2,)).init()))
    assert np.isnan(empty["mae"]).all() and np.isnan(empty["mean_mae"])
    one_empty = run(MeanAbsoluteError((2,)), pred[:, :2], np.stack([target[:, 0], np.full(2, np.nan)], 1))
    assert np.isfinite(one_empty["mae"][0]) and np.isnan(one_empty["mae"][1]) and np.isnan(one_empty["mean_mae"])
    with pytest.raises(ValueError, match="target_shape"):
        MeanAbsoluteError((3,)).update(MeanAbsoluteError((3,)).init(), pred, target)
    with pytest.raises(ValueError, match="scale"):
        MeanAbsoluteError((3,), scale=[1.0, 2.0])


# --- binary AUC ---------------------------------------------------------------------------------


def ref_auc(scores, labels):
    """Pairwise Mann-Whitney statistic, ties one half."""
    pos, neg = scores[labels], scores[~labels]
    return np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))


_binary_auc = jax.jit(binary_auc)


def test_binary_auc_exact_matches_pairwise_with_ties_and_mask():
    rng = np.random.default_rng(12)
    scores = np.round(rng.random(300), 2).astype(np.float32)  # many ties
    labels = rng.random(300) < scores
    mask = rng.random(300) < 0.8
    got = float(_binary_auc(scores, labels, mask))
    assert got == pytest.approx(ref_auc(scores[mask], labels[mask]), abs=1e-6)
    # no positives / no negatives: 0.5, not NaN
    assert float(_binary_auc(scores, np.zeros_like(labels), mask)) == 0.5
    assert float(_binary_auc(scores, np.ones_like(labels), mask)) == 0.5
    # +inf and -inf scores are ranked correctly, and masked-out entries never mix with them
    s2 = np.array([np.inf, 0.5, -np.inf, np.inf, 0.1], np.float32)
    l2 = np.array([True, False, False, False, True])
    m2 = np.array([True, True, True, True, True])
    assert float(_binary_auc(s2, l2, m2)) == pytest.approx(ref_auc(s2, l2))
    m2[3] = False
    assert float(_binary_auc(s2, l2, m2)) == pytest.approx(ref_auc(s2[m2], l2[m2]))


def test_binary_auc_streamed_histogram_within_reported_bound():
    rng = np.random.default_rng(13)
    metric = BinaryAUC(num_bins=50)
    batches = []
    for _ in range(4):
        s = rng.random(64).astype(np.float32)
        batches.append((s, rng.random(64) < s))
    got = stream(metric, batches)
    scores = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    exact = ref_auc(scores, labels)
    assert got["auc_error_bound"] > 0
    assert abs(got["auc"] - exact) <= got["auc_error_bound"] + 1e-6
    # scores at bin centres (one value per bin): the histogram AUC is exact
    centred = ((np.floor(scores * 50) + 0.5) / 50).astype(np.float32)
    fine = run(metric, centred, labels)
    assert fine["auc"] == pytest.approx(ref_auc(centred, labels), abs=1e-6)
    assert fine["num_pos"] == labels.sum() and fine["num_neg"] == (~labels).sum()
    # no positives: 0.5, not NaN
    none = run(metric, centred, np.zeros_like(labels))
    assert none["auc"] == 0.5 and none["auc_error_bound"] == 0.0


def test_binary_auc_logit_range_and_clipping():
    rng = np.random.default_rng(14)
    logits = rng.normal(scale=3, size=200).astype(np.float32)
    labels = rng.random(200) < 1 / (1 + np.exp(-logits))
    got = run(BinaryAUC(num_bins=4000, score_range=(-20.0, 20.0)), logits, labels)
    assert abs(got["auc"] - ref_auc(logits, labels)) <= got["auc_error_bound"] + 1e-6
    # out-of-range scores land in the end bins (ties there), never dropped
    big = run(BinaryAUC(num_bins=10), np.array([-5.0, 5.0, 7.0], np.float32), np.array([False, True, False]))
    assert big["auc"] == pytest.approx(0.75) and big["num_pos"] + big["num_neg"] == 3
    with pytest.raises(ValueError, match="score_range"):
        BinaryAUC(score_range=(1.0, 0.0))


@pytest.mark.parametrize("labels_dtype", [np.int32, np.float32])


def test_binary_auc_takes_0_1_labels_and_is_nan_for_other_labels_or_nan_scores(labels_dtype):
    rng = np.random.default_rng(15)
    scores = rng.random(100).astype(np.float32)
    labels = rng.random(100) < scores
    metric = BinaryAUC(num_bins=100)
    exact = ref_auc(scores, labels)
    as_01 = labels.astype(labels_dtype)
    assert float(_binary_auc(scores, as_01)) == pytest.approx(exact, abs=1e-6)
    assert abs(run(metric, scores, as_01)["auc"] - exact) <= 0.011
    # -1/+1 labels: a bool cast would call every sample positive (AUC 0.5); now NaN
    pm1 = np.where(labels, 1, -1).astype(labels_dtype)
    assert np.isnan(float(_binary_auc(scores, pm1)))
    assert np.isnan(run(metric, scores, pm1)["auc"])
    # a NaN score on a kept sample (a diverged model) is NaN, not skipped
    bad = scores.copy()
    bad[4] = np.nan
    assert np.isnan(float(_binary_auc(bad, labels)))
    got = run(metric, bad, labels)
    assert np.isnan(got["auc"]) and np.isnan(got["auc_error_bound"])
    # ... unless the mask drops that sample; and a bad label in one batch poisons the stream
    keep = np.ones(100, bool)
    keep[4] = False
    assert float(_binary_auc(bad, labels, keep)) == pytest.approx(ref_auc(scores[keep], labels[keep]), abs=1e-6)
    assert np.isfinite(run(metric, bad, labels, keep)["auc"])
    assert np.isnan(stream(metric, [(scores, labels), (scores[:3], np.array([0.0, 0.5, 1.0], np.float32))])["auc"])


# --- int32 count overflow -----------------------------------------------------------------------


def test_int32_counts_that_would_wrap_make_the_values_nan():
    """Counts near 2**31 wrapped to negative numbers, and the ratios built on them stayed plausible."""
    near = 2**31 - 20
    half = 2**30 + 5  # two of them overflow when merged; one alone is exact
    cases = []
    seg = SegmentationMetric(2)
    zeros = np.zeros((50,), np.int32)
    cases.append((seg, seg.init()._replace(confusion=jnp.asarray([[near, 0], [0, 7]], jnp.int32)), (zeros, zeros),
                  ("miou", "pixel_accuracy", "mean_class_accuracy")))
    depth = DepthMetric()
    ones = np.ones((50,), np.float32)
    cases.append((depth, depth.init()._replace(count=jnp.int32(near), abs_sum=jnp.float32(near)), (ones, ones),
                  ("abs_err", "rel_err")))
    acc = Accuracy()
    cases.append((acc, acc.init()._replace(correct=jnp.int32(near), count=jnp.int32(near)), (zeros, zeros),
                  ("accuracy",)))
    mae = MeanAbsoluteError()
    cases.append((mae, mae.init()._replace(count=jnp.int32(near)), (ones, ones), ("mae",)))
    normal = NormalMetric(bin_width=90.0)
    e = np.tile(np.float32([[0, 0, 1]]), (50, 1))
    cases.append((normal, normal.init()._replace(hist=jnp.asarray([near, 0], jnp.int32)), (e, e),
                  ("mean", "median", "within_11.25")))
    for metric, state, batch, keys in cases:
        assert all(np.all(np.isfinite(np.asarray(v))) for v in metric.compute(state).values()), type(metric)
        got = _np(metric.compute(metric.update(state, *batch)))
        assert all(np.all(np.isnan(got[k])) for k in keys), (type(metric), got)
    # merging two states whose counts fit but whose sum does not
    st = depth.init()._replace(count=jnp.int32(half), abs_sum=jnp.float32(half))
    assert np.isnan(depth.compute(depth.merge(st, st))["abs_err"])
    # every histogram cell fits but the total does not (normals, AUC)
    st = normal.init()._replace(hist=jnp.asarray([half, half], jnp.int32))
    assert np.isnan(normal.compute(st)["median"]) and normal.compute(st)["count"] == 2**31 - 1
    auc = BinaryAUC(num_bins=2)
    st = auc.init()._replace(pos_hist=jnp.asarray([half, half], jnp.int32), neg_hist=jnp.asarray([1, 1], jnp.int32))
    assert np.isnan(auc.compute(st)["auc"])
    # a plain valid state just below the limits stays finite
    st = auc.init()._replace(pos_hist=jnp.asarray([half, 3], jnp.int32), neg_hist=jnp.asarray([1, 1], jnp.int32))
    assert np.isfinite(auc.compute(st)["auc"])
