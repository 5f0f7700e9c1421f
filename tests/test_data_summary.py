"""The data summary kept in records and checkpoints (dbmtl_jax.experiments.data_summary): a finished run or a
checkpoint made from other data is not resumed into a table as if it were this data's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dbmtl_jax import experiments as ex
from dbmtl_jax.datasets._cache import DatasetUnavailableError
from dbmtl_jax.experiments import train as tr
from dbmtl_jax.experiments.data_summary import data_summary, summary_difference
from dbmtl_jax.experiments.train import parse_methods, read_record, write_record


def _splits(scale_val: float = 1.0, n: int = 128):
    rng = np.random.default_rng(3)
    make = lambda k: (rng.normal(size=(k, 4)).astype(np.float32),  # noqa: E731
                      (rng.normal(size=k).astype(np.float32), rng.integers(0, 3, size=k).astype(np.int32)))
    train, val, test = make(n), make(40), make(40)
    val = (val[0], (val[1][0] * np.float32(scale_val), val[1][1]))
    return train, val, test


def test_summary_matches_numpy_sums_over_one_epoch_and_the_evaluation_splits():
    train, val, test = _splits()
    recipe = ex.Recipe(learning_rate=0.1, batch_size=24, epochs=1, eval_batch_size=16)
    s = data_summary(ex.ArraySplits(train, val, test, recipe))
    rows = np.random.default_rng(0).permutation(128)[: (128 // 24) * 24]  # the epoch drawn with rng 0
    for split, (x, (y, c)), idx in (("train", train, rows), ("val", val, None), ("test", test, None)):
        arrays = [a if idx is None else a[idx] for a in (x, y, c)]
        assert s[split]["rows"] == len(arrays[0])
        assert s[split]["batches"] == (5 if split == "train" else 3)
        for got, a in zip(s[split]["arrays"], arrays):
            a = a.astype(np.float64)
            np.testing.assert_allclose(got, [a.sum(), (a * a).sum(), np.abs(a).sum()], rtol=1e-9)


def test_difference_ignores_rounding_but_names_a_changed_value_split_and_array():
    recipe = ex.Recipe(learning_rate=0.1, batch_size=16, epochs=1)
    base = _splits()
    s = data_summary(ex.ArraySplits(*base, recipe))
    assert summary_difference(s, s) is None
    train, val, test = base
    nudged = (train[0] * np.float32(1 + 2 ** -22), train[1])  # last-bit differences (another CPU's preprocessing)
    assert summary_difference(s, data_summary(ex.ArraySplits(nudged, val, test, recipe))) is None
    x = test[0].copy()
    x[7, 2] += 0.5  # one value of 160
    msg = summary_difference(s, data_summary(ex.ArraySplits(train, val, (x, test[1]), recipe)))
    assert msg is not None and msg.startswith("test split, array 0: sum")
    msg = summary_difference(s, data_summary(ex.ArraySplits(*_splits(scale_val=2.0), recipe)))
    assert msg is not None and msg.startswith("val split, array 1")
    fewer = ex.Recipe(learning_rate=0.1, batch_size=16, epochs=1, max_eval_examples=32)
    assert summary_difference(s, data_summary(ex.ArraySplits(*base, fewer))) == "val split: 3 batches then, 2 now"
    assert summary_difference(s, {**s, "val": {"rows": 40}}) == "the val split is missing from a summary, or malformed"
    assert summary_difference(s, "garbage") == "a summary is not a mapping (a malformed record?)"
    perm = np.random.default_rng(1).permutation(40)  # a permutation within a split: the documented blind spot
    shuffled = (test[0][perm], tuple(t[perm] for t in test[1]))
    assert summary_difference(s, data_summary(ex.ArraySplits(train, val, shuffled, recipe))) is None


def _bench(name: str, scale: dict):
    """A two-task benchmark whose val targets are scaled by ``scale['val']`` at load time (same config hash)."""
    from dbmtl_jax.experiments.builtin import encoder_shared, mlp_hps, mse_loss
    from dbmtl_jax.metrics import MeanAbsoluteError

    def data(recipe):
        rng = np.random.default_rng(0)
        make = lambda k: (rng.normal(size=(k, 4)).astype(np.float32),  # noqa: E731
                          tuple(rng.normal(size=k).astype(np.float32) for _ in range(2)))
        train, val, test = make(64), make(32), make(32)
        val = (val[0], tuple(t * np.float32(scale["val"]) for t in val[1]))
        return ex.ArraySplits(train, val, test, recipe)

    tasks = tuple(ex.Task(t, mse_loss, MeanAbsoluteError, {"mae": False}) for t in ("a", "b"))
    recipe = ex.Recipe(learning_rate=0.01, batch_size=16, epochs=4)
    return ex.Benchmark(name=name, tasks=tasks, data=data, model=lambda rngs: mlp_hps(4, (8,), 2, rngs=rngs),
                        shared=encoder_shared, recipe=recipe, quick=recipe)


def test_resume_refuses_a_finished_run_made_from_other_data(tmp_path):
    """Another copy of a local data set gave the same config hash, and its finished records were skipped as done
    and mixed into one table with runs on this copy. Records keep the data summary; a mismatch is an error."""
    scale = {"val": 1.0}
    bench = _bench("data_drift", scale)
    out = tmp_path / "store"
    path, second = ex.run_experiments(bench, parse_methods("ew"), [0, 1], out, progress=False, echo=lambda s: None)
    for p in (path, second):  # every run of an invocation keeps it
        assert summary_difference(read_record(p)["data_summary"], data_summary(bench.data(bench.recipe))) is None
    scale["val"] = 1.01
    with pytest.raises(ValueError, match=r"made with other data than benchmark 'data_drift' gives now \(val split"):
        ex.run_experiments(bench, parse_methods("ew,stl"), [0], out, progress=False, echo=lambda s: None)
    assert not list((out / "data_drift").glob("*__stl__*"))  # refused before anything ran
    second.unlink()
    scale["val"] = 1.0
    ex.run_experiments(bench, parse_methods("ew"), [0], out, progress=False, echo=lambda s: None)  # same data: skipped
    old = read_record(path)
    del old["data_summary"]  # a record from before summaries: nothing to compare, skipped as before
    write_record(path, old)
    scale["val"] = 1.01
    messages: list[str] = []
    ex.run_experiments(bench, parse_methods("ew"), [0], out, progress=False, echo=messages.append)
    assert any("1 finished run(s) skipped" in m for m in messages)


def test_finished_runs_are_skipped_with_a_note_when_the_data_is_not_available(tmp_path):
    scale = {"val": 1.0}
    bench = _bench("data_gone", scale)
    out = tmp_path / "store"
    ex.run_experiments(bench, parse_methods("ew"), [0], out, progress=False, echo=lambda s: None)

    def gone(recipe):
        raise DatasetUnavailableError("the files are gone")

    messages: list[str] = []
    ex.run_experiments(dataclasses.replace(bench, data=gone), parse_methods("ew"), [0], out, progress=False,
                       echo=messages.append)
    assert any("not checked against it" in m for m in messages) and any("skipped" in m for m in messages)
    with pytest.raises(DatasetUnavailableError):  # a run to do still needs the data
        ex.run_experiments(dataclasses.replace(bench, data=gone), parse_methods("ew"), [1], out, progress=False,
                           echo=lambda s: None)


def test_a_checkpoint_of_other_data_with_the_same_epoch_length_is_discarded(tmp_path, monkeypatch):
    """The checkpoint check compared only the steps per epoch: a run stopped part-way continued on other data of
    the same size. Its record now equals an uninterrupted run on the new data."""
    scale = {"val": 1.0}
    bench = _bench("ckpt_drift", scale)
    stop_at, real = {"n": 3, "calls": 0}, tr.evaluate

    def stopping(trainer, data, split, params, rest):
        if split == "val":
            stop_at["calls"] += 1
            if stop_at["calls"] == stop_at["n"]:
                raise KeyboardInterrupt
        return real(trainer, data, split, params, rest)

    monkeypatch.setattr(tr, "evaluate", stopping)
    with pytest.raises(KeyboardInterrupt):
        ex.run_experiments(bench, parse_methods("dbmtl"), [0], tmp_path / "cut", progress=False,
                           echo=lambda s: None, checkpoint_every_s=0.0)
    monkeypatch.setattr(tr, "evaluate", real)
    assert next((tmp_path / "cut").rglob("*.ckpt.npz")).is_file()
    scale["val"] = 3.0
    messages: list[str] = []
    (cut,) = ex.run_experiments(bench, parse_methods("dbmtl"), [0], tmp_path / "cut", progress=False,
                                echo=messages.append, checkpoint_every_s=0.0)
    assert any("discarding the checkpoint" in m and "other data" in m for m in messages), messages
    (ref,) = ex.run_experiments(bench, parse_methods("dbmtl"), [0], tmp_path / "ref", progress=False,
                                echo=lambda s: None)
    a, b = read_record(cut), read_record(ref)
    assert a["metrics"] == b["metrics"] and a["history"]["val"] == b["history"]["val"]


def test_a_table_refuses_runs_of_one_setting_made_from_other_data(tmp_path):
    """Records copied together from two stores (or two machines with other copies of a data set) were averaged
    into one row. `summarize` (every report and paired page) now refuses to mix them; records without a summary
    are not compared."""
    from dbmtl_jax.experiments.report import summarize

    scale = {"val": 1.0}
    bench = _bench("table_drift", scale)
    a = ex.run_experiments(bench, parse_methods("stl,ew"), [0], tmp_path / "a", progress=False, echo=lambda s: None)
    scale["val"] = 1.5
    (b,) = ex.run_experiments(bench, parse_methods("ew"), [1], tmp_path / "b", progress=False, echo=lambda s: None)
    recs = [read_record(p) for p in (*a, b)]
    assert len(summarize(recs[:2])[0].rows) == 2
    with pytest.raises(ValueError, match=r"ew seed 1: made from other data than stl seed 0 \(val split, array 1: sum [\d.]+ there, [\d.]+ here"):
        summarize(recs)
    del recs[2]["data_summary"]
    assert len(summarize(recs)[0].rows[("ew", recs[1]["config_hash"])].runs) == 2


def _nonfinite_splits():
    """Splits whose train and test inputs hold NaN and inf (a missing value, a log of 0)."""
    train, val, test = _splits()
    x, xt = train[0].copy(), test[0].copy()
    x[3, 1], x[9, 0], xt[5, 2], xt[6, 3] = np.nan, np.inf, np.nan, -np.inf
    return (x, train[1]), val, (xt, test[1])


def test_nan_and_inf_in_the_data_survive_a_record_and_still_let_a_change_be_seen(tmp_path):
    """NaN / inf values made the sums NaN / inf: a record stores them as null / "inf", and the next resume
    stopped with a TypeError (abs(None)); and a NaN sum compared equal to any other NaN sum, so any change of
    an array holding one NaN passed. The sums now cover the finite values and the non-finite ones are counted."""
    recipe = ex.Recipe(learning_rate=0.1, batch_size=128, epochs=1)
    train, val, test = _nonfinite_splits()
    s = data_summary(ex.ArraySplits(train, val, test, recipe))
    path = write_record(tmp_path / "r.json.gz", {"status": "done", "data_summary": s})
    stored = read_record(path)["data_summary"]
    assert summary_difference(stored, s) is None and summary_difference(s, stored) is None
    assert stored["test"]["nonfinite"][0] == [1, 0, 1] and stored["train"]["nonfinite"][0] == [1, 1, 0]
    assert "nonfinite" not in stored["val"]  # finite splits are stored as before
    xt = test[0].copy()
    xt[0, 0] += 0.5  # a finite value of the array holding NaN
    msg = summary_difference(stored, data_summary(ex.ArraySplits(train, val, (xt, test[1]), recipe)))
    assert msg is not None and msg.startswith("test split, array 0: sum")
    xt = test[0].copy()
    xt[5, 2] = 0.0  # the NaN filled in
    msg = summary_difference(stored, data_summary(ex.ArraySplits(train, val, (xt, test[1]), recipe)))
    assert msg == "test split, array 0: 1 NaN, 0 +inf, 1 -inf values then, 0 NaN, 0 +inf, 1 -inf now"


def test_a_summary_written_with_nan_sums_is_not_compared_on_that_array():
    """A record written before non-finite values were counted holds null (NaN) sums for such an array: they say
    nothing about the data, so that array is not compared (the others are), instead of a crash or a refusal."""
    recipe = ex.Recipe(learning_rate=0.1, batch_size=128, epochs=1)
    s = data_summary(ex.ArraySplits(*_nonfinite_splits(), recipe))
    old = {k: {"batches": v["batches"], "rows": v["rows"], "arrays": [list(r) for r in v["arrays"]]}
           for k, v in s.items()}
    old["test"]["arrays"][0] = [None, None, None]
    old["train"]["arrays"][0] = [None, "inf", "inf"]
    assert summary_difference(old, s) is None and summary_difference(s, old) is None
    old["test"]["arrays"][1][0] += 1.0
    assert summary_difference(old, s).startswith("test split, array 1: sum")


def test_resume_of_a_finished_run_on_data_with_nan(tmp_path):
    """The same data with a NaN: the second invocation skips the finished run (it stopped with a TypeError)."""
    from dbmtl_jax.experiments.builtin import encoder_shared, mlp_hps, mse_loss
    from dbmtl_jax.metrics import MeanAbsoluteError

    def data(recipe):
        rng = np.random.default_rng(0)
        make = lambda k: (rng.normal(size=(k, 4)).astype(np.float32),  # noqa: E731
                          tuple(rng.normal(size=k).astype(np.float32) for _ in range(2)))
        train, val, test = make(64), make(32), make(32)
        test[1][0][3] = np.nan  # a missing label of the test split
        return ex.ArraySplits(train, val, test, recipe)

    tasks = tuple(ex.Task(t, mse_loss, MeanAbsoluteError, {"mae": False}) for t in ("a", "b"))
    recipe = ex.Recipe(learning_rate=0.01, batch_size=16, epochs=1)
    bench = ex.Benchmark(name="nan_data", tasks=tasks, data=data, model=lambda rngs: mlp_hps(4, (8,), 2, rngs=rngs),
                         shared=encoder_shared, recipe=recipe, quick=recipe)
    ex.run_experiments(bench, parse_methods("ew"), [0], tmp_path, progress=False, echo=lambda s: None)
    messages: list[str] = []
    ex.run_experiments(bench, parse_methods("ew"), [0], tmp_path, progress=False, echo=messages.append)
    assert any("1 finished run(s) skipped" in m for m in messages)


@pytest.mark.parametrize("bad, what", [
    ({"batches": None, "rows": 5, "arrays": []}, "batches"),
    ({"batches": 5, "rows": 128, "arrays": 3}, "arrays"),
    ({"batches": 5, "rows": 128, "arrays": [[1.0, 2.0]] * 3}, "arrays"),
    ({"batches": 5, "rows": 128, "arrays": [[1.0, "x", 2.0]] * 3}, "arrays"),
    ({"batches": 5, "rows": 128, "arrays": [[1.0, 1.0, 1.0]] * 3, "nonfinite": [[1, 0]] * 3}, "nonfinite"),
])
def test_a_malformed_summary_is_named_not_a_crash(bad, what):
    """A hand-edited or truncated summary stopped the runner, a report or compact with a bare TypeError."""
    recipe = ex.Recipe(learning_rate=0.1, batch_size=24, epochs=1)
    s = data_summary(ex.ArraySplits(*_splits(), recipe))
    for a, b in (({**s, "train": bad}, s), (s, {**s, "train": bad})):
        assert summary_difference(a, b) == f"the train split of a summary is malformed ({what})"


def test_bfloat16_arrays_are_summarised():
    """bfloat16 / float8 arrays (numpy dtype kind 'V') were left out of the summary: a change was not seen."""
    import jax.numpy as jnp

    recipe = ex.Recipe(learning_rate=0.1, batch_size=24, epochs=1)
    train, val, test = _splits()
    half = lambda split: (split[0].astype(jnp.bfloat16), split[1])  # noqa: E731
    s = data_summary(ex.ArraySplits(half(train), half(val), half(test), recipe))
    assert len(s["val"]["arrays"]) == 3
    np.testing.assert_allclose(s["val"]["arrays"][0][0], val[0].astype(jnp.bfloat16).astype(np.float64).sum())
    x = val[0].copy()
    x[0, 0] += 4.0
    changed = data_summary(ex.ArraySplits(half(train), half((x, val[1])), half(test), recipe))
    assert summary_difference(s, changed).startswith("val split, array 0: sum")


def test_complex_arrays_are_summarised():
    """Complex arrays (dtype kind 'c') were left out of the summary: a change of their imaginary part was not seen."""
    recipe = ex.Recipe(learning_rate=0.1, batch_size=24, epochs=1)
    train, val, test = _splits()
    cplx = lambda split, im=1.0: (split[0] + im * 1j * split[0], split[1])  # noqa: E731
    s = data_summary(ex.ArraySplits(cplx(train), cplx(val), cplx(test), recipe))
    assert len(s["val"]["arrays"]) == 3
    np.testing.assert_allclose(s["val"]["arrays"][0][0], 2 * val[0].astype(np.float64).sum(), rtol=1e-6)
    changed = data_summary(ex.ArraySplits(cplx(train), cplx(val, 2.0), cplx(test), recipe))
    assert summary_difference(s, changed).startswith("val split, array 0: sum")


def test_a_provider_yielding_too_many_training_batches_is_an_error_not_a_hang():
    """The runner refuses an epoch longer than ``steps_per_epoch`` (an endless generator of one's own); the
    summary, taken before training, iterated it for ever."""

    class Endless:
        steps_per_epoch = 3

        def train_batches(self, rng):
            while True:
                yield rng.normal(size=(4, 2)), (rng.normal(size=4),)

        def eval_batches(self, split):
            yield np.ones((4, 2)), (np.ones(4),)

    with pytest.raises(ValueError, match="more than 3 training batches"):
        data_summary(Endless())


def test_a_difference_in_the_training_split_alone_says_that_the_shuffle_may_be_the_cause():
    """The training epoch is drawn with NumPy's shuffle: when only it differs, the message names that cause too."""
    old = {"train": {"batches": 2, "rows": 8, "arrays": [[1.0, 2.0, 3.0]]},
           "val": {"batches": 1, "rows": 4, "arrays": [[0.5, 1.0, 1.5]]},
           "test": {"batches": 1, "rows": 4, "arrays": [[0.5, 1.0, 1.5]]}}
    new = {**old, "train": {"batches": 2, "rows": 8, "arrays": [[1.5, 2.0, 3.0]]}}
    msg = summary_difference(old, new)
    assert msg.startswith("train split, array 0: sum 1 then, 1.5 now")
    assert "validation and test splits agree" in msg and "NumPy" in msg
    test_changed = {**new, "test": {"batches": 1, "rows": 4, "arrays": [[0.0, 1.0, 1.5]]}}
    msg = summary_difference(old, test_changed)
    assert msg.startswith("train split, array 0") and "NumPy" not in msg
    assert summary_difference(old, {**old}) is None
