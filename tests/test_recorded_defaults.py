"""DB-MTL's default σ changed (0 → 0.5): run configs record the defaults in force, so no record is misread.

A record written before (no ``defaults`` key) ran with LibMTL's β = 0.9, σ = 0; ``dbmtl-jax compact`` restates
it under today's defaults (new hash and file name, ``runs.txt`` updated), and two records that turn out to be
the same configuration trained twice become one run with the other kept in ``reruns``.
"""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")

import dbmtl_jax  # noqa: E402
from dbmtl_jax import experiments as ex  # noqa: E402
from dbmtl_jax.experiments import store as record_store  # noqa: E402
from dbmtl_jax.experiments.cli import main  # noqa: E402
from dbmtl_jax.experiments.train import (  # noqa: E402
    RunConfig, canonical_hparams, method_defaults, parse_method, read_record, read_study, resolved_hparams,
    upgrade_config, write_study,
)

from numpy_reference import NumpyDBMTL  # noqa: E402


def _config(hparams, method="dbmtl", epochs=None):
    bench = ex.get_benchmark("toy")
    recipe = bench.quick if epochs is None else bench.quick.replace(epochs=epochs)
    return ex.train.make_config(bench, parse_method(method), recipe, quick=True, hparams=hparams)


def test_default_is_beta_over_sqrt_k_and_libmtl_is_one_argument_away():
    rng = np.random.default_rng(0)
    grads = [{"w": rng.normal(size=(3, 4)) * s} for s in (1.0, 3.0, 0.2, 5.0)]
    for kwargs in ({}, {"beta_sigma": 0.0}):
        tx = dbmtl_jax.dbmtl(3, **kwargs)
        state = tx.init({"w": jnp.zeros(4)})
        ref = NumpyDBMTL(3, beta=0.9, beta_sigma=kwargs.get("beta_sigma", 0.5))
        outs = []
        for g in grads:
            u, state = tx.update({"w": jnp.asarray(g["w"], jnp.float32)}, state)
            np.testing.assert_allclose(u["w"], ref.step(g)["w"], rtol=2e-5, atol=1e-6)
            outs.append(np.asarray(u["w"]))
        if not kwargs:
            default_out = outs
    assert not np.allclose(default_out[-1], outs[-1])  # the two settings really differ
    assert method_defaults("dbmtl") == {"beta": 0.9, "beta_sigma": 0.5}
    assert method_defaults("ew") == {}


def test_config_records_the_defaults_and_hashes_one_computation_once():
    default = _config({})
    assert default.to_dict()["defaults"] == {"beta": 0.9, "beta_sigma": 0.5} and default.hparams == {}
    assert ex.config_hash(_config({"beta_sigma": 0.5})) == ex.config_hash(default)  # the default spelled out
    assert ex.config_hash(_config({"beta": 0.9, "beta_sigma": 0.5})) == ex.config_hash(default)
    libmtl = _config({"beta": 0.9, "beta_sigma": 0.0})
    assert libmtl.hparams == {"beta_sigma": 0.0} and ex.config_hash(libmtl) != ex.config_hash(default)
    # β = 0 makes σ irrelevant: one computation, one hash
    assert len({ex.config_hash(_config({"beta": 0.0, "beta_sigma": s})) for s in (0.0, 0.5, 1)}) == 1
    assert ex.config_hash(_config({"beta": 0.0})) == ex.config_hash(_config({"beta": 0, "beta_sigma": 0.0}))
    # methods without recorded defaults keep the old config layout (their stored hashes stay valid)
    assert "defaults" not in _config({}, "ew").to_dict()
    assert RunConfig(**default.to_dict()) == default


def test_old_configs_resolve_to_what_they_ran_and_upgrade_to_the_new_hash():
    old = {k: v for k, v in _config({}).to_dict().items() if k != "defaults"}
    assert resolved_hparams(old) == {"beta": 0.9, "beta_sigma": 0.0}  # a pre-0.2.0 default run
    new = upgrade_config(old)
    assert new["hparams"] == {"beta_sigma": 0.0}
    assert ex.config_hash(RunConfig(**new)) == ex.config_hash(_config({"beta_sigma": 0.0}))
    sqrt_k = upgrade_config({**old, "hparams": {"beta_sigma": 0.5}})
    assert ex.config_hash(RunConfig(**sqrt_k)) == ex.config_hash(_config({}))  # now the default run
    zero = upgrade_config({**old, "hparams": {"beta": 0.0}})
    assert ex.config_hash(RunConfig(**zero)) == ex.config_hash(_config({"beta": 0.0}))
    assert upgrade_config(new) == new  # idempotent
    ew = _config({}, "ew").to_dict()
    assert upgrade_config(ew) == ew
    assert canonical_hparams("dbmtl", {"beta": 0.5, "alpha": "min"}, method_defaults("dbmtl")) == \
        {"beta": 0.5, "alpha": "min"}


