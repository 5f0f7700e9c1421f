"""One record store, many studies: ``run --study``, study indices (``runs.txt``), resume by hash, dry runs.

A run's record lives once in the store (``--out``, ``<store>/<benchmark>/<run id>.json.gz``); a
study folder lists the records of its table in ``runs.txt`` and ``load_results`` / ``report`` read
them from there.  Runs finished in the store (in either format) are listed, never rerun or copied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("flax")
pytest.importorskip("matplotlib")

from dbmtl_jax import experiments as ex  # noqa: E402
from dbmtl_jax.experiments import store as record_store  # noqa: E402
from dbmtl_jax.experiments.cli import main  # noqa: E402
from dbmtl_jax.experiments.train import read_record, read_study  # noqa: E402

FLAGS = ["--quick", "--epochs", "1", "--no-progress", "--no-compile-cache"]


def _run(store: Path, methods: str, *extra: str) -> int:
    return main(["run", "toy", "--methods", methods, "--out", str(store), *FLAGS, *extra])


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """results/runs (the store), results/a (stl, ew) and results/b (stl reused, dbmtl)."""
    root = tmp_path_factory.mktemp("results")
    store = root / "runs"
    assert _run(store, "stl,ew", "--study", str(root / "a")) == 0
    assert _run(store, "stl,dbmtl", "--study", str(root / "b")) == 0
    return root


def test_store_holds_each_run_once_and_studies_list_them(studies):
    files = sorted(p.name.split("__")[1] for p in (studies / "runs" / "toy").iterdir())
    assert files == ["dbmtl", "ew", "stl"]  # stl trained once, for study a, and listed by b
    a, b = read_study(studies / "a"), read_study(studies / "b")
    assert all(e.startswith("../runs/toy/toy__") and e.endswith(".json.gz") for e in a + b)
    assert [e.split("__")[1] for e in a] == ["ew", "stl"] and [e.split("__")[1] for e in b] == ["dbmtl", "stl"]
    assert set(a) & set(b) == {e for e in a if "__stl__" in e}
    assert (studies / "a" / "runs.txt").read_text().startswith("#")
    assert sorted(r["method"] for r in ex.load_results(studies / "a")) == ["ew", "stl"]
    assert sorted(r["method"] for r in ex.load_results(studies / "b")) == ["dbmtl", "stl"]
    assert len(ex.load_results(studies)) == 3  # the whole tree: each record once


def test_report_of_a_study_folder(studies, tmp_path):
    shutil.copytree(studies, tmp_path / "r")
    assert main(["report", str(tmp_path / "r" / "b"), "--no-plots", "--strict"]) == 0
    md = (tmp_path / "r" / "b" / "report.md").read_text()
    assert "| stl" in md and "| dbmtl" in md and "| ew" not in md


def test_resume_lists_finished_runs_without_training(studies, tmp_path, capsys, monkeypatch):
    root = tmp_path / "r"
    shutil.copytree(studies, root)
    monkeypatch.setattr(ex.train, "train_run", lambda *a, **k: pytest.fail("a finished run was retrained"))
    assert _run(root / "runs", "ew,dbmtl", "--study", str(root / "c")) == 0
    assert "2 finished run(s) skipped" in capsys.readouterr().out
    assert [e.split("__")[1] for e in read_study(root / "c")] == ["dbmtl", "ew"]
    # a study listing a run again (or in the other format) keeps one entry per run
    ex.train.add_to_study(root / "c", [root / "runs" / "toy" / Path(read_study(root / "c")[0]).name])
    assert len(read_study(root / "c")) == 2


def test_dry_run_writes_nothing(studies, tmp_path, capsys):
    root = tmp_path / "r"
    shutil.copytree(studies, root)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert _run(root / "runs", "stl,pcgrad", "--study", str(root / "d"), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "finished: " in out and "__stl__" in out.split("finished: ")[1].splitlines()[0]
    assert "to run: " in out and "__pcgrad__" in out.split("to run: ")[1].splitlines()[0]
    assert "1 finished, 1 to run" in out
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_study_index_problems_are_reported(studies, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(studies, root)
    entries = read_study(root / "a")
    # an entry written for the older .json name still finds the .json.gz record; a missing one is reported
    ex.train.write_study(root / "a", [entries[0].replace(".json.gz", ".json"), entries[1],
                                      "../runs/toy/toy__ew__seed9__0123456789.json.gz"])
    skipped: list = []
    recs = ex.load_results(root / "a", skipped=skipped)
    assert len(recs) == 2
    assert len(skipped) == 1 and "seed9" in skipped[0][0] and "listed in" in skipped[0][1]
    with pytest.raises(ex.report.BadResultFiles):
        ex.write_report(root / "a", plots=False, strict=True)


def test_a_json_twin_of_a_json_gz_record_is_superseded(studies, tmp_path):
    store = tmp_path / "runs"
    shutil.copytree(studies / "runs", store)
    gz = sorted((store / "toy").glob("*.json.gz"))[0]
    rec = read_record(gz)
    gz.with_name(gz.name[:-3]).write_text(json.dumps({**rec, "format": "dbmtl_jax.experiment/1"}, indent=1))
    skipped: list = []
    recs = ex.load_results(store, skipped=skipped)
    assert len(recs) == 3 and all(r["_path"].endswith(".json.gz") for r in recs)
    assert len(skipped) == 1 and "superseded" in skipped[0][1]


# --------------------------------------------------------------------------- dbmtl-jax compact


def _legacy(rec: dict, **changes) -> str:
    """A format /1 file of ``rec``: indented JSON, full-precision (here: perturbed) curves."""
    rec = {**rec, "format": "dbmtl_jax.experiment/1", **changes}
    rec.pop("curve_digits", None)
    rec["curve"] = {k: v if k == "step" else _perturb(v) for k, v in rec["curve"].items()}
    return json.dumps(rec, indent=1)


def _perturb(x):
    if isinstance(x, list):
        return [_perturb(v) for v in x]
    return x * (1 + 1e-7) if isinstance(x, float) else x


@pytest.fixture
def legacy_tree(studies, tmp_path):
    """An old-layout results tree: s1/toy/{stl,ew}, s2/toy/{stl (a copy), dbmtl}, s3/toy/ew (trained again)."""
    recs = {r["method"]: r for r in ex.load_results(studies / "runs")}
    for r in recs.values():
        r.pop("_path")
    old = tmp_path / "old"

    def put(study, method, **changes):
        r = recs[method]
        name = f"toy__{method}__seed{r['seed']}__{r['config_hash']}.json"
        (old / study / "toy").mkdir(parents=True, exist_ok=True)
        (old / study / "toy" / name).write_text(_legacy(r, **changes))

    put("s1", "stl")
    put("s1", "ew")
    put("s2", "stl")
    put("s2", "dbmtl")
    put("s3", "ew", created="2099-01-01T00:00:00+0000", wall_time_s=123.0)
    return old, recs


def test_compact_converts_in_place_and_is_idempotent(legacy_tree, capsys):
    old, recs = legacy_tree
    before = {p: ex.train.read_record(p) for p in old.rglob("*.json")}
    assert main(["compact", str(old)]) == 0
    assert "5 record(s) converted" in capsys.readouterr().out
    assert not list(old.rglob("*.json")) and len(list(old.rglob("*.json.gz"))) == 5
    for p, v1 in before.items():
        v2 = read_record(p.with_name(p.name + ".gz"))
        assert v2["format"] == "dbmtl_jax.experiment/2" and v2["metrics"] == v1["metrics"]
        assert v2 == ex.train.compact_record(v1)
    snapshot = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    assert main(["compact", str(old)]) == 0
    assert "0 record(s) converted" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == snapshot


def test_compact_into_a_store_keeps_each_run_once_and_indexes_the_studies(legacy_tree, capsys):
    old, recs = legacy_tree
    reports = {}
    for s in ("s1", "s2", "s3"):
        reports[s] = ex.write_report(old / s, old.parent / f"rep_{s}", plots=False)["markdown"]
    assert main(["compact", str(old), "--store", str(old / "runs")]) == 0
    out = capsys.readouterr().out
    assert "5 moved into" in out and "1 identical copies, 1 reruns of a run and 0 second runs" in out
    assert sorted(p.name.split("__")[1] for p in (old / "runs" / "toy").iterdir()) == ["dbmtl", "ew", "stl"]
    assert not (old / "s1" / "toy").exists()  # emptied benchmark folders are removed
    for s, methods in (("s1", ["ew", "stl"]), ("s2", ["dbmtl", "stl"]), ("s3", ["ew"])):
        assert [e.split("__")[1] for e in read_study(old / s)] == methods
        assert all(e.startswith("../runs/toy/") for e in read_study(old / s))
    # tables are unchanged, except the timing of a run trained twice (the earlier one is kept)
    assert ex.write_report(old / "s1", old.parent / "r1", plots=False)["markdown"] == reports["s1"]
    assert ex.write_report(old / "s2", old.parent / "r2", plots=False)["markdown"] == reports["s2"]
    ew = next(r for r in ex.load_results(old / "s3"))
    assert ew["wall_time_s"] == recs["ew"]["wall_time_s"]
    (rerun,) = ew["reruns"]
    assert rerun["wall_time_s"] == 123.0 and rerun["created"].startswith("2099")
    assert rerun["source"] == "s3/toy/" + Path(read_study(old / "s3")[0]).name.replace(".json.gz", ".json")
    # a second pass changes nothing
    snapshot = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    assert main(["compact", str(old), "--store", str(old / "runs")]) == 0
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == snapshot


def test_compact_refuses_to_merge_different_results_of_one_run(legacy_tree, capsys):
    old, recs = legacy_tree
    stl = recs["stl"]
    name = f"toy__stl__seed{stl['seed']}__{stl['config_hash']}.json"
    bad_metrics = json.loads(json.dumps(stl["metrics"]))
    bad_metrics["test"]["big"]["mae"] += 1.0
    (old / "s4" / "toy").mkdir(parents=True)
    (old / "s4" / "toy" / name).write_text(_legacy(stl, metrics=bad_metrics))
    assert main(["compact", str(old), "--store", str(old / "runs")]) == 1
    cap = capsys.readouterr()
    assert "conflict" in cap.err and "metrics" in cap.err and "s4" in cap.err
    assert (old / "s4" / "toy" / name).exists()  # left in place, not merged, not lost


def test_merge_records_keeps_the_earlier_run_whatever_the_order(legacy_tree):
    _, recs = legacy_tree
    a = ex.train.compact_record(recs["ew"])
    b = {**a, "created": "1999-01-01T00:00:00+0000", "wall_time_s": 1.0}
    for x, y in ((a, b), (b, a)):
        m = record_store.merge_records(x, y, a_source="x", b_source="y")
        assert m["created"].startswith("1999") and m["wall_time_s"] == 1.0
        assert [e["wall_time_s"] for e in m["reruns"]] == [a["wall_time_s"]]
    assert "reruns" not in record_store.merge_records(a, dict(a))
    # the cores, CPU model and allocator a run used are provenance too (a rerun with tcmalloc is the same run)
    c = {**a, "created": "2030-01-01T00:00:00+0000", "cpu_cores": 1, "cpu_model": "Some CPU", "allocator": "tcmalloc"}
    m = record_store.merge_records(a, c)
    assert m["created"] == a["created"] and m["reruns"][0]["allocator"] == "tcmalloc"
    assert m["reruns"][0]["cpu_model"] == "Some CPU"


def test_merge_records_compares_data_summaries_within_their_tolerance(legacy_tree):
    """A rerun on another machine may see last-bit differences in preprocessed data (same run); other data is a
    conflict, not a rerun; a record from before summaries takes the other's."""
    _, recs = legacy_tree
    a = {k: v for k, v in ex.train.compact_record(recs["ew"]).items() if k != "data_summary"}
    summ = {s: {"batches": 2, "rows": 32, "arrays": [[1.5, 20.25, 3.0]]} for s in ("train", "val", "test")}
    near = {s: {**v, "arrays": [[1.5 * (1 + 1e-9), 20.25, 3.0]]} for s, v in summ.items()}
    far = {**summ, "test": {**summ["test"], "arrays": [[1.6, 20.25, 3.0]]}}
    with_s = {**a, "data_summary": summ, "created": "2030-01-01T00:00:00+0000"}
    assert record_store.merge_records(a, with_s)["data_summary"] == summ
    assert record_store.merge_records(with_s, {**with_s, "data_summary": near})["data_summary"] == summ
    with pytest.raises(record_store.RecordConflict, match="other data .test split, array 0"):
        record_store.merge_records(with_s, {**with_s, "data_summary": far})


def test_run_study_script_parses():
    script = Path(__file__).resolve().parent.parent / "results" / "run_study.sh"
    bash = shutil.which("bash")
    if bash is None or not script.exists():
        pytest.skip("no bash or no results/run_study.sh")
    import subprocess

    assert subprocess.run([bash, "-n", str(script)], capture_output=True).returncode == 0
