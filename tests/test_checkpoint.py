"""Mid-run checkpoints (dbmtl_jax.experiments.checkpoint): a stopped run resumes to the same record."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dbmtl_jax import experiments as ex
from dbmtl_jax.experiments import checkpoint as ck
from dbmtl_jax.experiments import train as tr
from dbmtl_jax.experiments.train import parse_methods, read_record

METHODS = "stl,ew,dbmtl,uw,nash_mtl"
TIMING = {"wall_time_s", "median_step_time_s", "first_step_time_s", "created"}


def _bench_recipe():
    bench = ex.get_benchmark("toy")
    return bench, dataclasses.replace(bench.quick, epochs=5)


def _run(store, methods=METHODS, **kw):
    bench, recipe = _bench_recipe()
    return ex.run_experiments(bench, parse_methods(methods), [0], store, recipe=recipe, progress=False,
                              echo=kw.pop("echo", lambda s: None), checkpoint_every_s=0.0, **kw)


class _StopAt:
    """Replaces train.evaluate: stops the process (KeyboardInterrupt, as a kill would) at the n-th
    validation of each run, after the checkpoints of the epochs before it were written."""

    def __init__(self, monkeypatch, n):
        self.n, self.calls, self.real = n, 0, tr.evaluate
        monkeypatch.setattr(tr, "evaluate", self)

    def __call__(self, trainer, data, split, params, rest):
        if split == "val":
            self.calls += 1
            if self.calls == self.n:
                raise KeyboardInterrupt
        return self.real(trainer, data, split, params, rest)


def _same_record(a, b):
    a, b = dict(a), dict(b)
    for k in TIMING:
        a.pop(k, None), b.pop(k, None)
    for r in (a, b):
        r["history"] = {k: v for k, v in r["history"].items() if k != "epoch_time_s"}
    assert a == b


@pytest.mark.parametrize("method", METHODS.split(","))
def test_a_stopped_run_resumes_to_the_record_of_an_uninterrupted_run(tmp_path, monkeypatch, method):
    (ref_path,) = _run(tmp_path / "ref", method, test_curve=True)
    stop = _StopAt(monkeypatch, 4)  # stopped while validating epoch 4: epochs 1-3 are checkpointed
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", method, test_curve=True)
    partial = ck.checkpoint_path(tmp_path / "cut" / ref_path.relative_to(tmp_path / "ref"))
    assert partial.is_file() and not list((tmp_path / "cut").rglob("*.json.gz"))
    assert ck.load_checkpoint(partial, run=ref_path.name, template=_template(method)).loop[
        "epoch"] == 3
    monkeypatch.setattr(tr, "evaluate", stop.real)
    messages: list[str] = []
    bench, recipe = _bench_recipe()
    _run(tmp_path / "cut", method, test_curve=True, dry_run=True, echo=messages.append)
    assert "continues from its checkpoint" in messages[0]
    (path,) = _run(tmp_path / "cut", method, test_curve=True)
    assert not partial.exists()  # deleted once the record is written
    _same_record(read_record(ref_path), read_record(path))


def _template(method):
    bench, recipe = _bench_recipe()
    (spec,) = parse_methods(method)
    hp = tr.method_hparams(spec, bench, {}) if spec.name != "stl" else {}
    t = tr._Trainer(bench, spec, recipe, hp, 0, 4, False, tr.normalize_optimizer(None))
    return (t.params, t.rest, t.opt_state)


def test_a_foreign_or_stale_checkpoint_is_refused_and_no_resume_discards_it(tmp_path, monkeypatch):
    (ref_path,) = _run(tmp_path / "ref", "dbmtl")
    stop = _StopAt(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", "dbmtl")
    monkeypatch.setattr(tr, "evaluate", stop.real)
    partial = next((tmp_path / "cut").rglob("*.ckpt.npz"))
    template = _template("dbmtl")
    with pytest.raises(ck.CheckpointMismatch, match="not 'other"):
        ck.load_checkpoint(partial, run="other.json.gz", template=template)
    # A checkpoint whose arrays no longer fit the model (same run id) is discarded, with a message,
    # and the run is trained from the start: the same record as the uninterrupted one.
    with np.load(partial) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["leaf0"] = np.zeros(arrays["leaf0"].shape + (2,), arrays["leaf0"].dtype)
    with open(partial, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ck.CheckpointMismatch, match="leaf 0"):
        ck.load_checkpoint(partial, run=partial.name.replace(".ckpt.npz", ".json.gz"), template=template)
    messages: list[str] = []
    (path,) = _run(tmp_path / "cut", "dbmtl", echo=messages.append)
    assert any("discarding the checkpoint" in m for m in messages) and not partial.exists()
    _same_record(read_record(ref_path), read_record(path))
    # A checkpoint written without the test curve cannot continue a run that records one: trained afresh.
    stop = _StopAt(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "curve", "ew")
    monkeypatch.setattr(tr, "evaluate", stop.real)
    messages = []
    (path,) = _run(tmp_path / "curve", "ew", test_curve=True, echo=messages.append)
    assert any("without the test curve" in m for m in messages)
    assert len(read_record(path)["history"]["test"]) == 5
    # resume=False discards a checkpoint before training.
    stop = _StopAt(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "again", "ew")
    monkeypatch.setattr(tr, "evaluate", stop.real)
    partial = next((tmp_path / "again").rglob("*.ckpt.npz"))
    seen = []
    monkeypatch.setattr(ck, "load_checkpoint", lambda *a, **k: seen.append(a) or pytest.fail("loaded"))
    _run(tmp_path / "again", "ew", resume=False)
    assert not seen and not partial.exists()


def test_checkpoint_files_round_trip_nan_and_weak_types(tmp_path):
    import jax.numpy as jnp

    tree = {"w": jnp.ones((2, 3)), "count": jnp.asarray(0.5), "n": jnp.int32(7)}
    loop = {"best": [float("nan"), float("inf"), None], "h": np.float32(1.5), "arr": np.arange(3)}
    p = ck.save_checkpoint(tmp_path / "a" / "r.ckpt.npz", run="r", tree=tree,
                           snapshots=[None, {1: np.full(2, 3.0)}], loop=loop)
    got = ck.load_checkpoint(p, run="r", template=tree)
    assert got.tree["count"].weak_type and not got.tree["n"].weak_type
    np.testing.assert_array_equal(got.tree["w"], tree["w"])
    assert np.isnan(got.loop["best"][0]) and got.loop["best"][1:] == [float("inf"), None]
    assert got.loop["h"] == 1.5 and got.loop["arr"] == [0, 1, 2]
    assert got.snapshots[0] is None and got.snapshots[1][1].tolist() == [3.0, 3.0]
    assert not list((tmp_path / "a").glob("*.tmp"))
    (tmp_path / "bad.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        ck.load_checkpoint(tmp_path / "bad.npz", run="r", template=tree)


def test_a_checkpoint_of_other_data_or_other_tasks_is_discarded_not_continued(tmp_path, monkeypatch):
    """The config hash names neither the data a provider yields nor the tasks' metric directions: a checkpoint
    written with 16 steps per epoch was continued with 8 (a record of 3 x 16 + 2 x 8 steps claiming 8 per epoch),
    and one whose best epoch was chosen with another selection direction went on comparing against it."""
    bench, recipe = _bench_recipe()
    spe = {"cap": None}
    real_data = bench.data
    bench = dataclasses.replace(bench, data=lambda r: real_data(r.replace(max_steps_per_epoch=spe["cap"])))

    def run(store, b, **kw):
        messages: list[str] = []
        (path,) = ex.run_experiments(b, parse_methods("ew"), [0], store, recipe=recipe, progress=False,
                                     echo=messages.append, checkpoint_every_s=0.0, **kw)
        return path, messages

    for store, change in (("data", "data"), ("tasks", "tasks")):
        stop = _StopAt(monkeypatch, 4)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / store, bench)
        monkeypatch.setattr(tr, "evaluate", stop.real)
        assert next((tmp_path / store).rglob("*.ckpt.npz")).is_file()
        if change == "data":
            spe["cap"], b = 8, bench
        else:
            spe["cap"] = None
            flipped = dataclasses.replace(bench.tasks[0], metrics={"mae": True})  # same name, same config hash
            b = dataclasses.replace(bench, tasks=(flipped, *bench.tasks[1:]))
        path, messages = run(tmp_path / store, b)
        assert any("discarding the checkpoint" in m for m in messages), (change, messages)
        rec = read_record(path)
        assert rec["steps"] == 5 * rec["steps_per_epoch"] == 5 * (spe["cap"] or 16)
