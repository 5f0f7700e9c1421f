"""Δp: the average relative improvement of a multi-task model over single-task learning.

Lin et al., "Dual-Balancing for Multi-Task Learning", Eq. (3)–(4) (following
Maninis et al., CVPR 2019 and Vandenhende et al., TPAMI 2021)::

    Δp     = (1/T) Σ_t Δp,t                                            (3)
    Δp,t   = 100 · (1/N_t) Σ_i (−1)^{s_t,i} (M_t,i − M^STL_t,i) / M^STL_t,i   (4)

with ``s_t,i = 0`` when a larger value of metric ``i`` of task ``t`` is better and
1 otherwise, so **positive Δp means better than STL**.  Metrics are averaged
within each task first, then over tasks (a task with many metrics does not
dominate), exactly as LibMTL's ``count_improvement``.

This is plain Python on a handful of numbers (no jit needed); the result is a
Python float in percent.  The relative change is divided by ``|M^STL|``: for the
usual positive baselines this is Eq. (4) verbatim, and for a negative baseline it
keeps the sign convention (Eq. (4) as printed would flip it).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

__all__ = ["delta_p", "delta_p_per_task"]

NestedMetrics = Mapping[str, Mapping[str, Any]]


def _scalar(value: Any, what: str) -> float:
    arr = np.asarray(value)
    if arr.size != 1 or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{what} must be a real scalar, got {value!r}.")
    out = float(arr.reshape(()))
    if not math.isfinite(out):
        raise ValueError(f"{what} is not finite ({out}).")
    return out


def _direction(flag: Any, task: str, name: str) -> bool:
    if isinstance(flag, (bool, np.bool_)):
        return bool(flag)
    if isinstance(flag, (int, np.integer)) and int(flag) in (0, 1):
        return bool(flag)
    raise ValueError(
        f"higher_is_better[{task!r}][{name!r}] must be a bool (or 0/1), got {flag!r}."
    )


def delta_p_per_task(
    metrics: NestedMetrics, stl: NestedMetrics, higher_is_better: NestedMetrics
) -> dict[str, float]:
    """``Δp,t`` (Eq. 4, in percent) for every task of ``higher_is_better``.

    Args:
      metrics: task -> metric name -> value of the method being evaluated.
      stl: task -> metric name -> value of the single-task baseline.
      higher_is_better: task -> metric name -> bool.  It defines which tasks
        and metrics enter Δp.  Both ``metrics`` and ``stl`` must hold exactly
        its tasks (a missing or an extra task raises, since either would change
        the average over tasks) and at least its metric names (extra metric
        entries, e.g. diagnostics from a metric's ``compute``, are ignored).

    Raises:
      ValueError: on a missing or extra task, a missing metric, a task with no
        metrics, a zero or non-finite STL value, a non-finite metric value, a relative change
        that overflows a float.
    """
    if not higher_is_better:
        raise ValueError("higher_is_better is empty: Δp needs at least one task.")
    tasks = list(higher_is_better)
    for label, mapping in (("metrics", metrics), ("stl", stl)):
        missing = [t for t in tasks if t not in mapping]
        extra = [t for t in mapping if t not in higher_is_better]
        if missing:
            raise ValueError(f"{label} lacks task(s) {missing} named in higher_is_better.")
        if extra:
            raise ValueError(
                f"{label} has task(s) {extra} that higher_is_better does not name; Δp averages over tasks, "
                "so every task must be listed (or removed from both)."
            )
    out: dict[str, float] = {}
    for task in tasks:
        spec = higher_is_better[task]
        if not spec:
            raise ValueError(f"higher_is_better[{task!r}] names no metric.")
        total = 0.0
        for name, flag in spec.items():
            up = _direction(flag, task, name)
            for label, mapping in (("metrics", metrics), ("stl", stl)):
                if name not in mapping[task]:
                    raise ValueError(f"{label}[{task!r}] lacks metric {name!r}.")
            value = _scalar(metrics[task][name], f"metrics[{task!r}][{name!r}]")
            base = _scalar(stl[task][name], f"stl[{task!r}][{name!r}]")
            if base == 0.0:
                raise ValueError(
                    f"stl[{task!r}][{name!r}] is 0: the relative change of Eq. (4) is undefined."
                )
            change = (value - base) / abs(base)
            if not math.isfinite(change):
                raise ValueError(
                    f"the relative change of metrics[{task!r}][{name!r}] = {value!r} against stl = {base!r} overflows "
                    "(the STL value is too close to 0 or the values too far apart for a float)."
                )
            total += change if up else -change
        out[task] = 100.0 * total / len(spec)
        if not math.isfinite(out[task]):
            raise ValueError(f"Δp of task {task!r} overflows: its metrics' relative changes are too large for a float.")
    return out


def delta_p(metrics: NestedMetrics, stl: NestedMetrics, higher_is_better: NestedMetrics) -> float:
    """Δp of Eq. (3) in percent: the mean over tasks of :func:`delta_p_per_task`.

    Example (NYUv2 layout; values as fractions or percentages alike, since
    only ratios enter)::

        hib = {"seg": {"miou": True, "pixel_accuracy": True},
               "depth": {"abs_err": False, "rel_err": False}}
        delta_p(mtl, stl, hib)   # > 0: better than STL on average
    """
    per_task = delta_p_per_task(metrics, stl, higher_is_better)
    value = sum(per_task.values()) / len(per_task)
    if not math.isfinite(value):
        raise ValueError("Δp overflows: the tasks' relative changes are too large for a float.")
    return value
