"""A summary of the data a run was trained and scored on, kept in its record and checked on resume.

A run's config hash names the benchmark and recipe, not the data the provider returns: another copy of a
local data set (``$DBMTL_JAX_ADULT``), another version of a package's data, or an edited loader give the
same hash, so a finished record made from other data would be skipped as done and mixed into one table
with new runs.  The runner therefore stores :func:`data_summary` in every record (and checkpoint) and
compares it (:func:`summary_difference`) with the data it has now before it skips or continues a run.

The summary is statistics, not a hash: for each split, the number of batches and rows and, for every
numeric array position of a batch, the float64 sum, sum of squares and sum of absolute values over the
split (the training split as the batches of one epoch drawn with ``numpy.random.default_rng(0)``), over its
finite values, with the NaN / +inf / -inf values counted (``nonfinite``, only in a split that has some).  They
are compared with a relative tolerance, so the last-bit differences of a preprocessing run on another CPU
pass, while another copy, subset, order of tasks or normalisation does not.  It is a check, not a proof:
data that differ only by a permutation within a split, or by less than ``1e-6`` of an array's summed ``|x|``
(one pixel of an image data set), have the same summary.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["data_summary", "summary_difference"]

SPLITS = ("train", "val", "test")
RTOL = 1e-6
DIGITS = 10  # significant digits kept in a record: enough for RTOL


def _batches(data: Any, split: str) -> Iterator[Any]:
    if split != "train":
        yield from data.eval_batches(split)
        return
    steps = getattr(data, "steps_per_epoch", None)
    for i, batch in enumerate(data.train_batches(np.random.default_rng(0))):
        if steps is not None and i == int(steps):  # as the runner does: an endless generator is an error
            raise ValueError(f"the data provider yielded more than {int(steps)} training batches in one epoch, "
                             f"not the {int(steps)} its steps_per_epoch reports.")
        yield batch


def _numeric(x: Any) -> Optional[np.ndarray]:
    """``x`` as a NumPy array if it holds numbers (bool, int, float; bfloat16 / float8 as float32; complex as its
    real and imaginary parts side by side), else ``None``."""
    a = np.asarray(x)
    if a.dtype.kind in "biuf":
        return a
    if a.dtype.kind == "c":
        return np.stack([a.real, a.imag], axis=-1)
    if a.dtype.kind == "V" and jnp.issubdtype(a.dtype, jnp.floating):  # ml_dtypes' floats
        return a.astype(np.float32)
    return None


def _stats(a: np.ndarray) -> tuple[list[float], list[int]]:
    """``[sum, sum of squares, sum of |x|]`` of the finite values of ``a`` (float64) and its NaN, +inf, -inf counts."""
    counts = [0, 0, 0]
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = [np.isnan(a), a == np.inf, a == -np.inf]
        counts = [int(m.sum()) for m in bad]
        a = np.where(bad[0] | bad[1] | bad[2], np.zeros((), a.dtype), a)
    return [a.sum(dtype=np.float64), np.square(a, dtype=np.float64).sum(), np.abs(a.astype(np.float64)).sum()], counts


def data_summary(data: Any) -> dict[str, dict[str, Any]]:
    """``{split: {"batches", "rows", "arrays": [[sum, sum of squares, sum of |x|], ...]}}`` of a
    ``DataSplits`` (one pass over one training epoch and the evaluation splits).  ``rows`` sums the leading
    size of each batch's first array (examples for array data, nodes for graph batches; padding included).
    The sums cover the finite values; a split with NaN or infinite values also has ``"nonfinite": [[NaN,
    +inf, -inf count], ...]`` (one row per array)."""
    out = {}
    for split in SPLITS:
        stats: Optional[np.ndarray] = None
        counts: Optional[np.ndarray] = None
        batches = rows = 0
        for batch in _batches(data, split):
            arrays = [a for a in map(_numeric, jax.tree_util.tree_leaves(batch)) if a is not None]
            per = [_stats(a) for a in arrays]
            s = np.array([p[0] for p in per], dtype=np.float64).reshape(len(arrays), 3)
            c = np.array([p[1] for p in per], dtype=np.int64).reshape(len(arrays), 3)
            if stats is None:
                stats, counts = s, c
            elif stats.shape != s.shape:
                raise ValueError(f"the {split} batches of this data provider disagree on their number of arrays "
                                 f"({stats.shape[0]} and {s.shape[0]}).")
            else:
                stats, counts = stats + s, counts + c
            batches += 1
            rows += int(np.shape(arrays[0])[0]) if arrays and np.ndim(arrays[0]) else 1
        out[split] = {"batches": batches, "rows": rows,
                      "arrays": [] if stats is None else [[float(f"{v:.{DIGITS}g}") for v in row] for row in stats]}
        if counts is not None and counts.any():  # only then: the summaries of finite data are as they were
            out[split]["nonfinite"] = counts.tolist()
    return out


class _Malformed(ValueError):
    pass


def _count(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer() or v < 0:
        raise _Malformed(what)
    return int(v)


def _number(v: Any) -> float:
    """A stored summary value: records store NaN as ``null`` and infinities as ``"inf"`` / ``"-inf"``."""
    if v is None:
        return math.nan
    if isinstance(v, str) and v in ("inf", "-inf", "nan"):
        return float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Malformed("arrays")
    return float(v)


def _read_split(x: Mapping[str, Any]) -> tuple[int, int, list[list[float]], list[list[int]]]:
    """``(batches, rows, arrays, nonfinite counts)`` of one split of a summary; :class:`_Malformed` naming the
    bad entry.  A summary without ``nonfinite`` (finite data, or one written before it existed) counts none."""
    batches, rows = _count(x["batches"], "batches"), _count(x["rows"], "rows")
    arrays = x["arrays"]
    if not isinstance(arrays, list) or not all(isinstance(r, list) and len(r) == 3 for r in arrays):
        raise _Malformed("arrays")
    arrays = [[_number(v) for v in r] for r in arrays]
    nonfinite = x.get("nonfinite")
    if nonfinite is None:
        return batches, rows, arrays, [[0, 0, 0]] * len(arrays)
    if not (isinstance(nonfinite, list) and len(nonfinite) == len(arrays)
            and all(isinstance(r, list) and len(r) == 3 for r in nonfinite)):
        raise _Malformed("nonfinite")
    return batches, rows, arrays, [[_count(v, "nonfinite") for v in r] for r in nonfinite]


def _split_difference(split: str, a: Any, b: Any, was: str, now: str) -> Optional[str]:
    """What differs first between two summaries of one split, in words; ``None`` if they agree.  Raises
    :class:`_Malformed` with the message when a summary of the split is missing or malformed."""
    if not all(isinstance(x, Mapping) and {"batches", "rows", "arrays"} <= set(x) for x in (a, b)):
        raise _Malformed(f"the {split} split is missing from a summary, or malformed")
    try:
        a, b = _read_split(a), _read_split(b)
    except _Malformed as e:
        raise _Malformed(f"the {split} split of a summary is malformed ({e})") from None
    for k, key in enumerate(("batches", "rows")):
        if a[k] != b[k]:
            return f"{split} split: {a[k]} {key} {was}, {b[k]} {now}"
    if len(a[2]) != len(b[2]):
        return f"{split} split: {len(a[2])} arrays per batch {was}, {len(b[2])} {now}"
    for i, (x, y, cx, cy) in enumerate(zip(a[2], b[2], a[3], b[3])):
        if not all(math.isfinite(v) for v in (*x, *y)):
            continue
        if cx != cy:
            return (f"{split} split, array {i}: {cx[0]} NaN, {cx[1]} +inf, {cx[2]} -inf values {was}, "
                    f"{cy[0]} NaN, {cy[1]} +inf, {cy[2]} -inf {now}")
        scale = max(abs(x[2]), abs(y[2]))  # a sum is compared on the scale of its sum of |x|
        if not (np.isclose(x[0], y[0], rtol=0.0, atol=RTOL * scale)
                and np.allclose(x[1:], y[1:], rtol=RTOL, atol=0.0)):
            return (f"{split} split, array {i}: sum {x[0]:.9g} {was}, {y[0]:.9g} {now} "
                    f"(sum of squares {x[1]:.9g} / {y[1]:.9g})")
    return None


def summary_difference(old: Mapping[str, Any], new: Mapping[str, Any], *,
                       labels: tuple[str, str] = ("then", "now")) -> Optional[str]:
    """``None`` if two summaries agree (within a relative ``1e-6``), else what differs first, in words
    (``labels`` name the two sides in the message).  An array whose stored sums are not finite (a summary
    written before non-finite values were counted, or an overflow) is not compared: they say nothing.
    Where only the training split differs, the message says so: the sampled epoch also depends on NumPy's
    shuffle, so the same examples shuffled by another NumPy version differ there too."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return "a summary is not a mapping (a malformed record?)"
    try:
        diffs = {split: _split_difference(split, old.get(split), new.get(split), *labels) for split in SPLITS}
    except _Malformed as e:
        return str(e)
    first = next((d for d in diffs.values() if d is not None), None)
    if first is not None and all(diffs[s] is None for s in SPLITS if s != "train"):
        first += ("; the validation and test splits agree: another training set, or the same one shuffled "
                  "otherwise (the epoch summarised is drawn with NumPy's default_rng(0); another NumPy version "
                  "may shuffle differently, and so would the run's batches)")
    return first
