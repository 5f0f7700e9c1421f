"""Lazy loaders for local NYUv2 / Cityscapes ``.npy`` trees and Office image folders, on tiny fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import dbmtl_jax.datasets as ds
from dbmtl_jax.datasets import DatasetUnavailableError, load_cityscapes, load_nyuv2, load_office
from dbmtl_jax.datasets import local

H, W = 6, 8


def write_npy_tree(root: Path, counts: dict, folders: tuple, seed: int = 0) -> dict:
    """MTAN-style tree: <root>/<split>/<folder>/<i>.npy, with float labels using -1 as ignore."""
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in counts.items():
        for i in range(n):
            item = {
                "image": rng.random((H, W, 3)),
                "label": np.where(rng.random((H, W)) < 0.2, -1.0, rng.integers(0, 7, (H, W)).astype(float)),
                "depth": rng.random((H, W, 1)) * 10,
                "normal": rng.normal(size=(H, W, 3)),
            }
            for f in folders:
                src = "label" if f.startswith("label") else f
                (root / split / f).mkdir(parents=True, exist_ok=True)
                np.save(root / split / f / f"{i}.npy", item[src].astype(np.float32))
            data[(split, i)] = item
    return data


def test_nyuv2_lazy_items_and_batches(tmp_path):
    data = write_npy_tree(tmp_path, {"train": 5, "val": 2}, ("image", "label", "depth", "normal"))
    tr = load_nyuv2(tmp_path, "train")
    assert len(tr) == 5 and tr.num_classes == 13 and [t.name for t in tr.tasks] == ["segmentation", "depth", "normal"]
    it = tr[3]
    assert set(it) == {"image", "segmentation", "depth", "normal"}
    np.testing.assert_allclose(it["image"], data[("train", 3)]["image"], rtol=1e-6)
    assert it["segmentation"].dtype == np.int32 and it["segmentation"].shape == (H, W)
    np.testing.assert_array_equal(it["segmentation"], data[("train", 3)]["label"].astype(np.int32))
    assert np.any(it["segmentation"] == -1)  # the ignore label survives
    assert it["depth"].shape == (H, W, 1) and it["normal"].shape == (H, W, 3) and it["image"].dtype == np.float32
    np.testing.assert_allclose(tr[-1]["depth"], data[("train", 4)]["depth"], rtol=1e-6)
    with pytest.raises(IndexError):
        tr[5]
    b = tr.get_batch([4, 0])
    assert b["image"].shape == (2, H, W, 3) and b["segmentation"].shape == (2, H, W)
    np.testing.assert_allclose(b["normal"][0], data[("train", 4)]["normal"], rtol=1e-6)
    batches = list(tr.iterate_batches(2, shuffle=True, seed=1))
    assert [len(x["image"]) for x in batches] == [2, 2, 1]
    seen = np.concatenate([x["depth"][:, 0, 0, 0] for x in batches])
    np.testing.assert_allclose(np.sort(seen), np.sort([data[("train", i)]["depth"][0, 0, 0] for i in range(5)]),
                               rtol=1e-6)
    again = list(tr.iterate_batches(2, shuffle=True, seed=1))
    np.testing.assert_array_equal(again[0]["image"], batches[0]["image"])
    assert len(list(tr.iterate_batches(2, drop_last=True))) == 2
    with pytest.warns(UserWarning, match="same files as split='val'.*select on the test images"):
        te = load_nyuv2(tmp_path, "test")  # alias of LibMTL's val
    assert len(te) == 2 and te.root == tmp_path / "val"
    np.testing.assert_allclose(te[1]["image"], data[("val", 1)]["image"], rtol=1e-6)


def test_nyuv2_errors(tmp_path):
    with pytest.raises(DatasetUnavailableError, match=r"\{train,val\}/\{image,label,depth,normal\}"):
        load_nyuv2(tmp_path / "none")
    write_npy_tree(tmp_path, {"train": 3}, ("image", "label", "depth"))
    with pytest.raises(DatasetUnavailableError, match="normal"):
        load_nyuv2(tmp_path)
    write_npy_tree(tmp_path, {"train": 3}, ("normal",))
    os.remove(tmp_path / "train" / "depth" / "1.npy")
    with pytest.raises(ValueError, match=r"depth lacks 1 of the files 0\.\.2\.npy \(first: 1\.npy\)"):
        load_nyuv2(tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_nyuv2(tmp_path, "dev")


def test_npy_items_with_wrong_shapes_or_labels_raise(tmp_path):
    """Such files used to load: a channel-first image or depth, labels of another class count (ignored by mIoU),
    fractional labels (rounded), an item whose arrays disagree on H, W."""
    write_npy_tree(tmp_path, {"train": 2}, ("image", "label", "depth", "normal"))
    tr = load_nyuv2(tmp_path)
    tr[1]  # the fixture is valid
    f = tmp_path / "train"
    good = {k: np.load(f / k / "1.npy") for k in ("image", "label", "depth", "normal")}
    bad_cases = [
        ("image", np.moveaxis(good["image"], -1, 0), r"image/1\.npy: shape \(3, 6, 8\); expected \[H, W, 3\]"),
        ("depth", np.moveaxis(good["depth"], -1, 0), r"depth/1\.npy: shape \(1, 6, 8\); expected \[H, W, 1\]"),
        ("normal", good["normal"][..., :2], r"normal/1\.npy: shape \(6, 8, 2\)"),
        ("normal", good["normal"][:, :7], r"normal/1\.npy: shape \(6, 7, 3\), but the item's image is \(6, 8\)"),
        ("label", good["label"].T, r"label/1\.npy: shape \(8, 6\), but the item's image is \(6, 8\)"),
        ("label", np.where(good["label"] == 0, 13.0, good["label"]), r"label 13(\.0)? outside -1 \(ignore\) \.\. 12"),
        ("label", np.where(good["label"] == 0, 255, good["label"]).astype(np.uint8), "label 255 outside"),
        ("label", np.where(good["label"] == 0, -2.0, good["label"]), "label -2(\\.0)? outside"),
        ("label", good["label"] + 0.5, "not an integer"),
        ("label", np.where(good["label"] == 0, np.nan, good["label"]), "nan is not an integer"),
        ("label", good["label"] > 0, "dtype bool"),
        # non-finite pixels, and a finite float64 value that overflows the float32 cast
        ("depth", np.where(np.arange(W)[None, :, None] == 5, 1e39, good["depth"].astype(np.float64)),
         r"depth/1\.npy: value at index \(0, 5, 0\) is not finite as float32 \(1e\+39"),
        ("normal", np.where(np.arange(H)[:, None, None] == 4, np.inf, good["normal"]),
         r"normal/1\.npy: value at index \(4, 0, 0\) is not finite"),
        ("image", np.where(np.arange(W)[None, :, None] == 7, np.nan, good["image"]), r"image/1\.npy: .* \(nan in"),
    ]
    for folder, arr, match in bad_cases:
        np.save(f / folder / "1.npy", arr)
        with pytest.raises(ValueError, match=match):
            tr[1]
        tr[0]
        np.save(f / folder / "1.npy", good[folder])
    # accepted variants: [H, W] depth, [H, W, 1] integer labels
    np.save(f / "depth" / "1.npy", good["depth"][..., 0])
    np.save(f / "label" / "1.npy", good["label"][..., None].astype(np.int64))
    it = tr[1]
    assert it["depth"].shape == (H, W, 1) and it["segmentation"].shape == (H, W)
    np.testing.assert_array_equal(it["segmentation"], good["label"].astype(np.int32))
    # Cityscapes: 19-class labels in the 7-class folder
    write_npy_tree(tmp_path / "cs", {"train": 1}, ("image", "label_7", "depth"))
    lab = np.load(tmp_path / "cs" / "train" / "label_7" / "0.npy")
    np.save(tmp_path / "cs" / "train" / "label_7" / "0.npy", np.where(lab == 0, 18.0, lab))
    with pytest.raises(ValueError, match=r"label 18(\.0)? outside -1 \(ignore\) \.\. 6"):
        load_cityscapes(tmp_path / "cs")[0]


def test_npy_extra_files_empty_split_and_negative_depth_raise(tmp_path):
    """Audit 43: these loaded silently. Files beyond the image folder's 0..n-1 (a truncated image copy) were
    dropped, an empty split gave 0 items (metrics of an empty state read 0), and a negative depth (a -1
    "invalid" marker of another preprocessing) was scored as a valid depth (the metrics skip only 0)."""
    write_npy_tree(tmp_path, {"train": 3}, ("image", "label", "depth", "normal"))
    os.remove(tmp_path / "train" / "image" / "2.npy")
    with pytest.raises(ValueError, match=r"train/label has 1 \.npy file\(s\) beyond 0\.\.1\.npy \(first: 2\.npy\)"):
        load_nyuv2(tmp_path)
    for f in ("label", "depth", "normal"):
        os.remove(tmp_path / "train" / f / "2.npy")
    tr = load_nyuv2(tmp_path)
    assert len(tr) == 2
    depth = np.load(tmp_path / "train" / "depth" / "1.npy")
    depth[2, 3, 0] = -1.0
    np.save(tmp_path / "train" / "depth" / "1.npy", depth)
    with pytest.raises(ValueError, match=r"depth/1\.npy: depth value -1\.0 is negative"):
        tr[1]
    tr[0]
    for f in ("image", "label", "depth", "normal"):
        (tmp_path / "empty" / "val" / f).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"val/image holds no \.npy files"):
        load_nyuv2(tmp_path / "empty", "val")


def test_npy_float_index_empty_batch_corrupt_file_and_float_class_count_raise(tmp_path):
    """Bad input gets an error naming it: a float index was truncated (ds[1.7] read item 1), an empty batch
    raised NumPy's "need at least one array to stack", a truncated .npy file gave NumPy's error without the
    file, and num_classes=7.0 was accepted by load_cityscapes."""
    write_npy_tree(tmp_path, {"train": 2}, ("image", "label", "depth", "normal"))
    ds = load_nyuv2(tmp_path)
    for bad in (1.7, "1", True):
        with pytest.raises(TypeError, match="index must be an integer"):
            ds[bad]
    assert ds[np.int64(1)]["image"].shape == ds[1]["image"].shape
    with pytest.raises(ValueError, match="at least one index"):
        ds.get_batch([])
    path = tmp_path / "train" / "depth" / "1.npy"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"depth/1\.npy: not a readable \.npy array"):
        ds[1]
    write_npy_tree(tmp_path / "cs", {"train": 1}, ("image", "label", "depth"))
    with pytest.raises(ValueError, match="the int 7 or 19"):
        load_cityscapes(tmp_path / "cs", num_classes=7.0)


def test_cityscapes_label_folders(tmp_path):
    data = write_npy_tree(tmp_path / "libmtl", {"train": 2, "val": 1}, ("image", "label", "depth"))
    cs = load_cityscapes(tmp_path / "libmtl", "val")
    assert len(cs) == 1 and cs.num_classes == 7 and set(cs[0]) == {"image", "segmentation", "depth"}
    np.testing.assert_array_equal(cs[0]["segmentation"], data[("val", 0)]["label"].astype(np.int32))
    with pytest.raises(DatasetUnavailableError, match="label_19"):
        load_cityscapes(tmp_path / "libmtl", num_classes=19)
    write_npy_tree(tmp_path / "mtan", {"train": 2}, ("image", "label_7", "label_19", "depth"))
    c19 = load_cityscapes(tmp_path / "mtan", num_classes=19)
    assert c19.folders["segmentation"] == "label_19" and c19.num_classes == 19
    assert load_cityscapes(tmp_path / "mtan").folders["segmentation"] == "label_7"
    with pytest.raises(ValueError, match="num_classes"):
        load_cityscapes(tmp_path / "mtan", num_classes=13)


# ----------------------------------------------------------------------------- Office


def write_office(root: Path, dataset: str = "office-31", list_dir: Path | None = None, pil: bool = True) -> dict:
    """Solid-colour images per domain / class and LibMTL-style lists; returns {domain: {split: [(path, label, rgb)]}}.

    ``pil=False`` writes placeholder bytes instead of images (for tests that never decode pixels).
    """
    image_mod = pytest.importorskip("PIL.Image") if pil else None
    lists = list_dir or root / "data_txt" / dataset
    lists.mkdir(parents=True, exist_ok=True)
    out = {}
    for di, dom in enumerate(local.OFFICE_DOMAINS[dataset]):
        out[dom] = {}
        for split, n in (("train", 3), ("val", 1), ("test", 2)):
            rows = []
            for k in range(n):
                label = (k + di) % 3
                rgb = (10 * di + 40 * k + 5, 100 + label, 200 - 30 * k)
                cls = f"class_{label}"
                rel = f"{dom}/images/{cls}/{split}_{k}.png" if dataset == "office-31" else f"{dom}/{cls}/{split}{k}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                if image_mod is None:
                    (root / rel).write_bytes(b"placeholder")
                else:
                    img = image_mod.new("RGB", (20 + 7 * k, 13 + 5 * di), rgb)
                    if k == 1:
                        img = img.convert("RGBA")  # converted back to RGB on load
                    img.save(root / rel)
                rows.append((rel, label, rgb))
            (lists / f"{dom}_{split}.txt").write_text("".join(f"{p} {lb}\n" for p, lb, _ in rows))
            out[dom][split] = rows
    return out


@pytest.mark.parametrize("dataset", ["office-31", "office-home"])


def test_office_lists_and_decoding(tmp_path, dataset):
    made = write_office(tmp_path, dataset)
    d = load_office(tmp_path, dataset, image_size=16)
    assert d.domains == local.OFFICE_DOMAINS[dataset] and d.task_names == d.domains
    assert d.num_classes == {"office-31": 31, "office-home": 65}[dataset] and d.num_tasks == len(d.domains)
    for dom in d.domains:
        for split in ("train", "val", "test"):
            s = d.splits[dom][split]
            assert s.paths == tuple(p for p, _, _ in made[dom][split])
            np.testing.assert_array_equal(s.labels, [lb for _, lb, _ in made[dom][split]])
        tv = d.splits[dom]["trval"]
        assert tv.paths == d.splits[dom]["train"].paths + d.splits[dom]["val"].paths
    dom = d.domains[-1]
    s = d.splits[dom]["train"]
    x, y = s[1]
    assert x.shape == (16, 16, 3) and x.dtype == np.float32 and y == made[dom]["train"][1][1]
    rgb = np.asarray(made[dom]["train"][1][2], np.float32) / 255.0
    ref = (rgb - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])  # ImageNet statistics
    np.testing.assert_allclose(x, np.broadcast_to(ref, x.shape), atol=1e-5)
    raw = load_office(tmp_path, dataset, image_size=10, normalize=False).splits[dom]["test"]
    xb, yb = raw.get_batch([1, 0])
    assert xb.shape == (2, 10, 10, 3)
    np.testing.assert_allclose(xb[0], np.broadcast_to(np.asarray(made[dom]["test"][1][2]) / 255.0, (10, 10, 3)),
                               atol=1e-6)
    np.testing.assert_array_equal(yb, [made[dom]["test"][1][1], made[dom]["test"][0][1]])
    assert [len(b[1]) for b in s.iterate_batches(2)] == [2, 1]
    assert len(list(s.iterate_batches(2, drop_last=True, shuffle=True))) == 1


def test_office_list_dir_and_errors(tmp_path, monkeypatch):
    write_office(tmp_path / "imgs", list_dir=tmp_path / "lists", pil=False)  # runs without Pillow
    d = load_office(tmp_path / "imgs", list_dir=tmp_path / "lists")
    assert len(d.splits["amazon"]["train"]) == 3
    with pytest.raises(DatasetUnavailableError, match=r"amazon,dslr,webcam\}_\{train,val,test\}\.txt"):
        load_office(tmp_path / "imgs")  # lists not under <root>/data_txt
    with pytest.raises(DatasetUnavailableError, match="is not a directory"):
        load_office(tmp_path / "nothing")
    with pytest.raises(ValueError, match="dataset"):
        load_office(tmp_path / "imgs", "office-10")
    lst = tmp_path / "lists" / "dslr_val.txt"
    good = lst.read_text()
    lst.write_text(good + "dslr/images/x.png 31\n")
    with pytest.raises(ValueError, match="label 31 outside 0..30"):
        load_office(tmp_path / "imgs", list_dir=tmp_path / "lists", check_files=False)
    lst.write_text(good + "just-a-path\n")
    with pytest.raises(ValueError, match="expected '<relative path> <label>'"):
        load_office(tmp_path / "imgs", list_dir=tmp_path / "lists")
    lst.write_text(good + "dslr/images/missing.png 2\n")
    with pytest.raises(DatasetUnavailableError, match="missing.png"):
        load_office(tmp_path / "imgs", list_dir=tmp_path / "lists")
    lazy = load_office(tmp_path / "imgs", list_dir=tmp_path / "lists", check_files=False)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        lazy.splits["dslr"]["val"][1]
    monkeypatch.setitem(sys.modules, "PIL", None)  # Pillow absent: a clear message, only when pixels are read
    with pytest.raises(DatasetUnavailableError, match="pip install pillow"):
        lazy.splits["dslr"]["val"][0]
    assert lazy.splits["dslr"]["val"].labels.shape == (2,)


def test_office_image_listed_in_two_splits_raises(tmp_path):
    """An image in train and test (test leakage) or twice in one list raises naming both entries."""
    made = write_office(tmp_path, pil=False)
    lists = tmp_path / "data_txt" / "office-31"
    test = lists / "webcam_test.txt"
    good = test.read_text()
    leaked, label, _ = made["webcam"]["train"][2]
    test.write_text(good + f"./{leaked} {label}\n")  # the same file, spelt differently
    with pytest.raises(ValueError, match=r"webcam_test: entry 3 \(\./webcam/.*\) is also entry 3 of webcam_train"):
        load_office(tmp_path)
    test.write_text(good + good.splitlines()[0] + "\n")
    with pytest.raises(ValueError, match=r"webcam_test: entry 3 .* is also entry 1 of webcam_test"):
        load_office(tmp_path, check_files=False)
    test.write_text(good)
    assert len(load_office(tmp_path).splits["webcam"]["test"]) == 2


def test_office_labels_disagreeing_within_a_class_folder_raise(tmp_path):
    """A line whose label differs from its class folder's other images (a mislabelled item) raises."""
    made = write_office(tmp_path, "office-home", pil=False)
    lst = tmp_path / "data_txt" / "office-home" / "Clipart_val.txt"
    path, label, _ = made["Clipart"]["val"][0]
    assert any(p.rsplit("/", 1)[0] == path.rsplit("/", 1)[0] for p, _, _ in made["Clipart"]["train"])
    lst.write_text(f"{path} {(label + 1) % 3}\n")
    with pytest.raises(ValueError, match=rf"Clipart_val: entry 1 \({path}\) has label {(label + 1) % 3}, but entry "
                                         rf"\d of Clipart_train in the same class folder Clipart/class_{label}/ has label {label}"):
        load_office(tmp_path, "office-home")


