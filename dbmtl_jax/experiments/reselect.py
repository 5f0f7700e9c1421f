"""Model selection after training: re-pick a run's epoch on a smoothed validation curve.

The runner keeps the parameters of the epoch with the best validation score
(:func:`dbmtl_jax.experiments.train.selection_score`; per task for STL) and
tests them once.  Once a model has memorised its training set, the validation
score sits on a noisy plateau and that arg-max lands anywhere on it, so the
selected epoch (and the "selected in the last 20 %" convergence figure) is
partly noise.  Re-selecting on a centred moving average of the validation
curve picks the middle of the best stretch instead.

A run recorded with ``--test-curve`` holds its test metrics after every epoch,
so the re-selected epoch's test metrics are read from the record: selection
still sees validation only, and nothing is retrained.  With ``window=1`` the
choice is the runner's own (up to the rounding of the recorded curves).

:func:`average_last` goes without selection: each metric is the mean of the
run's recorded curve over its last epochs (the level of the plateau that
training ended on), so no choice of epoch, noisy or not, enters the comparison;
:func:`average_epochs` does the same over any stretch of epochs.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["check_window", "smooth_curve", "smoothed_epoch", "best_smoothed_epoch", "reselect_smoothed", "reselect_all",
           "average_last", "average_all", "average_epochs", "average_epochs_all", "check_epoch_range", "last_epochs"]


def check_window(window: Any, epochs: int | None = None, name: str = "the curve") -> None:
    """``window`` must be an odd positive int and, given the curve's length, at most ``epochs``: a wider window
    truncated at both ends flattens the curve (from 2·epochs − 1 on every epoch averages the whole curve and the
    first epoch wins the tie), so the choice would say nothing about the validation curve."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd positive int (epochs), got {window!r}.")
    if epochs is not None and window > epochs:
        raise ValueError(f"window {window} is longer than {name}'s {epochs} epochs: a centred moving average wider "
                         "than the curve flattens it; use a window of at most the number of epochs.")


def smooth_curve(values: Sequence[float], window: int) -> np.ndarray:
    """Centred moving average of ``values`` over ``window`` (odd) epochs, truncated at both ends.

    Non-finite values are left out of each mean; a window with no finite value gives NaN.
    """
    check_window(window)
    x = np.asarray(values, np.float64)
    half = window // 2
    out = np.full(x.shape, np.nan)
    for e in range(len(x)):
        seg = x[max(0, e - half): e + half + 1]
        seg = seg[np.isfinite(seg)]
        if seg.size:
            out[e] = seg.mean()
    return out


def smoothed_epoch(scores: Sequence[float], window: int, higher: bool = True) -> int:
    """The 1-based epoch whose smoothed score is best (the first such epoch on ties), among the epochs whose own
    score is finite (a diverged epoch is never chosen for its neighbours' scores)."""
    check_window(window, len(scores))
    e = best_smoothed_epoch(scores, smooth_curve(scores, window), higher)
    if e is None:
        raise ValueError("the validation curve has no finite value to select on.")
    return e


def best_smoothed_epoch(scores: Sequence[float], smooth: np.ndarray, higher: bool = True) -> int | None:
    """The 1-based epoch of the best value of ``smooth`` (the first on ties) among the epochs where both it and
    the raw ``scores`` are finite; ``None`` when there is none."""
    ok = np.isfinite(smooth) & np.isfinite(np.asarray(scores, np.float64))
    if not np.any(ok):
        return None
    return int(np.argmax(np.where(ok, smooth if higher else -smooth, -np.inf))) + 1


def _epoch_metrics(curve: Sequence[Mapping[str, Any]], epoch: int, task: str) -> dict[str, float]:
    """The task's metrics at a 1-based epoch; a metric not recorded there (``None``) is NaN, so the run's Δp is NaN
    and the table leaves it out, as :func:`average_last` does."""
    return {m: math.nan if v is None else float(v) for m, v in curve[epoch - 1][task].items()}


