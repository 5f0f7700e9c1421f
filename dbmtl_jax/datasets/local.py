"""Lazy loaders for user copies of the DB-MTL paper's image benchmarks (nothing is downloaded).

These data sets cannot be fetched from a package registry; point the loaders at
a local copy.  Items are read from disk on access (``ds[i]``,
``ds.get_batch(indices)``, ``ds.iterate_batches(...)``), so the sets are never
loaded into memory at once.  Arrays are NumPy, channel-last (NHWC).

NYUv2 and Cityscapes: the preprocessed ``.npy`` trees of MTAN (Liu et al.,
CVPR 2019) that LibMTL's ``examples/nyu`` and ``examples/cityscapes`` read::

    <root>/train/image/0.npy ... <root>/val/image/<n-1>.npy
    NYUv2:      {train,val}/{image,label,depth,normal}/<i>.npy
                image [288, 384, 3] in [0, 1]; label [288, 384], 13 classes, -1 = ignore;
                depth [288, 384, 1], 0 = missing; normal [288, 384, 3], unit, 0 = missing
    Cityscapes: {train,val}/{image,label,depth}/<i>.npy   (LibMTL; 7 classes)
                or MTAN's {label_7, label_19} folders instead of label
                image [128, 256, 3]; label [128, 256], -1 = ignore; depth [128, 256, 1]

Files are numbered ``0 .. n-1`` (n = number of ``.npy`` files in ``image/``, at least 1); every
folder of a split must hold exactly those files (a missing or an extra file is a ValueError).
LibMTL evaluates on ``val`` (NYUv2: 795 train / 654 val; Cityscapes: 2,975 /
500); ``split="test"`` is accepted as an alias of ``val``, with a warning (selecting on
``val`` and reporting ``test`` would select on the test images).  Returned items:
``image`` float32, ``segmentation`` int32 (-1 ignore), ``depth`` float32
``[H, W, 1]``, ``normal`` float32 ``[H, W, 3]`` (NYUv2 only), unchanged
otherwise.  Every item is checked on reading: real (integer or float) arrays
of those shapes (an ``[H, W]`` depth or ``[H, W, 1]`` label is accepted), one
``H, W`` for all of an item's arrays, labels that are integers in
``-1 .. num_classes - 1``, and depths ``>= 0``; anything else raises a ValueError naming the file
(a channel-first image, or 19-class labels read as 7, would otherwise load).

Office-31 (Saenko et al., 2010; domains amazon, dslr, webcam; 31 classes) and
Office-Home (Venkateswara et al., 2017; Art, Clipart, Product, Real_World; 65
classes): one task per domain (multi-input), images in folders per domain and
class, plus LibMTL's split lists (``examples/office/data_txt/<dataset>/``),
one file per domain and split, ``<domain>_{train,val,test}.txt``, each line
``<path relative to root> <label>``, e.g. ``dslr/images/back_pack/frame_0011.jpg
0`` or ``Art/Calendar/00016.jpg 0``.  The list directory defaults to
``<root>/data_txt/<dataset>``, then ``<root>/data_txt``, then ``<root>``.
``trval`` = train + val, as LibMTL.  Images are decoded with Pillow (``pip
install pillow``; needed only when pixels are read), converted to RGB, resized
to ``image_size`` (224, bilinear) and, by default, normalised with the ImageNet
mean / std, as LibMTL's transform.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from dbmtl_jax.datasets._cache import unavailable
from dbmtl_jax.datasets.adult import TaskInfo

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageListDataset",
    "NpyDenseDataset",
    "OFFICE_DOMAINS",
    "OfficeData",
    "load_cityscapes",
    "load_nyuv2",
    "load_office",
    "read_split_list",
]

IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], np.float32)
OFFICE_DOMAINS: dict[str, tuple[str, ...]] = {
    "office-31": ("amazon", "dslr", "webcam"),
    "office-home": ("Art", "Clipart", "Product", "Real_World"),
}
OFFICE_CLASSES = {"office-31": 31, "office-home": 65}
NYU_TASKS: tuple[TaskInfo, ...] = (
    TaskInfo("segmentation", "cross_entropy", "miou", True),
    TaskInfo("depth", "l1", "abs_err", False, "m"),
    TaskInfo("normal", "cosine", "mean_angle", False, "degrees"),
)
CITYSCAPES_TASKS: tuple[TaskInfo, ...] = NYU_TASKS[:2]
_CHANNELS = {"image": 3, "depth": 1, "normal": 3}
_NPY_HOW = (
    "Copy the MTAN/LibMTL preprocessed {name} (.npy files) to a local folder with the layout\n"
    "  <root>/{{train,val}}/{{{dirs}}}/<i>.npy\n"
    "and pass its path (see LibMTL's examples/{example}/README.md for where the preprocessed files come from)."
)


class NpyDenseDataset:
    """Lazy dense-prediction split over ``<root>/<split>/<folder>/<i>.npy`` files.

    Attributes:
      root: the split directory.
      folders: ``{output key: folder name}``, ``"image"`` first.
      tasks: task metadata.
      num_classes: segmentation classes.
    """

    def __init__(self, split_dir: Path, folders: dict[str, str], tasks: tuple[TaskInfo, ...], num_classes: int):
        self.root = split_dir
        self.folders = dict(folders)
        self.tasks = tasks
        self.num_classes = num_classes
        files = {k: {f.name for f in (split_dir / d).glob("*.npy")} for k, d in self.folders.items()}
        n = len(files["image"])
        if n == 0:
            raise ValueError(f"{split_dir / self.folders['image']} holds no .npy files (an empty split).")
        want = {f"{i}.npy" for i in range(n)}
        for k, have in files.items():
            missing = sorted(want - have, key=lambda s: int(s[:-4]))
            if missing:
                raise ValueError(f"{split_dir / self.folders[k]} lacks {len(missing)} of the files 0..{n - 1}.npy "
                                 f"(first: {missing[0]}); the image folder has {n} .npy files.")
            extra = sorted(have - want)
            if extra:  # e.g. a truncated image folder: its items would silently be dropped
                raise ValueError(f"{split_dir / self.folders[k]} has {len(extra)} .npy file(s) beyond 0..{n - 1}.npy "
                                 f"(first: {extra[0]}), but the image folder has {n}; the folders of a split must "
                                 "hold the same items.")
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):  # int(1.7) would read item 1
            raise TypeError(f"index must be an integer, got {type(i).__name__} {i!r}.")
        i = int(i)
        if not -self._n <= i < self._n:
            raise IndexError(f"index {i} out of range for {self._n} items.")
        i %= self._n
        out = {}
        for key, d in self.folders.items():
            path = self.root / d / f"{i}.npy"
            try:
                a = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:  # a truncated or non-.npy file: say which one
                raise ValueError(f"{path}: not a readable .npy array ({e}).") from e
            if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
                raise ValueError(f"{path}: dtype {a.dtype}; expected an integer or float array.")
            if key == "segmentation":
                a = self._labels(a, path)
            else:
                raw = a
                with np.errstate(over="ignore", invalid="ignore"):
                    a = np.asarray(raw, np.float32)
                bad = ~np.isfinite(a)
                if bad.any():
                    raise ValueError(
                        f"{path}: value at index {tuple(int(j) for j in np.argwhere(bad)[0])} is not finite as float32 "
                        f"({raw[bad][0].item()!r} in the file); mark invalid pixels with 0, "
                        "as the LibMTL layouts do, not NaN or inf."
                    )
                if key == "depth" and a.ndim == 2:
                    a = a[..., None]
                if key == "depth" and a.size and a.min() < 0:
                    raise ValueError(
                        f"{path}: depth value {a[a < 0][0]} is negative; these layouts mark missing depth with 0 "
                        "(a -1 'invalid' marker, as other preprocessings use, would be scored as a valid depth)."
                    )
                channels = _CHANNELS.get(key)
                if channels is not None and (a.ndim != 3 or a.shape[-1] != channels):
                    raise ValueError(f"{path}: shape {a.shape}; expected [H, W, {channels}] (channel-last).")
            hw = out["image"].shape[:2] if out else a.shape[:2]
            if a.shape[:2] != hw:
                raise ValueError(f"{path}: shape {a.shape}, but the item's image is {hw} pixels.")
            out[key] = a
        return out

    def _labels(self, a: np.ndarray, path: Path) -> np.ndarray:
        """``a`` as int32 ``[H, W]`` labels in ``-1 .. num_classes - 1`` (-1 = ignore), or a ValueError."""
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim != 2:
            raise ValueError(f"{path}: shape {a.shape}; expected [H, W] labels.")
        if np.issubdtype(a.dtype, np.floating):
            whole = np.isfinite(a) & (a == np.round(a))
            if not np.all(whole):
                raise ValueError(f"{path}: label value {a[~whole][0]} is not an integer.")
        if a.size and (a.min() < -1 or a.max() >= self.num_classes):
            bad = a[(a < -1) | (a >= self.num_classes)][0]
            raise ValueError(f"{path}: label {bad} outside -1 (ignore) .. {self.num_classes - 1}.")
        return a.astype(np.int32)

    def get_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Items ``indices`` stacked along a new leading axis."""
        items = [self[i] for i in indices]
        if not items:
            raise ValueError("get_batch needs at least one index.")
        return {k: np.stack([it[k] for it in items]) for k in self.folders}

    def iterate_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                        drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        order = np.random.default_rng(seed).permutation(self._n) if shuffle else np.arange(self._n)
        for s in range(0, self._n, batch_size):
            chunk = order[s:s + batch_size]
            if drop_last and len(chunk) < batch_size:
                return
            yield self.get_batch(chunk)


