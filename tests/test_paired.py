"""Paired per-seed statistics and convergence figures of dbmtl_jax.experiments.paired."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dbmtl_jax.experiments import paired as pr
from dbmtl_jax.experiments.report import summarize


def test_t_quantiles_match_known_values_and_approach_the_normal():
    # published values to 5 decimals (a 3-decimal table moved printed bounds by 0.01)
    for df, want in ((1, 12.70620), (2, 4.30265), (4, 2.77645), (9, 2.26216), (30, 2.04227)):
        assert pr.t_quantile_975(df) == pytest.approx(want, abs=1e-5)
    # beyond the table: published values to 4 decimals (df 31, 40, 60, 120)
    for df, want in ((31, 2.0395), (40, 2.0211), (60, 2.0003), (120, 1.9799)):
        assert pr.t_quantile_975(df) == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError):
        pr.t_quantile_975(0)


def test_paired_interval_uses_only_common_finite_seeds_and_the_t_interval():
    a = {0: 1.0, 1: 2.0, 2: 4.0, 3: 7.0, 9: 5.0}
    b = {0: 0.5, 1: 1.0, 2: 3.0, 3: float("nan"), 4: 1.0}
    iv = pr.paired_interval(a, b)
    d = np.array([0.5, 1.0, 1.0])
    half = 4.30265 * d.std(ddof=1) / math.sqrt(3)
    assert iv.n == 3 and iv.mean == pytest.approx(d.mean())
    assert iv.low == pytest.approx(d.mean() - half) and iv.high == pytest.approx(d.mean() + half)
    assert iv.separated  # all differences positive and tight
    assert pr.paired_interval({0: 1.0}, {1: 1.0}) is None
    one = pr.paired_interval({0: 2.0}, {0: 1.0})
    assert one.n == 1 and not one.separated


def test_pairing_separates_what_unpaired_means_cannot():
    """A constant per-seed advantage of 0.1 under seed noise of ±5 is separated by the paired interval."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 5, size=5)
    a = {s: float(noise[s] + 0.1) for s in range(5)}
    b = {s: float(noise[s]) for s in range(5)}
    assert abs(np.mean(list(a.values())) - np.mean(list(b.values()))) < np.std(noise)  # unpaired: overlap
    c = {s: float(noise[s] + 0.1 + 0.01 * (-1) ** s) for s in range(5)}
    assert pr.paired_interval(c, b).text().startswith("+0.10") and pr.paired_interval(c, b).separated
    assert pr.rank_ranges({"c": c, "b": b}) == {"c": (1, 1), "b": (2, 2)}
    # Swapping which seeds got the advantage's noise makes it indistinguishable from 0.
    e = {s: float(noise[s] + 0.1 * (-1) ** s) for s in range(5)}
    assert not pr.paired_interval(e, b).separated and pr.rank_ranges({"e": e, "b": b}) == {"e": (1, 2), "b": (1, 2)}


def test_a_row_ahead_on_the_shared_seeds_ranks_above_a_row_with_a_higher_mean():
    # A leads by its mean over three seeds (one lucky seed); B diverged on seed 2 and is ahead of A on seeds 0
    # and 1 with an interval above 0: it must not be ranked below A as if it were worse.
    a = {0: 1.0, 1: 1.0, 2: 10.0}
    b = {0: 2.0, 1: 2.1, 2: float("nan")}
    assert pr.paired_interval(b, a).low > 0
    # separated on the seeds both have: b ranks first although a's mean over its own seeds is higher
    assert pr.rank_ranges({"a": a, "b": b}) == {"a": (2, 2), "b": (1, 1)}
    # a row clearly worse than another on the same seeds ranks below it
    c = {0: 0.0, 1: 0.05, 2: 0.1}
    d = {0: -1.0, 1: -0.9, 2: -1.05}
    assert pr.rank_ranges({"c": c, "d": d}) == {"c": (1, 1), "d": (2, 2)}


def test_rank_ranges_order_and_are_invariant_to_a_common_seed_shift():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, size=6)
    scores = {
        "best": {s: base[s] + 3 + 0.2 * rng.normal() for s in range(6)},
        "tied": {s: base[s] + 2.9 + 0.2 * rng.normal() for s in range(6)},
        "worse": {s: base[s] + 0.0 + 0.2 * rng.normal() for s in range(6)},
        "empty": {0: float("nan")},
    }
    g = pr.rank_ranges(scores)
    assert g["best"][0] == 1 and g["worse"] == (3, 3) and "empty" not in g
    shifted = {k: {s: v + 10 * s for s, v in d.items()} for k, d in scores.items()}
    assert pr.rank_ranges(shifted) == g


def _record(method, seed, hp, test_acc, selected, losses, epochs=10, wall=60.0):
    return {
        "method": method, "seed": seed, "config_hash": f"{method}{sorted(hp.items())}",
        "config": {"benchmark": "b", "recipe": {"epochs": epochs}, "quick": False, "hparams": hp},
        "tasks": {"a": {"metrics": {"acc": True}}, "b": {"metrics": {"acc": True}}},
        "metrics": {"test": {"a": {"acc": test_acc[0]}, "b": {"acc": test_acc[1]}},
                    "val": {"a": {"acc": test_acc[0]}, "b": {"acc": test_acc[1]}}},
        "selected_epoch": {"a": selected, "b": selected},
        "history": {"train_loss": [[l, l] for l in losses]},
        "wall_time_s": wall,
    }


def _stl_at_rate(seed, lr, losses):
    """An STL record at accuracy 0.80 on both tasks, trained at learning rate ``lr``."""
    stl = _record("stl", seed, {}, (0.80, 0.80), 10, losses)
    stl["config"]["recipe"]["learning_rate"] = lr
    return stl


