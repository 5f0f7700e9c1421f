"""The ``dbmtl-jax`` command is never silently wrong (issue 13, item 7).

* ``run``: every ``--hp`` is checked before anything is loaded or trained
  (unknown methods, unknown hyperparameter names, strings where the factory
  wants a number, values the factory rejects) -> exit status 2 and a message
  naming the option; ``--seeds`` rejects duplicates and negative seeds.
* ``report``: truncated / invalid JSON or gzip data and well-formed files with
  missing keys are reported by name with the reason, counted, and skipped; the
  report of the valid files is still written; ``--strict`` exits non-zero
  instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import warnings
from pathlib import Path

import pytest

pytest.importorskip("flax")
pytest.importorskip("matplotlib")

from dbmtl_jax import experiments as ex  # noqa: E402
from dbmtl_jax.experiments.cli import main  # noqa: E402
from dbmtl_jax.experiments.train import parse_method, read_record  # noqa: E402

NO_CACHE = ["--no-progress", "--no-compile-cache"]


def _run_cli(tmp_path, *args):
    return main(["run", "toy", "--quick", "--out", str(tmp_path), *NO_CACHE, *args])


@pytest.fixture
def no_training(monkeypatch):
    """Any run or data load fails the test: validation must happen before."""
    def boom(*a, **k):
        raise AssertionError("a run started although the options are invalid")

    monkeypatch.setattr(ex.train, "train_run", boom)
    return boom


# --------------------------------------------------------------------------- --hp


@pytest.mark.parametrize("hp,needle", [
    ("dbmtl.beta=abc", "expects a number for 'beta'"),
    ("dbmtl.beta=", "expects a number for 'beta'"),
    ("dbmtl.beta=true", "expects a number for 'beta'"),
    ("dbmtl.bta=0.5", "has no hyperparameter 'bta'"),
    ("dbmtl.alpha=bogus", "rejects"),
    ("foo.beta=0.5", "unknown method 'foo'"),
    ("stl.beta=0.5", "stl takes no hyperparameters"),
    ("pcgrad.reduction=mean", "not being run"),
])
def test_bad_hp_exits_2_naming_the_option_and_runs_nothing(tmp_path, capsys, no_training, hp, needle):
    # ew is listed first: on the old runner it trained (and wrote a file) before dbmtl failed.
    rc = _run_cli(tmp_path, "--methods", "ew,dbmtl", "--hp", hp)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"--hp {hp}" in err and needle in err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("*.json*"))


def test_hp_unknown_name_lists_the_accepted_ones(tmp_path, capsys, no_training):
    assert _run_cli(tmp_path, "--methods", "dbmtl", "--hp", "dbmtl.nope=1") == 2
    err = capsys.readouterr().err
    assert "beta" in err and "beta_sigma" in err and "num_tasks" not in err


def test_factory_errors_of_any_type_are_reported_before_any_run(tmp_path, capsys, no_training, monkeypatch):
    """Range checks in the factories (whatever they raise) fire before training, for the benchmark's T."""
    import importlib

    mod = importlib.import_module("dbmtl_jax.dbmtl")  # the module (the package attribute is the function)
    real = mod.dbmtl
    seen = []

    @functools.wraps(real)
    def checked(num_tasks, **kw):
        seen.append(num_tasks)
        if kw.get("beta") == 0.5:
            raise RuntimeError("beta 0.5 is out of range for this test")
        return real(num_tasks, **kw)

    monkeypatch.setattr(mod, "dbmtl", checked)
    rc = _run_cli(tmp_path, "--methods", "stl,ew,dbmtl", "--hp", "dbmtl.beta=0.5")
    err = capsys.readouterr().err
    assert rc == 2 and "--hp dbmtl.beta=0.5" in err and "out of range" in err
    assert seen == [ex.get_benchmark("toy").num_tasks]
    assert not list(tmp_path.rglob("*.json*"))


def test_valid_hp_still_pass_validation():
    bench = ex.get_benchmark("toy")
    specs = ex.parse_methods("stl,ew,dbmtl,dbmtl+nolog,pcgrad+log,dwa,cagrad")
    ex.train.validate_hparams(bench, specs, ex.parse_hparams([
        "dbmtl.beta=0.5", "dbmtl.beta_sigma=0.5", "dbmtl.alpha=mean", "dbmtl+nolog.alpha=0.5",
        "pcgrad+log.reduction=mean", "dwa.temperature=1", "cagrad.c=1e-1", "ew.reduction=mean",
    ]))


def test_run_experiments_validates_before_loading_data(tmp_path):
    bench = ex.get_benchmark("toy")

    def no_data(recipe):
        raise AssertionError("data loaded although the options are invalid")

    bench = dataclasses.replace(bench, data=no_data)
    for hp, match in (({"dbmtl": {"beta": "abc"}}, "beta"), ({"dbmtl": {"nope": 1}}, "nope")):
        with pytest.raises(ValueError, match=match):
            ex.run_experiments(bench, [parse_method("ew"), parse_method("dbmtl")], [0], tmp_path, hparams=hp,
                               quick=True, progress=False)
    with pytest.raises(ValueError, match="duplicate seed"):
        ex.run_experiments(bench, [parse_method("ew")], [0, 1, 0], tmp_path, quick=True, progress=False)
    with pytest.raises(ValueError, match="negative"):
        ex.run_experiments(bench, [parse_method("ew")], [-1], tmp_path, quick=True, progress=False)
    assert not list(tmp_path.rglob("*.json*"))