def _curves(run: Mapping[str, Any], why: str) -> tuple[list, list]:
    """The run's recorded per-epoch validation and test curves; ``ValueError`` (ending with ``why`` they
    are needed) when it has no test curve of the validation curve's length."""
    hist = run.get("history") or {}
    val, test = hist.get("val"), hist.get("test")
    if not test or not val or len(test) != len(val):
        name = run.get("_path") or f"{run.get('benchmark')} {run.get('method')} seed {run.get('seed')}"
        raise ValueError(f"{name}: no per-epoch test curve{why} (train with --test-curve).")
    return val, test


def reselect_smoothed(run: Mapping[str, Any], window: int) -> dict[str, Any]:
    """A copy of the run record with ``selected_epoch`` and ``metrics`` re-chosen by :func:`smoothed_epoch`.

    Multi-task runs select on the recorded per-epoch ``selection_score`` (the
    runner's criterion); STL selects each task on its own ``select_metric``.
    Raises ``ValueError`` if the run has no test curve (train with ``--test-curve``).
    """
    val, test = _curves(run, ", so another epoch's test metrics are unknown")
    hist = run["history"]
    tasks = run["tasks"]
    out = copy.copy(run)
    if run["method"] == "stl":
        sel = {}
        for t, info in tasks.items():
            m = info["select_metric"]
            curve = [float(v[t][m]) if v[t][m] is not None else math.nan for v in val]
            sel[t] = smoothed_epoch(curve, window, bool(info["metrics"][m]))
    else:
        scores = [math.nan if s is None else float(s) for s in hist["selection_score"]]
        e = smoothed_epoch(scores, window)
        sel = {t: e for t in tasks}
    out["selected_epoch"] = sel
    out["metrics"] = {"val": {t: _epoch_metrics(val, sel[t], t) for t in tasks},
                      "test": {t: _epoch_metrics(test, sel[t], t) for t in tasks}}
    out["selection"] = f"{run.get('selection', 'validation')}, re-selected on its {window}-epoch centred moving average"
    return out


def _each(runs: Sequence[Mapping[str, Any]], fn: Callable[[Mapping[str, Any]], dict[str, Any]],
          skipped: list | None) -> list[dict[str, Any]]:
    """``fn`` of every run; a run it refuses (``ValueError``) goes to ``skipped`` as ``(path, reason)``,
    or the error is raised when ``skipped`` is None."""
    out = []
    for r in runs:
        try:
            out.append(fn(r))
        except ValueError as e:
            if skipped is None:
                raise
            skipped.append((str(r.get("_path", "")), str(e)))
    return out


def reselect_all(runs: Sequence[Mapping[str, Any]], window: int,
                 skipped: list | None = None) -> list[dict[str, Any]]:
    """:func:`reselect_smoothed` of every run; runs without a test curve go to ``skipped``
    as ``(path, reason)`` (or raise when ``skipped`` is None).  A bad ``window`` always raises, also one longer
    than some run's curve."""
    check_window(window)
    for r in runs:
        val = (r.get("history") or {}).get("val")
        if val:
            check_window(window, len(val), str(r.get("_path") or f"{r.get('method')} seed {r.get('seed')}"))
    return _each(runs, lambda r: reselect_smoothed(r, window), skipped)


