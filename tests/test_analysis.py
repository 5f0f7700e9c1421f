"""The analysis commands (``dbmtl-jax select``, ``breakdown``, ``summary``, ``time``, ``index``) on small
synthetic records written by the tests (a record store and study folders under ``tmp_path``; nothing
is trained and nothing committed under ``results/`` is read).  Expected numbers come from independent
NumPy formulas.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from dbmtl_jax.experiments import analysis as an  # noqa: E402
from dbmtl_jax.experiments.cli import main  # noqa: E402
from dbmtl_jax.experiments.report import Setting, load_results, summarize  # noqa: E402
from dbmtl_jax.experiments.train import (  # noqa: E402
    RESULT_FORMAT,
    RunConfig,
    add_to_study,
    config_hash,
    parse_method,
    result_path,
    write_record,
)

TASKS = {"a": {"metrics": {"acc": True}, "select_metric": "acc", "units": {}},
         "b": {"metrics": {"err": False}, "select_metric": "err", "units": {}}}
HIB = {"a": {"acc": True}, "b": {"err": False}}
SEEDS = (0, 1, 2)


def _config(method: str, hparams: dict, epochs: int) -> RunConfig:
    spec = parse_method(method)
    return RunConfig(benchmark="syn", method=spec.label, base_method=spec.name, log=spec.log, hparams=dict(hparams),
                     recipe={"learning_rate": 0.001, "batch_size": 8, "epochs": epochs}, quick=True,
                     grad_path="stl" if spec.name == "stl" else "per_task")


def record(method: str, seed: int, val: tuple, test: tuple, *, hparams: dict | None = None, epochs: int = 4,
           step: float = 0.01, wall: float = 60.0, epoch_times=(5.0, 1.0, 1.2, 1.4)) -> dict:
    """A finished record: ``val`` / ``test`` are ``(a.acc, b.err)``; seed s shifts acc by 0.001 s."""
    cfg = _config(method, hparams or {}, epochs)
    shift = 0.001 * seed
    return {
        "format": RESULT_FORMAT, "status": "done", "benchmark": "syn", "method": cfg.method, "seed": seed,
        "config_hash": config_hash(cfg), "config": cfg.to_dict(), "tasks": TASKS,
        "versions": {"python": "3", "dbmtl_jax": "0.1.0", "dbmtl_jax_git_commit": "abcdef0123"},
        "device": "cpu:cpu", "created": f"2026-01-01T00:00:0{seed}+0000",
        "metrics": {"val": {"a": {"acc": val[0] + shift}, "b": {"err": val[1]}},
                    "test": {"a": {"acc": test[0] + shift}, "b": {"err": test[1]}}},
        "selected_epoch": {"a": epochs, "b": epochs},
        "history": {"epoch_time_s": list(epoch_times)}, "curve": {},
        "wall_time_s": wall, "median_step_time_s": step, "steps_per_epoch": 10, "steps": 10 * epochs,
        "nonfinite_steps": 0,
    }


def put(root: Path, study: str, method: str, val: tuple, test: tuple, **kw) -> list[Path]:
    """Lists the run of every seed in ``root/<study>/runs.txt``, writing its record into ``root/runs`` first
    unless the store has it already (as the runner's resume does: a run shared by two tables is stored once)."""
    paths = []
    for s in SEEDS:
        cfg = _config(method, kw.get("hparams") or {}, kw.get("epochs", 4))
        path = result_path(root / "runs", cfg, s)
        paths.append(path if path.exists() else write_record(path, record(method, s, val, test, **kw)))
    add_to_study(root / study, paths)
    return paths


def np_delta_p(m: dict, ref: dict) -> float:
    """Independent Δp (%): mean over tasks of the signed relative change."""
    return float(np.mean([100.0 * (1 if up else -1) * (m[t][k] - ref[t][k]) / abs(ref[t][k])
                          for t, ms in HIB.items() for k, up in ms.items()]))


def _mean_metrics(recs: list, split: str) -> dict:
    return {t: {k: float(np.mean([r["metrics"][split][t][k] for r in recs])) for k in ms} for t, ms in HIB.items()}


BETA_GRID = {  # hparams -> (val, test): β = 0 is the best on validation but not in the paper's grid
    (): ((0.78, 1.10), (0.77, 1.12)),
    (("beta", 0.0), ("beta_sigma", 0.0)): ((0.82, 0.95), (0.80, 1.00)),
    (("beta", 0.1), ("beta_sigma", 0.0)): ((0.81, 0.97), (0.81, 0.96)),
    (("beta", 0.5), ("beta_sigma", 0.5)): ((0.80, 1.00), (0.82, 0.99)),
}


@pytest.fixture
def study(tmp_path):
    """results/runs + results/syn_4ep_{main,beta,ablation,log,alpha,budget} + one unlisted record."""
    root = tmp_path / "results"
    stl = ((0.80, 1.00), (0.80, 1.00))
    for sec in ("main", "beta", "ablation", "log", "alpha"):
        put(root, f"syn_4ep_{sec}", "stl", *stl)
    put(root, "syn_4ep_main", "ew", (0.79, 1.02), (0.78, 1.03), wall=30.0)
    put(root, "syn_4ep_main", "pcgrad", (0.80, 1.01), (0.79, 1.01), step=0.03)
    put(root, "syn_4ep_main", "dbmtl", *BETA_GRID[()], step=0.02)
    for hp, (val, test) in BETA_GRID.items():
        put(root, "syn_4ep_beta", "dbmtl", val, test, hparams=dict(hp))
    put(root, "syn_4ep_ablation", "ew", (0.79, 1.02), (0.78, 1.03), wall=30.0)
    put(root, "syn_4ep_ablation", "ew+log", (0.79, 1.00), (0.79, 1.01))
    put(root, "syn_4ep_ablation", "dbmtl", *BETA_GRID[()])
    put(root, "syn_4ep_ablation", "dbmtl+nolog", (0.78, 1.05), (0.78, 1.06))
    put(root, "syn_4ep_ablation", "dbmtl", (0.81, 0.97), (0.815, 0.955), hparams={"beta": 0.1})
    put(root, "syn_4ep_ablation", "dbmtl+nolog", (0.80, 0.99), (0.80, 0.98), hparams={"beta": 0.1})
    put(root, "syn_4ep_log", "pcgrad", (0.80, 1.01), (0.79, 1.01))
    put(root, "syn_4ep_log", "pcgrad+log", (0.81, 1.00), (0.80, 0.99))
    put(root, "syn_4ep_alpha", "dbmtl", *BETA_GRID[()])
    put(root, "syn_4ep_alpha", "dbmtl", (0.79, 1.05), (0.785, 1.04), hparams={"alpha": "min"})
    put(root, "syn_4ep_alpha", "dbmtl", (0.81, 0.98), (0.81, 0.97), hparams={"alpha": "max", "beta": 0.1})
    put(root, "syn_4ep_budget", "stl", (0.85, 0.90), (0.85, 0.90), epochs=12)
    put(root, "syn_4ep_budget", "ew", (0.83, 0.95), (0.83, 0.94), epochs=12)
    put(root, "syn_4ep_budget", "dbmtl", (0.82, 0.96), (0.82, 0.95), epochs=12)
    put(root, "syn_4ep_budget", "dbmtl", (0.84, 0.93), (0.84, 0.92), epochs=12, hparams={"beta": 0.1})
    cfg = _config("gradvac", {}, 4)
    write_record(result_path(root / "runs", cfg, 0), record("gradvac", 0, (0.8, 1.0), (0.8, 1.0)))  # listed nowhere
    return root


# --------------------------------------------------------------------------- select


def test_select_ranks_on_validation_and_picks_the_grid_best(study, capsys):
    d = study / "syn_4ep_beta"
    assert main(["select", str(d), "--print-grid-best"]) == 0
    assert capsys.readouterr().out.split() == ["0.1", "0.0"]  # β = 0 is val-best but outside the paper's grid
    assert not (d / "val_selection.md").exists()  # --print-grid-best writes nothing
    assert main(["select", str(d)]) == 0
    page = (d / "val_selection.md").read_text()
    assert page == capsys.readouterr().out
    table = [ln for ln in page.splitlines() if ln.startswith("| ") and "configuration" not in ln]
    assert table[0].startswith("| **dbmtl (beta=0.0, beta_sigma=0.0)** (selected)")
    recs = load_results(d)
    stl_val = _mean_metrics([r for r in recs if r["method"] == "stl"], "val")
    expected = {}
    for hp in BETA_GRID:
        runs = [r for r in recs if r["method"] == "dbmtl" and tuple(sorted(r["config"]["hparams"].items())) == hp]
        expected[hp] = np.mean([np_delta_p(r["metrics"]["val"], stl_val) for r in runs])
    order = sorted(expected, key=lambda hp: -expected[hp])
    assert [re.search(r"dbmtl[^|*]*", ln).group(0).strip() for ln in table] == [
        "dbmtl" + (f" ({', '.join(f'{k}={v}' for k, v in hp)})" if hp else "") for hp in order]
    for ln, hp in zip(table, order):
        assert f"{expected[hp]:+.2f}" in ln.split(" | ")[2]
    assert "Within the paper's grid" in page and "`dbmtl (beta=0.1, beta_sigma=0.0)`" in page


def test_select_vary_ranks_only_the_rows_that_vary_those_hyperparameters(study, capsys):
    """A folder holding the β grid and an α row (val-best): ``--vary beta,beta_sigma`` ranks the β grid alone
    (the default row stays), ``--vary alpha`` the α row and the default; an unknown key is an error naming it."""
    d = study / "syn_4ep_beta"
    put(study, "syn_4ep_beta", "dbmtl", (0.90, 0.90), (0.70, 1.20), hparams={"alpha": "mean"})
    assert main(["select", str(d)]) == 0
    assert "**dbmtl (alpha=mean)** (selected)" in capsys.readouterr().out
    assert main(["select", str(d), "--vary", "beta,beta_sigma"]) == 0
    page = capsys.readouterr().out
    assert page == (d / "val_selection.md").read_text() and "alpha" not in page
    rows = [ln.split(" | ")[0] for ln in page.splitlines() if ln.startswith("| ") and "configuration" not in ln]
    assert len(rows) == len(BETA_GRID) and rows[0] == "| **dbmtl (beta=0.0, beta_sigma=0.0)** (selected)"
    # the α row runs at the default β = 0.9/√k, a grid point, but varies α: never the grid's best
    for extra in ([], ["--vary", "beta, beta_sigma"]):
        assert main(["select", str(d), "--print-grid-best", *extra]) == 0
        assert capsys.readouterr().out.split() == ["0.1", "0.0"]
    (st,) = an.load_settings(study / "syn_4ep_alpha")
    grid = {r.label: an.in_paper_grid(r) for r in st.rows.values() if r.method == "dbmtl"}
    assert grid == {"dbmtl": True, "dbmtl (alpha=min)": False, "dbmtl (alpha=max, beta=0.1)": True}  # max: default
    assert main(["select", str(d), "--vary", "alpha"]) == 0
    rows = [ln.split(" | ")[0] for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("| ") and "configuration" not in ln]
    assert rows == ["| **dbmtl (alpha=mean)** (selected)", "| dbmtl"]
    (st,) = an.restrict_rows(an.load_settings(d), "dbmtl", ["alpha"])
    assert st.stl is not None  # other methods' rows are kept
    before = (d / "val_selection.md").read_text()
    for bad, msg in (("beta,gamma", "gamma: not a hyperparameter of dbmtl"), (" , ", "names no hyperparameter")):
        assert main(["select", str(d), "--vary", bad]) == 2
        assert msg in capsys.readouterr().err
    assert (d / "val_selection.md").read_text() == before  # nothing written on a rejected call


def test_select_functions_compose(study):
    (st,) = an.load_settings(study / "syn_4ep_beta")
    scored = an.scored_rows(st, "dbmtl")
    assert [round(x[0], 9) for x in scored] == sorted((round(x[0], 9) for x in scored), reverse=True)
    assert all(len(per_seed) == len(SEEDS) and np.isclose(np.mean(per_seed), m) for m, _, per_seed in scored)
    assert an.beta_sigma_of(an.grid_best_row(st)) == (0.1, 0.0)
    assert an.grid_best([st]) == (0.1, 0.0) and an.grid_best([], "dbmtl") is None
    # a row with a diverged seed (NaN validation metric) is ranked last, never picked by an unordered sort
    bad = next(r for r in st.rows.values() if an.beta_sigma_of(r) == (0.1, 0.0))
    bad.runs[1] = {**bad.runs[1], "metrics": {**bad.runs[1]["metrics"], "val": {"a": {"acc": float("nan")},
                                                                                   "b": {"err": 1.0}}}}
    ranked = an.scored_rows(st, "dbmtl")
    assert ranked[-1][1] is bad and all(np.isfinite(x[0]) for x in ranked[:-1])
    assert an.beta_sigma_of(an.grid_best_row(st)) == (0.5, 0.5)
    assert an.mean_std([1.0, 3.0]) == "+2.00 ± 1.41" and an.mean_std([float("nan")]) == "n/a"
    # a diverged seed is named, not silently left out of the mean
    assert an.mean_std([1.0, float("nan"), 3.0]) == "+2.00 ± 1.41 (2 of 3 finite)"
    assert an.mean_std([2.0, float("inf")]) == "+2.00 (1 of 2 finite)"
    assert an.finite_mean([float("nan")]) == float("-inf")


def test_select_borrows_stl_for_a_schedule_without_one_and_ranks_on_shared_seeds(tmp_path, capsys):
    """Rows trained with cosine decay beside an STL trained at a constant rate only: validation and test
    Δp are taken against that STL (as ``paired`` does), not skipped; a row run on fewer seeds is compared
    on the seeds every row has, not against other rows' means over more seeds."""
    root = tmp_path / "results"
    put(root, "cos", "stl", (0.80, 1.00), (0.80, 1.00))

    def put_cosine(hparams: dict, val: tuple, test: tuple, seeds=SEEDS) -> list:
        out = []
        for s in seeds:
            cfg = _config("dbmtl", hparams, 4)
            cfg = RunConfig(**{**cfg.to_dict(), "recipe": {**cfg.recipe, "lr_schedule": "cosine"}})
            rec = record("dbmtl", s, val, test, hparams=hparams)
            rec.update(config=cfg.to_dict(), config_hash=config_hash(cfg))
            out.append(write_record(result_path(root / "runs", cfg, s), rec))
        add_to_study(root / "cos", out)
        return out

    put_cosine({"beta": 0.5, "beta_sigma": 0.5}, (0.810, 0.98), (0.81, 0.98))
    # seed 0 only: better than the row above on seed 0, worse than its mean over seeds 0-2
    put_cosine({"beta": 0.1, "beta_sigma": 0.0}, (0.8105, 0.98), (0.79, 1.00), seeds=(0,))
    assert main(["select", str(root / "cos"), "--print-grid-best"]) == 0
    assert capsys.readouterr().out.split() == ["0.1", "0.0"]
    assert main(["select", str(root / "cos")]) == 0
    page = capsys.readouterr().out
    assert "cosine decay to 0" in page and "Validation and test Δp against the STL row" in page
    assert "ranked on the mean validation Δp over the seeds they all share (0)" in page
    table = [ln for ln in page.splitlines() if ln.startswith("| ") and "configuration" not in ln]
    assert table[0].startswith("| **dbmtl (beta=0.1, beta_sigma=0.0)** (selected) | 1 |")
    recs = load_results(root / "cos")
    stl = [r for r in recs if r["method"] == "stl"]
    only = [r for r in recs if r["config"]["hparams"] == {"beta": 0.1, "beta_sigma": 0.0}]
    val = np_delta_p(only[0]["metrics"]["val"], _mean_metrics(stl, "val"))
    test = np_delta_p(only[0]["metrics"]["test"], _mean_metrics(stl, "test"))
    assert table[0].split(" | ")[2:4] == [f"{val:+.2f}", f"{test:+.2f} |"]
    # the per-task breakdown borrows the same STL row
    page = an.breakdown_markdown(an.load_settings(root / "cos"))
    assert "Δp against the STL row trained with" in page
    base = _mean_metrics(stl, "test")["a"]["acc"]
    acc = 100.0 * (only[0]["metrics"]["test"]["a"]["acc"] - base) / base
    assert f"| dbmtl {{\"beta\": 0.1, \"beta_sigma\": 0.0}} | {acc:+.2f} |" in page


def test_select_and_friends_reject_missing_directories(tmp_path, capsys):
    for cmd in (["select", str(tmp_path / "nope")], ["breakdown", str(tmp_path / "nope")],
                ["time", str(tmp_path / "nope")], ["index", str(tmp_path / "nope")]):
        assert main(cmd) == 2
        assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["select", str(tmp_path / "empty"), "--print-grid-best"]) == 1
    assert main(["summary", str(tmp_path / "empty")]) == 1
    assert "no runs with an STL row" in capsys.readouterr().err
    # No records, or none of what was asked for: an error naming it, and nothing written.
    for cmd, msg in ((["select", str(tmp_path / "empty")], "no dbmtl row next to an STL row"),
                     (["breakdown", str(tmp_path / "empty")], "no run records with an STL row"),
                     (["paired", str(tmp_path / "empty")], "no run records under")):
        assert main(cmd) == 1
        assert msg in capsys.readouterr().err
    assert not list((tmp_path / "empty").iterdir())