# --------------------------------------------------------------------------- --seeds


@pytest.mark.parametrize("seeds,needle", [
    ("0,0", "duplicate seed"),
    ("1,2,1", "duplicate seed"),
    ("0,-1", "negative"),
    ("0,a", "integers"),
    ("0", "count of seeds"),
    ("x", "expected a count"),
])
def test_bad_seeds_are_rejected(tmp_path, capsys, no_training, seeds, needle):
    with pytest.raises(SystemExit) as e:
        _run_cli(tmp_path, "--methods", "ew", "--seeds", seeds)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--seeds" in err and needle in err
    assert not list(tmp_path.rglob("*.json*"))


def test_good_seeds_parse():
    from dbmtl_jax.experiments.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["run", "toy", "--seeds", "3"]).seeds == [0, 1, 2]
    assert parse(["run", "toy", "--seeds", "0,5, 7"]).seeds == [0, 5, 7]


# --------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def good_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    assert main(["run", "toy", "--quick", "--epochs", "1", "--methods", "stl,ew", "--out", str(out), *NO_CACHE]) == 0
    files = sorted((out / "toy").glob("*.json.gz"))
    assert len(files) == 2
    return files


def _bad_dir(tmp_path, good_runs):
    d = tmp_path / "res" / "toy"
    d.mkdir(parents=True)
    for f in good_runs:
        shutil.copy(f, d / f.name)
    rec = read_record(good_runs[1])
    text = json.dumps(rec, indent=1)
    raw = good_runs[1].read_bytes()
    bad = {
        "truncated.json": text[: len(text) // 2],
        "empty.json": "",
        "missing_metrics.json": json.dumps({k: v for k, v in rec.items() if k != "metrics"}),
        "missing_hash.json": json.dumps({k: v for k, v in rec.items() if k != "config_hash"}),
        "bad_task_metrics.json": json.dumps({**rec, "metrics": {"val": {}, "test": {"big": {"mae": "high"}}}}),
        "list.json": "[1, 2]",
        "other_format.json": json.dumps({**rec, "format": "dbmtl_jax.experiment/9"}),
        "cut_short.json.gz": raw[: len(raw) // 2],
        "not_gzip.json.gz": text,
    }
    for name, content in bad.items():
        if isinstance(content, bytes):
            (d / name).write_bytes(content)
        else:
            (d / name).write_text(content)
    return tmp_path / "res", bad


def test_report_names_bad_files_and_still_reports_the_good_ones(tmp_path, capsys, good_runs):
    res_dir, bad = _bad_dir(tmp_path, good_runs)
    rc = main(["report", str(res_dir), "--no-plots"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "Traceback" not in cap.err
    for name in bad:
        assert any(name in ln for ln in cap.err.splitlines() if ln.startswith("skipped ")), name
    lines = {ln.split(": ", 1)[0].rsplit("/", 1)[-1]: ln for ln in cap.err.splitlines() if ln.startswith("skipped ")}
    assert "invalid JSON" in lines["truncated.json"] and "invalid JSON" in lines["empty.json"]
    assert "missing key(s) ['metrics']" in lines["missing_metrics.json"]
    assert "missing key(s) ['config_hash']" in lines["missing_hash.json"]
    assert "not a number" in lines["bad_task_metrics.json"]
    assert "not a run record" in lines["list.json"]
    assert "unknown format 'dbmtl_jax.experiment/9'" in lines["other_format.json"]
    assert "invalid gzip" in lines["cut_short.json.gz"] and "invalid gzip" in lines["not_gzip.json.gz"]
    assert f"skipped {len(bad)} file(s)" in cap.err
    md = (res_dir / "report.md").read_text()
    assert "| stl" in md and "| ew" in md
    assert "2 run(s)" in cap.out


def test_report_strict_exits_nonzero_and_writes_nothing(tmp_path, capsys, good_runs):
    res_dir, bad = _bad_dir(tmp_path, good_runs)
    rc = main(["report", str(res_dir), "--no-plots", "--strict"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "Traceback" not in cap.err and f"skipped {len(bad)} file(s)" in cap.err and "--strict" in cap.err
    assert not (res_dir / "report.md").exists()
    # only good files: --strict reports normally
    shutil.rmtree(res_dir)
    (res_dir / "toy").mkdir(parents=True)
    for f in good_runs:
        shutil.copy(f, res_dir / "toy" / f.name)
    assert main(["report", str(res_dir), "--no-plots", "--strict"]) == 0
    assert "skipped" not in capsys.readouterr().err
    assert (res_dir / "report.md").exists()


def test_load_results_api_reports_skipped_files(tmp_path, good_runs):
    res_dir, bad = _bad_dir(tmp_path, good_runs)
    skipped: list = []
    recs = ex.load_results(res_dir, skipped=skipped)
    assert len(recs) == 2 and sorted(Path(p).name for p, _ in skipped) == sorted(bad)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert len(ex.load_results(res_dir)) == 2
    assert len([x for x in w if "skipped" in str(x.message)]) == len(bad)
    with pytest.raises(ex.report.BadResultFiles) as e:
        ex.write_report(res_dir, tmp_path / "rep", plots=False, strict=True)
    assert len(e.value.skipped) == len(bad) and not (tmp_path / "rep" / "report.md").exists()
    assert ex.report.check_record(read_record(good_runs[0])) is None
    assert ex.report.check_record({**read_record(good_runs[0]), "format": "dbmtl_jax.experiment/1"}) is None


# --------------------------------------------------------------------------- audit 39: --import, --hp, errors

_USER_BENCH = '''
from dbmtl_jax.experiments import register_benchmark, get_benchmark
import dataclasses

@register_benchmark("{name}")
def make():
    from {helper} import DESCRIPTION
    return dataclasses.replace(get_benchmark("toy"), name="{name}", description=DESCRIPTION)
'''


@pytest.fixture
def clean_import_state(monkeypatch):
    """sys.path, sys.modules and the benchmark registry are restored after the test."""
    import sys

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    before = set(sys.modules)
    names = set(ex.BENCHMARKS)
    yield
    for m in set(sys.modules) - before:
        del sys.modules[m]
    for b in set(ex.BENCHMARKS) - names:
        ex.BENCHMARKS.pop(b)


@pytest.mark.parametrize("form", ["dotted", "file"])
def test_import_finds_modules_beside_the_user_module(tmp_path, capsys, monkeypatch, clean_import_state, form):
    # audit 39 #2: `dbmtl-jax run x --import x` from x's folder failed (python -m put cwd on sys.path, the script
    # did not), as did a .py file importing a sibling module.
    tag = form + str(abs(hash(str(tmp_path))) % 10**8)
    (tmp_path / f"helper_{tag}.py").write_text('DESCRIPTION = "from the sibling module"\n')
    (tmp_path / f"bench_{tag}.py").write_text(_USER_BENCH.format(name=f"b{tag}", helper=f"helper_{tag}"))
    if form == "dotted":
        monkeypatch.chdir(tmp_path)
        spec = f"bench_{tag}"
    else:
        monkeypatch.chdir(tmp_path.parent)
        spec = str(tmp_path / f"bench_{tag}.py")
    assert main(["list", "--import", spec]) == 0
    assert "from the sibling module" in capsys.readouterr().out


def test_failing_import_exits_2_naming_the_module(tmp_path, capsys, monkeypatch, clean_import_state, no_training):
    bad = tmp_path / "broken_bench.py"
    bad.write_text("import no_such_module_for_dbmtl_tests\n")
    for argv in (["list", "--import", str(bad)],
                 ["run", "toy", "--import", str(bad), "--out", str(tmp_path), *NO_CACHE],
                 ["list", "--import", str(tmp_path / "missing.py")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --import ") and ("no_such_module_for_dbmtl_tests" in err or "missing.py" in err)
        assert "Traceback" not in err


def test_unknown_benchmark_points_to_import(tmp_path, capsys, no_training):
    assert main(["run", "no_such_bench", "--out", str(tmp_path), *NO_CACHE]) == 2
    assert "--import" in capsys.readouterr().err


def test_hp_shared_is_rejected(tmp_path, capsys, no_training):
    # audit 39 #9: it silently replaced the benchmark's shared predicate by "every parameter shared".
    assert _run_cli(tmp_path, "--methods", "dbmtl", "--hp", "dbmtl.shared=true") == 2
    err = capsys.readouterr().err
    assert "--hp dbmtl.shared=true" in err and "Benchmark.shared" in err


def test_hp_equal_to_its_default_warns(tmp_path, capsys, no_training):
    # audit 39 #8: an explicit default is its own configuration (config hash): say so.
    with pytest.warns(UserWarning, match="equals the default of 'alpha'"):
        assert _run_cli(tmp_path, "--methods", "dbmtl", "--hp", "dbmtl.alpha=max", "--dry-run") == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # another value, and β (normalised to one hash): no warning
        assert _run_cli(tmp_path, "--methods", "dbmtl", "--hp", "dbmtl.alpha=mean", "--dry-run") == 0
        assert _run_cli(tmp_path, "--methods", "dbmtl", "--hp", "dbmtl.beta=0.9", "--dry-run") == 0


def test_stop_on_error_shows_the_traceback(tmp_path, capsys, monkeypatch):
    # audit 39 #4: a failing run showed only "Type: message".
    def fail(*a, **k):
        raise IndexError("index 133 is out of bounds")

    monkeypatch.setattr(ex.train, "train_run", fail)
    assert _run_cli(tmp_path, "--methods", "ew") == 1
    captured = capsys.readouterr()
    assert "FAILED toy ew seed 0: IndexError" in captured.out + captured.err
    with pytest.raises(IndexError, match="133"):
        _run_cli(tmp_path, "--methods", "ew", "--stop-on-error")
    assert not list(tmp_path.rglob("*.json*"))
