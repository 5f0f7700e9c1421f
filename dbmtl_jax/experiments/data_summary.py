"""A summary of the data a run was trained and scored on, kept in its record and checked on resume.

A run's config hash names the benchmark and recipe, not the data the provider returns: another copy of a
local data set (``$DBMTL_JAX_ADULT``), another version of a package's data, or an edited loader give the
same hash, so a finished record made from other data would be skipped as done and mixed into one table
with new runs.  The runner therefore stores :func:`data_summary` in every record (and checkpoint) and
compares it (:func:`summary_difference`) with the data it has now before it skips or continues a run.

The summary is statistics, not a hash: for each split, the number of batches and rows and, for every
numeric array position of a batch, the float64 sum, sum of squares and sum of absolute values over the
split (the training split as the batches of one epoch drawn with ``numpy.random.default_rng(0)``).  They
are compared with a relative tolerance, so the last-bit differences of a preprocessing run on another CPU
pass, while another copy, subset, order of tasks or normalisation does not.  It is a check, not a proof:
data that differ only by a permutation within a split have the same summary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import jax
import numpy as np

__all__ = ["data_summary", "summary_difference"]

SPLITS = ("train", "val", "test")
RTOL = 1e-6
DIGITS = 10  # significant digits kept in a record: enough for RTOL


def _batches(data: Any, split: str):
    if split == "train":
        return data.train_batches(np.random.default_rng(0))
    return data.eval_batches(split)


def data_summary(data: Any) -> dict[str, dict[str, Any]]:
    """``{split: {"batches", "rows", "arrays": [[sum, sum of squares, sum of |x|], ...]}}`` of a
    ``DataSplits`` (one pass over one training epoch and the evaluation splits).  ``rows`` sums the leading
    size of each batch's first array (examples for array data, nodes for graph batches; padding included)."""
    out = {}
    for split in SPLITS:
        stats: Optional[np.ndarray] = None
        batches = rows = 0
        for batch in _batches(data, split):
            arrays = [np.asarray(x) for x in jax.tree_util.tree_leaves(batch)]
            arrays = [a for a in arrays if a.dtype.kind in "biuf"]
            s = np.array([[a.sum(dtype=np.float64), np.square(a, dtype=np.float64).sum(),
                           np.abs(a.astype(np.float64)).sum()] for a in arrays]).reshape(len(arrays), 3)
            if stats is None:
                stats = s
            elif stats.shape != s.shape:
                raise ValueError(f"the {split} batches of this data provider disagree on their number of arrays "
                                 f"({stats.shape[0]} and {s.shape[0]}).")
            else:
                stats = stats + s
            batches += 1
            rows += int(np.shape(arrays[0])[0]) if arrays and np.ndim(arrays[0]) else 1
        out[split] = {"batches": batches, "rows": rows,
                      "arrays": [] if stats is None else [[float(f"{v:.{DIGITS}g}") for v in row] for row in stats]}
    return out


def summary_difference(old: Mapping[str, Any], new: Mapping[str, Any], *,
                       labels: tuple[str, str] = ("then", "now")) -> Optional[str]:
    """``None`` if two summaries agree (within a relative ``1e-6``), else what differs first, in words
    (``labels`` name the two sides in the message)."""
    was, now = labels
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return "a summary is not a mapping (a malformed record?)"
    for split in SPLITS:
        a, b = old.get(split), new.get(split)
        if not all(isinstance(x, Mapping) and {"batches", "rows", "arrays"} <= set(x) for x in (a, b)):
            return f"the {split} split is missing from a summary, or malformed"
        for key in ("batches", "rows"):
            if int(a[key]) != int(b[key]):
                return f"{split} split: {a[key]} {key} {was}, {b[key]} {now}"
        if len(a["arrays"]) != len(b["arrays"]):
            return f"{split} split: {len(a['arrays'])} arrays per batch {was}, {len(b['arrays'])} {now}"
        for i, (x, y) in enumerate(zip(a["arrays"], b["arrays"])):
            scale = max(abs(x[2]), abs(y[2]))  # a sum is compared on the scale of its sum of |x|
            if not (np.isclose(x[0], y[0], rtol=0.0, atol=RTOL * scale, equal_nan=True)
                    and np.allclose(x[1:], y[1:], rtol=RTOL, atol=0.0, equal_nan=True)):
                return (f"{split} split, array {i}: sum {x[0]:.9g} {was}, {y[0]:.9g} {now} "
                        f"(sum of squares {x[1]:.9g} / {y[1]:.9g})")
    return None
