"""How each row ends its training: its fit of the training set, and its test curve after the peak.

A table's Δp is read at one epoch per run (the validation-selected one).  Two
rows with the same Δp can still end differently: one still rising, one past its
peak and falling because it memorised its training set.  For every row of a
study this page gives

* **final training loss / the reference's**: the run's summed per-task training
  loss at its last epoch over the reference row's (EW by default) on the same
  seed (seeds are paired): below 1, the row fits its training set tighter;
* **the test curve** (runs trained with ``--test-curve``): each epoch's Δp
  (Lin et al., Eq. 3–4) against the STL row's mean metrics at its selected
  epochs (the table's reference), averaged over the row's seeds, then smoothed
  by a centred moving average (:func:`dbmtl_jax.experiments.reselect.smooth_curve`).
  Its *peak* (value and epoch); its mean over the last 20 % of epochs, unsmoothed
  (against the same STL metrics as the peak; ``dbmtl-jax paired --average-last 0.2``
  averages STL's curve too, so its Δp are shifted, while differences between rows
  agree closely); and the *fall* from the peak to that mean.  A fall beside a
  tighter training fit is the signature of overfitting.  Each seed's own fall is
  paired with the reference row's on the same seed (95 % t-interval).

Runs that did not train the setting's epochs are left out of every figure;
fewer seeds than a row has, or diverged losses, are counted in the cell.

The peak is read on the test curve, so it is a description of the curve, not a
model selection (selection stays on validation; ``split="val"`` gives the same
page for the validation curve).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from dbmtl_jax.experiments.paired import (borrow_stl, check_split, find_row, order_rows, paired_interval, rank_text,
                                          reference_stl, summed_train_loss)
from dbmtl_jax.experiments.report import Row, Setting, runs_delta_p, setting_title, signed
from dbmtl_jax.experiments.reselect import best_smoothed_epoch, check_window, last_epochs, smooth_curve
from dbmtl_jax.metrics import delta_p

__all__ = ["CurveFacts", "default_window", "epoch_delta_p", "row_curve_facts", "final_losses", "curves_markdown",
           "curves_report"]


class CurveFacts(NamedTuple):
    """One row's curve figures (NaN / None where the records lack them)."""

    peak: float  # the smoothed seed-mean Δp curve's maximum (over epochs whose own value is finite)
    peak_epoch: Optional[int]  # its 1-based epoch (the first on ties)
    last: float  # the unsmoothed seed-mean Δp over the last ``fraction`` of epochs
    runs: int  # the runs with a full-length curve, the ones averaged
    window: Optional[int]  # the smoothing window used (epochs)
    seed_falls: Mapping[int, float]  # per seed: its own smoothed curve's peak minus its last-fraction mean

    @property
    def fall(self) -> float:
        """Peak minus the last-fraction mean, in Δp points (≥ 0 up to the smoothing)."""
        return self.peak - self.last