def _split_dir(root: Union[str, os.PathLike], split: str, name: str, how: str) -> Path:
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test' (alias of 'val'), got {split!r}.")
    if split == "test":
        warnings.warn(
            f"{name}: split='test' reads the same files as split='val' (the MTAN/LibMTL copies have no separate "
            "test split): selecting a model on 'val' and reporting 'test' would select on the test images. "
            "Carve a validation set from 'train' instead.",
            UserWarning,
            stacklevel=3,
        )
    base = Path(root).expanduser()
    d = base / ("val" if split == "test" else split)
    if not (d / "image").is_dir():
        raise unavailable(name, f"{d / 'image'} is not a directory.", how)
    return d


def load_nyuv2(root: Union[str, os.PathLike], split: str = "train") -> NpyDenseDataset:
    """NYUv2 (13-class segmentation, depth, normals) from a local MTAN/LibMTL ``.npy`` tree."""
    how = _NPY_HOW.format(name="NYUv2", dirs="image,label,depth,normal", example="nyu")
    d = _split_dir(root, split, "NYUv2", how)
    for sub in ("label", "depth", "normal"):
        if not (d / sub).is_dir():
            raise unavailable("NYUv2", f"{d / sub} is not a directory.", how)
    folders = {"image": "image", "segmentation": "label", "depth": "depth", "normal": "normal"}
    return NpyDenseDataset(d, folders, NYU_TASKS, 13)