def last_epochs(n: int, fraction: float) -> int:
    """How many epochs "the last ``fraction`` of ``n``" holds: ``ceil(fraction · n)``, at least 1 (the
    window of ``--average-last``, of the late-selection count and of the training-loss figures)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}.")
    return max(1, int(math.ceil(fraction * n - 1e-9)))


def average_last(run: Mapping[str, Any], fraction: float) -> dict[str, Any]:
    """A copy of the run record whose ``metrics`` are the means of its validation and test curves over
    its last ``ceil(fraction · epochs)`` epochs: no model selection.  A metric that is non-finite in
    any of those epochs averages to NaN.  ``selected_epoch`` becomes ``None`` per task (no epoch was
    selected).  Raises ``ValueError`` without a test curve."""
    val, test = _curves(run, " to average")
    k = last_epochs(len(test), fraction)
    return _averaged(run, val, test, len(test) - k + 1, len(test),
                     f"none: metrics averaged over the last {k} of {len(test)} epochs", "the last epochs of each run")


def average_epochs(run: Mapping[str, Any], first: int, last: int) -> dict[str, Any]:
    """:func:`average_last` over the 1-based epochs ``first`` … ``last`` (inclusive) instead of the last ones: the
    level of a stretch of training, e.g. before a late gap opens.  ``ValueError`` when the stretch is empty or
    reaches past the run's curve."""
    check_epoch_range(first, last)
    val, test = _curves(run, " to average")
    if last > len(test):
        name = run.get("_path") or f"{run.get('benchmark')} {run.get('method')} seed {run.get('seed')}"
        raise ValueError(f"{name}: epochs {first}-{last} reach past its {len(test)} recorded epochs.")
    return _averaged(run, val, test, first, last,
                     f"none: metrics averaged over epochs {first}-{last} of {len(test)}", f"epochs {first}-{last}")


def check_epoch_range(first: Any, last: Any) -> None:
    """``first`` and ``last`` must be ints with ``1 <= first <= last`` (1-based, inclusive)."""
    for x in (first, last):
        if isinstance(x, bool) or not isinstance(x, int):
            raise ValueError(f"epochs must be ints, got {first!r}-{last!r}.")
    if not 1 <= first <= last:
        raise ValueError(f"epochs {first}-{last}: need 1 <= first <= last (1-based, inclusive).")


def _averaged(run: Mapping[str, Any], val: Sequence, test: Sequence, first: int, last: int,
              selection: str, over: str) -> dict[str, Any]:
    """The run with every metric the mean of its curve over epochs ``first`` … ``last`` (1-based, inclusive);
    a metric non-finite in any of them is NaN (a diverged epoch is not hidden).  ``selection`` says so in the
    record's words, ``over`` (key ``averaged_over``) in a table's."""
    def mean(curve: Sequence[Mapping[str, Any]], task: str) -> dict[str, float]:
        out = {}
        for m in curve[-1][task]:
            xs = np.array([np.nan if e[task][m] is None else float(e[task][m]) for e in curve[first - 1:last]],
                          np.float64)
            out[m] = float(np.mean(xs)) if np.all(np.isfinite(xs)) else math.nan
        return out

    out = copy.copy(run)
    tasks = run["tasks"]
    out["selected_epoch"] = {t: None for t in tasks}
    out["metrics"] = {"val": {t: mean(val, t) for t in tasks}, "test": {t: mean(test, t) for t in tasks}}
    out["selection"] = selection
    out["averaged_over"] = over
    return out


def average_all(runs: Sequence[Mapping[str, Any]], fraction: float,
                skipped: list | None = None) -> list[dict[str, Any]]:
    """:func:`average_last` of every run; runs without a test curve go to ``skipped`` (or raise when
    ``skipped`` is None).  A bad ``fraction`` always raises."""
    last_epochs(1, fraction)
    return _each(runs, lambda r: average_last(r, fraction), skipped)


def average_epochs_all(runs: Sequence[Mapping[str, Any]], first: int, last: int,
                       skipped: list | None = None) -> list[dict[str, Any]]:
    """:func:`average_epochs` of every run; runs without a test curve go to ``skipped`` (or raise when ``skipped``
    is None).  A bad range always raises, also one that reaches past some run's curve."""
    check_epoch_range(first, last)
    for r in runs:
        test = (r.get("history") or {}).get("test")
        if test and last > len(test):
            average_epochs(r, first, last)  # raises, naming the run
    return _each(runs, lambda r: average_epochs(r, first, last), skipped)
