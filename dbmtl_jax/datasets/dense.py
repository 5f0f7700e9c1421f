"""A dense-prediction benchmark composed from real Fashion-MNIST images.

**This is a synthetic composition of real images**, a stand-in for NYUv2 (whose
images cannot be had offline): every scene is built from a fixed seed by
stacking Fashion-MNIST items (Xiao et al., 2017; read from the Debian package
``dataset-fashion-mnist``, see :mod:`dbmtl_jax.datasets.multimnist`) in depth
layers on a square canvas.  It exercises the same three per-pixel tasks and
loss types as NYUv2 (DB-MTL paper, Section 4.1), not the same difficulty.

Scene recipe (``image_size`` S = 64 by default):

1. draw ``k`` items (uniform in ``items_per_image``, default 3..5) and for each
   a depth ``d ~ U(near, far_item)`` (default ``U(2, 8)``); the item is
   resized (bilinear) to ``round(28 * size_ref / d)`` pixels (default
   ``size_ref = 4``: 56 px at d=2, 14 px at d=8, so nearer items look larger)
   and placed at a uniform position fully inside the canvas;
2. an item covers the pixels where its resized intensity exceeds
   ``mask_threshold`` (0.1); items are painted far to near, so **nearer items
   occlude farther ones** and farther items stay visible around them;
3. per pixel, the visible item defines every target; background pixels (no
   item) get class 0, depth ``far`` (the far plane, default 10) and normal
   ``(0, 0, 1)``.

Tasks:

================  =========================================================  ==========  ==========================
name              target                                                     loss        metrics
================  =========================================================  ==========  ==========================
``segmentation``  int32 ``[S, S]``: 0 background, ``1 + c`` for class ``c``   cross-ent.  mIoU, pixel accuracy
``depth``         float32 ``[S, S, 1]``: depth of the visible layer          L1          abs. / rel. error
``normal``        float32 ``[S, S, 3]``: unit normal of a relief surface     cosine      mean / median angle, within
================  =========================================================  ==========  ==========================

Normals: each item carries a relief height ``h = relief * blur(intensity)``
(Gaussian blur with ``sigma = blur_sigma`` px of its resized intensity, in
pixel units); the visible item's height is composited into a height field
``H`` (0 on the background) and ``n = (-dH/dx, -dH/dy, 1) / ||.||`` by central
differences (x = column, to the right; y = row, downwards; z towards the
viewer).  The inputs are the visible intensities, float32 ``[S, S, 1]`` in
[0, 1] (NHWC).

Items: train and val scenes draw from disjoint parts of the 60,000 training
items (``val_fraction`` held out), test scenes from the 10,000 t10k items.
The scenes are cached compactly (uint8 image and layer map, per-layer class
and depth, float16 height field) as ``.npz`` under the cache directory
(``$DBMTL_JAX_CACHE``, else ``$XDG_CACHE_HOME/dbmtl_jax``, else
``~/.cache/dbmtl_jax``); the float targets are expanded from that compact form
both on a fresh build and on a cache hit, so the two are identical.  The cache
key holds the options and, for files given with ``path=``, a digest of all four
arrays (an edited copy is built again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Optional, Union

import numpy as np

from dbmtl_jax.datasets._cache import artefact_path, load_artefact, save_artefact
from dbmtl_jax.datasets._checks import check_int
from dbmtl_jax.datasets.adult import TaskInfo
from dbmtl_jax.datasets.multimnist import FASHION_CLASSES, load_fashion_mnist, resize_bilinear

__all__ = ["DENSE_TASKS", "DenseData", "DenseSplit", "load_dense_fashion", "normals_from_height"]

_VERSION = 2
DENSE_TASKS: tuple[TaskInfo, ...] = (
    TaskInfo("segmentation", "cross_entropy", "miou", True),
    TaskInfo("depth", "l1", "abs_err", False, "depth units"),
    TaskInfo("normal", "cosine", "mean_angle", False, "degrees"),
)


@dataclasses.dataclass(frozen=True)
class DenseSplit:
    """One split: ``image`` float32 ``[N, S, S, 1]``, ``segmentation`` int32 ``[N, S, S]``,
    ``depth`` float32 ``[N, S, S, 1]``, ``normal`` float32 ``[N, S, S, 3]`` (unit vectors)."""

    image: np.ndarray
    segmentation: np.ndarray
    depth: np.ndarray
    normal: np.ndarray

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def targets(self) -> dict[str, np.ndarray]:
        """``{"segmentation": ..., "depth": ..., "normal": ...}`` (task order of :data:`DENSE_TASKS`)."""
        return {"segmentation": self.segmentation, "depth": self.depth, "normal": self.normal}


@dataclasses.dataclass(frozen=True)
class DenseData:
    """The three splits and their metadata.

    Attributes:
      train, val, test: :class:`DenseSplit`.
      tasks: one :class:`TaskInfo` per task.
      class_names: ``("background", "T-shirt/top", ...)``: 11 segmentation classes.
      far: depth of the background (far plane).
    """

    train: DenseSplit
    val: DenseSplit
    test: DenseSplit
    tasks: tuple[TaskInfo, ...]
    class_names: tuple[str, ...]
    far: float

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``[..., H, W]`` with zero padding (radius ``ceil(3 sigma)``)."""
    if sigma <= 0:
        return x.astype(np.float32)
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    h, w = x.shape[-2:]
    pad = np.zeros(x.shape[:-2] + (h + 2 * r, w + 2 * r), np.float32)
    pad[..., r:r + h, r:r + w] = x
    rows = sum(k[i] * pad[..., i:i + h, :] for i in range(2 * r + 1))
    return sum(k[i] * rows[..., :, i:i + w] for i in range(2 * r + 1)).astype(np.float32)


