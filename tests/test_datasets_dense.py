"""The layered Fashion-MNIST dense benchmark on fixture items whose pixels encode their identity."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

import dbmtl_jax.datasets as ds
from dbmtl_jax.datasets import DatasetUnavailableError, load_dense_fashion
from dbmtl_jax.datasets import dense as dense_mod
from dbmtl_jax.datasets import multimnist as mm

N_TRAIN_ITEMS, N_TEST_ITEMS = 40, 20
SIZE_REF, NEAR, FAR_ITEM, FAR = 2.0, 2.0, 8.0, 10.0


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DBMTL_JAX_CACHE", str(tmp_path / "cache"))


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, np.uint8)
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_solid_fashion(root: Path) -> None:
    """Items are solid 28x28 squares; train item i has intensity 40 + 4 i, test item i 41 + 4 i; label i % 10."""
    root.mkdir(parents=True, exist_ok=True)
    tr = np.stack([np.full((28, 28), 40 + 4 * i) for i in range(N_TRAIN_ITEMS)])
    te = np.stack([np.full((28, 28), 41 + 4 * i) for i in range(N_TEST_ITEMS)])
    arrays = {"train_images": tr, "train_labels": np.arange(N_TRAIN_ITEMS) % 10,
              "test_images": te, "test_labels": np.arange(N_TEST_ITEMS) % 10}
    for key, name in mm.FASHION_FILES.items():
        (root / name).write_bytes(gzip.compress(idx_bytes(arrays[key])))


def _load(root: Path, **kw):
    args = dict(num_train=8, num_val=4, num_test=5, image_size=32, items_per_image=(1, 3), near=NEAR,
                far_item=FAR_ITEM, far=FAR, size_ref=SIZE_REF, val_fraction=0.25, seed=3)
    args.update(kw)
    return load_dense_fashion(root, **args)


def _item_id(intensity_u8: np.ndarray) -> np.ndarray:
    return (intensity_u8.astype(np.int64) - 40) // 4


def test_scene_targets_follow_the_recipe(tmp_path):
    write_solid_fashion(tmp_path / "fm")
    d = _load(tmp_path / "fm")
    assert d.task_names == ("segmentation", "depth", "normal") and d.num_classes == 11 and d.far == FAR
    assert d.class_names[0] == "background" and d.class_names[1] == "T-shirt/top"
    seen = {}
    for name in ("train", "val", "test"):
        sp = getattr(d, name)
        n = {"train": 8, "val": 4, "test": 5}[name]
        assert len(sp) == n
        assert sp.image.shape == (n, 32, 32, 1) and sp.image.dtype == np.float32
        assert sp.segmentation.shape == (n, 32, 32) and sp.segmentation.dtype == np.int32
        assert sp.depth.shape == (n, 32, 32, 1) and sp.normal.shape == (n, 32, 32, 3)
        np.testing.assert_allclose(np.linalg.norm(sp.normal, axis=-1), 1.0, atol=1e-5)
        u8 = np.rint(sp.image[..., 0] * 255).astype(np.int64)
        bg = sp.segmentation == 0
        # background: no intensity, far-plane depth
        assert np.all(u8[bg] == 0) and np.all(sp.depth[..., 0][bg] == FAR)
        # item pixels: the class is the label of the item whose intensity is seen; depth within the item range
        ids = _item_id(u8[~bg])
        np.testing.assert_array_equal(sp.segmentation[~bg], ids % 10 + 1)
        dep = sp.depth[..., 0][~bg]
        assert np.all((dep >= NEAR) & (dep <= FAR_ITEM))
        parity = u8[~bg] % 2
        assert np.all(parity == (1 if name == "test" else 0))  # test scenes use t10k items only
        seen[name] = set(ids.tolist())
        for k in range(n):
            img_ids = _item_id(u8[k])
            dk = sp.depth[k, ..., 0]
            for item in np.unique(img_ids[~bg[k]]):
                region = img_ids == item
                depth = np.unique(dk[region])
                assert len(depth) == 1  # one depth per visible item
                side = int(np.clip(round(28 * SIZE_REF / depth[0]), 4, 32))
                rows, cols = np.nonzero(region)
                assert rows.max() - rows.min() + 1 <= side and cols.max() - cols.min() + 1 <= side
                nearest = depth[0] == dk[~bg[k]].min()
                if nearest:  # the nearest item is never occluded: a full side x side square
                    assert region.sum() == side * side
                else:  # a farther item is only seen where no nearer item covers it
                    assert np.all(dk[region] >= dk[~bg[k]].min())
    assert not seen["train"] & seen["val"]  # train and val draw from disjoint training items


def test_normals_from_height_reference():
    y, x = np.mgrid[0:9, 0:11].astype(np.float64)
    a, b = 0.3, -1.7
    n = dense_mod.normals_from_height(a * x + b * y)  # a plane: exact everywhere
    ref = np.array([-a, -b, 1.0]) / np.sqrt(a * a + b * b + 1)
    np.testing.assert_allclose(n, np.broadcast_to(ref, n.shape), atol=1e-6)
    h = 0.05 * (x - 4.0) ** 2 + 0.02 * x * y  # a quadratic: central differences exact inside
    n = dense_mod.normals_from_height(h)[1:-1, 1:-1]
    gx, gy = (0.1 * (x - 4.0) + 0.02 * y)[1:-1, 1:-1], (0.02 * x)[1:-1, 1:-1]
    ref = np.stack([-gx, -gy, np.ones_like(gx)], -1)
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
    np.testing.assert_allclose(n, ref, atol=1e-6)


def test_normals_flat_away_from_items_and_tilted_on_relief(tmp_path):
    write_solid_fashion(tmp_path / "fm")
    d = _load(tmp_path / "fm", relief=4.0, blur_sigma=1.0)
    sp = d.train
    bg = sp.segmentation == 0
    # a background pixel whose 3x3 neighbourhood is background has a flat height field: normal (0, 0, 1)
    pad = np.pad(bg, ((0, 0), (1, 1), (1, 1)), constant_values=True)
    inner = np.ones_like(bg)
    for dy in range(3):
        for dx in range(3):
            inner &= pad[:, dy:dy + 32, dx:dx + 32]
    np.testing.assert_allclose(sp.normal[inner], np.broadcast_to([0.0, 0.0, 1.0], sp.normal[inner].shape), atol=1e-6)
    assert np.any(sp.normal[..., 2] < 0.99)  # blurred relief edges tilt the normals
    flat = _load(tmp_path / "fm", relief=0.0, cache=False)
    np.testing.assert_allclose(flat.train.normal[..., 2], 1.0, atol=1e-6)  # no relief: all normals face the viewer


def test_cache_roundtrip_and_determinism(tmp_path, monkeypatch):
    write_solid_fashion(tmp_path / "fm")
    first = _load(tmp_path / "fm")
    files = list((tmp_path / "cache" / "dense_fashion").glob("*.npz"))
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(dense_mod, "_generate", boom)
    cached = _load(tmp_path / "fm")
    monkeypatch.undo()
    monkeypatch.setenv("DBMTL_JAX_CACHE", str(tmp_path / "cache"))
    fresh = _load(tmp_path / "fm", cache=False)
    for name in ("train", "val", "test"):
        for k, v in getattr(first, name).targets().items():
            np.testing.assert_array_equal(v, getattr(cached, name).targets()[k])
            np.testing.assert_array_equal(v, getattr(fresh, name).targets()[k])
        np.testing.assert_array_equal(getattr(first, name).image, getattr(fresh, name).image)
    other = _load(tmp_path / "fm", seed=4, cache=False)
    assert not np.array_equal(other.train.segmentation, first.train.segmentation)
    assert len(list((tmp_path / "cache" / "dense_fashion").glob("*.npz"))) == 1  # cache=False wrote nothing


def test_cache_is_not_reused_for_other_labels_or_items(tmp_path):
    """The old key checked only the item counts and the first 64 items' pixel sum: new labels, or
    items changed after the 64th, silently reused the scenes of the first files."""
    write_solid_fashion(tmp_path / "fm")
    first = _load(tmp_path / "fm")
    f = tmp_path / "fm" / mm.FASHION_FILES["train_labels"]
    f.write_bytes(gzip.compress(idx_bytes((np.arange(N_TRAIN_ITEMS) + 3) % 10)))
    relabelled = _load(tmp_path / "fm")
    np.testing.assert_array_equal(relabelled.train.image, first.train.image)
    shifted = np.where(first.train.segmentation > 0, (first.train.segmentation - 1 + 3) % 10 + 1, 0)
    np.testing.assert_array_equal(relabelled.train.segmentation, shifted)
    assert len(list((tmp_path / "cache" / "dense_fashion").glob("*.npz"))) == 2


def test_evaluation_sizes_do_not_change_the_training_scenes(tmp_path):
    """The dense benchmark's data options num_val / num_test enlarge the evaluation sets; the training
    scenes come from their own random stream, so a model trained on them (and its depth-bias init) is
    the same, and only evaluation changes."""
    write_solid_fashion(tmp_path / "fm")
    small = _load(tmp_path / "fm", cache=False)
    large = _load(tmp_path / "fm", num_val=9, num_test=11, cache=False)
    assert len(large.val.image) == 9 and len(large.test.image) == 11
    np.testing.assert_array_equal(small.train.image, large.train.image)
    for k, v in small.train.targets().items():
        np.testing.assert_array_equal(v, large.train.targets()[k])


def test_errors(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="apt-get install -y dataset-fashion-mnist"):
        load_dense_fashion(tmp_path / "missing")
    write_solid_fashion(tmp_path / "fm")
    with pytest.raises(ValueError, match="items_per_image"):
        _load(tmp_path / "fm", items_per_image=(3, 2))
    with pytest.raises(ValueError, match="near < far_item < far"):
        _load(tmp_path / "fm", far=5.0)
    with pytest.raises(ValueError, match="image_size"):
        _load(tmp_path / "fm", image_size=16)
    with pytest.raises(ValueError, match="item pool"):
        _load(tmp_path / "fm", items_per_image=(1, 30), cache=False)  # 10 val items < 30


def test_nonfinite_or_out_of_range_scene_options_raise(tmp_path):
    """audit 45: these options built scenes without error but with wrong targets: ``mask_threshold`` NaN or >= 1
    (every scene all background), ``relief`` NaN, inf or beyond float16's 65504 (NaN normals), ``size_ref`` <= 0
    (every item clipped to 4 px), ``far`` inf (infinite background depth); NaN ``blur_sigma`` and float scene
    counts failed without naming the option."""
    write_solid_fashion(tmp_path / "fm")
    nan, inf = float("nan"), float("inf")
    cases = [("mask_threshold", nan), ("mask_threshold", 1.0), ("mask_threshold", -0.1), ("relief", nan),
             ("relief", inf), ("relief", 1e5), ("relief", -1.0), ("size_ref", 0.0), ("size_ref", -1.0),
             ("size_ref", nan), ("blur_sigma", nan), ("blur_sigma", -1.0), ("num_train", 2.5), ("num_val", True),
             ("num_test", -1), ("image_size", 64.0)]
    for name, bad in cases:
        with pytest.raises(ValueError, match=name):
            _load(tmp_path / "fm", cache=False, **{name: bad})
    with pytest.raises(ValueError, match="finite 0 < near < far_item < far"):
        _load(tmp_path / "fm", far=inf, cache=False)
    ok = _load(tmp_path / "fm", relief=0.0, blur_sigma=0.0, mask_threshold=0.0, num_train=np.int64(2), cache=False)
    assert len(ok.train) == 2 and np.isfinite(ok.train.normal).all()


def test_exported():
    assert ds.load_dense_fashion is load_dense_fashion


def test_real_fashion_scenes():
    if not all((mm.FASHION_DIR / f).is_file() for f in mm.FASHION_FILES.values()):
        pytest.skip("Fashion-MNIST is not installed: apt-get update && apt-get install -y dataset-fashion-mnist")
    d = load_dense_fashion(num_train=40, num_val=5, num_test=10, cache=False)
    sp = d.train
    assert sp.image.shape == (40, 64, 64, 1)
    assert 0.3 < np.mean(sp.segmentation == 0) < 0.95
    assert len(np.unique(sp.segmentation)) >= 8
    fg = sp.segmentation > 0
    assert np.all(sp.image[..., 0][fg] > 0.1 - 1e-6) and np.all(sp.depth[..., 0][~fg] == d.far)
    np.testing.assert_allclose(np.linalg.norm(d.test.normal, axis=-1), 1.0, atol=1e-5)
