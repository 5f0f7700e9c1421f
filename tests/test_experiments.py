"""The experiment runner: CLI end to end, resume, report (Δp vs STL), selection on val, BYO benchmarks.

The end-to-end tests run the built-in ``toy`` benchmark through ``dbmtl-jax``'s
``main``; the others use a tiny benchmark defined here, whose data can be
built so that validation and test disagree.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import textwrap
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")
pytest.importorskip("matplotlib")
from flax import nnx  # noqa: E402

import dbmtl_jax  # noqa: E402
from dbmtl_jax import experiments as ex  # noqa: E402
from dbmtl_jax.experiments.builtin import cosine_loss, encoder_shared, mlp_hps, mse_loss  # noqa: E402
from dbmtl_jax.experiments.cli import main  # noqa: E402
from dbmtl_jax.experiments import train as tr  # noqa: E402
from dbmtl_jax.experiments.train import parse_method, parse_methods, read_record, train_run  # noqa: E402
from dbmtl_jax.metrics import MeanAbsoluteError  # noqa: E402

# --------------------------------------------------------------------------- helpers


def tiny_benchmark(name: str = "tiny", *, val_sign=(1.0, 1.0), test_sign=(1.0, 1.0), epochs: int = 3,
                   lr: float = 0.03) -> ex.Benchmark:
    """Two linear regression tasks on 4-d inputs; val/test targets can be sign-flipped per task."""
    w = np.array([[1.0, -2.0, 0.5, 1.5], [-1.0, 0.5, 2.0, -0.5]], np.float32)

    def make(n: int, seed: int, sign) -> tuple:
        x = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
        return x, tuple((s * (x @ w[t])).astype(np.float32) for t, s in enumerate(sign))

    splits = {"train": make(128, 0, (1.0, 1.0)), "val": make(48, 1, val_sign), "test": make(48, 2, test_sign)}
    tasks = tuple(ex.Task(t, mse_loss, MeanAbsoluteError, {"mae": False}) for t in ("a", "b"))
    recipe = ex.Recipe(learning_rate=lr, batch_size=16, epochs=epochs)
    return ex.Benchmark(
        name=name,
        tasks=tasks,
        data=lambda r: ex.ArraySplits(splits["train"], splits["val"], splits["test"], r),
        model=lambda rngs: mlp_hps(4, (16,), 2, rngs=rngs),
        shared=encoder_shared,
        recipe=recipe,
        quick=recipe,
    )


def np_delta_p(metrics: dict, stl: dict, hib: dict) -> float:
    """Independent NumPy Δp (Eq. 3-4): mean over tasks of the mean signed relative change, in %."""
    per_task = []
    for t, ms in hib.items():
        ch = [(1 if up else -1) * (metrics[t][m] - stl[t][m]) / abs(stl[t][m]) for m, up in ms.items()]
        per_task.append(100.0 * np.mean(ch))
    return float(np.mean(per_task))


def np_selected_epoch(val_history: list, tasks) -> int:
    """Independent reference of the MTL selection rule (1-based epoch, earliest on ties)."""
    first = val_history[0]
    scores = []
    for v in val_history:
        ch = []
        for t in tasks:
            m, up = t.select_metric, t.metrics[t.select_metric]
            d = (v[t.name][m] - first[t.name][m]) / abs(first[t.name][m])
            ch.append(d if up else -d)
        scores.append(np.mean(ch))
    return int(np.argmax(scores)) + 1


def _run(bench, method: str, data=None, **kw):
    recipe = kw.pop("recipe", bench.recipe)
    data = data if data is not None else bench.data(recipe)
    return train_run(bench, parse_method(method), 0, data, recipe, hparams=kw.pop("hparams", {}), progress=False,
                     **kw)


# --------------------------------------------------------------------------- end to end on `toy`

METHODS = ("stl", "ew", "dbmtl")


@pytest.fixture(scope="module")
def toy_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    rc = main(["run", "toy", "--methods", ",".join(METHODS), "--seeds", "2", "--quick", "--epochs", "2",
               "--out", str(out), "--no-progress", "--no-compile-cache"])
    assert rc == 0
    return out


def _records(out: Path) -> list[dict]:
    return [read_record(p) for p in sorted((out / "toy").glob("*.json.gz"))]


def test_json_files_written(toy_results):
    files = sorted((toy_results / "toy").glob("*.json*"))
    assert len(files) == len(METHODS) * 2
    seen = set()
    for f in files:
        rec = read_record(f)
        m = re.fullmatch(r"toy__(.+)__seed(\d+)__([0-9a-f]{10})\.json\.gz", f.name)
        assert m and m.group(1) == rec["method"] and int(m.group(2)) == rec["seed"]
        assert m.group(3) == rec["config_hash"] == ex.config_hash(ex.train.RunConfig(**rec["config"]))
        seen.add((rec["method"], rec["seed"]))
        assert rec["status"] == "done" and rec["config"]["quick"] is True
        assert rec["config"]["recipe"]["epochs"] == 2
        assert {"jax", "optax", "flax", "numpy", "dbmtl_jax"} <= set(rec["versions"])
        for split in ("val", "test"):
            assert set(rec["metrics"][split]) == {"big", "cls", "small"}
            assert set(rec["metrics"][split]["cls"]) == {"accuracy"}
            assert all(np.isfinite(v) for t in rec["metrics"][split].values() for v in t.values())
        assert 0.0 <= rec["metrics"]["test"]["cls"]["accuracy"] <= 1.0
        assert rec["wall_time_s"] > 0 and rec["median_step_time_s"] > 0
        assert rec["steps"] == 2 * rec["steps_per_epoch"] == 32
        h = rec["history"]
        assert h["epoch"] == [1, 2] and np.shape(h["train_loss"]) == (2, 3)
        assert all(1 <= e <= 2 for e in rec["selected_epoch"].values())
        grads = rec["method"] == "dbmtl"  # ew takes the one-backward cheap path, stl has no shared trunk
        assert rec["config"]["grad_path"] == {"stl": "stl", "ew": "weighted", "dbmtl": "per_task"}[rec["method"]]
        if grads:
            assert np.shape(h["grad_norm"]) == (2, 3) and np.shape(h["grad_cosine"]) == (2, 3, 3)
        else:
            assert h["grad_norm"] is None and h["grad_cosine"] is None
    assert seen == {(m, s) for m in METHODS for s in (0, 1)}


def test_gradient_statistics(toy_results):
    rec = next(r for r in _records(toy_results) if r["method"] == "dbmtl")
    c = rec["curve"]
    assert c["step"] == list(range(1, 33))  # 32 steps < 100 points: one point per step
    cos = np.asarray(c["grad_cosine"])
    assert np.allclose(np.diagonal(cos, axis1=1, axis2=2), 1.0, atol=1e-5)
    assert np.allclose(cos, np.swapaxes(cos, 1, 2), atol=1e-6) and np.all(np.abs(cos) <= 1 + 1e-5)
    # DB-MTL differentiates log(ℓ + ε): ‖∇ℓ_t‖ = ‖∇ log(ℓ_t + ε)‖ (ℓ_t + ε).  The file stores the curves at
    # 4 significant digits (relative error <= 5e-4 each): checked at full precision in the next test.
    loss, norm, raw = (np.asarray(c[k]) for k in ("train_loss", "grad_norm", "raw_grad_norm"))
    assert np.all(norm > 0)
    np.testing.assert_allclose(raw, norm * (loss + 1e-8), rtol=2e-3)
    # the per-epoch history is the mean of the steps of the epoch
    np.testing.assert_allclose(rec["history"]["train_loss"][0], loss[:16].mean(axis=0), rtol=2e-3)


def test_gradient_statistics_full_precision():
    """The same identities on the in-memory record of ``train_run`` (before the file's rounding)."""
    bench = tiny_benchmark(epochs=2)
    res = _run(bench, "dbmtl")
    c = res["curve"]
    loss, norm, raw = (np.asarray(c[k]) for k in ("train_loss", "grad_norm", "raw_grad_norm"))
    assert np.all(norm > 0)
    np.testing.assert_allclose(raw, norm * (loss + 1e-8), rtol=1e-5)
    spe = res["steps_per_epoch"]
    assert c["step"] == list(range(1, 2 * spe + 1))
    np.testing.assert_allclose(res["history"]["train_loss"][0], loss[:spe].mean(axis=0), rtol=1e-5)


def test_resume_skips_finished_runs(toy_results, capsys):
    files = sorted((toy_results / "toy").glob("*.json*"))
    before = {f: f.stat().st_mtime_ns for f in files}
    rc = main(["run", "toy", "--methods", ",".join(METHODS), "--seeds", "2", "--quick", "--epochs", "2",
               "--out", str(toy_results), "--no-progress", "--no-compile-cache"])
    assert rc == 0
    assert f"{len(files)} finished run(s) skipped" in capsys.readouterr().out
    assert {f: f.stat().st_mtime_ns for f in sorted((toy_results / "toy").glob("*.json*"))} == before


def _sig_digits_ok(x, digits=4) -> bool:
    if isinstance(x, list):
        return all(_sig_digits_ok(v, digits) for v in x)
    if isinstance(x, dict):
        return all(_sig_digits_ok(v, digits) for v in x.values())
    return not isinstance(x, float) or float(f"{x:.{digits}g}") == x


def test_records_are_compact_gzip_json(toy_results):
    import gzip

    for f in sorted((toy_results / "toy").glob("*.json.gz")):
        raw = f.read_bytes()
        assert raw[:2] == b"\x1f\x8b"  # gzip
        text = gzip.decompress(raw).decode()
        assert "\n" not in text and '": ' not in text  # no indentation, compact separators
        rec = json.loads(text)
        assert rec["format"] == ex.train.RESULT_FORMAT == "dbmtl_jax.experiment/2"
        assert rec["curve_digits"] == 4 and _sig_digits_ok(rec["curve"])
        assert all(_sig_digits_ok(rec["history"][k]) for k in ("train_loss", "grad_norm", "val"))
        # the table's numbers keep full precision; the per-epoch history is their 4-digit copy
        for t, ep in rec["selected_epoch"].items():
            for m, v in rec["metrics"]["val"][t].items():
                assert rec["history"]["val"][ep - 1][t][m] == float(f"{v:.4g}")
        # the same record encodes to the same bytes (fixed gzip header)
        assert ex.train.encode_record(rec) == raw


def test_resume_recognises_format_1_files_and_replaces_them(toy_results, tmp_path, capsys):
    """Older plain-JSON records count as finished; a rerun (--no-resume) replaces them, never duplicates."""
    store = tmp_path / "store"
    (store / "toy").mkdir(parents=True)
    for f in sorted((toy_results / "toy").glob("*.json.gz")):
        rec = read_record(f)
        legacy = store / "toy" / f.name.replace(".json.gz", ".json")
        legacy.write_text(json.dumps({**rec, "format": "dbmtl_jax.experiment/1"}, indent=1))
    n = len(list((store / "toy").glob("*.json")))
    args = ["run", "toy", "--methods", ",".join(METHODS), "--seeds", "2", "--quick", "--epochs", "2",
            "--out", str(store), "--no-progress", "--no-compile-cache"]
    assert main(args) == 0
    assert f"{n} finished run(s) skipped" in capsys.readouterr().out
    assert not list(store.rglob("*.json.gz"))
    skipped: list = []
    assert len(ex.load_results(store, skipped=skipped)) == n and not skipped
    assert main(["run", "toy", "--methods", "ew", "--seeds", "1", "--quick", "--epochs", "2", "--out", str(store),
                 "--no-progress", "--no-compile-cache", "--no-resume"]) == 0
    (gz,) = store.rglob("*.json.gz")
    assert gz.name.startswith("toy__ew__seed0__") and not gz.with_name(gz.name[:-3]).exists()
    recs = ex.load_results(store, skipped=skipped)
    assert len(recs) == n and not skipped
    assert sorted(r["format"][-1] for r in recs) == ["1"] * (n - 1) + ["2"]


def test_report_table_csv_plots_and_delta_p(toy_results, tmp_path, capsys):
    rc = main(["report", str(toy_results), "--out", str(tmp_path)])
    assert rc == 0
    md = (tmp_path / "report.md").read_text()
    assert md in capsys.readouterr().out
    recs = _records(toy_results)
    hib = {t: dict(info["metrics"]) for t, info in recs[0]["tasks"].items()}
    stl_runs = [r["metrics"]["test"] for r in recs if r["method"] == "stl"]
    stl = {t: {m: np.mean([r[t][m] for r in stl_runs]) for m in ms} for t, ms in hib.items()}

    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    for method in METHODS:
        runs = [r for r in recs if r["method"] == method]
        expected = [np_delta_p(r["metrics"]["test"], stl, hib) for r in runs]
        got = [r for r in rows if r["method"] == method and r["metric"] == "delta_p"]
        assert len(got) == 1 and int(got[0]["n"]) == 2
        assert float(got[0]["mean"]) == pytest.approx(np.mean(expected), rel=1e-6, abs=1e-9)
        assert float(got[0]["std"]) == pytest.approx(np.std(expected, ddof=1), rel=1e-6, abs=1e-9)
        acc = [r for r in rows if r["method"] == method and r["task"] == "cls"]
        assert float(acc[0]["mean"]) == pytest.approx(np.mean([r["metrics"]["test"]["cls"]["accuracy"] for r in runs]))
    stl_dp = [r for r in rows if r["method"] == "stl" and r["metric"] == "delta_p"][0]
    assert float(stl_dp["mean"]) == pytest.approx(0.0, abs=1e-9)  # Δp is linear: STL's mean is 0

    # markdown: one row per method; the best mean of every column is bold, nothing else
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| Method")]
    cells = {ln.split(" | ")[0][2:]: [c.strip() for c in ln.strip("| ").split(" | ")] for ln in table}
    assert set(cells) == set(METHODS)
    cols = [(t, m, up) for t, ms in hib.items() for m, up in ms.items()]
    for k, (t, m, up) in enumerate(cols, start=1):
        means = {meth: np.mean([r["metrics"]["test"][t][m] for r in recs if r["method"] == meth]) for meth in METHODS}
        best = (max if up else min)(means.values())
        for meth in METHODS:
            assert cells[meth][k].startswith("**") == (means[meth] == best), (t, m, meth)
    stl_cell = cells["stl"][len(cols) + 1].strip("*")
    assert stl_cell.startswith("+0.00 ± "), stl_cell  # STL's mean Δp is 0 up to rounding: never "-0.00" (audit 39)

    with open(tmp_path / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == len(recs) * 2 * 3  # runs x {val, test} x one metric per task
    pngs = {p.name.split("_", 1)[1] for p in tmp_path.glob("*.png")}
    assert pngs == {"train_loss.png", "grad_norm.png", "grad_cosine.png", "epochs.png"}
    assert all(p.stat().st_size > 1000 for p in tmp_path.glob("*.png"))


# --------------------------------------------------------------------------- model selection


def test_selection_uses_val_not_test():
    # Val agrees with training, test is sign-flipped: the more the model learns, the better on
    # val and the worse on test, so the val-selected epoch is late and the test-best one early.
    bench = tiny_benchmark(test_sign=(-1.0, -1.0), epochs=4)
    res = _run(bench, "ew", test_curve=True)
    h = res["history"]
    sel = np_selected_epoch(h["val"], bench.tasks)
    assert set(res["selected_epoch"].values()) == {sel}
    test_curve = [np.mean([e[t]["mae"] for t in ("a", "b")]) for e in h["test"]]
    assert int(np.argmin(test_curve)) + 1 != sel  # selecting on test would pick another epoch
    for t in ("a", "b"):
        # the reported test metrics are those of the restored val-selected parameters
        assert res["metrics"]["test"][t]["mae"] == pytest.approx(h["test"][sel - 1][t]["mae"], rel=1e-6)
        assert res["metrics"]["test"][t]["mae"] > min(e[t]["mae"] for e in h["test"])
        assert res["metrics"]["val"][t] == h["val"][sel - 1][t]


def test_stl_selects_each_task_on_its_own_val_metric():
    # Task a's val agrees with training (best late), task b's is flipped (best at epoch 1).
    bench = tiny_benchmark(val_sign=(1.0, -1.0), epochs=4)
    res = _run(bench, "stl", test_curve=True)
    h = res["history"]
    for t in ("a", "b"):
        val = [e[t]["mae"] for e in h["val"]]
        sel = int(np.argmin(val)) + 1
        assert res["selected_epoch"][t] == sel
        # each STL copy is restored from its own best epoch
        assert res["metrics"]["test"][t]["mae"] == pytest.approx(h["test"][sel - 1][t]["mae"], rel=1e-6)
    assert res["selected_epoch"]["b"] == 1 and res["selected_epoch"]["a"] > 1


# --------------------------------------------------------------------------- training steps vs references


def _manual_batches(bench, seed=0):
    data = bench.data(bench.recipe)
    rng = np.random.default_rng(seed)
    for _ in range(bench.recipe.epochs):
        yield from data.train_batches(rng)


@pytest.mark.parametrize("seed", [0, 5])
def test_seeds_pair_every_method_same_initial_parameters(seed):
    """Paired statistics assume that a seed fixes the initialisation whatever the method: every multi-task
    method's run starts from EW's parameters for that seed, and another seed starts elsewhere."""
    bench = tiny_benchmark(epochs=1)
    data = bench.data(bench.recipe)

    def initial(name: str, s: int = seed):
        t = tr._Trainer(bench, parse_method(name), bench.recipe, {}, s, data.steps_per_epoch, False, data=data)
        return [np.asarray(x) for x in jax.tree_util.tree_leaves((t.params, t.rest))]

    ref = initial("ew")
    for name in dbmtl_jax.METHODS:
        got = initial(name)
        assert len(got) == len(ref), name
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert any(not np.array_equal(a, b) for a, b in zip(initial("ew", seed + 1), ref))


def test_seeds_pair_methods_same_batches(monkeypatch):
    """The batch order of a run depends on its seed only: EW, DB-MTL and a method that draws random keys
    (RLW) see the same batches, in the same order, as the runner's documented order."""
    bench = tiny_benchmark(epochs=2)
    seen: list = []
    original = ex.ArraySplits.train_batches

    def recording(self, rng):
        for x, y in original(self, rng):
            seen[-1].append(np.asarray(x).copy())
            yield x, y

    monkeypatch.setattr(ex.ArraySplits, "train_batches", recording)
    for name in ("ew", "dbmtl", "rlw"):
        seen.append([])
        train_run(bench, parse_method(name), 3, bench.data(bench.recipe), bench.recipe, hparams={},
                  progress=False)
    monkeypatch.setattr(ex.ArraySplits, "train_batches", original)
    expected = [np.asarray(x) for x, _ in _manual_batches(bench, seed=3)]
    for batches in seen:
        assert len(batches) == len(expected) == 2 * bench.data(bench.recipe).steps_per_epoch
        for a, b in zip(batches, expected):
            np.testing.assert_array_equal(a, b)


OPTIMIZERS = {
    None: lambda lr: optax.adam(lr),
    "sgdm": lambda lr: optax.sgd(lr, momentum=0.9),
    "adam_b1_0": lambda lr: optax.adam(lr, b1=0.0),
    "adam_b2_09": lambda lr: optax.adam(lr, b2=0.9),
}
OPTIMIZER_SPECS = {None: None, "sgdm": {"name": "sgdm"}, "adam_b1_0": {"name": "adam", "b1": 0.0},
                   "adam_b2_09": {"name": "adam", "b2": 0.9}}


@pytest.mark.parametrize("opt", [None, "sgdm"])
def test_stl_equals_separate_single_task_training(opt):
    bench = tiny_benchmark(epochs=2)
    res = _run(bench, "stl", optimizer=OPTIMIZER_SPECS[opt])  # STL uses the run's optimizer too
    stl_losses = np.asarray(res["curve"]["train_loss"])
    rngs = nnx.Rngs(0)
    models = [bench.model(rngs) for _ in range(2)]  # the STL copies are built in this order
    for t, model in enumerate(models):
        tx = OPTIMIZERS[opt](bench.recipe.learning_rate)
        graphdef, params = nnx.split(model, nnx.Param)
        state = tx.init(params)

        @jax.jit
        def step(p, s, x, y, t=t):
            loss, g = jax.value_and_grad(lambda p: mse_loss(nnx.merge(graphdef, p)(x)[t], y[t]))(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

        losses = []
        for x, y in _manual_batches(bench):
            params, state, loss = step(params, state, x, y)
            losses.append(float(loss))
        np.testing.assert_allclose(stl_losses[:, t], losses, rtol=2e-5, atol=1e-6)


def _manual_losses(bench, tx, log: bool = True) -> np.ndarray:
    """Training losses of ``tx`` on ``bench``'s model (seed 0) over the runner's batches, by hand: per-task
    gradients (of log(ℓ_t + ε) when ``log``) into ``tx``, one jitted step per batch."""
    graphdef, params = nnx.split(bench.model(nnx.Rngs(0)), nnx.Param)
    state = tx.init(params)

    @jax.jit
    def step(p, s, x, y):
        def losses(p):
            out = nnx.merge(graphdef, p)(x)
            return jnp.stack([mse_loss(out[t], y[t]) for t in range(2)])

        ls, g = dbmtl_jax.value_and_task_grads(losses, log=log)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, ls

    got = []
    for x, y in _manual_batches(bench):
        params, state, ls = step(params, state, x, y)
        got.append(np.asarray(ls))
    return np.asarray(got)


@pytest.mark.parametrize("opt", [None, "sgdm", "adam_b1_0", "adam_b2_09"])
def test_dbmtl_step_matches_manual_optax_chain(opt):
    bench = tiny_benchmark(epochs=2)
    res = _run(bench, "dbmtl", hparams={"beta": 0.5}, optimizer=OPTIMIZER_SPECS[opt])
    tx = optax.chain(dbmtl_jax.dbmtl(2, beta=0.5, shared=lambda p: p.startswith("encoder")),
                     OPTIMIZERS[opt](bench.recipe.learning_rate))
    np.testing.assert_allclose(res["curve"]["train_loss"], _manual_losses(bench, tx), rtol=2e-5, atol=1e-6)


def test_mtadam_runs_with_the_learning_rate_only_not_into_a_second_adam():
    """MTAdam returns Adam's direction itself (per-task moments): the runner applies it with the learning rate only.
    Before audit 42 it chained it into optax.adam like every other method: another update, silently."""
    bench = tiny_benchmark(epochs=2)
    res = _run(bench, "mtadam")
    lr = bench.recipe.learning_rate
    mtadam = dbmtl_jax.get_method("mtadam", 2, shared=lambda p: p.startswith("encoder"))
    want = _manual_losses(bench, optax.chain(mtadam, optax.scale_by_learning_rate(lr)), log=False)  # raw losses
    np.testing.assert_allclose(res["curve"]["train_loss"], want, rtol=2e-5, atol=1e-6)
    old = _manual_losses(bench, optax.chain(mtadam, optax.adam(lr)), log=False)  # the pre-fix chain: the check has teeth
    assert np.max(np.abs(old[-1] - want[-1])) > 1e-3
    # the config records it (a new hash: the old records are other runs), and --optimizer does not apply
    spec = parse_method("mtadam")
    cfg = ex.train.make_config(bench, spec, bench.recipe, quick=False, hparams={})
    assert cfg.to_dict()["final"] == "learning_rate" and ex.train.RunConfig(**cfg.to_dict()) == cfg
    legacy = {k: v for k, v in cfg.to_dict().items() if k != "final"}
    assert ex.config_hash(ex.train.RunConfig(**legacy)) != ex.config_hash(cfg)
    assert "final" not in ex.train.make_config(bench, parse_method("ew"), bench.recipe, quick=False,
                                               hparams={}).to_dict()
    for opt in ("sgdm", {"name": "adam", "b1": 0.0}):
        with pytest.raises(ValueError, match="itself an Adam-type optimizer"):
            ex.train.make_config(bench, spec, bench.recipe, quick=False, hparams={}, optimizer=opt)
    # reports tell the pre-fix rows apart
    from dbmtl_jax.experiments.report import Row

    assert Row("mtadam", "x", legacy).label == "mtadam → adam" and Row("mtadam", "y", cfg.to_dict()).label == "mtadam"


def test_replay_steps_follows_the_runs_training_and_exposes_the_method_state():
    """``replay_steps`` retraces a run (init, batches, keys, jitted step) so that what a record does not keep
    (here DB-MTL's EMA norms) can be read; its losses are the run's, step by step."""
    bench = tiny_benchmark(epochs=2)
    res = _run(bench, "dbmtl", hparams={"beta": 0.5}, grad_stats=True)
    steps = list(ex.replay_steps(bench, "dbmtl", bench.recipe, 0, hparams={"dbmtl": {"beta": 0.5}}))
    np.testing.assert_allclose(res["curve"]["train_loss"], [np.asarray(s.losses) for s in steps], rtol=2e-5, atol=1e-6)
    assert [s.step for s in steps] == list(range(1, len(steps) + 1)) and {s.epoch for s in steps} == {1, 2}
    db = steps[-1].opt_state[0]
    assert isinstance(db, dbmtl_jax.DBMTLState) and int(db.count) == len(steps) and np.all(np.asarray(db.norms) > 0)
    other = list(ex.replay_steps(bench, "dbmtl", bench.recipe, 1, hparams={"dbmtl": {"beta": 0.5}}))
    assert not np.allclose(np.asarray(other[0].losses), np.asarray(steps[0].losses))  # the seed matters


def test_a_non_finite_first_validation_does_not_pin_the_selection_to_epoch_1():
    """If a task's selection metric is NaN at epoch 1 only (e.g. 0/0 before the model predicts anything),
    the selection score's reference is the first epoch where every task is finite; with epoch 1 as the
    reference every later score would be -inf and epoch 1 would be kept silently."""
    calls = {"n": 0}

    class NanOnceMAE(MeanAbsoluteError):
        def compute(self, state):
            calls["n"] += 1
            out = super().compute(state)
            return {k: jnp.nan for k in out} if calls["n"] == 1 else out  # task "a", epoch 1's validation

    bench = tiny_benchmark(epochs=4)
    tasks = (ex.Task("a", mse_loss, NanOnceMAE, {"mae": False}), bench.tasks[1])
    bench = dataclasses.replace(bench, tasks=tasks)
    res = _run(bench, "ew")
    val = res["history"]["val"]
    assert math.isnan(val[0]["a"]["mae"]) and all(math.isfinite(v["a"]["mae"]) for v in val[1:])
    assert res["selection"].endswith("vs epoch 2")
    scores = res["history"]["selection_score"]
    assert scores[0] == -math.inf and scores[1] == 0.0 and all(math.isfinite(x) for x in scores[1:])
    best = int(np.argmax(scores)) + 1
    assert res["selected_epoch"] == {"a": best, "b": best} and best > 1


def test_a_zero_reference_metric_is_named_not_silently_mixed_into_the_score():
    """Audit 38 #5: a selection metric of exactly 0 at the reference epoch makes that task's term an absolute
    change (a relative one is undefined), on another scale than the others': the run warns and its record's
    ``selection`` names the task."""
    calls = {"n": 0}

    class ZeroOnceMAE(MeanAbsoluteError):
        def compute(self, state):
            calls["n"] += 1
            out = super().compute(state)
            return {k: 0.0 * v for k, v in out.items()} if calls["n"] == 1 else out  # task "a", epoch 1's val

    bench = tiny_benchmark(epochs=3)
    bench = dataclasses.replace(bench, tasks=(ex.Task("a", mse_loss, ZeroOnceMAE, {"mae": False}), bench.tasks[1]))
    with pytest.warns(UserWarning, match=r"validation a mae of epoch 1, the selection score's reference, is exactly 0"):
        res = _run(bench, "ew")
    assert res["history"]["val"][0]["a"]["mae"] == 0.0
    assert res["selection"] == ("mean signed relative change of select_metric on val vs epoch 1 "
                                "(absolute change for a mae, whose reference value is 0)")
    va, vb = ([v[t]["mae"] for v in res["history"]["val"]] for t in ("a", "b"))
    expected = [(-(x - va[0]) - (y - vb[0]) / abs(vb[0])) / 2 for x, y in zip(va, vb)]  # MAE: lower is better
    np.testing.assert_allclose(res["history"]["selection_score"], expected, rtol=1e-6)
    assert _run(tiny_benchmark(epochs=2), "ew")["selection"].endswith("vs epoch 1")  # no zero: unchanged text


def test_stl_task_without_a_finite_validation_epoch_keeps_epoch_1_as_multi_task_runs_do():
    """A task whose selection metric is never finite on val: the multi-task rule keeps epoch 1 (and says so);
    STL recorded "epoch 0" and took that copy's test metrics from the last epoch's parameters (its val metrics
    from ``history.val[-1]``), so a Δp against STL compared epoch 1 with the last epoch."""

    split = {"now": None}

    class Tracking:  # remembers which split is being evaluated
        def __init__(self, inner):
            self.inner, self.steps_per_epoch = inner, inner.steps_per_epoch

        def train_batches(self, rng):
            return self.inner.train_batches(rng)

        def eval_batches(self, name):
            split["now"] = name
            yield from self.inner.eval_batches(name)

    class NanValMAE(MeanAbsoluteError):  # task b's val MAE is NaN at every epoch, its test MAE finite
        def compute(self, state):
            out = super().compute(state)
            return {k: jnp.nan for k in out} if split["now"] == "val" else out

    bench = tiny_benchmark(epochs=3)
    real = bench.data
    bench = dataclasses.replace(bench, data=lambda r: Tracking(real(r)),
                                tasks=(bench.tasks[0], ex.Task("b", mse_loss, NanValMAE, {"mae": False})))
    ew = _run(bench, "ew")
    assert ew["selected_epoch"] == {"a": 1, "b": 1} and "epoch 1 kept" in ew["selection"]
    res = _run(bench, "stl", test_curve=True)
    h = res["history"]
    assert res["selected_epoch"]["b"] == 1
    assert res["selected_epoch"]["a"] == int(np.argmin([e["a"]["mae"] for e in h["val"]])) + 1
    assert "task(s) b:" in res["selection"] and "epoch 1 kept" in res["selection"]
    assert math.isnan(res["metrics"]["val"]["b"]["mae"])
    # copy b is restored from epoch 1, not left at the last epoch
    test_b = [e["b"]["mae"] for e in h["test"]]
    assert test_b[0] != test_b[-1]
    assert res["metrics"]["test"]["b"]["mae"] == pytest.approx(test_b[0], rel=1e-6)


def test_resume_and_tables_refuse_records_made_with_other_tasks_or_twice(tmp_path, capsys):
    """A task whose metric direction changed under the same config hash would be skipped on resume and
    mixed into one table; a copied record would count its seed twice. Both are errors now."""
    bench = tiny_benchmark("tasks_drift", epochs=1)
    out = tmp_path / "store"
    (path,) = ex.run_experiments(bench, [parse_method("ew")], [0], out, progress=False)
    flipped = dataclasses.replace(bench, tasks=tuple(
        ex.Task(t.name, t.loss, t.metric, {"mae": True}) for t in bench.tasks))  # "higher is better" now
    with pytest.raises(ValueError, match="made with other tasks"):
        ex.run_experiments(flipped, [parse_method("ew")], [0], out, progress=False)
    ex.run_experiments(flipped, [parse_method("ew")], [1], out, progress=False)  # a new seed: fine
    from dbmtl_jax.experiments.cli import main
    from dbmtl_jax.experiments.report import load_results, summarize

    with pytest.raises(ValueError, match="tasks .* differ"):
        summarize(load_results(out))
    assert main(["report", str(out), "--no-plots"]) == 1
    assert "differ from those of the other runs" in capsys.readouterr().err
    (out / "tasks_drift" / sorted((out / "tasks_drift").glob("*seed1*"))[0].name).unlink()
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / Path(path).name).write_bytes(Path(path).read_bytes())
    with pytest.raises(ValueError, match="two records of run ew seed 0"):
        summarize(load_results(tmp_path))
    assert main(["paired", str(tmp_path), "--baseline", "ew"]) == 1
    assert "a seed counts once" in capsys.readouterr().err


def test_built_in_providers_reject_data_options_they_do_not_read():
    """An option a provider ignores would give the run a new config hash with the same data."""
    from dbmtl_jax.experiments.builtin import check_data_options

    toy = ex.get_benchmark("toy")
    with pytest.raises(ValueError, match=r"unknown data option\(s\) \['limt'\] .* takes: none"):
        toy.data(toy.quick.replace(data_options={"limt": 5}))
    r = toy.quick.replace(data_options={"limit": 100, "cutoff": 5.0})
    with pytest.raises(ValueError, match=r"\['cutoff'\] .* takes: limit"):
        check_data_options(r, ("limit",))  # what the qm9 provider calls
    check_data_options(toy.quick.replace(data_options={"limit": 100}), ("limit",))


def test_dense_data_options_are_checked_before_any_data_is_read():
    dense = ex.get_benchmark("dense")
    for bad, match in (({"num_tests": 900}, r"\['num_tests'\] .* takes: num_val, num_test"),
                       ({"num_test": 0}, "num_test must be a positive int"),
                       ({"num_val": 2.5}, "num_val must be a positive int"),
                       ({"num_test": True}, "num_test must be a positive int")):
        with pytest.raises(ValueError, match=match):
            dense.data(dense.recipe.replace(data_options=bad))


def test_cli_data_option_sets_the_recipe_and_names_the_setting(tmp_path, capsys):
    """--data-option NAME=VALUE reaches the provider (JSON values), changes the config hash, and titles say it."""
    from dbmtl_jax.experiments.train import parse_data_options as _data_options

    assert _data_options(["num_test=2000", "name=abc", "x=[1, 2]"]) == {"num_test": 2000, "name": "abc", "x": [1, 2]}
    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        _data_options(["num_test"])
    assert main(["run", "toy", "--quick", "--epochs", "1", "--methods", "ew", "--seeds", "1", "--out",
                 str(tmp_path), "--data-option", "limt=5", "--no-progress", "--no-compile-cache"]) == 2
    assert "unknown data option(s) ['limt']" in capsys.readouterr().err
    assert main(["run", "toy", "--quick", "--epochs", "1", "--methods", "ew", "--seeds", "1", "--out",
                 str(tmp_path), "--data-option", "oops", "--no-progress", "--no-compile-cache"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("reported", [3, 9])
def test_a_provider_whose_batches_disagree_with_steps_per_epoch_is_an_error(reported):
    """The schedule (cosine decays over epochs × steps_per_epoch), logging and checkpoints count on the
    provider's steps_per_epoch; a provider that yields another number of batches would silently train
    at a wrong (or zero) learning rate."""
    bench = tiny_benchmark(epochs=2)
    recipe = bench.recipe.replace(lr_schedule="cosine")
    data = bench.data(recipe)
    assert data.steps_per_epoch == 8

    class Wrong:
        steps_per_epoch = reported

        def train_batches(self, rng):
            return data.train_batches(rng)

        def eval_batches(self, split):
            return data.eval_batches(split)

    message = ("yielded more than 3 training batches in epoch 1, not the 3" if reported < 8
               else "yielded 8 training batches in epoch 1, not the 9")
    with pytest.raises(ValueError, match=message):
        _run(bench, "ew", data=Wrong(), recipe=recipe)
    wrong = dataclasses.replace(bench, data=lambda r: Wrong())
    with pytest.raises(ValueError, match=message):  # a replay checks it too
        list(ex.replay_steps(wrong, "ew", recipe, 0))


def test_lr_schedule_is_validated_and_hashed():
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        ex.Recipe(learning_rate=1e-3, batch_size=8, epochs=2, lr_schedule="linear")
    with pytest.raises(ValueError, match="give one of them"):
        ex.Recipe(learning_rate=1e-3, batch_size=8, epochs=2, lr_schedule="cosine", lr_decay_epoch=1)
    bench = tiny_benchmark()
    spec = parse_method("dbmtl")
    base = ex.train.make_config(bench, spec, bench.recipe, quick=False, hparams={})
    cos = ex.train.make_config(bench, spec, bench.recipe.replace(lr_schedule="cosine"), quick=False, hparams={})
    assert "lr_schedule" not in base.recipe and cos.recipe["lr_schedule"] == "cosine"
    assert ex.config_hash(base) != ex.config_hash(cos)
    assert ex.Recipe(**cos.recipe).lr_schedule == "cosine"  # a stored recipe rebuilds


def test_cli_lr_schedule_flag(tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["run", "toy", "--quick", "--epochs", "2", "--methods", "ew", "--out", str(out),
               "--no-progress", "--no-compile-cache", "--lr-schedule", "cosine", "--study", str(tmp_path / "st")])
    assert rc == 0
    (rec,) = _records(out)
    assert rec["config"]["recipe"]["lr_schedule"] == "cosine"
    rc = main(["run", "toy", "--quick", "--epochs", "2", "--methods", "ew", "--out", str(out),
               "--no-progress", "--no-compile-cache", "--lr-schedule", "recipe"])
    assert rc == 0
    assert sorted("lr_schedule" in r["config"]["recipe"] for r in _records(out)) == [False, True]
    # The two schedules are two settings, and every page says which is which.
    res = ex.write_report(out, plots=False)
    assert len(res["settings"]) == 2 and res["markdown"].count("cosine decay to 0") == 1
    from dbmtl_jax.experiments.analysis import index_markdown
    from dbmtl_jax.experiments.paired import paired_report
    from dbmtl_jax.experiments.report import load_results, summarize

    assert "cosine decay to 0" in index_markdown(tmp_path)
    text = paired_report(summarize(load_results(out)), baseline="ew")
    assert text.count("### toy") == 2 and text.count("cosine decay to 0") == 1
    with pytest.raises(SystemExit):  # argparse rejects an unknown choice, naming the flag
        main(["run", "toy", "--quick", "--out", str(out), "--no-progress", "--no-compile-cache",
              "--lr-schedule", "step"])
    assert "--lr-schedule" in capsys.readouterr().err


def test_cli_data_size_flags(tmp_path, capsys):
    """--max-train-examples / --max-eval-examples set the recipe's caps: hashed, trained on, and named in titles."""
    out = tmp_path / "res"
    rc = main(["run", "toy", "--epochs", "1", "--batch-size", "16", "--methods", "ew", "--out", str(out),
               "--no-progress", "--no-compile-cache", "--max-train-examples", "48", "--max-eval-examples", "20"])
    assert rc == 0
    (rec,) = _records(out)
    assert rec["config"]["recipe"]["max_train_examples"] == 48 and rec["config"]["recipe"]["max_eval_examples"] == 20
    assert rec["steps_per_epoch"] == 3  # 48 examples in batches of 16
    res = ex.write_report(out, plots=False)
    assert "≤48 train examples" in res["markdown"] and "≤20 val/test examples" in res["markdown"]
    rc = main(["run", "toy", "--epochs", "1", "--methods", "ew", "--out", str(out), "--no-progress",
               "--no-compile-cache", "--max-eval-examples", "0"])
    assert rc == 2 and "max_eval_examples must be a positive int" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ew", "dwa", "ew+log", "uw+log"])
def test_cheap_path_equals_per_task_path(method):
    bench = tiny_benchmark(epochs=2)
    data = bench.data(bench.recipe)
    assert ex.train.uses_cheap_path(parse_method(method), grad_stats=False)
    cheap = _run(bench, method, data=data)
    full = _run(bench, method, data=data, grad_stats=True)
    assert cheap["history"]["grad_norm"] is None and full["history"]["grad_norm"] is not None
    np.testing.assert_allclose(cheap["curve"]["train_loss"], full["curve"]["train_loss"], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- bring your own benchmark


def test_register_and_get_benchmark():
    name = f"byo_{uuid.uuid4().hex[:8]}"
    try:
        @ex.register_benchmark(name)
        def factory() -> ex.Benchmark:
            return tiny_benchmark(name)

        assert name in ex.BENCHMARKS and ex.get_benchmark(name).name == name
        with pytest.raises(ValueError, match="already registered"):
            ex.register_benchmark(name, factory)
        ex.register_benchmark(name, tiny_benchmark(name, epochs=1), overwrite=True)
        assert ex.get_benchmark(name).recipe.epochs == 1
        ex.register_benchmark(name, lambda: "not a benchmark", overwrite=True)
        with pytest.raises(TypeError, match="not a Benchmark"):
            ex.get_benchmark(name)
    finally:
        ex.BENCHMARKS.pop(name, None)
    with pytest.raises(ValueError, match="unknown benchmark"):
        ex.get_benchmark(name)
    with pytest.raises(ValueError, match="name"):
        ex.register_benchmark("has space", tiny_benchmark)


def test_byo_benchmark_through_cli_import(tmp_path, capsys):
    name = f"byo_{uuid.uuid4().hex[:8]}"
    module = tmp_path / "my_bench.py"
    module.write_text(textwrap.dedent(f"""
        import numpy as np
        from dbmtl_jax.experiments import ArraySplits, Benchmark, Recipe, Task, register_benchmark
        from dbmtl_jax.experiments.builtin import bce_loss, binary_labels, mlp_hps, mse_loss
        from dbmtl_jax.metrics import Accuracy, MeanAbsoluteError

        def split(n, seed):
            x = np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)
            return x, (x[:, 0] * 2, (x[:, 1] > 0).astype(np.float32))

        @register_benchmark("{name}")
        def make():
            return Benchmark(
                name="{name}",
                tasks=(Task("reg", mse_loss, MeanAbsoluteError, {{"mae": False}}),
                       Task("clf", bce_loss, Accuracy, {{"accuracy": True}}, metric_input=binary_labels)),
                data=lambda r: ArraySplits(split(64, 0), split(32, 1), split(32, 2), r),
                model=lambda rngs: mlp_hps(3, (8,), 2, rngs=rngs),
                shared=lambda p: p.startswith("encoder"),
                recipe=Recipe(learning_rate=1e-2, batch_size=16, epochs=2),
                quick=Recipe(learning_rate=1e-2, batch_size=16, epochs=1),
                description="user benchmark",
            )
    """))
    try:
        assert main(["list", "--import", str(module)]) == 0
        assert name in capsys.readouterr().out
        out = tmp_path / "res"
        assert main(["run", name, "--import", str(module), "--methods", "pcgrad+log", "--quick", "--out", str(out),
                     "--no-progress", "--no-compile-cache", "--hp", "pcgrad.reduction=mean"]) == 0
        (f,) = (out / name).glob("*.json.gz")
        rec = read_record(f)
        assert rec["method"] == "pcgrad+log" and rec["config"]["log"] is True
        assert rec["config"]["hparams"] == {"reduction": "mean"} and rec["config"]["grad_path"] == "per_task"
        assert set(rec["metrics"]["test"]) == {"reg", "clf"}
        assert rec["cpu_cores"] == len(os.sched_getaffinity(0))  # 1 under `taskset -c N`
        assert isinstance(rec["cpu_model"], str) and rec["cpu_model"] == ex.train._cpu_model()
        assert rec["allocator"] == ("tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "default")
    finally:
        ex.BENCHMARKS.pop(name, None)


# --------------------------------------------------------------------------- parsing and validation


def test_parse_method_labels_and_log_defaults():
    assert parse_method("dbmtl") == ex.MethodSpec("dbmtl", True, "dbmtl")
    assert parse_method("dbmtl+nolog") == ex.MethodSpec("dbmtl", False, "dbmtl+nolog")
    assert parse_method("dbmtl+log").label == "dbmtl"
    assert parse_method("PCGrad+log") == ex.MethodSpec("pcgrad", True, "pcgrad+log")
    assert parse_method("ew+nolog").label == "ew"
    assert parse_method("stl") == ex.MethodSpec("stl", False, "stl")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        parse_method("nope")
    with pytest.raises(ValueError, match="suffix"):
        parse_method("ew+sqrt")
    with pytest.raises(ValueError, match="stl"):
        parse_method("stl+log")
    specs = ex.parse_methods("stl, ew, pcgrad", force_log=True)
    assert [s.label for s in specs] == ["stl", "ew+log", "pcgrad+log"]
    assert [s.label for s in ex.parse_methods("all")] == ["stl", *dbmtl_jax.METHODS]


def test_parse_hparams():
    hp = ex.parse_hparams(["dbmtl.beta=0.5", "dbmtl.alpha=mean", "pcgrad+log.reduction=sum", "cagrad.c=1e-1",
                           "x.flag=true", "x.n=none"])
    assert hp == {"dbmtl": {"beta": 0.5, "alpha": "mean"}, "pcgrad+log": {"reduction": "sum"},
                  "cagrad": {"c": 0.1}, "x": {"flag": True, "n": None}}
    for bad in ("dbmtl=0.5", "dbmtl.beta", ".beta=1"):
        with pytest.raises(ValueError, match="METHOD.NAME=VALUE"):
            ex.parse_hparams([bad])


def test_config_hash_ignores_seed_and_tracks_config():
    bench = tiny_benchmark()
    spec = parse_method("dbmtl")
    base = ex.train.make_config(bench, spec, bench.recipe, quick=False, hparams={})
    same = ex.train.make_config(bench, spec, bench.recipe, quick=False, hparams={})
    assert ex.config_hash(base) == ex.config_hash(same)
    p0 = ex.train.result_path("out", base, 0)
    p1 = ex.train.result_path("out", base, 1)
    assert p0 != p1 and p0.name.split("__")[-1] == p1.name.split("__")[-1]
    others = [
        ex.train.make_config(bench, spec, bench.recipe, quick=False, hparams={"beta": 0.5}),
        ex.train.make_config(bench, spec, bench.recipe, quick=True, hparams={}),
        ex.train.make_config(bench, spec, bench.recipe.replace(epochs=5), quick=False, hparams={}),
        ex.train.make_config(bench, parse_method("dbmtl+nolog"), bench.recipe, quick=False, hparams={}),
    ]
    assert len({ex.config_hash(c) for c in [base, *others]}) == 5


def test_default_optimizer_keeps_existing_config_hashes():
    """Runs with the default optimizer hash exactly as the result files written before the option existed."""
    root = Path(__file__).resolve().parent.parent / "results"
    files = sorted([*root.glob("runs/multimnist/*.json*"), *root.glob("multimnist_quick12/multimnist/*.json*")])
    if not files:
        pytest.skip("no stored multimnist result files under results/")
    bench = ex.get_benchmark("multimnist")
    # The store also holds runs with other optimizers (results/README.md §11); those record an "optimizer" key.
    # MTAdam's records made before audit 42 (chained into Adam) are other runs than today's: their configs lack "final".
    records = [(f, rec) for f in files if "optimizer" not in (rec := read_record(f))["config"]
               and rec["config"]["base_method"] not in ex.train.SELF_OPTIMIZING][:40]
    assert len(records) >= 20
    for f, rec in records:
        cfg = rec["config"]
        spec = parse_method(rec["method"])
        for optimizer in (None, "adam", {"name": "adam", "b1": 0.9}):
            new = ex.train.make_config(bench, spec, ex.Recipe(**cfg["recipe"]), quick=cfg["quick"],
                                       hparams=cfg["hparams"], grad_stats=cfg["grad_path"] == "per_task",
                                       optimizer=optimizer)
            assert new.to_dict() == cfg, f.name
            assert ex.config_hash(new) == rec["config_hash"] == f.name.rsplit("__", 1)[1].split(".")[0], f.name


def test_optimizer_option_is_validated_and_recorded():
    norm = ex.train.normalize_optimizer
    assert norm(None) is None and norm("adam") is None and norm({"name": "adam", "b1": 0.9}) is None
    assert norm("sgdm") == {"name": "sgdm", "momentum": 0.9}
    assert norm({"name": "sgdm", "momentum": 0}) == {"name": "sgdm", "momentum": 0.0}
    assert norm({"name": "adam", "b1": 0}) == {"name": "adam", "b1": 0.0}
    # b2 came later: listed only when set, so the Adam b1 = 0 records made before keep their configs and hashes
    assert norm({"name": "adam", "b2": 0.999}) is None
    assert norm({"name": "adam", "b1": 0.0, "b2": 0.999}) == {"name": "adam", "b1": 0.0}
    assert norm({"name": "adam", "b2": 0.9}) == {"name": "adam", "b1": 0.9, "b2": 0.9}
    for bad, match in (("rmsprop", "unknown optimizer"), ({"name": "adam", "b1": 1.0}, r"\[0, 1\)"),
                       ({"name": "adam", "b2": 1.0}, r"b2 must be a number in \[0, 1\)"),
                       ({"name": "sgdm", "b1": 0.0}, "no option"), ({"name": "adam", "b1": "x"}, "b1"),
                       ({"name": "sgdm", "momentum": float("nan")}, "momentum")):
        with pytest.raises(ValueError, match=match):
            norm(bad)
    bench = tiny_benchmark()
    spec = parse_method("dbmtl")
    base = ex.train.make_config(bench, spec, bench.recipe, quick=False, hparams={})
    sgd = ex.train.make_config(bench, spec, bench.recipe, quick=False, hparams={}, optimizer="sgdm")
    adam0 = ex.train.make_config(bench, spec, bench.recipe, quick=False, hparams={},
                                 optimizer={"name": "adam", "b1": 0.0})
    assert "optimizer" not in base.to_dict() and sgd.to_dict()["optimizer"] == {"name": "sgdm", "momentum": 0.9}
    adam_b2 = ex.train.make_config(bench, spec, bench.recipe, quick=False, hparams={},
                                   optimizer={"name": "adam", "b2": 0.9})
    assert len({ex.config_hash(c) for c in (base, sgd, adam0, adam_b2)}) == 4
    assert ex.train.RunConfig(**sgd.to_dict()) == sgd  # a stored config rebuilds to the same hash


@pytest.mark.parametrize("flags,expected", [
    (["--optimizer", "sgdm"], {"name": "sgdm", "momentum": 0.9}),
    (["--optimizer", "sgdm", "--momentum", "0.5"], {"name": "sgdm", "momentum": 0.5}),
    (["--b1", "0"], {"name": "adam", "b1": 0.0}),
    (["--b2", "0.9"], {"name": "adam", "b1": 0.9, "b2": 0.9}),
])
def test_cli_optimizer_quick_toy_run(tmp_path, capsys, flags, expected):
    out = tmp_path / "res"
    rc = main(["run", "toy", "--quick", "--epochs", "1", "--methods", "stl,dbmtl", "--out", str(out),
               "--no-progress", "--no-compile-cache", *flags])
    assert rc == 0
    recs = _records(out)
    assert sorted(r["method"] for r in recs) == ["dbmtl", "stl"]
    for rec in recs:  # STL gets the same optimizer as the MTL methods
        assert rec["config"]["optimizer"] == expected
        assert rec["config_hash"] == ex.config_hash(ex.train.RunConfig(**rec["config"]))
        assert all(np.isfinite(v) for m in rec["metrics"]["test"].values() for v in m.values())
    default = ex.train.make_config(ex.get_benchmark("toy"), parse_method("dbmtl"),
                                   ex.get_benchmark("toy").quick.replace(epochs=1), quick=True, hparams={})
    assert ex.config_hash(default) not in {r["config_hash"] for r in recs}
    res = ex.write_report(out, plots=False)
    (st,) = res["settings"]  # one setting: STL is the Δp reference of the same optimizer
    opts = ", ".join(f"{k} = {v}" for k, v in expected.items() if k != "name")
    title = f"SGD ({opts})" if expected["name"] == "sgdm" else f"Adam ({opts})"
    assert st.optimizer == expected and f"optimizer {title}" in res["markdown"]
    assert all(np.isfinite(np.mean(r.delta_p)) for r in st.rows.values())


def test_cli_optimizer_options_must_match(tmp_path, capsys):
    for flags, match in ((["--optimizer", "sgdm", "--b1", "0"], "--b1"),
                         (["--momentum", "0.5"], "--momentum"),
                         (["--optimizer", "sgdm", "--b2", "0.9"], "--b2 is an option of --optimizer adam"),
                         (["--b2", "1.5"], "--b2"),
                         (["--optimizer", "sgdm", "--momentum", "1"], "momentum")):
        rc = main(["run", "toy", "--quick", "--out", str(tmp_path), "--no-progress", "--no-compile-cache", *flags])
        assert rc == 2
        assert match in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.json*"))


def test_bad_method_hyperparameters_fail_before_training(tmp_path):
    bench = tiny_benchmark()
    with pytest.raises(ValueError, match="dbmtl"):
        ex.run_experiments(bench, [parse_method("dbmtl")], [0], tmp_path, hparams={"dbmtl": {"nope": 1}},
                           progress=False)
    with pytest.raises(ValueError, match="not being run"):
        ex.run_experiments(bench, [parse_method("ew")], [0], tmp_path, hparams={"pcgrad": {"reduction": "sum"}},
                           progress=False)
    with pytest.raises(ValueError, match="alpha"):
        ex.run_experiments(bench, [parse_method("dbmtl")], [0], tmp_path, hparams={"dbmtl": {"alpha": "bogus"}},
                           progress=False)
    assert not list(tmp_path.rglob("*.json*"))


def test_task_and_recipe_validation():
    with pytest.raises(ValueError, match="select_metric"):
        ex.Task("t", mse_loss, MeanAbsoluteError, {"mae": False}, select_metric="rmse")
    with pytest.raises(ValueError, match="bool"):
        ex.Task("t", mse_loss, MeanAbsoluteError, {"mae": "low"})
    with pytest.raises(ValueError, match="no metric"):
        ex.Task("t", mse_loss, MeanAbsoluteError, {})
    assert ex.Task("t", mse_loss, MeanAbsoluteError, {"mae": False, "count": True}).select_metric == "mae"
    with pytest.raises(ValueError, match="batch_size"):
        ex.Recipe(learning_rate=1e-3, batch_size=0, epochs=1)
    with pytest.raises(ValueError, match="learning_rate"):
        ex.Recipe(learning_rate=-1.0, batch_size=1, epochs=1)
    with pytest.raises(ValueError, match="duplicate"):
        b = tiny_benchmark()
        ex.Benchmark(name="x", tasks=(b.tasks[0], b.tasks[0]), data=b.data, model=b.model, recipe=b.recipe,
                     quick=b.quick)


def test_recipe_rejects_non_finite_or_bool_rates():
    """A NaN weight decay was accepted (every step NaN) and recorded in the config as null, JSON having no NaN; an
    infinite decay factor made the learning rate infinite from the decay epoch on; True was a learning rate of 1."""
    base = {"learning_rate": 1e-3, "batch_size": 1, "epochs": 1}
    for kw in ({"weight_decay": float("nan")}, {"weight_decay": float("inf")}, {"weight_decay": True},
               {"weight_decay": "0.1"}, {"lr_decay_epoch": 1, "lr_decay_factor": float("inf")},
               {"lr_decay_epoch": 1, "lr_decay_factor": float("nan")}, {"lr_decay_factor": -0.5},
               {"learning_rate": True}):
        with pytest.raises(ValueError, match=next(iter(kw)) if len(kw) == 1 else "lr_decay_factor"):
            ex.Recipe(**{**base, **kw})
    ex.Recipe(**base, weight_decay=0, lr_decay_epoch=1, lr_decay_factor=1)  # ints are numbers

def test_array_splits_batches():
    x = np.arange(50, dtype=np.float32)[:, None]
    ys = (np.arange(50), np.arange(50) * 2)
    split = (x, ys)
    r = ex.Recipe(learning_rate=1e-3, batch_size=8, epochs=1, eval_batch_size=16)
    data = ex.ArraySplits(split, split, split, r)
    assert data.steps_per_epoch == 6  # ragged last batch dropped
    batches = list(data.train_batches(np.random.default_rng(0)))
    assert len(batches) == 6 and all(b[0].shape == (8, 1) for b in batches)
    seen = np.concatenate([b[1][0] for b in batches])
    assert len(set(seen.tolist())) == 48
    for bx, (y0, y1) in batches:  # inputs and every target stay aligned
        np.testing.assert_array_equal(bx[:, 0], y0)
        np.testing.assert_array_equal(y1, 2 * y0)
    ev = list(data.eval_batches("test"))
    assert [len(b[0]) for b in ev] == [16, 16, 16, 2]
    np.testing.assert_array_equal(np.concatenate([b[1][0] for b in ev]), np.arange(50))
    capped = ex.ArraySplits(split, split, split, r.replace(max_train_examples=20, max_eval_examples=10,
                                                           max_steps_per_epoch=1))
    assert capped.steps_per_epoch == 1 and capped.size("train") == 20 and capped.size("val") == 10
    again = ex.ArraySplits(split, split, split, r.replace(max_train_examples=20, max_eval_examples=10))
    a = np.concatenate([b[1][0] for b in capped.eval_batches("val")])
    assert np.array_equal(a, np.concatenate([b[1][0] for b in again.eval_batches("val")]))  # fixed subset
    with pytest.raises(ValueError, match="fewer than the batch size"):
        ex.ArraySplits(split, split, split, r.replace(batch_size=64))
    with pytest.raises(ValueError, match="leading"):
        ex.ArraySplits((x, (np.arange(3),)), split, split, r)


def test_report_without_stl_has_no_delta_p(tmp_path):
    bench = tiny_benchmark(epochs=1)
    ex.run_experiments(bench, [parse_method("ew")], [0], tmp_path, progress=False, echo=lambda s: None)
    res = ex.write_report(tmp_path, plots=False)
    assert res["num_runs"] == 1
    assert "No STL run" in res["markdown"]
    row = [ln for ln in res["markdown"].splitlines() if ln.startswith("| ew")][0]
    assert row.split(" | ")[-3] == "—"


def test_builtin_benchmarks_are_registered_and_cheap_to_build():
    expected = {"toy": 3, "adult": 4, "adult_l1": 4, "qm9": 11, "multimnist": 2, "multifashion": 2, "dense": 3}
    assert set(expected) <= set(ex.BENCHMARKS)
    for name, num_tasks in expected.items():
        bench = ex.get_benchmark(name)  # factories load no data
        assert bench.name == name and bench.num_tasks == num_tasks
        assert bench.quick.epochs <= bench.recipe.epochs
        hib = bench.higher_is_better
        assert all(t.select_metric in hib[t.name] for t in bench.tasks)
    dense = ex.get_benchmark("dense").higher_is_better
    assert dense["normal"] == {"mean": False, "median": False, "within_11.25": True, "within_22.5": True,
                               "within_30": True}


def test_binary_labels_accuracy_matches_numpy_and_nan_outputs_make_it_nan():
    from dbmtl_jax.experiments.builtin import binary_labels
    from dbmtl_jax.metrics import Accuracy

    rng = np.random.default_rng(0)
    logit = rng.normal(size=64).astype(np.float32)
    logit[:3] = 0.0  # a zero logit is class 0, as ``logit > 0``
    target = (rng.random(64) < 0.5).astype(np.float32)
    metric = Accuracy()

    def accuracy(lg, tg):
        return float(metric.compute(metric.update(metric.init(), *binary_labels(lg, tg)))["accuracy"])

    assert accuracy(logit, target) == pytest.approx(np.mean((logit > 0) == (target > 0.5)))
    bad_logit = logit.copy()
    bad_logit[5] = np.nan  # a diverged model: must not score as "predicted 0"
    assert math.isnan(accuracy(bad_logit, target))
    bad_target = target.copy()
    bad_target[7] = np.nan
    assert math.isnan(accuracy(logit, bad_target))


def test_cosine_loss_matches_numpy_and_has_finite_gradient_at_zero_prediction():
    """Regression: a pixel predicted exactly 0 gave a NaN gradient (d‖p‖ at 0) and stalled dense STL."""
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    pred[0, 1, 2] = 0.0  # an exactly-zero prediction (e.g. a ReLU head that died on this pixel)
    target = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    target /= np.linalg.norm(target, axis=-1, keepdims=True)
    target[1, 3, 3] = 0.0  # an invalid (zero) ground-truth pixel is left out
    valid = np.any(target != 0, axis=-1)
    norm = np.linalg.norm(pred, axis=-1, keepdims=True)
    p = pred / np.maximum(norm, 1e-6)
    expected = np.sum((1.0 - np.sum(p * target, -1)) * valid) / valid.sum()
    np.testing.assert_allclose(float(cosine_loss(jnp.asarray(pred), jnp.asarray(target))), expected, rtol=1e-6)
    g = jax.grad(cosine_loss)(jnp.asarray(pred), jnp.asarray(target))
    assert bool(jnp.all(jnp.isfinite(g)))
    # away from zero the gradient is the analytic one: (t − cos·p̂) / ‖p‖ per valid pixel, / #valid
    cos = np.sum(p * target, -1, keepdims=True)
    g_np = -(target - cos * p) / np.maximum(norm, 1e-6) * valid[..., None] / valid.sum()
    ok = norm[..., 0] > 0
    np.testing.assert_allclose(np.asarray(g)[ok], g_np[ok], rtol=1e-4, atol=1e-6)


def test_a_last_update_that_leaves_nonfinite_parameters_is_counted(tmp_path, monkeypatch):
    """nonfinite_steps counts steps with non-finite losses; the last step's update is seen by no later
    loss, so the state left at the end is checked too (a run that diverged never reads as clean)."""
    bench = ex.get_benchmark("toy")
    recipe = dataclasses.replace(bench.quick, epochs=2)
    calls: list[int] = []

    class PoisonLast(tr._Trainer):
        def __init__(self, benchmark, spec, recipe, hparams, seed, steps_per_epoch, *rest, **kw):
            super().__init__(benchmark, spec, recipe, hparams, seed, steps_per_epoch, *rest, **kw)
            inner, total = self.train_step, recipe.epochs * steps_per_epoch

            def step(*args):
                params, *out = inner(*args)
                calls.append(1)
                if len(calls) == total:  # finite losses, then an update that leaves NaN parameters
                    params = jax.tree_util.tree_map(lambda x: x * np.nan, params)
                return (params, *out)

            self.train_step = step

    monkeypatch.setattr(tr, "_Trainer", PoisonLast)
    (path,) = ex.run_experiments(bench, parse_methods("ew"), [0], tmp_path, recipe=recipe, progress=False,
                                 echo=lambda s: None)
    rec = read_record(path)
    assert len(calls) == rec["steps"] == 2 * rec["steps_per_epoch"]
    assert rec["nonfinite_steps"] == 1
    assert set(rec["selected_epoch"].values()) == {1}  # the NaN last epoch is not selected


def test_a_metric_that_takes_the_data_provider_is_built_from_the_run_s_own_data():
    """``Task.metric(data)``: a metric that depends on the loaded data (qm9's MAE scale is the training std)
    is built from the provider the run trains on, not from whichever data set was loaded last."""
    base = tiny_benchmark(epochs=1)
    seen = []

    def scaled_mae(data):
        seen.append(data)
        return MeanAbsoluteError(scale=data.scale)

    def data(recipe):
        splits = base.data(recipe)
        splits.scale = recipe.learning_rate * 100  # stands for a statistic of the loaded data
        return splits

    tasks = tuple(dataclasses.replace(t, metric=scaled_mae) for t in base.tasks)
    bench = dataclasses.replace(base, tasks=tasks, data=data)
    mine, other = bench.data(bench.recipe), bench.data(bench.recipe.replace(learning_rate=0.05))
    res = _run(bench, "ew", data=mine)
    plain = _run(base, "ew")  # same training, unscaled MAE
    assert seen and all(d is mine for d in seen) and other is not mine
    for t in ("a", "b"):
        np.testing.assert_allclose(res["metrics"]["test"][t]["mae"], plain["metrics"]["test"][t]["mae"] * 3.0,
                                   rtol=1e-5)
    with pytest.raises(ValueError, match="takes the data provider"):
        tasks[0].make_metric()


def test_cross_entropy_loss_skips_the_ignore_label():
    """-1 (NYUv2's and Cityscapes' unlabelled pixels) was read by optax as the last class and trained; the loss
    is now the mean over labelled positions (NumPy reference), and unchanged, bit for bit, without -1."""
    from dbmtl_jax.experiments.builtin import cross_entropy_loss

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 6, 13)).astype(np.float32)
    labels = rng.integers(-1, 13, size=(2, 5, 6)).astype(np.int32)
    assert (labels == -1).any()
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    valid = labels >= 0
    ref = -np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0][valid].mean()
    np.testing.assert_allclose(float(cross_entropy_loss(jnp.asarray(logits), jnp.asarray(labels))), ref, rtol=1e-6)
    assert float(cross_entropy_loss(jnp.asarray(logits), jnp.full((2, 5, 6), -1, jnp.int32))) == 0.0
    full = np.where(valid, labels, 3)
    old = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(full)))
    assert float(jax.jit(cross_entropy_loss)(jnp.asarray(logits), jnp.asarray(full))) == float(jax.jit(lambda: old)())


def test_resume_refuses_records_of_a_model_that_changed_under_the_same_name(tmp_path):
    """Editing a benchmark's model under the same name left the config hash unchanged, so its old records were
    skipped as finished and mixed with the new model's in one table. A changed parameter count is an error now;
    the STL record (T copies of the model) is checked against the STL model's count."""
    bench = tiny_benchmark("model_drift", epochs=1)
    out = tmp_path / "store"
    ex.run_experiments(bench, [parse_method("ew"), parse_method("stl")], [0], out, progress=False)
    assert ex.train.model_num_params(bench) == read_record(next((out / "model_drift").glob("*__ew__*")))["num_params"]
    wider = dataclasses.replace(bench, model=lambda rngs: mlp_hps(4, (32,), 2, rngs=rngs))
    for method in ("ew", "stl"):
        with pytest.raises(ValueError, match=r"model of [\d,]+ parameters, benchmark 'model_drift' builds one of"):
            ex.run_experiments(wider, [parse_method(method)], [0], out, progress=False)
    ex.run_experiments(bench, [parse_method("ew")], [0], out, progress=False)  # the same model resumes as before


def test_model_output_mistakes_are_named():
    """One concatenated [B, T] array gave "got LinearizeTracer"; a [B, 1] output against a [B] target trained on a
    broadcast [B, B] loss and failed only in the metric, without the task's name."""
    import warnings as _w

    bench = tiny_benchmark("outputs", epochs=1)

    class Concat(nnx.Module):
        def __init__(self, rngs):
            self.inner = mlp_hps(4, (16,), 2, rngs=rngs)

        def __call__(self, x):
            return jnp.stack(self.inner(x), axis=-1)

    with pytest.raises(ValueError, match=r"tuple of 2 per-task outputs.*one array of shape \(16, 2\)"):
        _run(dataclasses.replace(bench, model=Concat), "ew")

    class Unsqueezed(nnx.Module):
        def __init__(self, rngs):
            self.inner = mlp_hps(4, (16,), 2, rngs=rngs)

        def __call__(self, x):
            return tuple(o[:, None] for o in self.inner(x))

    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always")
        with pytest.raises(ValueError, match=r"task 'a': .*shape"):
            _run(dataclasses.replace(bench, model=Unsqueezed), "ew")
    assert any("task 'a': the output has shape (16, 1) and the target (16,)" in str(w.message) for w in caught)


def test_task_losses_take_pytree_targets_under_jit():
    """QM9's targets are (values, graph_mask): the output-shape warning must not read a pytree as an array (it
    did, and every QM9 run failed with TracerArrayConversionError)."""

    def masked_mse(out, y):
        values, mask = y
        return jnp.sum(mask * (out - values) ** 2) / jnp.maximum(jnp.sum(mask), 1.0)

    tasks = (ex.Task("a", masked_mse, MeanAbsoluteError, {"mae": False}),)
    out, y = jnp.ones(4), (jnp.zeros(4), jnp.array([1.0, 1.0, 0.0, 0.0]))
    loss = jax.jit(lambda o, t: ex.train._task_losses(tasks, (o,), (t,)))(out, y)
    np.testing.assert_allclose(loss, [1.0])