def test_convergence_figures_and_table():
    falling = list(np.linspace(2.0, 1.0, 10))  # last fifth: 1.2222 → 1.0
    flat = [2.0] * 5 + [1.0] * 5
    recs = []
    for s in range(3):
        recs.append(_record("stl", s, {}, (0.80, 0.80), 10, flat))
        recs.append(_record("ew", s, {}, (0.80 + 0.01 * s, 0.80), 9, falling))
        recs.append(_record("dbmtl", s, {}, (0.82 + 0.01 * s, 0.80), 3, flat))
    assert pr.selected_late(recs[1]) and not pr.selected_late(recs[2])
    assert pr.loss_change_last_fifth(recs[1]) == pytest.approx((falling[7] - falling[9]) / falling[7])
    assert pr.loss_change_last_fifth(recs[2]) == 0.0
    assert pr.loss_share_last_fifth(recs[1]) == pytest.approx((falling[7] - falling[9]) / (falling[0] - falling[9]))
    assert pr.loss_share_last_fifth(recs[2]) == 0.0
    geometric = [2.0 * 0.5 ** e for e in range(10)]  # halves every epoch: relative change large, share tiny
    rec = _record("ew", 0, {}, (0.8, 0.8), 5, geometric)
    assert pr.loss_change_last_fifth(rec) == pytest.approx(0.75)
    assert pr.loss_share_last_fifth(rec) == pytest.approx((geometric[7] - geometric[9]) / (2.0 - geometric[9]))
    assert pr.loss_share_last_fifth(rec) < 0.02
    assert math.isnan(pr.loss_share_last_fifth(_record("ew", 0, {}, (0.8, 0.8), 5, [1.0, 1.5, 2.0])))
    (st,) = summarize(recs)
    rows = list(st.rows.values())
    ew = next(r for r in rows if r.method == "ew")
    db = next(r for r in rows if r.method == "dbmtl")
    md = pr.paired_table_markdown(st, rows, {"EW": ew}, loss_rows=[ew])
    assert "3 of 6 multi-task runs (worst row 100%)" in md
    # per row: STL (epoch 10) and EW (epoch 9) late in every seed, DB-MTL (epoch 3) in none
    assert " | 3 of 3 (6 of 6 task networks) |" in md  # STL: every task's network selected late
    assert md.count(" | 3 of 3 |") == 1 and md.count(" | 0 of 3 |") == 1
    assert "(share of the run's whole decrease: 22.2 %, 22.2 %, 22.2 %)" in md
    assert "**dbmtl**" in md and "| ew | 3 |" in md  # DB-MTL +1.25 points on every seed: ranked alone above EW
    # listed STL first, then by mean Δp, whatever order the rows came in
    for order in (rows, rows[::-1]):
        table = pr.paired_table_markdown(st, order, {"EW": ew}, loss_rows=[ew])
        assert [ln.split(" | ")[0] for ln in table.splitlines()[2:5]] == ["| stl", "| **dbmtl**", "| ew"]
    iv = pr.paired_interval(dict(zip(db.seeds, db.delta_p)), dict(zip(ew.seeds, ew.delta_p)))
    assert iv.mean == pytest.approx(1.25, abs=1e-9) and iv.separated
    # the core count is said only when every CPU run recorded it (audit 39 #21: unpinned runs were "one core each")
    assert "Wall time of the runs in this table: 9 min (CPU)." in md
    (st1,) = summarize([dict(r, cpu_cores=1) for r in recs])
    md1 = pr.paired_table_markdown(st1, list(st1.rows.values()), {"EW": ew}, loss_rows=[ew])
    assert "Wall time of the runs in this table: 9 min (one CPU core each)." in md1
    (st2,) = summarize([dict(r, cpu_cores=1 if i else 2) for i, r in enumerate(recs)])
    assert "9 min (CPU)." in pr.paired_table_markdown(st2, list(st2.rows.values()), {}, loss_rows=[])
    stl_only = pr.paired_table_markdown(st, [r for r in rows if r.method == "stl"], {})
    assert "multi-task runs" not in stl_only and "nan" not in stl_only and "\n\nWall time" in stl_only
    # a row of one seed has no spread: said, not printed as "± nan"
    (st_one,) = summarize(recs + [_record("rlw", 0, {}, (0.81, 0.80), 4, flat)])
    one = pr.paired_table_markdown(st_one, list(st_one.rows.values()), {"EW": ew}, loss_rows=[ew])
    assert "| rlw | 1 | +0.62 (one seed) |" in one.replace("**", "") and "nan" not in one
    # runs trained on an accelerator are not counted as CPU-core time: the line says which device took how long
    gpu = [dict(r, device="gpu:NVIDIA H200", wall_time_s=120.0) for r in recs]
    (st_gpu,) = summarize(gpu[:3] + recs[3:])
    md_gpu = pr.paired_table_markdown(st_gpu, list(st_gpu.rows.values()), {}, loss_rows=[])
    assert ("Wall time of the runs in this table: 6 min for 6 runs on CPU; "
            "6 min for 3 runs on NVIDIA H200.") in md_gpu
    # STL's tasks are separate networks: a run is late if any one is, and the count of late networks says how many
    recs[0]["selected_epoch"] = {"a": 10, "b": 2}
    assert pr.late_task_selections(recs[0]) == 1 and pr.selected_late(recs[0])
    (st,) = summarize(recs)
    md = pr.paired_table_markdown(st, list(st.rows.values()), {})
    assert " | 3 of 3 (5 of 6 task networks) |" in md