def test_office_empty_list_byte_order_mark_and_image_in_two_domains(tmp_path):
    """Audit 43: an empty list loaded as an empty split (accuracy 0), a UTF-8 byte-order mark became part of
    the first path (reported as a missing image), and one domain's training image in another domain's test
    list (leakage through the shared encoder) was accepted."""
    made = write_office(tmp_path, pil=False)
    lists = tmp_path / "data_txt" / "office-31"
    val = lists / "dslr_val.txt"
    good = val.read_text()
    val.write_bytes(b"\xef\xbb\xbf" + good.encode())
    assert load_office(tmp_path).splits["dslr"]["val"].paths == tuple(p for p, _, _ in made["dslr"]["val"])
    val.write_text("")
    with pytest.raises(ValueError, match=r"dslr_val\.txt lists no image"):
        load_office(tmp_path)
    val.write_text(good)
    test = lists / "webcam_test.txt"
    path, label, _ = made["amazon"]["train"][0]
    test.write_text(test.read_text() + f"{path} {label}\n")
    with pytest.raises(ValueError, match=rf"webcam_test: {path} is also listed for domain amazon"):
        load_office(tmp_path)


def test_read_split_list_paths_with_spaces(tmp_path):
    p = tmp_path / "l.txt"
    p.write_text("Art/Alarm Clock/00001.jpg 62\n\nArt/Pan/00005.jpg 63\n")
    assert local.read_split_list(p) == [("Art/Alarm Clock/00001.jpg", 62), ("Art/Pan/00005.jpg", 63)]
    p.write_text("Art/Room 2/00001.jpg 62\nArt/Pan/00005.jpg 1 63\n")  # a stray second label, not a path " 1"
    with pytest.raises(ValueError, match=r"l\.txt:2: two integer fields at the end of 'Art/Pan/00005\.jpg 1 63'"):
        local.read_split_list(p)
    p.write_text("Art/Room 2/00001.jpg 62\n")
    assert local.read_split_list(p) == [("Art/Room 2/00001.jpg", 62)]


