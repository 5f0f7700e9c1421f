"""The curves page (dbmtl_jax.experiments.curves, `dbmtl-jax curves`): final training loss against a reference
row and the test curve's peak and fall, checked against an independent NumPy computation."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest

from dbmtl_jax.experiments import curves as cv
from dbmtl_jax.experiments.cli import main
from dbmtl_jax.experiments.report import summarize

E = 40  # epochs of the toy runs: default window 2 * (40 // 30) + 1 = 3


def _record(method, seed, test_curve, final_loss, selected=10, hp=None):
    """A two-task run whose test accuracy per epoch is ``test_curve`` (a, b pairs) and whose summed training
    loss falls linearly from 4 to ``final_loss``."""
    hp = hp or {}
    losses = np.linspace(4.0, final_loss, len(test_curve) if test_curve is not None else E)
    last = test_curve[selected - 1] if test_curve is not None else (0.8, 0.8)
    rec = {
        "method": method, "seed": seed, "config_hash": f"{method}{sorted(hp.items())}",
        "config": {"benchmark": "b", "recipe": {"epochs": E}, "quick": False, "hparams": hp},
        "tasks": {"a": {"metrics": {"acc": True}}, "b": {"metrics": {"acc": True}}},
        "metrics": {split: {"a": {"acc": last[0]}, "b": {"acc": last[1]}} for split in ("val", "test")},
        "selected_epoch": {"a": selected, "b": selected},
        "history": {"train_loss": [[l / 2, l / 2] for l in losses]},
        "wall_time_s": 60.0,
    }
    if test_curve is not None:
        rec["history"]["test"] = [{"a": {"acc": a}, "b": {"acc": b}} for a, b in test_curve]
    return rec


def _rise_then_fall(peak_epoch, height, drop, seed):
    """Accuracy rising linearly to ``height`` at ``peak_epoch``, then falling linearly by ``drop`` at the end;
    the seed changes the peak epoch and the drop (so that seeds differ in their falls, not only by an offset)."""
    e = np.arange(1, E + 1)
    peak_epoch = peak_epoch + 2 * seed
    drop = drop * (1 + seed * seed / 4)
    up = 0.5 + (height - 0.5) * np.minimum(e, peak_epoch) / peak_epoch
    down = drop * np.clip((e - peak_epoch) / (E - peak_epoch), 0, 1)
    acc = up - down + 0.001 * seed
    return list(zip(acc, acc - 0.01))


def _reference_facts(curves, stl_base, w, k):
    """Independent NumPy: Δp per epoch (mean over tasks of (acc − base) / base, ×100), seed mean, centred mean over
    w with truncated ends, arg-max; unsmoothed mean of the last k epochs."""
    dp = np.array([[100 * np.mean([(a - stl_base[0]) / stl_base[0], (b - stl_base[1]) / stl_base[1]])
                    for a, b in c] for c in curves]).mean(0)
    h = w // 2
    sm = np.array([dp[max(0, i - h): i + h + 1].mean() for i in range(len(dp))])
    i = int(np.argmax(sm))
    return sm[i], i + 1, dp[-k:].mean()


def _toy(seeds=(0, 1, 2)):
    recs = []
    for s in seeds:
        flat = [(0.80, 0.80)] * E
        recs.append(_record("stl", s, flat, 0.5))
        recs.append(_record("ew", s, _rise_then_fall(30, 0.78, 0.01, s), 2.0 + s))
        recs.append(_record("dbmtl", s, _rise_then_fall(15, 0.80, 0.04, s), 1.0 + 0.5 * s, selected=15))
    return recs


def test_default_window_is_about_a_fifteenth_and_odd():
    assert [cv.default_window(e) for e in (1, 29, 30, 40, 150, 320)] == [1, 1, 3, 3, 11, 21]


def test_peak_fall_and_loss_ratio_match_numpy():
    recs = _toy()
    (st,) = summarize(recs)
    stl = st.stl
    base = stl.mean_metrics(st.higher_is_better, "test")
    rows = {r.method: r for r in st.rows.values()}
    k = math.ceil(0.2 * E)
    for method in ("ew", "dbmtl"):
        curves = [[(h["a"]["acc"], h["b"]["acc"]) for h in r["history"]["test"]] for r in rows[method].runs]
        peak, epoch, last = _reference_facts(curves, (0.80, 0.80), 3, k)
        f = cv.row_curve_facts(rows[method], base, st.higher_is_better, epochs=E)
        assert f.runs == 3 and f.window == 3 and f.peak_epoch == epoch
        assert f.peak == pytest.approx(peak, abs=1e-9) and f.last == pytest.approx(last, abs=1e-9)
        assert f.fall == pytest.approx(peak - last, abs=1e-9)
        for r, c in zip(rows[method].runs, curves):  # each seed's own fall, paired by seed
            p1, _, l1 = _reference_facts([c], (0.80, 0.80), 3, k)
            assert f.seed_falls[r["seed"]] == pytest.approx(p1 - l1, abs=1e-9)
    # the falling row: a fall of 5 points and more (100 · 0.04 · (1 + s²/4) / 0.8); EW falls a quarter as much
    f_db = cv.row_curve_facts(rows["dbmtl"], base, st.higher_is_better, epochs=E)
    f_ew = cv.row_curve_facts(rows["ew"], base, st.higher_is_better, epochs=E)
    assert 15 <= f_db.peak_epoch <= 19 and f_db.fall > 4.0 and f_ew.fall < 2.0  # seeds peak at 15, 17, 19
    # a wider window: still the reference's answer
    peak, epoch, last = _reference_facts(
        [[(h["a"]["acc"], h["b"]["acc"]) for h in r["history"]["test"]] for r in rows["dbmtl"].runs], (0.8, 0.8), 9, k)
    f9 = cv.row_curve_facts(rows["dbmtl"], base, st.higher_is_better, epochs=E, window=9)
    assert (f9.peak_epoch, f9.window) == (epoch, 9) and f9.peak == pytest.approx(peak, abs=1e-9)
    md = cv.curves_markdown(st, stl, rows["ew"])
    # final loss over EW's on the same seed: (1 + 0.5 s) / (2 + s) = 0.5 on every seed
    assert "| dbmtl | 3 | 15 | 0.50 (0.50–0.50) |" in md and "| ew | 3 | 10 | 1 |" in md
    assert [cv._ratio(x) for x in (0.5, 0.123, 0.0043, 0.0)] == ["0.50", "0.12", "0.0043", "0.00"]
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert [ln.split(" | ")[0] for ln in lines] == ["| row", "| stl", "| dbmtl", "| ew"]  # STL, then by Δp
    assert f"| {f_db.fall:.2f} |" in md and "3-epoch centred moving average" in md
    d = np.array([f_db.seed_falls[s] - f_ew.seed_falls[s] for s in range(3)])
    assert d.std() > 0.1  # the seeds differ: pairing by position or the wrong t-quantile would show
    half = 4.30265 * d.std(ddof=1) / np.sqrt(3)  # t_{0.975, 2}
    assert f"| {d.mean():+.2f} [{d.mean() - half:+.2f}, {d.mean() + half:+.2f}] |" in md


def test_loss_ratio_pairs_seeds_and_rows_without_curves_show_dashes():
    recs = _toy(seeds=(0, 1, 2))
    recs = [r for r in recs if not (r["method"] == "dbmtl" and r["seed"] == 0)]
    recs.append(_record("pcgrad", 0, None, 6.0))  # no test curve
    recs.append(_record("pcgrad", 5, None, 1.0))  # a seed EW did not run: not in the ratio
    (st,) = summarize(recs)
    rows = {r.method: r for r in st.rows.values()}
    md = cv.curves_markdown(st, st.stl, rows["ew"])
    assert "| dbmtl | 2 | 15 | 0.50 (0.50–0.50) |" in md
    assert "| pcgrad | 2 | 10 | 3.00 (3.00–3.00) (n=1 of 2) | — | — | — |" in md  # seed 0 only: 6 / 2, and said
    # a diverged final loss is counted, not dropped silently
    recs[-2]["history"]["train_loss"][-1] = [None, 1.0]
    (st,) = summarize(recs)
    md = cv.curves_markdown(st, st.stl, {r.method: r for r in st.rows.values()}["ew"])
    assert "| pcgrad | 2 | 10 | — (1 diverged, n=0 of 2) |" in md
    # without a reference row there is no training-loss column
    no_ref = cv.curves_markdown(st, st.stl, None)
    assert "training loss" not in no_ref and "| pcgrad | 2 | 10 | — | — | — |" in no_ref


def test_a_diverged_epoch_and_a_run_of_another_length():
    recs = _toy()
    bad = next(r for r in recs if r["method"] == "dbmtl" and r["seed"] == 1)
    bad["history"]["test"][20]["a"]["acc"] = None  # a missing metric at epoch 21: NaN, skipped by the smoothing
    (st,) = summarize(recs)
    rows = {r.method: r for r in st.rows.values()}
    base = st.stl.mean_metrics(st.higher_is_better, "test")
    f = cv.row_curve_facts(rows["dbmtl"], base, st.higher_is_better, epochs=E)
    assert f.peak_epoch is not None and math.isfinite(f.peak) and math.isfinite(f.last)
    curve = cv.epoch_delta_p(bad, base, st.higher_is_better)
    assert np.isnan(curve[20]) and np.isfinite(curve[19])
    short = next(r for r in recs if r["method"] == "ew" and r["seed"] == 2)
    short["history"]["test"] = short["history"]["test"][:20]  # another budget's curve: left out, and said
    (st,) = summarize(recs)
    md = cv.curves_markdown(st, st.stl, None)
    assert "(2 runs)" in md
    with pytest.raises(ValueError, match="window 41 is longer"):
        cv.row_curve_facts(st.rows[next(iter(st.rows))], base, st.higher_is_better, epochs=E, window=41)
    # a run of another length is left out of the loss ratio too (the setting's epochs decide, for every column)
    short["history"]["train_loss"] = short["history"]["train_loss"][:20]
    (st,) = summarize(recs)
    rows = {r.method: r for r in st.rows.values()}
    assert set(cv.final_losses(rows["ew"], E)) == {0, 1}
    assert "| dbmtl | 3 | 15 | 0.50 (0.50–0.50) (n=2 of 3) |" in cv.curves_markdown(st, st.stl, rows["ew"])


def test_the_peak_is_never_a_diverged_epoch():
    curve = np.array([0.0, 1.0, 2.0, np.nan, 2.5, 0.0, 0.0])  # smoothed: epoch 4 (NaN) would lead with 2.25
    peak, epoch, last = cv._peak_and_last(curve, 3, 2)
    assert epoch == 3 and peak == pytest.approx(1.5) and last == 0.0
    assert cv._peak_and_last(np.array([np.nan, np.nan]), 1, 1)[1] is None


def test_a_borrowed_stl_is_said_and_gets_no_loss_ratio():
    recs = _toy()
    other = [dict(r, config=dict(r["config"], recipe={"epochs": E, "learning_rate": 0.1}), config_hash=r["config_hash"] + "lr")
             for r in recs if r["method"] != "stl"]
    text = cv.curves_report(summarize(recs + other))
    tables = text.split("### ")[1:]
    assert len(tables) == 2
    borrowed = next(t for t in tables if "Δp against the STL row trained with" in t)
    assert "| stl | 3 | 10 | — |" in borrowed and "| ew | 3 | 10 | 1 |" in borrowed
    rows = [ln.split(" | ")[0] for ln in borrowed.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert rows == ["| row", "| stl", "| dbmtl", "| ew"]  # ordered by Δp against the borrowed STL, not by label
    # a --ref row that one setting lacks: said under that setting's title
    no_db = cv.curves_report(summarize(recs + [r for r in other if r["method"] != "dbmtl"]), "dbmtl")
    assert "this setting has no dbmtl row" in no_db


def test_report_and_cli(tmp_path, capsys):
    recs = _toy()
    text = cv.curves_report(summarize(recs))
    assert text.startswith("### b (") and "final training loss / ew's" in text
    assert "final training loss" not in cv.curves_report(summarize([r for r in recs if r["method"] != "ew"]))
    with pytest.raises(ValueError, match="no row 'nope'"):
        cv.curves_report(summarize(recs), "nope")
    with pytest.raises(ValueError, match="split must be"):
        cv.curves_report(summarize(recs), split="train")
    for i, r in enumerate(recs):
        r.update(format="dbmtl_jax.experiment/2", status="done", benchmark="b")
        with gzip.open(tmp_path / f"b__{r['method']}__seed{r['seed']}__{i:010d}.json.gz", "wt") as f:
            json.dump(r, f)
    out = tmp_path / "curves.md"
    assert main(["curves", str(tmp_path), "--out", str(out)]) == 0
    assert out.read_text() == text
    assert main(["curves", str(tmp_path), "--ref", "dbmtl", "--smooth", "5"]) == 0
    printed = capsys.readouterr().out
    assert "final training loss / dbmtl's" in printed and "5-epoch" in printed
    assert main(["curves", str(tmp_path), "--ref", "nope"]) == 2
    assert main(["curves", str(tmp_path), "--smooth", "4"]) == 2
    assert main(["curves", str(tmp_path / "missing")]) == 2
    assert "odd positive int" in capsys.readouterr().err
    # validation curves: none recorded here, so every curve cell is a dash
    assert main(["curves", str(tmp_path), "--split", "val"]) == 0
    printed = capsys.readouterr().out
    assert "| ew | 3 | 10 | 1 | — | — | — |" in printed and "No run has a recorded val curve" in printed


def test_a_peak_inside_the_last_fifth_is_flagged_not_read_as_a_fall():
    recs = _toy()
    for s in range(3):  # still rising at the end: its "fall" is the rise within the last fifth
        recs.append(_record("rlw", s, _rise_then_fall(E + 5, 0.79, 0.0, s), 2.0))
    (st,) = summarize(recs)
    rows = {r.method: r for r in st.rows.values()}
    md = cv.curves_markdown(st, st.stl, rows["ew"])
    cells = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in md.splitlines() if ln.startswith("| ")}
    base = st.stl.mean_metrics(st.higher_is_better, "test")
    f_rise = cv.row_curve_facts(rows["rlw"], base, st.higher_is_better, epochs=E)
    assert f_rise.peak_epoch > E - math.ceil(0.2 * E) and f_rise.fall > 0.5  # a rise, not a fall
    assert cells["rlw"][6] == f"{f_rise.fall:.2f} (peak in the last 20 %)"
    f_db = cv.row_curve_facts(rows["dbmtl"], base, st.higher_is_better, epochs=E)
    assert cells["dbmtl"][6] == f"{f_db.fall:.2f}"  # a mid-run peak: a fall, unflagged
    assert "a peak inside the last 20 % is flagged" in md