def test_paired_report_borrows_stl_for_another_optimizer_and_the_cli(tmp_path, capsys):
    import gzip
    import json

    from dbmtl_jax.experiments import analysis as an
    from dbmtl_jax.experiments.cli import main

    flat = [2.0] * 5 + [1.0] * 5
    recs = []
    for s in range(3):
        recs.append(_record("stl", s, {}, (0.80, 0.80), 10, flat))
        recs.append(_record("ew", s, {}, (0.80 + 0.01 * s, 0.80), 9, flat))
        other = _record("ew", s, {}, (0.70, 0.80), 4, flat)
        other["config"]["optimizer"] = {"name": "adam", "b1": 0.0}
        other["config_hash"] = "ew-b1-0"
        recs.append(other)
    settings = summarize(recs)
    text = pr.paired_report(settings, ("ew",))
    assert "Adam (b1 = 0.9)" in text and "Adam (b1 = 0.0)" in text
    assert "Δp against the STL row trained with Adam (b1 = 0.9)" in text
    borrowed = [st for st in settings if st.optimizer][0]
    (row,) = borrowed.rows.values()
    assert row.delta_p == pytest.approx([-6.25] * 3)  # (0.70 − 0.80)/0.80 on one of two tasks, ×100, /2
    # The CLI on records written to disk in the runner's compact format.
    for i, r in enumerate(recs):
        r.update(format="dbmtl_jax.experiment/2", status="done", benchmark="b", seed=r["seed"])
        with gzip.open(tmp_path / f"b__{r['method']}__seed{r['seed']}__{i:010d}.json.gz", "wt") as f:
            json.dump(r, f)
    out = tmp_path / "paired.md"
    rc = main(["paired", str(tmp_path), "--ref", "ew", "--out", str(out)])
    assert rc == 0 and "| **ew** | 3 |" in out.read_text() and "b1 = 0.0" in out.read_text()
    assert main(["paired", str(tmp_path / "missing")]) == 2
    # Against EW instead of STL: EW's own mean is 0, the b1 = 0 rows lose 0.70 vs EW's mean left accuracy.
    text = pr.paired_report(summarize(recs), ("ew",), baseline="ew")
    assert "Δp is measured against ew" in text and "| **ew** | 3 | +0.00 ± 0.62 |" in text
    del an


def test_references_by_row_label_and_unknown_names_are_errors(tmp_path, capsys):
    from dbmtl_jax.experiments.cli import main

    flat = [2.0] * 5 + [1.0] * 5
    recs = []
    for s in range(3):
        recs.append(_record("stl", s, {}, (0.80, 0.80), 10, flat))
        recs.append(_record("ew", s, {}, (0.80, 0.80), 9, flat))
        recs.append(_record("dbmtl", s, {"beta_sigma": 0.0}, (0.82 + 0.01 * s, 0.80), 3, flat))
    settings = summarize(recs)
    (row,) = [r for r in settings[0].rows.values() if r.method == "dbmtl"]
    assert pr.find_row(list(settings[0].rows.values()), row.label) is row
    assert pr.find_row(list(settings[0].rows.values()), "dbmtl") is None  # no default-hyperparameter row
    text = pr.paired_report(settings, (row.label,))
    assert f"Δp − {row.label} [95 % CI]" in text
    assert "| ew | 3 | +0.00 ± 0.00 | -1.87 [-3.43, -0.32] |" in text  # EW − DB-MTL: −1.25, −1.875, −2.5
    for refs, base in (((row.label, "pcgrad"), "stl"), (None, "nope")):
        with pytest.raises(ValueError, match="no row '(pcgrad|nope)'.*rows: dbmtl"):
            pr.paired_report(settings, refs, base)
    assert "Δp − dbmtl" not in pr.paired_report(settings)  # the default references are optional
    import gzip
    import json

    for i, r in enumerate(recs):
        r.update(format="dbmtl_jax.experiment/2", status="done", benchmark="b", seed=r["seed"])
        with gzip.open(tmp_path / f"b__{r['method']}__seed{r['seed']}__{i:010d}.json.gz", "wt") as f:
            json.dump(r, f)
    assert main(["paired", str(tmp_path), "--ref", "dbmtl"]) == 2
    assert "no row 'dbmtl'" in capsys.readouterr().err


def test_non_finite_runs_and_short_pairings_are_visible():
    flat = [2.0] * 5 + [1.0] * 5
    recs = []
    for s in range(3):
        recs.append(_record("stl", s, {}, (0.80, 0.80), 10, flat))
        recs.append(_record("ew", s, {}, (0.80 + 0.01 * s, 0.80), 3, flat))
        recs.append(_record("dbmtl", s, {}, (0.84 + 0.01 * s if s != 2 else float("nan"), 0.80), 3, flat))
    for s in (3, 4):  # EW has two more seeds that DB-MTL lacks: still 2 pairs, the smaller row's count
        recs.append(_record("ew", s, {}, (0.80, 0.80), 3, flat))
    (st,) = summarize(recs)
    rows = list(st.rows.values())
    ew = next(r for r in rows if r.method == "ew")
    md = pr.paired_table_markdown(st, rows, {"ew": ew}, loss_rows=[ew])
    assert "| **dbmtl** | 2 of 3 finite |" in md
    assert "(n=2)" in md  # DB-MTL vs EW: 2 pairs although both rows have at least 3 seeds
    assert "Left out of means and intervals (non-finite Δp: a diverged run or a missing metric): dbmtl seed 2." in md
    clean = pr.paired_table_markdown(st, [r for r in rows if r.method != "dbmtl"], {"ew": ew}, loss_rows=[ew])
    assert "Left out" not in clean and "(n=" not in clean


def test_rows_sharing_a_label_stay_apart():
    """EW with and without --grad-stats: two configs, one label. They must not overwrite each other."""
    flat = [2.0] * 5 + [1.0] * 5
    recs = []
    for s in range(3):
        recs.append(_record("stl", s, {}, (0.80, 0.80), 10, flat))
        a = _record("ew", s, {}, (0.80 + 0.001 * s, 0.80), 3, flat)
        b = _record("ew", s, {}, (0.96 + 0.001 * s, 0.80), 3, flat)
        a["config"]["grad_path"], b["config"]["grad_path"] = "weighted", "per_task"
        b["config_hash"] = "ew-grad-stats"
        recs += [a, b]
    (st,) = summarize(recs)
    rows = list(st.rows.values())
    md = pr.paired_table_markdown(st, rows, {})
    assert "| **ew [per_task, ew-grad-stats]** | 3 |" in md and "| ew [weighted, " in md
    assert "| 2 | 0 of 3 |" in md and "| 1 | 0 of 3 |" in md  # rank ranges: the two rows are separated
    with pytest.raises(ValueError, match="'ew' fits 2 rows"):
        pr.paired_report([st], ("ew",))


