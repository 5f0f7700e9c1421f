"""Benchmark problems: hard-parameter-sharing (HPS) models in pure JAX.

Two problems, both built from NumPy initial values so that the PyTorch
reference (``torch_steps.py``) can start from exactly the same parameters and
batch:

* ``mlp``:  trunk ``512 → 1024 → 512`` (ReLU after both layers,
  1,050,112 shared parameters), one linear head ``512 → 16`` per task with a
  mean-squared-error loss; batch 256.
* ``conv``: a small convolutional trunk (``3 → 16`` stride-2 conv, ``16 → 32``
  conv; 5,088 shared parameters) and, per task, a heavy dense head in the
  style of DeepLab's ASPP: parallel ``1×1``, ``3×3`` dilation-2 and ``3×3``
  dilation-4 branches, concatenation, a ``1×1`` projection and a ``1×1``
  per-pixel output, with a per-pixel MSE loss; batch 8, 32×32 RGB input.
  One head costs about twice the trunk, so back-propagating every head once per
  task (T² head backward passes) dominates a naive per-task-gradient step.

Layouts: dense kernels ``[in, out]``, conv kernels ``HWIO``, images ``NHWC``.
Parameters are ``{"trunk": {...}, "heads": ({...}, ...)}``; the shared
(trunk) leaves are those whose path starts with ``"trunk"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Problem", "make_problem", "make_mlp", "make_conv", "PROBLEMS", "is_shared"]

PyTree = Any


def is_shared(path: str) -> bool:
    """The ``shared=`` callable for these problems: trunk leaves are shared."""
    return path.startswith("trunk")


@dataclass(frozen=True)
class Problem:
    """One benchmark problem at one number of tasks.

    ``params`` / ``batch`` hold NumPy arrays (converted to JAX by the caller);
    ``trunk_fn(trunk_params, batch) -> features`` and
    ``head_loss_fns[t](head_params_t, features, batch) -> scalar loss`` define
    the model, ``loss_fn(params, batch) -> [T]`` the raw task losses.
    ``config`` records the sizes (the PyTorch mirror reads it).
    """

    name: str
    num_tasks: int
    params: dict
    batch: tuple
    trunk_fn: Callable[[PyTree, Any], jax.Array]
    head_loss_fns: tuple
    config: dict

    @property
    def n_shared(self) -> int:
        return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(self.params["trunk"])))

    @property
    def n_params(self) -> int:
        return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(self.params)))

    def loss_fn(self, params: PyTree, batch: Any) -> jax.Array:
        z = self.trunk_fn(params["trunk"], batch)
        return jnp.stack([f(hp, z, batch) for f, hp in zip(self.head_loss_fns, params["heads"])])


def _dense(rng: np.random.Generator, fan_in: int, fan_out: int) -> dict:
    bound = 1.0 / np.sqrt(fan_in)
    return {
        "w": rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32),
        "b": rng.uniform(-bound, bound, (fan_out,)).astype(np.float32),
    }


def _conv(rng: np.random.Generator, k: int, c_in: int, c_out: int) -> dict:
    bound = 1.0 / np.sqrt(k * k * c_in)
    return {
        "w": rng.uniform(-bound, bound, (k, k, c_in, c_out)).astype(np.float32),
        "b": rng.uniform(-bound, bound, (c_out,)).astype(np.float32),
    }


def make_mlp(
    num_tasks: int,
    *,
    batch_size: int = 256,
    d_in: int = 512,
    hidden: int = 1024,
    d_feat: int = 512,
    d_out: int = 16,
    seed: int = 0,
) -> Problem:
    """MLP HPS: ``d_in → hidden → d_feat`` trunk, linear ``d_feat → d_out`` heads, MSE."""
    rng = np.random.default_rng(seed)
    params = {
        "trunk": {"l1": _dense(rng, d_in, hidden), "l2": _dense(rng, hidden, d_feat)},
        "heads": tuple(_dense(rng, d_feat, d_out) for _ in range(num_tasks)),
    }
    x = rng.standard_normal((batch_size, d_in)).astype(np.float32)
    y = rng.standard_normal((num_tasks, batch_size, d_out)).astype(np.float32)

    def trunk_fn(p: PyTree, batch: Any) -> jax.Array:
        h = jax.nn.relu(batch[0] @ p["l1"]["w"] + p["l1"]["b"])
        return jax.nn.relu(h @ p["l2"]["w"] + p["l2"]["b"])

    def head_loss(t: int) -> Callable:
        def f(hp: PyTree, z: jax.Array, batch: Any) -> jax.Array:
            return jnp.mean(jnp.square(z @ hp["w"] + hp["b"] - batch[1][t]))

        return f

    config = dict(kind="mlp", batch_size=batch_size, d_in=d_in, hidden=hidden, d_feat=d_feat, d_out=d_out)
    return Problem("mlp", num_tasks, params, (x, y), trunk_fn, tuple(head_loss(t) for t in range(num_tasks)), config)


def conv2d(x: jax.Array, p: dict, *, stride: int = 1, dilation: int = 1) -> jax.Array:
    """NHWC convolution with HWIO kernel, 'SAME'-style symmetric padding ``dilation*(k-1)/2``."""
    k = p["w"].shape[0]
    pad = dilation * (k - 1) // 2
    y = jax.lax.conv_general_dilated(
        x,
        p["w"],
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + p["b"]


def make_conv(
    num_tasks: int,
    *,
    batch_size: int = 8,
    image: int = 32,
    c_in: int = 3,
    trunk_channels: Sequence[int] = (16, 32),
    head_channels: int = 16,
    dilations: Sequence[int] = (2, 4),
    d_out: int = 4,
    seed: int = 0,
) -> Problem:
    """Conv HPS: strided conv trunk, ASPP-like heads (1×1 + dilated 3×3 branches), per-pixel MSE."""
    rng = np.random.default_rng(seed)
    c1, c2 = trunk_channels
    trunk = {"c1": _conv(rng, 3, c_in, c1), "c2": _conv(rng, 3, c1, c2)}

    def head_params() -> dict:
        hp = {"b0": _conv(rng, 1, c2, head_channels)}
        for i, _ in enumerate(dilations):
            hp[f"b{i + 1}"] = _conv(rng, 3, c2, head_channels)
        hp["proj"] = _conv(rng, 1, head_channels * (1 + len(dilations)), head_channels)
        hp["out"] = _conv(rng, 1, head_channels, d_out)
        return hp

    params = {"trunk": trunk, "heads": tuple(head_params() for _ in range(num_tasks))}
    x = rng.standard_normal((batch_size, image, image, c_in)).astype(np.float32)
    y = rng.standard_normal((num_tasks, batch_size, image // 2, image // 2, d_out)).astype(np.float32)
    dil = tuple(dilations)

    def trunk_fn(p: PyTree, batch: Any) -> jax.Array:
        h = jax.nn.relu(conv2d(batch[0], p["c1"], stride=2))
        return jax.nn.relu(conv2d(h, p["c2"]))

    def head_loss(t: int) -> Callable:
        def f(hp: PyTree, z: jax.Array, batch: Any) -> jax.Array:
            branches = [jax.nn.relu(conv2d(z, hp["b0"]))]
            branches += [jax.nn.relu(conv2d(z, hp[f"b{i + 1}"], dilation=d)) for i, d in enumerate(dil)]
            h = jax.nn.relu(conv2d(jnp.concatenate(branches, axis=-1), hp["proj"]))
            return jnp.mean(jnp.square(conv2d(h, hp["out"]) - batch[1][t]))

        return f

    config = dict(
        kind="conv", batch_size=batch_size, image=image, c_in=c_in, trunk_channels=(c1, c2),
        head_channels=head_channels, dilations=dil, d_out=d_out,
    )
    return Problem("conv", num_tasks, params, (x, y), trunk_fn, tuple(head_loss(t) for t in range(num_tasks)), config)


PROBLEMS = {"mlp": make_mlp, "conv": make_conv}


def make_problem(name: str, num_tasks: int, **kwargs: Any) -> Problem:
    """``make_mlp`` / ``make_conv`` by name."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; expected one of {tuple(PROBLEMS)}.")
    return PROBLEMS[name](num_tasks, **kwargs)
