"""Post-hoc re-selection on a smoothed validation curve (dbmtl_jax.experiments.reselect, `paired --smooth`)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dbmtl_jax.experiments import reselect as rs
from dbmtl_jax.experiments.cli import main
from dbmtl_jax.experiments.report import load_results

NO_CACHE = ["--no-progress", "--no-compile-cache"]


def _numpy_centred_mean(x, w):
    """Independent reference: explicit loop over index windows, NaNs dropped."""
    x = np.asarray(x, float)
    h = w // 2
    out = []
    for e in range(len(x)):
        vals = [x[j] for j in range(e - h, e + h + 1) if 0 <= j < len(x) and np.isfinite(x[j])]
        out.append(sum(vals) / len(vals) if vals else np.nan)
    return np.asarray(out)


@pytest.mark.parametrize("w", [1, 3, 5, 11])
def test_smooth_curve_matches_a_reference_with_truncated_ends_and_nans(w):
    rng = np.random.default_rng(w)
    x = rng.normal(size=17)
    x[[2, 9]] = np.nan
    np.testing.assert_allclose(rs.smooth_curve(x, w), _numpy_centred_mean(x, w), rtol=1e-12)
    assert rs.smooth_curve([1.0, 2.0, 3.0, 10.0], 3).tolist() == [1.5, 2.0, 5.0, 6.5]
    assert np.isnan(rs.smooth_curve([np.nan, np.nan, 1.0], 1)[0])


@pytest.mark.parametrize("w", [0, 2, -3, 1.0, True, "3"])
def test_window_must_be_an_odd_positive_int(w):
    with pytest.raises(ValueError, match="odd positive int"):
        rs.smooth_curve([1.0, 2.0], w)
    with pytest.raises(ValueError, match="odd positive int"):
        rs.reselect_all([], w, skipped=[])  # a bad window raises even when runs would be skipped


def test_smoothing_prefers_a_plateau_to_a_lone_spike_in_either_direction():
    curve = [0.0, 0.5, 0.8, 0.82, 0.81, 0.83, 0.80, 0.6, 0.9, 0.5]  # spike at epoch 9, plateau 3-7
    assert rs.smoothed_epoch(curve, 1) == 9
    assert rs.smoothed_epoch(curve, 3) in (4, 5, 6)
    assert rs.smoothed_epoch([-v for v in curve], 3, higher=False) == rs.smoothed_epoch(curve, 3)
    assert rs.smoothed_epoch([1.0, 1.0, 1.0], 1) == 1  # first of ties, as the runner keeps the first best
    with pytest.raises(ValueError, match="no finite value"):
        rs.smoothed_epoch([math.nan, math.nan], 1)


def test_a_window_longer_than_the_curve_is_refused():
    # Truncated at both ends, a window of >= 2E - 1 epochs averages the whole curve at every epoch: the curve is
    # flat and the first epoch "wins" (audit 41: --smooth 301 on 150 epochs tabulated epoch-1 models).
    curve = [0.0, 1.0, 2.0, 3.0, 9.0, 3.0, 2.0]
    assert rs.smoothed_epoch(curve, 7) == int(np.argmax(_numpy_centred_mean(curve, 7))) + 1  # as long as the curve
    for w in (9, 13):
        with pytest.raises(ValueError, match=f"window {w} is longer than the curve's 7 epochs"):
            rs.smoothed_epoch(curve, w)


def _toy_runs(tmp_path, *extra):
    out = tmp_path / "store"
    assert main(["run", "toy", "--quick", "--epochs", "6", "--methods", "stl,ew,dbmtl", "--seeds", "2",
                 "--out", str(out), *NO_CACHE, *extra]) == 0
    return out, load_results(out)


@pytest.fixture(scope="module")
def curve_runs(tmp_path_factory):
    """One store of toy runs with test curves, shared by the tests of this module (they only read it)."""
    return _toy_runs(tmp_path_factory.mktemp("curves"), "--test-curve")


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    return _toy_runs(tmp_path_factory.mktemp("plain"))


def test_window_one_reproduces_the_runners_selection_and_test_metrics(curve_runs):
    _, runs = curve_runs
    assert {r["method"] for r in runs} == {"stl", "ew", "dbmtl"} and len(runs) == 6
    for run in runs:
        again = rs.reselect_smoothed(run, 1)
        val = run["history"]["val"]
        for t, info in run["tasks"].items():
            m = info["select_metric"]
            e_old, e_new = run["selected_epoch"][t], again["selected_epoch"][t]
            if run["method"] == "stl":  # the recorded curve is rounded: a near-tie may move, the value may not
                assert val[e_new - 1][t][m] == val[e_old - 1][t][m]
            else:  # selection_score is kept at full precision: the same epoch
                assert e_new == e_old
            if e_new == e_old:
                for k, v in run["metrics"]["test"][t].items():
                    assert again["metrics"]["test"][t][k] == pytest.approx(v, rel=1e-3)
        assert again is not run and run["selection"] != again["selection"]  # the input record is unchanged


def test_wider_windows_pick_an_epoch_whose_smoothed_score_is_best(curve_runs):
    _, runs = curve_runs
    for run in (r for r in runs if r["method"] != "stl"):
        picked = rs.reselect_smoothed(run, 3)
        e = picked["selected_epoch"][next(iter(run["tasks"]))]
        sm = rs.smooth_curve(run["history"]["selection_score"], 3)
        assert sm[e - 1] == np.nanmax(sm)
        assert picked["metrics"]["test"] == {t: run["history"]["test"][e - 1][t] for t in run["tasks"]}


def test_runs_without_a_test_curve_are_refused_or_skipped_and_the_cli(tmp_path, capsys, plain_runs, curve_runs):
    out, runs = plain_runs
    with pytest.raises(ValueError, match="--test-curve"):
        rs.reselect_smoothed(runs[0], 3)
    skipped: list = []
    assert rs.reselect_all(runs, 3, skipped=skipped) == [] and len(skipped) == len(runs)
    # The CLI: a bad window is an error; runs without a test curve are reported, not used.
    assert main(["paired", str(out), "--smooth", "2"]) == 2
    assert "odd positive int" in capsys.readouterr().err
    assert main(["paired", str(out), "--smooth", "3"]) == 1
    assert "no run with a recorded test curve (--test-curve) to re-select" in capsys.readouterr().err
    # With test curves, the table says how selection was made and still ranks the rows.
    out2, _ = curve_runs
    assert main(["paired", str(out2), "--smooth", "3"]) == 0
    text = capsys.readouterr().out
    assert "3-epoch centred moving average" in text and "| ew |" in text.replace("**", "")
    # a window longer than the runs' 6 epochs is an error naming it, not a table of first epochs
    with pytest.raises(ValueError, match="window 7 is longer than .* 6 epochs"):
        rs.reselect_all(load_results(out2), 7, skipped=[])
    assert main(["paired", str(out2), "--smooth", "7"]) == 2
    assert "window 7 is longer than" in capsys.readouterr().err
    # The report draws the per-epoch curves, with the test Δp panel when test curves were recorded.
    from dbmtl_jax.experiments.report import _epoch_plot, load_results as lr, summarize

    (st,) = summarize(lr(out2))
    path = _epoch_plot(st, list(st.rows.values()), tmp_path)
    assert path is not None and path.stat().st_size > 1000
    # a run that diverged (NaN metrics from some epoch on) is drawn, not a crash of the whole report
    mtl = next(r for r in st.rows.values() if r.method != "stl")
    run = mtl.runs[0]
    nan_epoch = {t: {m: float("nan") for m in ms} for t, ms in run["history"]["val"][-1].items()}
    run["history"] = {**run["history"], "val": run["history"]["val"][:-2] + [nan_epoch] * 2,
                      "test": run["history"]["test"][:-2] + [nan_epoch] * 2}
    path = _epoch_plot(st, list(st.rows.values()), tmp_path)
    assert path is not None and path.stat().st_size > 1000


def test_average_last_is_the_mean_of_the_last_epochs_of_each_curve(capsys, curve_runs, plain_runs):
    out, runs = curve_runs
    for run in runs:
        avg = rs.average_last(run, 0.5)  # 6 epochs: the last 3
        for split in ("val", "test"):
            curve = run["history"][split]
            for t in run["tasks"]:
                for m in curve[0][t]:
                    want = sum(float(curve[e][t][m]) for e in (3, 4, 5)) / 3
                    assert avg["metrics"][split][t][m] == pytest.approx(want, rel=1e-12)
        assert set(avg["selected_epoch"].values()) == {None} and "last 3 of 6 epochs" in avg["selection"]
        assert run["selected_epoch"] != avg["selected_epoch"]  # the input record is unchanged
        last = rs.average_last(run, 1e-3)  # at least one epoch: the final one
        assert last["metrics"]["test"] == {t: {m: float(v) for m, v in run["history"]["test"][-1][t].items()}
                                           for t in run["tasks"]}
    broken = dict(runs[1], history=dict(runs[1]["history"]))
    task = next(iter(broken["tasks"]))
    broken["history"]["test"] = [dict(e) for e in broken["history"]["test"]]
    broken["history"]["test"][-1] = {**broken["history"]["test"][-1],
                                     task: {m: None for m in broken["history"]["test"][-1][task]}}  # NaN, stored
    assert all(math.isnan(v) for v in rs.average_last(broken, 0.5)["metrics"]["test"][task].values())
    for bad in (0, 1.5, -0.2, True, "0.2"):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            rs.average_all([], bad, skipped=[])
    # The CLI: a table without selection says so instead of a late-selection count.
    assert main(["paired", str(out), "--average-last", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "No model selection" in text and "no epoch selected" in text and "selected epoch in the last" not in text
    assert main(["paired", str(out), "--average-last", "0.5", "--smooth", "3"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert main(["paired", str(out), "--average-last", "2"]) == 2
    _, plain = plain_runs
    with pytest.raises(ValueError, match="no per-epoch test curve to average"):
        rs.average_last(plain[0], 0.2)


def test_average_epochs_is_the_mean_over_a_stretch_and_refuses_bad_ranges(capsys, curve_runs):
    out, runs = curve_runs
    for run in runs:
        avg = rs.average_epochs(run, 2, 4)  # epochs 2, 3, 4 (1-based): indices 1..3
        for split in ("val", "test"):
            curve = run["history"][split]
            for t in run["tasks"]:
                for m in curve[0][t]:
                    want = np.mean([float(curve[i][t][m]) for i in (1, 2, 3)])
                    assert avg["metrics"][split][t][m] == pytest.approx(want, rel=1e-12)
        assert set(avg["selected_epoch"].values()) == {None} and "epochs 2-4 of 6" in avg["selection"]
        assert rs.average_epochs(run, 4, 6)["metrics"] == rs.average_last(run, 0.5)["metrics"]  # the last 3 of 6
        one = rs.average_epochs(run, 5, 5)["metrics"]["test"]
        assert one == {t: {m: float(v) for m, v in run["history"]["test"][4][t].items()} for t in run["tasks"]}
    for first, last, match in ((0, 3, "1 <= first"), (4, 3, "1 <= first"), (1.0, 3, "ints"), (True, 3, "ints")):
        with pytest.raises(ValueError, match=match):
            rs.average_epochs_all(runs, first, last, skipped=[])
    with pytest.raises(ValueError, match="reach past its 6 recorded epochs"):  # raised, not skipped: a typo
        rs.average_epochs_all(runs, 2, 7, skipped=[])
    # The CLI: the range is parsed, checked, and exclusive with the other two.
    assert main(["paired", str(out), "--average-epochs", "2-4"]) == 0
    text = capsys.readouterr().out
    assert "over epochs 2-4" in text and "no epoch selected" in text
    assert main(["paired", str(out), "--average-epochs", "2-7"]) == 2  # past the runs' curves
    assert "reach past its 6 recorded epochs" in capsys.readouterr().err
    for bad in ("4-2", "0-3", "2", "a-b", "2-4-6"):  # refused by the parser
        with pytest.raises(SystemExit):
            main(["paired", str(out), "--average-epochs", bad])
        assert "--average-epochs" in capsys.readouterr().err
    assert main(["paired", str(out), "--average-epochs", "2-4", "--average-last", "0.5"]) == 2
    assert "give one of them" in capsys.readouterr().err


def _curve_run(method, scores, accs):
    """A minimal record with per-epoch validation / test curves of one task "a" (accuracy; None: NaN, as stored)."""
    val = [{"a": {"acc": v}} for v in accs]
    return {"method": method, "seed": 0, "tasks": {"a": {"metrics": {"acc": True}, "select_metric": "acc"}},
            "selected_epoch": {"a": 1}, "metrics": {"val": val[0], "test": val[0]},
            "history": {"val": val, "test": [{"a": {"acc": None if v is None else v - 0.01}} for v in accs],
                        "selection_score": scores}}


def test_smoothing_never_selects_a_diverged_epoch_for_its_neighbours_scores():
    """A run that rose to epoch 3 and then diverged (NaN from epoch 4): the truncated mean at epoch 4 is epoch 3's
    score alone, the best smoothed value, but epoch 4 has no metrics; epoch 3 is the best one that has."""
    curve = [0.1, 0.5, 0.9, math.nan, math.nan, math.nan]
    assert rs.smoothed_epoch(curve, 3) == 3 and rs.smoothed_epoch([-v for v in curve], 3, higher=False) == 3
    assert rs.smoothed_epoch([0.1, 0.5, 0.9, 1.0, math.nan, 0.2], 3) == 4  # finite neighbours still smooth
    assert rs.smoothed_epoch([math.nan, 1.0, math.nan], 3) == 2  # epochs 1 and 3 also smooth to 1.0
    accs = [0.5, 0.6, 0.7, None, None, None]
    for run in (_curve_run("ew", [0.0, 0.2, 0.4, None, None, None], accs), _curve_run("stl", [None] * 6, accs)):
        again = rs.reselect_smoothed(run, 3)
        assert again["selected_epoch"] == {"a": 3}
        assert again["metrics"]["test"] == {"a": {"acc": pytest.approx(0.69)}}


def test_a_test_metric_missing_at_the_reselected_epoch_is_nan_not_a_crash():
    # Validation finite everywhere, the test metric not recorded (None, a NaN as stored) at the epoch the smoothed
    # curve picks: NaN there, so the table leaves the run out, as --average-last does (audit 41: a TypeError).
    run = _curve_run("ew", [0.1, 0.5, 0.9, 0.2], [0.5, 0.6, 0.7, 0.4])
    run["history"]["test"][2] = {"a": {"acc": None}}
    again = rs.reselect_smoothed(run, 1)
    assert again["selected_epoch"] == {"a": 3} and math.isnan(again["metrics"]["test"]["a"]["acc"])
    assert again["metrics"]["val"] == {"a": {"acc": 0.7}}