def test_settings_left_out_of_the_report_are_named():
    flat = [2.0] * 5 + [1.0] * 5
    recs = []
    for s in range(2):
        recs.append(_record("stl", s, {}, (0.80, 0.80), 10, flat))
        recs.append(_record("ew", s, {}, (0.80, 0.80), 3, flat))
        other = _record("ew", s, {}, (0.70, 0.80), 3, flat, epochs=20)  # another recipe, no STL of its own
        other["config_hash"] = "ew-20ep"
        recs.append(other)
    text = pr.paired_report(summarize(recs))
    assert text.count("### b (full recipe: 10 epochs,") == 1 and "20 epochs" not in text
    assert "Not shown, for want of an STL row to measure Δp against: b " in text and "(2 runs)" in text
    # an STL row whose metrics are NaN is named as the reason, not reported as missing
    bad = [dict(r) for r in recs if r["config_hash"] == "ew-20ep"]
    nan_stl = _record("stl", 0, {}, (0.80, 0.80), 20, flat, epochs=20)
    nan_stl["metrics"] = {**nan_stl["metrics"], "test": {t: {k: float("nan") for k in ms}
                                                          for t, ms in nan_stl["metrics"]["test"].items()}}
    nan_stl["config_hash"] = "stl-20ep"
    text = pr.paired_report(summarize([r for r in recs if r["config_hash"] != "ew-20ep"] + bad + [nan_stl]))
    assert "20 epochs" not in text.split("Not shown")[0]
    assert "(3 runs; its STL row has a non-finite test metric in 1 of 1 runs)" in text


def test_two_stl_configurations_in_one_setting_are_an_error_not_a_guess():
    flat = [2.0] * 5 + [1.0] * 5
    recs = [_record("stl", 0, {}, (0.80, 0.80), 10, flat), _record("ew", 0, {}, (0.80, 0.80), 3, flat)]
    other = _record("stl", 0, {}, (0.90, 0.90), 10, flat)  # e.g. STL recorded under other defaults
    other["config_hash"] = "stl-other"
    other["config"] = {**other["config"], "defaults": {"dbmtl": {"beta_sigma": 0.0}}}
    assert summarize(recs)[0].stl is not None
    with pytest.raises(ValueError, match=r"2 STL configurations .*differ in defaults"):
        summarize(recs + [other])


def test_titles_tell_settings_apart_by_every_recipe_field():
    """Two settings that differ only in one recipe field (batch, caps, steps per epoch, weight decay) get two headings."""
    flat = [2.0] * 5 + [1.0] * 5
    recs = []
    for bs, caps in ((64, {"max_train_examples": 2000, "max_eval_examples": 500}), (128, {}),
                     (128, {"max_steps_per_epoch": 5}), (128, {"weight_decay": 1e-4})):
        for s in range(2):
            for m in ("stl", "ew"):
                r = _record(m, s, {}, (0.80, 0.80), 3, flat)
                r["config"]["recipe"] = {"epochs": 10, "batch_size": bs, "learning_rate": 1e-3, **caps}
                r["config_hash"] = f"{m}-{bs}-{sorted(caps)}"
                recs.append(r)
    text = pr.paired_report(summarize(recs))
    assert ("### b (full recipe: lr 0.001, batch 64, 10 epochs, ≤2000 train examples, ≤500 val/test examples, "
            "optimizer Adam (b1 = 0.9)) [b-full-") in text
    assert "### b (full recipe: lr 0.001, batch 128, 10 epochs, optimizer Adam (b1 = 0.9)) [b-full-" in text
    headings = [line for line in text.splitlines() if line.startswith("### ")]
    assert len(headings) == 4 == len(set(headings))
    assert any("≤5 steps/epoch" in h for h in headings) and any("weight decay 0.0001" in h for h in headings)


def test_a_schedule_without_stl_borrows_the_constant_rate_stl():
    flat = [2.0] * 5 + [1.0] * 5
    recs = []
    for s in range(3):
        recs.append(_record("stl", s, {}, (0.80, 0.80), 10, flat))
        cos = _record("ew", s, {}, (0.84, 0.80), 10, flat)
        cos["config"]["recipe"] = {"epochs": 10, "lr_schedule": "cosine"}
        cos["config_hash"] = "ew-cosine"
        recs.append(cos)
    text = pr.paired_report(summarize(recs), ("ew",))
    assert "### b (full recipe: 10 epochs, cosine decay to 0, optimizer Adam (b1 = 0.9)) [b-full-" in text
    assert ("Δp against the STL row trained with Adam (b1 = 0.9) and a constant learning rate "
            "(no STL was trained with this learning-rate schedule)") in text
    assert "| **ew** | 3 | +2.50 ± 0.00 |" in text  # (0.84 − 0.80) / 0.80 on one of two tasks, ×100 / 2