def test_exported():
    assert ds.load_nyuv2 is load_nyuv2 and ds.load_cityscapes is load_cityscapes and ds.load_office is load_office


# ----------------------------------------------------------------------------- user copies, when present


def _env_root(var: str) -> Path:
    root = os.environ.get(var)
    if not root or not Path(root).is_dir():
        pytest.skip(f"no local copy: set {var}=<path> to the preprocessed data set to run this check")
    return Path(root)


def test_real_nyuv2():
    d = load_nyuv2(_env_root("DBMTL_JAX_NYUV2"), "train")
    assert len(d) == 795 and len(load_nyuv2(_env_root("DBMTL_JAX_NYUV2"), "val")) == 654
    it = d[0]
    assert it["image"].shape == (288, 384, 3) and it["segmentation"].max() < 13 and it["normal"].shape[-1] == 3


def test_real_cityscapes():
    d = load_cityscapes(_env_root("DBMTL_JAX_CITYSCAPES"), "train")
    assert len(d) == 2975 and d[0]["image"].shape == (128, 256, 3) and d[0]["segmentation"].max() < 7


@pytest.mark.parametrize("var,dataset", [("DBMTL_JAX_OFFICE31", "office-31"), ("DBMTL_JAX_OFFICEHOME", "office-home")])


def test_real_office(var, dataset):
    d = load_office(_env_root(var), dataset)
    s = d.splits[d.domains[0]]["test"]
    x, y = s[0]
    assert x.shape == (224, 224, 3) and 0 <= y < d.num_classes