def normals_from_height(height: np.ndarray) -> np.ndarray:
    """Unit normals ``(-dH/dx, -dH/dy, 1) / norm`` of ``[..., H, W]`` height fields by central
    differences (one-sided at the border); returns float32 ``[..., H, W, 3]``."""
    h = np.asarray(height, dtype=np.float32)
    dy, dx = np.gradient(h, axis=(-2, -1))
    n = np.stack([-dx, -dy, np.ones_like(h)], axis=-1)
    return (n / np.linalg.norm(n, axis=-1, keepdims=True)).astype(np.float32)


def _generate(items: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator, cfg: dict) -> dict:
    """Compact scenes: uint8 image, uint8 layer map (0 = background, j = layer j-1), per-layer class
    and depth (-1 / far where unused), float16 relief height."""
    s, kmax = cfg["image_size"], cfg["items_per_image"][1]
    image = np.zeros((n, s, s), np.uint8)
    layer = np.zeros((n, s, s), np.uint8)
    height = np.zeros((n, s, s), np.float16)
    cls = np.full((n, kmax), -1, np.int16)
    dep = np.full((n, kmax), cfg["far"], np.float32)
    for i in range(n):
        k = int(rng.integers(cfg["items_per_image"][0], kmax + 1))
        pick = rng.choice(len(items), size=k, replace=False)
        d = rng.uniform(cfg["near"], cfg["far_item"], size=k)
        img = np.zeros((s, s), np.float32)
        hgt = np.zeros((s, s), np.float32)
        lay = np.zeros((s, s), np.uint8)
        for j in np.argsort(-d, kind="stable"):  # far to near
            size = int(np.clip(round(28 * cfg["size_ref"] / d[j]), 4, s))
            it = resize_bilinear(items[pick[j]].astype(np.float32) / 255.0, size, size)
            it = np.clip(it, 0.0, 1.0)
            r0, c0 = (int(v) for v in rng.integers(0, s - size + 1, size=2))
            mask = it > cfg["mask_threshold"]
            relief = cfg["relief"] * _gaussian_blur(it, cfg["blur_sigma"])
            win = (slice(r0, r0 + size), slice(c0, c0 + size))
            img[win] = np.where(mask, it, img[win])
            hgt[win] = np.where(mask, relief, hgt[win])
            lay[win] = np.where(mask, j + 1, lay[win])
            cls[i, j], dep[i, j] = labels[pick[j]], d[j]
        image[i] = np.round(img * 255.0).astype(np.uint8)
        layer[i], height[i] = lay, hgt.astype(np.float16)
    return {"image": image, "layer": layer, "height": height, "cls": cls, "depth": dep}


def _expand(c: dict, far: float) -> DenseSplit:
    lay = c["layer"].astype(np.int64)
    n = lay.shape[0]
    cls = np.concatenate([np.full((n, 1), -1, np.int64), c["cls"].astype(np.int64)], axis=1)
    dep = np.concatenate([np.full((n, 1), far, np.float32), c["depth"].astype(np.float32)], axis=1)
    rows = np.arange(n)[:, None, None]
    return DenseSplit(
        image=(c["image"].astype(np.float32) / 255.0)[..., None],
        segmentation=(cls[rows, lay] + 1).astype(np.int32),
        depth=dep[rows, lay][..., None].astype(np.float32),
        normal=normals_from_height(c["height"].astype(np.float32)),
    )