def _legacy(rec, hparams, created, test_value):
    """``rec`` as a pre-0.2.0 runner would have written it with explicit ``hparams``."""
    out = copy.deepcopy(rec)
    cfg = {k: v for k, v in out["config"].items() if k != "defaults"}
    cfg["hparams"] = hparams
    out["config"] = cfg
    out["config_hash"] = ex.config_hash(RunConfig(**cfg))
    out["created"] = created
    for metrics in out["metrics"]["test"].values():
        for k in metrics:
            metrics[k] = test_value
    return out


def _write(path: Path, rec):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(json.dumps(rec).encode()))
    return path


def test_compact_restates_old_records_and_merges_one_configuration_trained_twice(tmp_path):
    store = tmp_path / "runs"
    assert main(["run", "toy", "--methods", "dbmtl", "--out", str(store), "--quick", "--epochs", "1",
                 "--no-progress", "--no-compile-cache"]) == 0
    (fresh,) = (store / "toy").glob("*.json.gz")
    rec = read_record(fresh)
    fresh.unlink()
    # three pre-0.2.0 records: the old default, LibMTL spelled out (the same run twice) and σ = 0.5
    files = {}
    for name, hp, created, v in (("default", {}, "2026-01-01T00:00:00", 0.25),
                                 ("spelled", {"beta": 0.9, "beta_sigma": 0.0}, "2026-01-02T00:00:00", 0.5),
                                 ("sqrt_k", {"beta_sigma": 0.5}, "2026-01-03T00:00:00", 0.75)):
        old = _legacy(rec, hp, created, v)
        files[name] = _write(store / "toy" / f"toy__dbmtl__seed0__{old['config_hash']}.json.gz", old)
    study = tmp_path / "study"
    write_study(study, [f"../runs/toy/{f.name}" for f in files.values()])

    res = record_store.compact_directory(tmp_path, store=store)
    assert len(res.upgraded) == 3 and len(res.same_config) == 1 and not res.conflicts
    kept = sorted((store / "toy").glob("*.json.gz"))
    assert len(kept) == 2 and not any(f.exists() for f in files.values())
    by_hash = {read_record(f)["config_hash"]: read_record(f) for f in kept}
    libmtl = by_hash[ex.config_hash(_config({"beta_sigma": 0.0}, epochs=1))]
    default = by_hash[ex.config_hash(_config({}, epochs=1))]
    for r in (libmtl, default):
        assert r["config"]["defaults"] == {"beta": 0.9, "beta_sigma": 0.5}
        assert r["config_hash"] == ex.config_hash(RunConfig(**r["config"]))
    # the earlier of the two LibMTL runs is kept; the later one's numbers are not lost
    assert all(v == 0.25 for m in libmtl["metrics"]["test"].values() for v in m.values())
    (rerun,) = libmtl["reruns"]
    assert rerun["same_config"] and all(v == 0.5 for m in rerun["metrics"]["test"].values() for v in m.values())
    assert all(v == 0.75 for m in default["metrics"]["test"].values() for v in m.values())
    assert sorted(read_study(study)) == sorted(f"../runs/toy/{f.name}" for f in kept)
    assert record_store.compact_directory(tmp_path, store=store).upgraded == []  # idempotent
    # resume finds the restated records under today's configs: nothing is trained again
    for hp in ({"beta_sigma": 0.0}, {"beta": 0.9, "beta_sigma": 0.0}, {}, {"beta_sigma": 0.5}):
        assert ex.train.find_finished(ex.train.result_path(store, _config(hp, epochs=1), 0)) is not None
    assert sorted(r["method"] + str(r["config"]["hparams"]) for r in ex.load_results(study)) == \
        ["dbmtl{'beta_sigma': 0.0}", "dbmtl{}"]


def test_a_changed_method_default_is_recorded_in_the_config():
    """A run's config hash covers its hyperparameters only as given, plus the defaults of
    RECORDED_DEFAULTS; changing any other default of a method would let an old record pass for a run
    under the new default (resume would skip it, tables would pool the two). This pins every method's
    current defaults: a change must add the parameter to RECORDED_DEFAULTS (with its old value in
    LEGACY_DEFAULTS) and then update tests/method_defaults.json."""
    import inspect

    from dbmtl_jax.methods.registry import METHODS, get_factory

    pinned = json.loads((Path(__file__).parent / "method_defaults.json").read_text())
    assert sorted(pinned) == sorted(METHODS), "a method was added or removed: update tests/method_defaults.json"
    for name in sorted(METHODS):
        params = inspect.signature(get_factory(name)).parameters
        now = {k: repr(p.default) for k, p in params.items() if p.default is not inspect.Parameter.empty}
        changed = {k for k in set(now) | set(pinned[name]) if now.get(k) != pinned[name].get(k)}
        unrecorded = changed - set(ex.train.RECORDED_DEFAULTS.get(name, ()))
        assert not unrecorded, (f"{name}: default of {sorted(unrecorded)} changed without being recorded "
                                f"(was {[pinned[name].get(k) for k in sorted(unrecorded)]})")