def test_select_unknown_method_and_paired_without_stl_are_errors(study, tmp_path, capsys):
    assert main(["select", str(study / "syn_4ep_beta"), "--method", "pcgrad"]) == 1
    assert "no pcgrad row next to an STL row (methods there: dbmtl, stl)" in capsys.readouterr().err
    # A study without STL has no Δp against STL: say so, and point to --baseline.
    (tmp_path / "no_stl").mkdir()
    listed = [study / "syn_4ep_beta" / line.strip() for line in (study / "syn_4ep_beta" / "runs.txt").read_text()
              .splitlines() if line.strip() and not line.startswith("#")]
    for f in listed:
        if "__stl__" not in f.name:
            (tmp_path / "no_stl" / f.name).write_bytes(f.read_bytes())
    assert len(list((tmp_path / "no_stl").iterdir())) >= 3
    assert main(["paired", str(tmp_path / "no_stl")]) == 1
    assert "give --baseline ROW" in capsys.readouterr().err


# --------------------------------------------------------------------------- breakdown


def test_breakdown_matches_independent_changes_and_delta_p(study, capsys):
    d = study / "syn_4ep_main"
    assert main(["breakdown", str(d)]) == 0
    page = (d / "breakdown.md").read_text()
    assert page == capsys.readouterr().out  # one folder: stdout is the page, so a redirect into it is harmless
    assert main(["breakdown", str(d), str(study / "syn_4ep_ablation")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{d}\n{page}") and f"{study / 'syn_4ep_ablation'}\n" in out  # several: each named
    recs = load_results(d)
    stl = _mean_metrics([r for r in recs if r["method"] == "stl"], "test")
    rows = [ln.strip("| ").split(" | ") for ln in page.splitlines() if re.match(r"\| \d", ln)]
    assert [r[1] for r in rows][0] == "stl" and len(rows) == 4
    dps = [float(r[-1]) for r in rows]
    assert dps == sorted(dps, reverse=True)  # ranked by Δp
    (st,) = summarize(recs)
    for r in rows:
        runs = [x for x in recs if x["method"] == r[1]]
        mean = _mean_metrics(runs, "test")
        assert float(r[2]) == pytest.approx(100 * (mean["a"]["acc"] - stl["a"]["acc"]) / stl["a"]["acc"], abs=0.006)
        assert float(r[3]) == pytest.approx(-100 * (mean["b"]["err"] - stl["b"]["err"]) / stl["b"]["err"], abs=0.006)
        row = next(x for x in st.rows.values() if x.method == r[1])
        assert float(r[-1]) == pytest.approx(np.mean(row.delta_p), abs=0.006)  # Δp is linear in the metrics


def test_breakdown_delta_p_weights_tasks_not_metrics():
    """A task with two metrics and one with one (as NYUv2's 2/2/5): the Δp column is Eq. 3-4, the mean over tasks
    of the mean over each task's metrics, as the row's Δp; the mean over all metrics weights the first task 2/3."""
    tasks = {"seg": {"metrics": {"miou": True, "pix": True}, "select_metric": "miou"},
             "depth": {"metrics": {"abs": False}, "select_metric": "abs"}}

    def rec(method: str, seed: int, m: dict) -> dict:
        return {"method": method, "seed": seed, "config_hash": method, "tasks": tasks,
                "config": {"benchmark": "nyu", "recipe": {"epochs": 4}, "quick": False, "hparams": {}},
                "metrics": {"test": m, "val": m}, "selected_epoch": {"seg": 4, "depth": 4}}

    stl = {"seg": {"miou": 0.40, "pix": 0.70}, "depth": {"abs": 0.50}}
    ew = {"seg": {"miou": 0.44, "pix": 0.77}, "depth": {"abs": 0.60}}  # seg +10 % on both, depth −20 %
    (st,) = summarize([rec("stl", 0, stl), rec("ew", 0, ew)])
    page = an.breakdown_markdown([st])
    row = next(ln.strip("| ").split(" | ") for ln in page.splitlines() if " | ew | " in ln)
    want = np.mean([np.mean([10.0, 10.0]), -20.0])  # −5.00 (the mean over the three metrics is 0.00)
    assert [float(x) for x in row[2:]] == pytest.approx([10.0, 10.0, -20.0, want], abs=0.006)
    assert float(row[-1]) == pytest.approx(st.rows[("ew", "ew")].delta_p[0], abs=0.006)


def _syn_rows(rows: dict) -> Setting:
    """A setting of hand-made records: ``rows`` maps method -> per-seed ``(a.acc, b.err)`` test metrics."""
    recs = []
    for method, per_seed in rows.items():
        for seed, (acc, err) in per_seed.items():
            m = {"a": {"acc": acc}, "b": {"err": err}}
            recs.append({"method": method, "seed": seed, "config_hash": method, "tasks": TASKS,
                         "config": {"benchmark": "syn", "recipe": {"epochs": 4}, "quick": True, "hparams": {}},
                         "metrics": {"test": m, "val": m}, "selected_epoch": {"a": 4, "b": 4}})
    (st,) = summarize(recs)
    return st


def test_main_table_task_columns_average_the_seeds_of_the_delta_p_column():
    """Seed 2 has a finite task-a metric but a NaN task-b metric, so its Δp is NaN and Δp averages seeds 0-1:
    the task columns must average the same seeds (a NaN-aware mean per metric would add seed 2's task a)."""
    stl = {0: (0.80, 1.0), 1: (0.80, 1.0), 2: (0.80, 1.0)}
    ew = {0: (0.84, 0.90), 1: (0.88, 0.95), 2: (0.40, float("nan"))}
    st = _syn_rows({"stl": stl, "ew": ew})
    row = st.rows[("ew", "ew")]
    ch = an.task_changes(st, row)
    want_a = 100 * (np.mean([0.84, 0.88]) - 0.80) / 0.80
    want_b = -100 * (np.mean([0.90, 0.95]) - 1.0) / 1.0
    assert ch["a"] == pytest.approx(want_a) and ch["b"] == pytest.approx(want_b)
    dp = [d for d in row.delta_p if np.isfinite(d)]
    assert len(dp) == 2 and np.mean([ch["a"], ch["b"]]) == pytest.approx(np.mean(dp))
    line = next(ln for ln in an.main_table(st) if "| ew |" in ln)
    assert f"{want_a:+.2f} | {want_b:+.2f} | " in line and "(2 of 3 finite)" in line


def test_fig1_change_uses_only_seeds_both_rows_have():
    """Fig. 1's change column: the mean of per-seed differences over the seeds both rows ran with a finite Δp,
    not the difference of the two rows' means over different seed sets."""
    stl = {s: (0.80, 1.0) for s in range(4)}
    raw = {0: (0.80, 1.0), 1: (0.90, 1.0), 2: (0.70, 1.0)}              # seeds 0-2
    log = {1: (0.92, 1.0), 2: (0.74, 1.0), 3: (0.60, 1.0)}              # seeds 1-3
    st = _syn_rows({"stl": stl, "pcgrad": raw, "pcgrad+log": log})
    first, second = st.rows[("pcgrad", "pcgrad")], st.rows[("pcgrad+log", "pcgrad+log")]
    # Δp of a row = 0.5 · 100 · (acc − 0.8)/0.8 (task b unchanged): seeds 1 and 2 gain 0.02 and 0.04 acc
    diff = np.mean([0.5 * 100 * 0.02 / 0.8, 0.5 * 100 * 0.04 / 0.8])
    assert an._paired_change_cell(first, second) == f"{diff:+.2f} (2 paired seeds)"
    unpaired = np.mean(second.delta_p) - np.mean(first.delta_p)
    assert abs(unpaired - diff) > 1.0  # the old column (−2.92 here) had the opposite sign
    other = _syn_rows({"stl": stl, "x": {3: (0.9, 1.0)}}).rows[("x", "x")]
    assert an._paired_change_cell(first, other) == "no shared seed"


# --------------------------------------------------------------------------- summary


def test_summary_puts_the_sections_side_by_side(study, capsys):
    assert main(["summary", str(study / "syn_4ep")]) == 0
    page = (study / "syn_4ep_summary.md").read_text()
    assert page == capsys.readouterr().out
    for header in ("## Tables 1-4: main table (`syn_4ep_main/`)", "## Fig. 5: β (`syn_4ep_beta/`)",
                   "## Table 5: ablation (`syn_4ep_ablation/`)", "## Fig. 1: the log transform for other methods",
                   "## Fig. 6: α (`syn_4ep_alpha/`)", "## Budget diagnostic: 3× the epochs (`syn_4ep_budget/`)"):
        assert header in page
    assert "# syn: the paper's tables at 4 quick epochs" in page
    assert "`dbmtl-jax summary " in page and "library commits abcdef0" in page
    # each run counted once, though the STL runs are listed by five tables
    n_runs = len({p.name for p in (study / "runs" / "syn").iterdir()}) - 1  # the unlisted gradvac run
    assert f"Runs: {n_runs} distinct run files" in page
    assert "| β = 0.1 (selected) | `dbmtl (beta=0.1, beta_sigma=0.0)` |" in page
    assert "Δp (%) at the selected β = 0.1 |" in page
    assert "| gradvac | not run | not run | – |" in page
    main_rows = [ln for ln in page.split("## Fig. 5")[0].splitlines() if re.match(r"\| \d", ln)]
    assert len(main_rows) == 3  # ew, pcgrad, dbmtl (STL is the – row)
    assert "| 12 epochs" not in page and "Δp (%) at 12 epochs" in page
    budget = page.split("## Budget diagnostic")[1]
    assert "| dbmtl (selected β = 0.1) |" in budget


def test_summary_sections_are_optional(study, capsys):
    import shutil

    for sec in ("beta", "ablation", "log", "alpha", "budget"):
        shutil.rmtree(study / f"syn_4ep_{sec}")
    assert main(["summary", str(study / "syn_4ep")]) == 0
    page = capsys.readouterr().out
    assert "## Tables 1-4" in page and "## Fig." not in page and "## Table 5" not in page


def test_summary_counts_the_seeds_of_its_rows(study, capsys):
    assert main(["summary", str(study / "syn_4ep")]) == 0
    assert "for 4 epochs, 3 seeds. **Not the paper's setting**" in capsys.readouterr().out
    cfg = _config("ew", {}, 4)  # a fourth seed of one row: the page no longer says "3 seeds"
    path = write_record(result_path(study / "runs", cfg, 3), record("ew", 3, (0.79, 1.02), (0.78, 1.03)))
    add_to_study(study / "syn_4ep_main", [path])
    assert main(["summary", str(study / "syn_4ep")]) == 0
    page = capsys.readouterr().out
    assert "for 4 epochs, 3–4 seeds per row. **Not" in page and "3 seeds" not in page


def test_summary_rejects_a_section_with_two_settings(study, capsys):
    """An STL row of another recipe in a section folder: which setting the table stands for would be a guess."""
    main_keys = {st.key for st in summarize(load_results(study / "syn_4ep_main"))}
    put(study, "syn_4ep_beta", "stl", (0.85, 0.90), (0.85, 0.90), epochs=12)
    put(study, "syn_4ep_beta", "dbmtl", (0.82, 0.96), (0.82, 0.95), epochs=12)
    keys = sorted(st.key for st in summarize(load_results(study / "syn_4ep_beta")))
    assert len(keys) == 2 and set(main_keys) < set(keys)
    with pytest.raises(ValueError, match="syn_4ep_beta holds 2 settings with an STL row") as e:
        an.summary_markdown(study / "syn_4ep")
    assert all(k in str(e.value) for k in keys) and "12 epochs" in str(e.value)
    assert main(["summary", str(study / "syn_4ep")]) == 1
    assert "error: " in capsys.readouterr().err and not (study / "syn_4ep_summary.md").exists()


# --------------------------------------------------------------------------- time


def test_time_per_epoch(study, tmp_path, capsys):
    out = tmp_path / "time"
    assert main(["time", str(study / "syn_4ep_main"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["time_per_epoch.csv", "time_per_epoch.md", "time_per_epoch.png"]
    with open(out / "time_per_epoch.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["stl", "ew", "pcgrad", "dbmtl"]  # by group (stl, loss, gradient, dbmtl), then time
    assert float(rows["pcgrad"]["train_time_per_epoch_s"]) == pytest.approx(0.03 * 10)
    assert float(rows["dbmtl"]["median_step_ms"]) == pytest.approx(20.0)
    assert float(rows["ew"]["epoch_time_s"]) == pytest.approx(np.mean([1.0, 1.2, 1.4]))  # epoch 1 left out
    assert rows["ew"]["group"] == "loss" and rows["pcgrad"]["grad_path"] == "per_task" and rows["stl"]["seeds"] == "3"
    assert "| pcgrad | gradient | per_task | 3 | 0.300 ± 0.000 | 30.00 |" in (out / "time_per_epoch.md").read_text()
    recs = load_results(study / "syn_4ep_alpha")
    assert [r["method"] for r in an.time_rows(recs)] == ["stl", "dbmtl"]  # rows with hyperparameters are left out
    assert main(["time", str(study / "syn_4ep_main"), "--out", str(tmp_path / "t2"), "--no-plot"]) == 0
    assert not (tmp_path / "t2" / "time_per_epoch.png").exists()


def _timed_records(method: str, step: float, **config) -> list[dict]:
    """Records of every seed of ``method`` whose config is changed by ``config`` (``device`` sets the device)."""
    device = config.pop("device", "cpu:cpu")
    out = []
    for s in SEEDS:
        r = record(method, s, (0.8, 1.0), (0.8, 1.0), step=step)
        r["config"].update(config)
        r["device"] = device
        if config or device != "cpu:cpu":  # another row (summarize counts a seed of a row once)
            r["config_hash"] = r["config_hash"][:-4] + "beef"
        out.append(r)
    return out


def test_time_does_not_pool_settings_devices_or_gradient_paths(study):
    """Runs of one label under other recipes, optimizers or devices are not averaged into one row; gradient
    paths get a row each."""
    recs = load_results(study / "syn_4ep_main") + load_results(study / "syn_4ep_budget")  # 4 and 12 epochs
    with pytest.raises(ValueError, match="the runs span 2 settings") as e:
        an.time_rows(recs)
    keys = sorted(st.key for st in summarize(recs))
    assert all(k in str(e.value) for k in keys) and "4 epochs" in str(e.value) and "12 epochs" in str(e.value)
    tables = an.time_tables(recs)
    assert [(st.key, dev) for st, dev, _ in tables] == [(k, "cpu:cpu") for k in keys]
    by_epochs = {st.recipe["epochs"]: rows for st, _, rows in tables}
    assert by_epochs[4] == an.time_rows(load_results(study / "syn_4ep_main"))
    # the β = 0.1 row counts as dbmtl's default (β does not change a step's cost): 6 runs
    assert [(r["method"], r["seeds"]) for r in by_epochs[12]] == [("stl", 3), ("ew", 3), ("dbmtl", 6)]
    assert all(r["seeds"] == 3 for r in by_epochs[4])

    base = _timed_records("stl", 0.01) + _timed_records("pcgrad", 0.03)
    sgd = _timed_records("pcgrad", 0.05, optimizer={"name": "sgdm", "momentum": 0.9})
    with pytest.raises(ValueError, match="optimizer"):
        an.time_rows(base + sgd)
    with pytest.raises(ValueError, match="on cuda:0"):
        an.time_rows(base + _timed_records("pcgrad", 0.002, device="cuda:0"))

    rows = an.time_rows(base + _timed_records("pcgrad", 0.01, grad_path="weighted"))
    pc = {r["grad_path"]: r for r in rows if r["method"] == "pcgrad"}
    assert sorted(pc) == ["per_task", "weighted"] and all(r["seeds"] == 3 for r in pc.values())
    assert pc["per_task"]["median_step_ms"] == pytest.approx(30.0)
    assert pc["weighted"]["median_step_ms"] == pytest.approx(10.0)
    md = an.time_markdown(rows)
    assert "| pcgrad | gradient | per_task | 3 |" in md and "| pcgrad | gradient | weighted | 3 |" in md


# --------------------------------------------------------------------------- index


def test_index_of_studies(study, tmp_path, capsys):
    assert main(["index", str(study)]) == 0
    page = capsys.readouterr().out
    rows = {ln.split(" | ")[0][3:-2]: ln.strip("| ").split(" | ") for ln in page.splitlines() if ln.startswith("| `")}
    assert sorted(rows) == [f"syn_4ep_{s}" for s in sorted(("main", "beta", "ablation", "log", "alpha", "budget"))]
    main_row = rows["syn_4ep_main"]
    assert main_row[1] == "syn" and main_row[2] == "quick, 4 epochs, lr 0.001, batch 8"
    assert main_row[3] == "4" and main_row[4] == "stl, dbmtl, ew, pcgrad" and main_row[5] == "0,1,2"
    assert main_row[6] == "12" and main_row[7] == f"{(9 * 60 + 3 * 30) / 60:.1f}"
    assert rows["syn_4ep_budget"][2].startswith("quick, 12 epochs")
    assert rows["syn_4ep_beta"][3] == "5"  # stl and four β rows
    n = len(list((study / "runs").rglob("*.json.gz")))
    assert f"Records under `{study.as_posix()}`: {n} (syn {n}); listed by no study: 1 (runs/syn/syn__gradvac__" in page
    assert main(["index", str(study), "--out", str(tmp_path / "INDEX.md")]) == 0
    assert (tmp_path / "INDEX.md").read_text() == page
    # every page a study folder holds is linked (paired tables too, not only the report's own pages)
    (study / "syn_4ep_main" / "paired.md").write_text("x")
    assert main(["index", str(study)]) == 0
    assert "[paired](syn_4ep_main/paired.md)" in capsys.readouterr().out
    # minutes on an accelerator are not added to CPU-core minutes: a study with both names each device
    ew_paths = sorted((study / "runs" / "syn").glob("syn__ew__*.json.gz"))
    for p in ew_paths:
        with gzip.open(p, "rt") as f:
            rec = json.load(f)
        write_record(p, dict(rec, device="gpu:NVIDIA H200", wall_time_s=90.0))
    assert main(["index", str(study)]) == 0
    rows = {ln.split(" | ")[0][3:-2]: ln.strip("| ").split(" | ") for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("| `")}
    assert rows["syn_4ep_main"][7] == f"{9 * 60 / 60:.1f} CPU + {3 * 90 / 60:.1f} NVIDIA H200"
    assert rows["syn_4ep_beta"][7] == f"{(3 * 5 * 60) / 60:.1f}"  # no EW run: CPU minutes alone, as before