def test_a_setting_without_stl_borrows_the_stl_of_its_own_schedule_first():
    """Two STL rows (a constant rate and cosine decay, both Adam at 0.001): cosine rows with another optimizer,
    or another optimizer and rate, borrow the cosine STL; a constant-rate row borrows the constant one."""
    flat = [2.0] * 5 + [1.0] * 5
    recs = []
    for s in range(3):
        recs.append(_stl_at_rate(s, 0.001, flat))
        cos_stl = _record("stl", s, {}, (0.90, 0.90), 10, flat)
        cos_stl["config"]["recipe"] = {"epochs": 10, "learning_rate": 0.001, "lr_schedule": "cosine"}
        cos_stl["config_hash"] = "stl-cosine"
        recs.append(cos_stl)
        for opt, lr, sched, tag in (({"name": "adam", "b1": 0.0}, 0.001, "cosine", "b1"),
                                    ({"name": "sgdm", "momentum": 0.9}, 0.03, "cosine", "sgd"),
                                    ({"name": "sgdm", "momentum": 0.9}, 0.03, None, "sgd-const")):
            r = _record("ew", s, {}, (0.90, 0.90), 10, flat)
            r["config"]["optimizer"] = opt
            r["config"]["recipe"] = {"epochs": 10, "learning_rate": lr, **({"lr_schedule": sched} if sched else {})}
            r["config_hash"] = f"ew-{tag}"
            recs.append(r)
    for order in (recs, recs[::-1]):
        text = pr.paired_report(summarize(order), ("ew",))
        assert text.count("| **ew** | 3 | +0.00 ± 0.00 |") == 2  # against the cosine STL's 0.90
        assert text.count("| **ew** | 3 | +12.50 ± 0.00 |") == 1  # the constant-rate row: against 0.80
        assert text.count("Δp against the STL row trained with Adam (b1 = 0.9) and cosine decay to 0 (no STL was "
                          "trained with this optimizer)") == 1
        assert text.count("Δp against the STL row trained with Adam (b1 = 0.9) at learning rate 0.001 and cosine "
                          "decay to 0 (no STL was trained with this optimizer and learning rate)") == 1
        assert text.count("at learning rate 0.001 and a constant learning rate (no STL was trained with this "
                          "optimizer and learning rate)") == 1


def _across_records(second_stl=None):
    """EW and DB-MTL under Adam (with STL) and under Adam b1 = 0 (STL optional): EW gains 0.5 Δp points on every
    seed, DB-MTL 1.0, 1.5, 2.0 on seeds 0, 1, 2 (Δp = 62.5 · (acc_a − 0.8) against STL's 0.8, 0.8)."""
    flat = [2.0] * 5 + [1.0] * 5
    recs = []
    for s in range(3):
        recs.append(_record("stl", s, {}, (0.80, 0.80), 10, flat))
        recs.append(_record("ew", s, {}, (0.80 + 0.01 * s, 0.80), 9, flat))
        recs.append(_record("dbmtl", s, {}, (0.82, 0.80), 3, flat))
        second = [_record("ew", s, {}, (0.808 + 0.01 * s, 0.80), 10, flat),
                  _record("dbmtl", s, {}, (0.836 + 0.008 * s, 0.80), 2, flat)]
        if second_stl is not None:
            second.append(_record("stl", s, {}, (second_stl, second_stl), 10, flat))
        for r in second:
            r["config"]["optimizer"] = {"name": "adam", "b1": 0.0}
            r["config_hash"] += "-b1-0"
        recs += second
    return recs


def test_across_settings_gains_and_interactions_against_one_stl():
    recs = _across_records()
    text = pr.across_settings_report(summarize(recs))
    assert text.startswith("### b: optimizer Adam (b1 = 0.9) → Adam (b1 = 0.0)\n")
    rows = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in text.splitlines() if ln.startswith("| ") and " | 3 | " in ln}
    assert set(rows) == {"dbmtl", "ew"}  # STL ran in the first setting only: not a shared row
    half = 4.30265 * 0.5 / math.sqrt(3)
    db, ew = rows["dbmtl"], rows["ew"]
    assert db[2:5] == ["+1.25", "+2.75", f"+1.50 [{1.5 - half:+.2f}, {1.5 + half:+.2f}]"]
    assert ew[4] == "+0.50 [+0.50, +0.50]"
    assert db[5] == f"+1.00 [{1.0 - half:+.2f}, {1.0 + half:+.2f}]" and db[6] == "—"  # interaction with EW
    assert ew[5] == "—" and ew[6] == f"-1.00 [{-1.0 - half:+.2f}, {-1.0 + half:+.2f}]"
    assert db[7] == "0 of 3; 0 of 3 |" and ew[7] == "3 of 3; 3 of 3 |"
    assert text.index("| dbmtl |") < text.index("| ew |")  # largest gain first
    # The same table whatever the record order, and the second setting's own STL does not move the baseline.
    assert pr.across_settings_report(summarize(recs[::-1])) == text
    with_stl = pr.across_settings_report(summarize(_across_records(second_stl=0.9)))
    assert "| dbmtl | 3 | +1.25 | +2.75 | +1.50 [" in with_stl and "| stl | 3 | +0.00 | +12.50 |" in with_stl
    with pytest.raises(ValueError, match="no pair of settings shares the row 'gradnorm'; rows shared: dbmtl, ew"):
        pr.across_settings_report(summarize(recs), ("gradnorm",))
    assert "gain − gain of dbmtl" not in pr.across_settings_report(summarize(recs), ("ew",))
    # A third setting (SGD) without STL: its pair with b1 = 0 borrows the first setting's STL; SGD's EW loses 0.25.
    sgd = [_record("ew", s, {}, (0.804 + 0.01 * s, 0.80), 10, [1.0] * 10) for s in range(3)]
    for r in sgd:
        r["config"]["optimizer"] = {"name": "sgdm", "momentum": 0.9}
        r["config_hash"] += "-sgd"
    three = pr.across_settings_report(summarize(recs + sgd))
    assert three.count("### b: ") == 3
    pair = three[three.index("### b: optimizer SGD (momentum = 0.9) → Adam (b1 = 0.0)"):]
    assert "Δp of both against the stl row of setting b-full-" in pair
    assert "| ew | 3 | +0.87 | +1.12 | +0.25 [+0.25, +0.25] |" in pair


