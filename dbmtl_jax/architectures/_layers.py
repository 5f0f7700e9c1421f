"""Small building blocks shared by the architectures (private).

Layouts: dense inputs ``[..., features]``; images ``NHWC``.  A 1×1 convolution
on an ``NHWC`` tensor is a dense layer on the channel axis, which is how the
attention masks of :mod:`.mtan` work on both images and tabular features.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
from flax import nnx

__all__ = ["NORMS", "Identity", "make_norm", "ConvBlock", "resize_to", "check_norm", "prefix_predicate"]

NORMS = ("batch", "layer", "group", "none")


def check_norm(norm: str) -> None:
    """Raises ``ValueError`` naming the option when ``norm`` is not one of :data:`NORMS`."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}.")


class Identity(nnx.Module):
    """``x ↦ x`` (stands in for a disabled normalisation layer)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def make_norm(norm: str, features: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """A normalisation layer over the last (feature/channel) axis.

    ``"batch"``: ``nnx.BatchNorm`` with momentum 0.9 (PyTorch's default 0.1 in
    Flax's convention) and ε = 1e-5; ``"layer"``: ``nnx.LayerNorm``;
    ``"group"``: ``nnx.GroupNorm`` with ``gcd(features, 8)`` groups;
    ``"none"``: identity.  Batch norm normalises with batch statistics while the
    module is in training mode (``model.train()``, the default) and with the
    running averages after ``model.eval()``.
    """
    check_norm(norm)
    if norm == "batch":
        return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)
    if norm == "layer":
        return nnx.LayerNorm(features, rngs=rngs)
    if norm == "group":
        return nnx.GroupNorm(features, num_groups=math.gcd(features, 8), rngs=rngs)
    return Identity()


class ConvBlock(nnx.Module):
    """``conv(k×k, stride, dilation) → norm → ReLU`` on ``NHWC`` inputs ('SAME' padding)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        norm: str = "batch",
        rngs: nnx.Rngs,
    ):
        self.conv = nnx.Conv(
            in_channels,
            out_channels,
            (kernel_size, kernel_size),
            strides=stride,
            kernel_dilation=dilation,
            padding="SAME",
            use_bias=norm == "none",
            rngs=rngs,
        )
        self.norm = make_norm(norm, out_channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.norm(self.conv(x)))


def resize_to(x: jax.Array, spatial: Sequence[int]) -> jax.Array:
    """Brings an ``NHWC`` map to the spatial size ``spatial``.

    Unchanged when the sizes agree; a max-pool when both sizes shrink by the
    same integer factor (the down-sampling used between MTAN stages);
    bilinear resizing otherwise.
    """
    h, w = x.shape[-3], x.shape[-2]
    th, tw = int(spatial[0]), int(spatial[1])
    if (h, w) == (th, tw):
        return x
    if th <= h and tw <= w and h % th == 0 and w % tw == 0 and h // th == w // tw:
        k = h // th
        return nnx.max_pool(x, (k, k), strides=(k, k), padding="VALID")
    return jax.image.resize(x, x.shape[:-3] + (th, tw, x.shape[-1]), method="linear")


def prefix_predicate(*prefixes: str) -> Callable[[str], bool]:
    """A ``shared=`` callable: True for parameter paths starting with one of ``prefixes``.

    A prefix matches a whole path component: ``"encoder"`` matches
    ``"encoder/layers/0/kernel"`` and ``"encoder"`` but not ``"encoder2/kernel"``.
    """
    prefixes = tuple(p.rstrip("/") for p in prefixes)

    def is_shared(path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in prefixes)

    return is_shared