def _check_scene_option(name: str, value: float, low: float, high: float, expected: str, *,
                        low_open: bool = False, high_open: bool = False) -> None:
    """A ValueError naming ``name`` unless ``value`` is a finite number within ``[low, high]`` (an end excluded
    when ``*_open``): a NaN or out-of-range scene option builds scenes without error but with wrong targets."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
          and np.isfinite(value) and (value > low if low_open else value >= low)
          and (value < high if high_open else value <= high))
    if not ok:
        raise ValueError(f"{name} must be a finite number {expected}, got {value!r}.")


def load_dense_fashion(
    path: Optional[Union[str, os.PathLike]] = None,
    *,
    num_train: int = 2000,
    num_val: int = 500,
    num_test: int = 500,
    image_size: int = 64,
    items_per_image: tuple[int, int] = (3, 5),
    near: float = 2.0,
    far_item: float = 8.0,
    far: float = 10.0,
    size_ref: float = 4.0,
    mask_threshold: float = 0.1,
    relief: float = 4.0,
    blur_sigma: float = 1.0,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache: bool = True,
) -> DenseData:
    """Builds (or reads from the cache) the layered Fashion-MNIST scenes; see the module docstring.

    Args:
      path: directory with the Fashion-MNIST IDX files; ``None``: ``/usr/share/datasets/fashion-mnist``.
      num_train, num_val, num_test: number of scenes per split.
      image_size: canvas side S (>= 28).
      items_per_image: inclusive (min, max) number of items per scene.
      near, far_item: range of item depths; far: background depth (> far_item).
      size_ref: an item at depth d is ``28 * size_ref / d`` pixels wide.
      mask_threshold: item pixels above this intensity are opaque.
      relief, blur_sigma: relief height scale and its Gaussian blur (pixels).
      val_fraction: share of the training items reserved for val scenes.
      seed: generation seed (splits use independent streams).
      cache: read / write the compact ``.npz`` in the cache directory.

    Raises:
      DatasetUnavailableError: Fashion-MNIST is not installed (message gives the apt-get command).
    """
    lo, hi = (int(v) for v in items_per_image)
    if not 1 <= lo <= hi or hi > 255:
        raise ValueError(f"items_per_image must be (min, max) with 1 <= min <= max <= 255, got {items_per_image!r}.")
    image_size = check_int("image_size", image_size, 28)
    num_train, num_val, num_test = (check_int(n, v, 0) for n, v in (("num_train", num_train), ("num_val", num_val),
                                                                   ("num_test", num_test)))
    if not (np.isfinite([near, far_item, far]).all() and 0 < near < far_item < far):  # far=inf: infinite depths
        raise ValueError(f"need finite 0 < near < far_item < far, got {near}, {far_item}, {far}.")
    _check_scene_option("size_ref", size_ref, 0.0, np.inf, "> 0", low_open=True)  # <= 0: every item 4 px wide
    # >= 1 (or NaN): no pixel is ever covered and every scene is all background
    _check_scene_option("mask_threshold", mask_threshold, 0.0, 1.0, "in [0, 1)", high_open=True)
    # the height field is stored as float16 (max 65504): a larger relief overflows to inf, i.e. NaN normals
    _check_scene_option("relief", relief, 0.0, 65504.0, "in [0, 65504]")
    _check_scene_option("blur_sigma", blur_sigma, 0.0, np.inf, ">= 0")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")
    cfg = dict(image_size=int(image_size), items_per_image=(lo, hi), near=float(near), far_item=float(far_item),
               far=float(far), size_ref=float(size_ref), mask_threshold=float(mask_threshold), relief=float(relief),
               blur_sigma=float(blur_sigma))
    fm = load_fashion_mnist(path)
    key = dict(cfg, version=_VERSION, sizes=(num_train, num_val, num_test), val_fraction=val_fraction, seed=seed,
               source=[int(fm[k].shape[0]) for k in ("train_images", "test_images")],
               checksum=[int(fm[k][:64].astype(np.int64).sum()) for k in ("train_images", "test_images")])
    if path is not None:  # the Debian package's files never change; a user's copy may differ beyond item 64
        key["digest"] = hashlib.sha256(b"".join(np.ascontiguousarray(fm[k]).tobytes() for k in sorted(fm))).hexdigest()
    target = artefact_path("dense_fashion", key)
    arrays = load_artefact(target) if cache else None
    names = ("train", "val", "test")
    if arrays is None:
        order = np.random.default_rng(seed).permutation(fm["train_images"].shape[0])
        n_val = max(hi, int(round(val_fraction * len(order))))
        pools = {"train": order[n_val:], "val": order[:n_val], "test": np.arange(fm["test_images"].shape[0])}
        streams = np.random.SeedSequence(seed).spawn(3)
        arrays = {}
        for name, n, ss in zip(names, (num_train, num_val, num_test), streams):
            src = "test" if name == "test" else "train"
            items, labels = fm[f"{src}_images"][pools[name]], fm[f"{src}_labels"][pools[name]]
            if len(items) < hi:
                raise ValueError(f"the {name} item pool has {len(items)} items, fewer than items_per_image max {hi}.")
            for k, v in _generate(items, labels, n, np.random.default_rng(ss), cfg).items():
                arrays[f"{name}_{k}"] = v
        if cache:
            save_artefact(target, arrays)
    splits = {name: _expand({k: arrays[f"{name}_{k}"] for k in ("image", "layer", "height", "cls", "depth")}, far)
              for name in names}
    return DenseData(**splits, tasks=DENSE_TASKS, class_names=("background",) + FASHION_CLASSES, far=float(far))