def test_across_settings_cli(tmp_path, capsys):
    import gzip
    import json

    from dbmtl_jax.experiments.cli import main

    for i, r in enumerate(_across_records()):
        r.update(format="dbmtl_jax.experiment/2", status="done", benchmark="b", seed=r["seed"])
        with gzip.open(tmp_path / f"b__{r['method']}__seed{r['seed']}__{i:010d}.json.gz", "wt") as f:
            json.dump(r, f)
    assert main(["paired", str(tmp_path), "--across", "--ref", "ew"]) == 0
    out = capsys.readouterr().out
    assert "| dbmtl | 3 | +1.25 | +2.75 | +1.50 [" in out and "gain − gain of ew" in out
    assert main(["paired", str(tmp_path), "--across", "--ref", "nope"]) == 2
    assert "no pair of settings shares the row 'nope'" in capsys.readouterr().err
    for f in tmp_path.glob("*.json.gz"):  # one setting left: nothing to compare
        if "b1" in gzip.open(f, "rt").read():
            f.unlink()
    assert main(["paired", str(tmp_path), "--across"]) == 1
    assert "no two settings of one benchmark share a row" in capsys.readouterr().err


def test_validation_split_and_an_stl_borrowed_across_a_learning_rate(tmp_path, capsys):
    import gzip
    import json

    from dbmtl_jax.experiments.cli import main

    flat = [2.0] * 5 + [1.0] * 5
    recs = []
    for s in range(3):
        recs.append(_stl_at_rate(s, 0.001, flat))
        for lr, acc in ((0.1, 0.76), (0.01, 0.84)):  # an SGD pilot: two rates, no STL of its own
            r = _record("ew", s, {}, (acc, 0.80), 10, flat)
            r["metrics"]["val"]["a"]["acc"] = acc - 0.04  # validation 0.04 below test: +0 and −10 Δp on val
            r["config"]["optimizer"] = {"name": "sgdm", "momentum": 0.9}
            r["config"]["recipe"] = {"epochs": 10, "learning_rate": lr}
            r["config_hash"] = f"ew-sgd-{lr}"
            recs.append(r)
    test = pr.paired_report(summarize(recs), ("ew",))
    assert test.count("Δp against the STL row trained with Adam (b1 = 0.9) at learning rate 0.001 and a constant "
                      "learning rate (no STL was trained with this optimizer and learning rate)") == 2
    assert "| **ew** | 3 | +2.50 ± 0.00 |" in test and "| **ew** | 3 | -2.50 ± 0.00 |" in test
    val = pr.paired_report(summarize(recs), ("ew",), split="val")
    assert "| **ew** | 3 | +0.00 ± 0.00 |" in val and "| **ew** | 3 | -5.00 ± 0.00 |" in val
    across = pr.across_settings_report(summarize(recs), split="val")
    assert across.startswith("### b: learning_rate 0.01 → 0.1\n")  # the smaller rate first
    assert "| ew | 3 | +0.00 | -5.00 | -5.00 [-5.00, -5.00] |" in across
    with pytest.raises(ValueError, match="split must be 'test' or 'val'"):
        pr.paired_report(summarize(recs), split="train")
    for i, r in enumerate(recs):
        r.update(format="dbmtl_jax.experiment/2", status="done", benchmark="b", seed=r["seed"])
        with gzip.open(tmp_path / f"b__{r['method']}__seed{r['seed']}__{i:010d}.json.gz", "wt") as f:
            json.dump(r, f)
    assert main(["paired", str(tmp_path), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Δp on the validation split") and "| **ew** | 3 | -5.00 ± 0.00 |" in out


def test_paired_cli_reads_several_study_folders_as_one_set_of_runs(tmp_path):
    """Two studies that share seeds pair across folders; a run listed in both counts once."""
    import gzip
    import json

    from dbmtl_jax.experiments.cli import main
    from dbmtl_jax.experiments.train import write_study

    flat = [2.0] * 5 + [1.0] * 5
    store = tmp_path / "runs"
    store.mkdir()
    names = {}
    for s in range(3):
        for i, r in enumerate([_record("stl", s, {}, (0.80, 0.80), 10, flat),
                               _record("ew", s, {}, (0.78 + 0.01 * s, 0.80), 9, flat),
                               _record("gls", s, {}, (0.79 + 0.01 * s, 0.80), 9, flat)]):
            r.update(format="dbmtl_jax.experiment/2", status="done", benchmark="b")
            name = f"b__{r['method']}__seed{s}__{i:010d}.json.gz"
            with gzip.open(store / name, "wt") as f:
                json.dump(r, f)
            names.setdefault(r["method"], []).append(f"../runs/{name}")
    one, two = tmp_path / "one", tmp_path / "two"
    write_study(one, names["stl"] + names["ew"])
    write_study(two, names["stl"] + names["gls"])  # STL listed in both
    assert main(["paired", str(one), str(two), "--ref", "ew", "--out", str(tmp_path / "both.md")]) == 0
    assert main(["paired", str(store), "--ref", "ew", "--out", str(tmp_path / "store.md")]) == 0
    both = (tmp_path / "both.md").read_text()
    assert both == (tmp_path / "store.md").read_text()
    assert "| stl | 3 |" in both and "| **gls** | 3 |" in both  # STL once per seed, not twice
    # GLS − EW is +1 accuracy point on task a every seed: +0.625 Δp (1/0.80 × 100 / 2 tasks).
    gls_row = next(line for line in both.splitlines() if line.startswith("| **gls**"))
    assert "+0.6" in gls_row.split("|")[4]
    assert main(["paired", str(one), str(tmp_path / "missing")]) == 2


def _reference_loss_figures(losses, fraction=0.2):
    """Independent reference: per-epoch summed losses over the window of the late-selection count (the epochs
    e > (1 − fraction)·E, at least one), from the loss of the epoch before it to the last."""
    totals = [sum(x) for x in losses]
    E = len(totals)
    k = max(1, sum(e > (1 - fraction) * E for e in range(1, E + 1)))  # the late-selection count's window, >= 1
    start, end, first = totals[E - k - 1], totals[-1], totals[0]
    return (start - end) / abs(start), (start - end) / (first - end)


def test_loss_figures_of_a_two_epoch_run_are_not_a_flat_zero():
    """With 2 epochs, round(0.8 · 2) = 2 put the window's start on the last epoch: a change of exactly 0 %, and 0 %
    of the decrease, for any loss curve (read as "finished")."""
    for losses in ([2.0, 1.0], [2.0, 1.9], list(np.linspace(3.0, 1.0, 7)), list(np.linspace(3.0, 1.0, 16))):
        rec = _record("ew", 0, {}, (0.8, 0.8), 2, losses, epochs=len(losses))
        change, share = _reference_loss_figures([[v, v] for v in losses])
        assert pr.loss_change_last_fifth(rec) == pytest.approx(change)
        assert pr.loss_share_last_fifth(rec) == pytest.approx(share)
    two = _record("ew", 0, {}, (0.8, 0.8), 2, [2.0, 1.0], epochs=2)
    assert pr.loss_change_last_fifth(two) == pytest.approx(0.5) and pr.loss_share_last_fifth(two) == pytest.approx(1.0)


def test_rank_ranges_count_the_rows_separated_above_and_below():
    """A chain a ~ b ~ c with a, c separated: b can rank 1st to 3rd, a 1st or 2nd, c 2nd or 3rd; d, separated
    from all, is 4th.  The old leader-only groups put b with a and c in the next group, hiding that b and c
    are level too; and a row level with the best but separated from another row cannot rank first."""
    rng = np.random.default_rng(3)
    base = rng.normal(0, 2, size=5)
    wiggle = np.asarray([0.6, -0.6, 0.4, -0.4, 0.0])  # a − c is exactly 1: separated; a − b, b − c are not
    scores = {"a": {s: base[s] + 1.0 + wiggle[s] for s in range(5)},
              "b": {s: base[s] + 0.5 for s in range(5)},
              "c": {s: base[s] + 0.0 + wiggle[s] for s in range(5)},
              "d": {s: base[s] - 5.0 for s in range(5)}}
    iv = lambda x, y: pr.paired_interval(scores[x], scores[y])  # noqa: E731
    assert not iv("a", "b").separated and not iv("b", "c").separated and iv("a", "c").separated
    r = pr.rank_ranges(scores)
    assert r == {"a": (1, 2), "b": (1, 3), "c": (2, 3), "d": (4, 4)}
    assert [pr.rank_text(r[k]) for k in "abcd"] == ["1–2", "1–3", "2–3", "4"]
    # the definition, on random rows: the counts of separated rows above and below, against a direct count
    rows = {f"r{i}": {s: float(base[s] + rng.normal(0, 0.4) + 0.3 * i) for s in range(5)} for i in range(9)}
    r = pr.rank_ranges(rows)
    for x in rows:
        ivs = [pr.paired_interval(rows[y], rows[x]) for y in rows if y != x]
        assert r[x] == (1 + sum(v.low > 0 for v in ivs), 9 - sum(v.high < 0 for v in ivs)), x
    # a common shift of one seed across rows changes nothing (pairing)
    assert pr.rank_ranges({k: {s: v + 7 * (s == 2) for s, v in d.items()} for k, d in rows.items()}) == r


def test_loss_figures_of_a_run_with_a_non_finite_loss_are_nan_not_an_error():
    """The runner stores a NaN loss as null and an infinite one as "inf": the figures say NaN, the table still prints."""
    losses = [[2.0, 2.0], [1.5, 1.5], [1.2, 1.2], [None, 1.0], [1.0, 1.0]]
    rec = _record("ew", 0, {}, (0.8, 0.8), 2, [0.0] * 5, epochs=5)
    rec["history"]["train_loss"] = losses  # epoch 4 (the window's start) is NaN
    assert math.isnan(pr.loss_change_last_fifth(rec)) and math.isnan(pr.loss_share_last_fifth(rec))
    rec["history"]["train_loss"] = losses[:3] + [[1.1, 1.1], ["inf", 1.0]]
    assert pr.loss_change_last_fifth(rec) == -math.inf and math.isnan(pr.loss_share_last_fifth(rec))


def test_a_row_sharing_no_seed_with_the_best_is_not_ranked_below_it():
    """Without a shared seed there is no paired interval: nothing separates the row from the best, so it must keep
    rank 1 in its range (the table would otherwise read it as "worse than the best, by the intervals")."""
    scores = {"a": {0: 5.0, 1: 5.1, 2: 4.9}, "b": {3: 4.0, 4: 4.2, 5: 4.1},
              "c": {0: 1.0, 1: 1.1, 2: 0.9, 3: 1.0}}  # c pairs with a: 4.0 below on every shared seed
    assert pr.paired_interval(scores["b"], scores["a"]) is None
    assert pr.paired_interval(scores["c"], scores["a"]).separated
    assert pr.rank_ranges(scores) == {"a": (1, 2), "b": (1, 3), "c": (2, 3)}  # b pairs with neither
    # the same with a diverged (NaN) seed as the only overlap, and in a table: b is bold, with "—" against a
    scores["b"] = {0: float("nan"), 4: 4.2, 5: 4.1}
    assert pr.rank_ranges(scores) == {"a": (1, 2), "b": (1, 3), "c": (2, 3)}
    flat = [2.0] * 5 + [1.0] * 5
    recs = [_record("stl", s, {}, (0.80, 0.80), 10, flat) for s in range(6)]
    recs += [_record("ew", s, {}, (0.84 + 0.001 * s, 0.80), 3, flat) for s in range(3)]
    recs += [_record("dbmtl", s, {}, (0.82 + 0.001 * s, 0.80), 3, flat) for s in range(3, 6)]
    (st,) = summarize(recs)
    rows = list(st.rows.values())
    ew = next(r for r in rows if r.method == "ew")
    md = pr.paired_table_markdown(st, rows, {"ew": ew})
    assert "| **ew** | 3 |" in md and "| **dbmtl** | 3 |" in md and " | — | 1–2 | 0 of 3 |" in md


def test_across_settings_states_runs_left_out_and_pairs_the_delta_p_columns():
    """A diverged run and seeds run in one setting only: the Δp columns are means over the gain's seeds (so that
    second − first is the gain), short interactions say n, and what was left out is listed under the table."""
    recs = _across_records()
    for r in recs:  # EW seed 2 diverged in the first setting
        if r["method"] == "ew" and r["seed"] == 2 and "b1" not in r["config_hash"]:
            r["metrics"]["test"]["a"]["acc"] = float("nan")
    flat = [2.0] * 5 + [1.0] * 5
    for s in (3, 4):  # DB-MTL seeds 3 and 4 in the second setting only, far above the others
        r = _record("dbmtl", s, {}, (0.9, 0.80), 2, flat)
        r["config"]["optimizer"] = {"name": "adam", "b1": 0.0}
        r["config_hash"] += "-b1-0"
        recs.append(r)
    text = pr.across_settings_report(summarize(recs))
    rows = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in text.splitlines() if ln.startswith("| ")}

    def dp(acc):  # Δp against STL's 0.80, 0.80: task a only, ×100, /2 tasks
        return 100 * (acc - 0.8) / 0.8 / 2

    ew_first = [dp(0.80 + 0.01 * s) for s in (0, 1)]  # seed 2 is NaN in the first setting
    ew_second = [dp(0.808 + 0.01 * s) for s in (0, 1)]
    ew = rows["ew"]
    assert ew[1:4] == ["2", f"{sum(ew_first) / 2:+.2f}", f"{sum(ew_second) / 2:+.2f}"]  # +0.31, +0.81 (not +1.12)
    db = rows["dbmtl"]
    db_first, db_second = [dp(0.82)] * 3, [dp(0.836 + 0.008 * s) for s in range(3)]
    assert db[1:4] == ["3", f"{sum(db_first) / 3:+.2f}", f"{sum(db_second) / 3:+.2f}"]  # +1.25, +2.75 (not +4.15)
    assert db[5] == "+0.75 [-2.43, +3.93]"  # over EW's 2 seeds: the seeds column says so, no "(n=2)"
    assert ("Left out of means and intervals (non-finite Δp: a diverged run or a missing metric): "
            "ew seed 2 (first setting).") in text
    assert ("Left out of means and intervals (no run of the seed in the other setting): "
            "dbmtl seed 3 (second setting), dbmtl seed 4 (second setting).") in text
    clean = pr.across_settings_report(summarize(_across_records()))
    assert "Left out" not in clean and "(n=" not in clean
    # An interaction over fewer seeds than either gain has says how many: EW lacks seed 0, DB-MTL seed 2.
    recs = [r for r in _across_records() if (r["method"], r["seed"]) not in (("ew", 0), ("dbmtl", 2))]
    recs += [_record("ew", 3, {}, (0.80, 0.80), 9, flat), _record("dbmtl", 3, {}, (0.82, 0.80), 3, flat)]
    second = [_record("ew", 3, {}, (0.81, 0.80), 9, flat), _record("dbmtl", 3, {}, (0.84, 0.80), 3, flat)]
    for r in second:
        r["config"]["optimizer"] = {"name": "adam", "b1": 0.0}
        r["config_hash"] += "-b1-0"
    recs += second
    short = pr.across_settings_report(summarize(recs))
    db = next(ln.split(" | ") for ln in short.splitlines() if ln.startswith("| dbmtl |"))
    assert db[1] == "3" and db[5].endswith(" (n=2)")  # seeds 1 and 3
    assert "Left out" not in short  # a seed a row ran in neither setting is not a left-out run


def test_late_selection_counts_the_last_ceil_fraction_epochs_as_the_loss_figures_do():
    """The last 30 % of 90 epochs are epochs 64..90 (27 epochs); in floats 0.7 · 90 = 62.99999999999999, and
    ``e > (1 − fraction) · E`` counted epoch 63 as late."""
    for epochs, fraction, first_late in ((90, 0.3, 64), (170, 0.3, 120), (320, 0.2, 257), (12, 0.2, 10)):
        window = int(math.ceil(round(fraction * epochs, 9)))  # independent: the last ceil(fraction·E) epochs
        assert first_late == epochs - window + 1
        for e, late in ((first_late - 1, False), (first_late, True)):
            rec = _record("stl", 0, {}, (0.8, 0.8), e, [1.0] * epochs, epochs=epochs)
            assert pr.selected_late(rec, fraction) is late, (epochs, fraction, e)
            assert pr.late_task_selections(rec, fraction) == 2 * late


def test_convergence_line_names_the_epoch_window_when_it_is_not_exactly_a_fifth():
    # audit 39 #23: with 6 epochs "the last 20 %" is the last 2 (33 %); the footer now says so (10 epochs: exact).
    def table(epochs):
        recs = [_record(m, s, {}, (0.8 + 0.01 * s * (m == "ew"), 0.8), epochs, [1.0] * epochs, epochs=epochs)
                for m in ("stl", "ew") for s in range(2)]
        (st,) = summarize(recs)
        rows = list(st.rows.values())
        return pr.paired_table_markdown(st, rows, {}, loss_rows=[r for r in rows if r.method == "ew"])

    six = table(6)
    assert "last 20 % of training (the last 2 of 6 epochs):" in six
    assert "last 20 % of epochs (the last 2 of 6 epochs):" in six
    assert "epochs):" not in table(10)


def test_signed_never_prints_minus_zero():
    from dbmtl_jax.experiments.report import signed

    assert [signed(x) for x in (-0.004, -0.0, 0.0, 0.004, -0.006, 1.234)] == \
        ["+0.00", "+0.00", "+0.00", "+0.00", "-0.01", "+1.23"]