def default_window(epochs: int) -> int:
    """The smoothing window for a curve of ``epochs`` epochs: ``2·⌊E/30⌋ + 1`` (21 for 320 epochs, 11 for 150,
    1 below 30), about a fifteenth of the run."""
    return 2 * (int(epochs) // 30) + 1


def epoch_delta_p(run: Mapping[str, Any], base: Mapping[str, Mapping[str, float]],
                  hib: Mapping[str, Mapping[str, bool]], split: str = "test") -> Optional[np.ndarray]:
    """The run's Δp at every recorded epoch of its ``split`` curve against the metrics ``base`` (NaN where a
    metric is missing or non-finite); ``None`` without a recorded curve."""
    curve = (run.get("history") or {}).get(split)
    if not curve:
        return None
    out = np.full(len(curve), np.nan)
    for i, epoch in enumerate(curve):
        metrics = {t: {m: math.nan if v is None else float(v) for m, v in ms.items()} for t, ms in epoch.items()}
        try:
            out[i] = delta_p(metrics, base, hib)
        except (ValueError, KeyError):  # a task or metric missing at this epoch
            pass
    return out


def _peak_and_last(curve: np.ndarray, window: int, k: int) -> tuple[float, Optional[int], float]:
    """The smoothed curve's maximum and its 1-based epoch, among epochs whose own value is finite (a diverged
    epoch is never the peak for its neighbours' sake), and the unsmoothed mean of the last ``k`` epochs."""
    smooth = smooth_curve(curve, window)
    last = float(np.mean(curve[-k:]))
    e = best_smoothed_epoch(curve, smooth)
    return (math.nan, None, last) if e is None else (float(smooth[e - 1]), e, last)


def row_curve_facts(row: Row, base: Mapping[str, Mapping[str, float]], hib: Mapping[str, Mapping[str, bool]], *,
                    epochs: int, window: Optional[int] = None, fraction: float = 0.2,
                    split: str = "test") -> CurveFacts:
    """The row's curve figures over its runs whose ``split`` curve has ``epochs`` epochs (the setting's budget;
    others are left out and the count says so): the seed-mean Δp curve's peak on a centred moving average over
    ``window`` epochs (default :func:`default_window`) and its unsmoothed mean over the last ``fraction`` of
    epochs, and each seed's own fall (its smoothed peak minus its last-fraction mean)."""
    w = default_window(epochs) if window is None else window
    check_window(w, epochs, f"{row.label}'s {split} curve")
    k = last_epochs(epochs, fraction)
    seeded = [(int(r["seed"]), c) for r in row.runs
              if (c := epoch_delta_p(r, base, hib, split)) is not None and len(c) == epochs]
    if not seeded:
        return CurveFacts(math.nan, None, math.nan, 0, w, {})
    falls: dict[int, float] = {}
    for seed, c in seeded:
        p, _, lst = _peak_and_last(c, w, k)
        falls[seed] = p - lst
    peak, epoch, last = _peak_and_last(np.mean([c for _, c in seeded], axis=0), w, k)  # NaN epochs stay NaN
    return CurveFacts(peak, epoch, last, len(seeded), w, falls)


def final_losses(row: Row, epochs: int) -> dict[int, float]:
    """Per seed, the summed training loss of the row's run at its last epoch, for runs that trained ``epochs``
    epochs (NaN for a run whose loss diverged)."""
    return {int(r["seed"]): t[-1] for r in row.runs if len(t := summed_train_loss(r)) == epochs}


def _loss_ratio_cell(row: Row, ref: Row, epochs: int) -> str:
    """Mean (min–max) over paired seeds of the row's final training loss over ``ref``'s; the seeds used when
    fewer than the row's runs, and the diverged ones (a non-finite loss in either row) by count."""
    mine, theirs = final_losses(row, epochs), final_losses(ref, epochs)
    shared = sorted(set(mine) & set(theirs))
    bad = [s for s in shared if not (math.isfinite(mine[s]) and math.isfinite(theirs[s]))]
    ratios = [mine[s] / theirs[s] for s in shared if s not in bad and theirs[s] > 0]
    notes = ([f"{len(bad)} diverged"] if bad else []) + ([f"n={len(ratios)} of {len(row.runs)}"]
                                                        if len(ratios) < len(row.runs) else [])
    text = "—" if not ratios else f"{_ratio(float(np.mean(ratios)))} ({_ratio(min(ratios))}–{_ratio(max(ratios))})"
    return text + (f" ({', '.join(notes)})" if notes else "")


def _ratio(x: float) -> str:
    """Two decimals, or two significant digits below 0.1 (a memorising row's 0.0043 is not "0.00")."""
    return f"{x:.2f}" if abs(x) >= 0.1 or x == 0 else f"{x:.2g}"


def _selected_cell(row: Row) -> str:
    """The range of the row's validation-selected epochs over its runs and tasks ("—" if none was selected)."""
    epochs = [int(e) for r in row.runs for e in r["selected_epoch"].values() if e is not None]
    return "—" if not epochs else rank_text((min(epochs), max(epochs)))


def _fall_cell(f: CurveFacts, epochs: int, fraction: float) -> str:
    """The fall, flagged when the peak lies in the last ``fraction`` of epochs: the curve was still rising (or
    level) at the end, and the figure is its spread inside that stretch, not a fall after a peak."""
    late = f.peak_epoch is not None and f.peak_epoch > epochs - last_epochs(epochs, fraction)
    return f"{f.fall:.2f}" + (f" (peak in the last {100 * fraction:g} %)" if late else "")


def curves_markdown(st: Setting, stl: Row, ref: Optional[Row], *, window: Optional[int] = None,
                    fraction: float = 0.2, split: str = "test") -> str:
    """The curve table of one setting: Δp against ``stl``'s mean metrics on ``split`` (``stl`` may be borrowed
    from another setting: it gets no training-loss cell then), training loss against ``ref`` (no such columns
    when ``None``).  Runs that did not train the setting's epochs are left out of every figure.  Rows are
    listed STL first, then by their Δp on ``split`` (best first)."""
    hib = st.higher_is_better
    base = stl.mean_metrics(hib, split)
    epochs = int(st.recipe["epochs"])
    rows = list(st.rows.values())
    own_stl = stl in rows
    if not own_stl:
        rows.insert(0, stl)

    pct = f"{100 * fraction:g} %"
    head = ["row", "seeds", "selected epochs"]
    if ref is not None:
        head.append(f"final training loss / {ref.label}'s (paired seeds)")
    head += [f"{split} Δp peak (epoch)", f"{split} Δp, last {pct}", "fall after the peak"]
    if ref is not None:
        head.append(f"per-seed fall − {ref.label}'s [95 % CI]")
        ref_falls = row_curve_facts(ref, base, hib, epochs=epochs, window=window, fraction=fraction,
                                    split=split).seed_falls
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    windows = set()
    for row in order_rows(rows, lambda r: runs_delta_p(r, base, hib, split)):
        cells = [row.label, str(len(row.runs)), _selected_cell(row)]
        if ref is not None:
            borrowed = row is stl and not own_stl
            cells.append("1" if row is ref else "—" if borrowed else _loss_ratio_cell(row, ref, epochs))
        f = row_curve_facts(row, base, hib, epochs=epochs, window=window, fraction=fraction, split=split)
        if f.runs:
            windows.add(f.window)
        some = "" if f.runs in (0, len(row.runs)) else f" ({f.runs} runs)"
        cells += ["—" if f.peak_epoch is None else f"{signed(f.peak)} ({f.peak_epoch}){some}",
                  "—" if not math.isfinite(f.last) else signed(f.last),
                  "—" if not (f.peak_epoch and math.isfinite(f.last)) else _fall_cell(f, epochs, fraction)]
        if ref is not None:
            iv = None if row is ref else paired_interval(f.seed_falls, ref_falls)
            short = iv is not None and iv.n < min(len(row.runs), len(ref.runs))
            cells.append("—" if iv is None else iv.text() + (f" (n={iv.n})" if short else ""))
        lines.append("| " + " | ".join(cells) + " |")
    if not windows:
        note = f"No run has a recorded {split} curve (`dbmtl-jax run --test-curve` records the test curve). "
    else:
        what = ("The peak is read on the curve, not selected (selection stays on validation)" if split == "test" else
                "The validation curve is the selection split's: STL's reference is its own selected epochs, so "
                "every row sits below it")
        note = (f"Curve: each epoch's {split} Δp against STL's mean {split} metrics at its selected epochs, averaged "
                f"over the row's seeds; peak on its {', '.join(map(str, sorted(windows)))}-epoch centred moving "
                f"average; last {pct}: the unsmoothed mean over the last {pct} of epochs against the same STL metrics "
                "(`paired --average-last` averages STL too: its Δp are shifted, differences between rows agree "
                f"closely); fall: peak − that mean, in Δp points (a peak inside the last {pct} is flagged: the curve "
                "had not fallen by the end, and the figure is its rise within that stretch). "
                f"{what}; on a noisy curve the peak can lie below "
                "the table's Δp, whose selected epochs are each run's good ones.")
    if ref is not None:
        note += (f" Training loss: the summed per-task training loss of the last epoch over {ref.label}'s on the "
                 f"same seed (mean, min–max). Per-seed fall: each run's own smoothed peak minus its last-{pct} mean, "
                 f"paired with {ref.label}'s on the same seed (a single run's peak is the maximum of a noisy curve, "
                 "so per-seed falls run larger than the seed-mean curve's; the difference of two rows is the figure).")
    return "\n".join(lines) + "\n\n" + note + "\n"


def curves_report(settings: Sequence[Setting], reference: Optional[str] = None, *, window: Optional[int] = None,
                  fraction: float = 0.2, split: str = "test") -> str:
    """One curve table per setting with an STL row (its own or borrowed, as ``dbmtl-jax paired`` does, and
    said under the title).  ``reference``: the row the training loss and falls are compared with (a row label
    or method name, see :func:`~dbmtl_jax.experiments.paired.find_row`; a name no setting has is an error, a
    setting without it says so); ``None``: EW where a setting has it.  Settings without an STL row are named
    at the end."""
    check_split(split)
    last_epochs(1, fraction)  # a bad fraction raises here
    explicit = reference is not None
    if explicit and settings and not any(find_row(list(st.rows.values()), reference) for st in settings):
        labels = sorted({r.label for st in settings for r in st.rows.values()})
        raise ValueError(f"no row {reference!r} in these results; rows: {', '.join(labels)}.")
    reference = reference or "ew"
    notes = borrow_stl(settings, split)
    out, left_out = [], []
    for st in settings:
        stl = reference_stl(settings, st)
        if stl is None:
            left_out.append(st)
            continue
        ref = find_row(list(st.rows.values()), reference)
        said = [notes[st.key]] if st.key in notes else []
        if ref is None and explicit:
            said.append(f"this setting has no {reference} row: no training-loss or per-seed fall columns")
        note = "".join(f"\n\n{n}." for n in said)
        out.append(f"### {setting_title(st)}{note}\n\n"
                   + curves_markdown(st, stl, ref, window=window, fraction=fraction, split=split))
    if out and left_out:
        out.append("Not shown, for want of an STL row: "
                   + "; ".join(f"{st.benchmark} {st.key}" for st in left_out) + ".\n")
    return "\n".join(out)