def load_cityscapes(root: Union[str, os.PathLike], split: str = "train", *, num_classes: int = 7) -> NpyDenseDataset:
    """Cityscapes (7- or 19-class segmentation, depth) from a local MTAN/LibMTL ``.npy`` tree.

    The labels are read from ``label_<num_classes>/`` if present, else (7 classes only) from
    LibMTL's ``label/``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes not in (7, 19):
        raise ValueError(f"num_classes must be the int 7 or 19, got {num_classes!r}.")
    how = _NPY_HOW.format(name="Cityscapes", dirs="image,label,depth", example="cityscapes")
    d = _split_dir(root, split, "Cityscapes", how)
    candidates = [f"label_{num_classes}"] + (["label"] if num_classes == 7 else [])
    label = next((c for c in candidates if (d / c).is_dir()), None)
    if label is None:
        raise unavailable("Cityscapes", f"none of {', '.join(str(d / c) for c in candidates)} is a directory.", how)
    if not (d / "depth").is_dir():
        raise unavailable("Cityscapes", f"{d / 'depth'} is not a directory.", how)
    return NpyDenseDataset(d, {"image": "image", "segmentation": label, "depth": "depth"}, CITYSCAPES_TASKS,
                           num_classes)


# --------------------------------------------------------------------------- Office-31 / Office-Home


def read_split_list(path: Union[str, os.PathLike]) -> list[tuple[str, int]]:
    """Parses a LibMTL split list: ``<relative path> <integer label>`` per line (blank lines skipped).

    A path may contain spaces, but a line ending in two integer fields (``a.jpg 1 2``) is an error: it
    would otherwise read as the path ``a.jpg 1``."""
    out = []
    # utf-8-sig: a byte-order mark (lists saved by some Windows editors) is not part of the first path
    for n, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        m = re.fullmatch(r"(.+?)\s+(-?\d+)", line)
        if m is None:
            raise ValueError(f"{path}:{n}: expected '<relative path> <label>', got {line[:80]!r}.")
        if re.search(r"\s-?\d+$", m.group(1)):
            raise ValueError(f"{path}:{n}: two integer fields at the end of {line[:80]!r}; expected one label "
                             "after the path.")
        out.append((m.group(1), int(m.group(2))))
    return out


def _pillow() -> Any:
    try:
        from PIL import Image  # type: ignore
    except ImportError as e:
        raise unavailable("Office image", "Pillow is not installed; it decodes the images.",
                          "  pip install pillow") from e
    return Image


class ImageListDataset:
    """Lazy (image, label) items of one domain and split; pixels are decoded on access.

    Attributes:
      root: directory the list paths are relative to.
      paths: relative image paths; labels: int32 ``[N]`` (available without decoding).
      image_size: output side; normalize: whether ImageNet mean / std are applied.
    """

    def __init__(self, root: Path, entries: Sequence[tuple[str, int]], image_size: int = 224,
                 normalize: bool = True):
        self.root = root
        self.paths = tuple(p for p, _ in entries)
        self.labels = np.asarray([lb for _, lb in entries], np.int32)
        self.image_size = int(image_size)
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, i: int) -> np.ndarray:
        """Float32 ``[S, S, 3]``: RGB, bilinear resize, /255, optional ImageNet normalisation."""
        image_mod = _pillow()
        path = self.root / self.paths[i]
        if not path.is_file():
            raise FileNotFoundError(f"{path} (listed in the split file) does not exist.")
        with image_mod.open(path) as im:
            im = im.convert("RGB").resize((self.image_size, self.image_size), image_mod.BILINEAR)
            x = np.asarray(im, dtype=np.float32) / 255.0
        if self.normalize:
            x = (x - IMAGENET_MEAN) / IMAGENET_STD
        return x.astype(np.float32)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.load_image(int(i)), int(self.labels[int(i)])

    def get_batch(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, np.int64).reshape(-1)
        images = np.stack([self.load_image(int(i)) for i in idx]) if len(idx) else np.zeros(
            (0, self.image_size, self.image_size, 3), np.float32)
        return images, self.labels[idx]

    def iterate_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                        drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for s in range(0, len(self), batch_size):
            chunk = order[s:s + batch_size]
            if drop_last and len(chunk) < batch_size:
                return
            yield self.get_batch(chunk)


@dataclasses.dataclass(frozen=True)
class OfficeData:
    """Office-31 / Office-Home: ``splits[domain][mode]`` (mode ``train``, ``val``, ``test``,
    ``trval``) are :class:`ImageListDataset`; one classification task per domain."""

    name: str
    domains: tuple[str, ...]
    num_classes: int
    splits: dict[str, dict[str, ImageListDataset]]
    tasks: tuple[TaskInfo, ...]

    @property
    def num_tasks(self) -> int:
        return len(self.domains)

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.domains


def _check_disjoint(domain: str, entries: dict[str, list[tuple[str, int]]]) -> None:
    """Raises a ValueError if an image is listed twice in one domain's train / val / test lists (an image in
    two splits leaks test items into training; one listed twice in a split counts twice), or if two images
    of one class folder have different labels (a mislabelled line)."""
    first: dict[str, tuple[str, int]] = {}
    for mode, es in entries.items():
        for n, (path, _) in enumerate(es, 1):
            key = os.path.normpath(path).replace("\\", "/")
            if key in first:
                m0, n0 = first[key]
                raise ValueError(f"{domain}_{mode}: entry {n} ({path}) is also entry {n0} of {domain}_{m0}; the "
                                 "train, val and test lists must name each image once.")
            first[key] = (mode, n)
    label_of: dict[str, tuple[int, str, int]] = {}  # class folder -> (label, list, entry)
    for mode, es in entries.items():
        for n, (path, label) in enumerate(es, 1):
            folder = os.path.dirname(os.path.normpath(path).replace("\\", "/"))
            lb0, m0, n0 = label_of.setdefault(folder, (label, mode, n))
            if lb0 != label:
                raise ValueError(f"{domain}_{mode}: entry {n} ({path}) has label {label}, but entry {n0} of "
                                 f"{domain}_{m0} in the same class folder {folder}/ has label {lb0}.")


def load_office(root: Union[str, os.PathLike], dataset: str = "office-31", *,
                list_dir: Optional[Union[str, os.PathLike]] = None, image_size: int = 224,
                normalize: bool = True, check_files: bool = True) -> OfficeData:
    """Office-31 or Office-Home from a local copy (see the module docstring).

    Args:
      root: directory the list paths are relative to (holding ``amazon/``, ``dslr/``, ... or
        ``Art/``, ``Clipart/``, ...).
      dataset: ``"office-31"`` or ``"office-home"``.
      list_dir: directory of the ``<domain>_<split>.txt`` lists (default: see the module docstring).
      image_size: side of the resized images.
      normalize: apply the ImageNet mean / std.
      check_files: verify that every listed image exists (a directory scan; no decoding).

    Raises:
      DatasetUnavailableError: ``root`` or a list file is missing.
      ValueError: a list is malformed or empty, a label is out of range, an image is listed twice in a
        domain's train / val / test lists or in two domains' lists, or one class folder's images have
        different labels.
    """
    if dataset not in OFFICE_DOMAINS:
        raise ValueError(f"dataset must be one of {sorted(OFFICE_DOMAINS)}, got {dataset!r}.")
    base = Path(root).expanduser()
    how = (f"Provide a local copy of {dataset}: the image folders per domain and class under <root>, and "
           f"LibMTL's split lists (examples/office/data_txt/{dataset}/<domain>_{{train,val,test}}.txt, lines "
           "'<path relative to root> <label>') in list_dir (default <root>/data_txt/<dataset>).")
    if not base.is_dir():
        raise unavailable(dataset, f"{base} is not a directory.", how)
    domains = OFFICE_DOMAINS[dataset]
    candidates = [Path(list_dir).expanduser()] if list_dir is not None else [
        base / "data_txt" / dataset, base / "data_txt", base]
    lists = next((c for c in candidates if all((c / f"{d}_{m}.txt").is_file() for d in domains
                                               for m in ("train", "val", "test"))), None)
    if lists is None:
        raise unavailable(dataset, f"no directory among {', '.join(map(str, candidates))} holds all of "
                                   f"{{{','.join(domains)}}}_{{train,val,test}}.txt.", how)
    n_cls = OFFICE_CLASSES[dataset]
    splits: dict[str, dict[str, ImageListDataset]] = {}
    owner: dict[str, str] = {}  # image -> the first domain listing it
    for d in domains:
        entries = {m: read_split_list(lists / f"{d}_{m}.txt") for m in ("train", "val", "test")}
        empty = [m for m, es in entries.items() if not es]
        if empty:
            raise ValueError(f"{lists / f'{d}_{empty[0]}.txt'} lists no image (an empty split would score 0).")
        _check_disjoint(d, entries)
        for m, es in entries.items():
            for path, _ in es:
                key = os.path.normpath(path).replace("\\", "/")
                if owner.setdefault(key, d) != d:  # one domain's training image in another's test set
                    raise ValueError(f"{d}_{m}: {path} is also listed for domain {owner[key]}; each image belongs "
                                     "to one domain.")
        entries["trval"] = entries["train"] + entries["val"]
        for m, es in entries.items():
            bad = [lb for _, lb in es if not 0 <= lb < n_cls]
            if bad:
                raise ValueError(f"{d}_{m}: label {bad[0]} outside 0..{n_cls - 1}.")
            if check_files and m != "trval":
                missing = [p for p, _ in es if not (base / p).is_file()]
                if missing:
                    raise unavailable(dataset, f"{len(missing)} image(s) of {d}_{m}.txt are missing under {base} "
                                               f"(first: {missing[0]}).", how)
        splits[d] = {m: ImageListDataset(base, es, image_size, normalize) for m, es in entries.items()}
    tasks = tuple(TaskInfo(d, "cross_entropy", "accuracy", True) for d in domains)
    return OfficeData(name=dataset, domains=domains, num_classes=n_cls, splits=splits, tasks=tasks)
