"""Small building blocks shared by the architectures (private).

Layouts: dense inputs ``[..., features]``; images ``NHWC``.  A 1×1 convolution
on an ``NHWC`` tensor is a dense layer on the channel axis, which is how the
attention masks of :mod:`.mtan` work on both images and tabular features.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import jax
from flax import nnx

__all__ = [
    "NORMS",
    "Identity",
    "BatchNorm",
    "make_norm",
    "ConvBlock",
    "resize_to",
    "check_norm",
    "check_channels",
    "check_unshared",
    "prefix_predicate",
]

NORMS = ("batch", "layer", "group", "none")


def check_norm(norm: str) -> None:
    """Raises ``ValueError`` naming the option when ``norm`` is not one of :data:`NORMS`."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}.")


class Identity(nnx.Module):
    """``x ↦ x`` (stands in for a disabled normalisation layer)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` that refuses a training-mode batch with fewer than two values per channel.

    With one value per channel the batch variance is 0 and the output is the
    bias ``β`` whatever the input (PyTorch raises here too); with none (an
    empty batch) the batch mean is NaN and would be written into the running
    statistics for good.  Evaluation mode (running averages) accepts any batch.
    """

    def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None, *,
                 mask: Optional[jax.Array] = None) -> jax.Array:
        train = not (self.use_running_average if use_running_average is None else use_running_average)
        if train and mask is None:
            axis = self.axis % x.ndim
            count = math.prod(d for i, d in enumerate(x.shape) if i != axis)
            if count < 2:
                raise ValueError(
                    f"batch norm in training mode got input shape {tuple(x.shape)}: {count} value(s) per channel, "
                    "at least 2 are needed (one gives a constant output, none makes the running statistics NaN); "
                    "use a larger batch, or model.eval() to normalise with the running averages."
                )
        return super().__call__(x, use_running_average, mask=mask)


def make_norm(norm: str, features: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """A normalisation layer over the last (feature/channel) axis.

    ``"batch"``: :class:`BatchNorm` (``nnx.BatchNorm``) with momentum 0.9 (PyTorch's default 0.1 in
    Flax's convention) and ε = 1e-5; ``"layer"``: ``nnx.LayerNorm``;
    ``"group"``: ``nnx.GroupNorm`` with ``gcd(features, 8)`` groups;
    ``"none"``: identity.  Batch norm normalises with batch statistics while the
    module is in training mode (``model.train()``, the default) and with the
    running averages after ``model.eval()``; in training mode it needs at least
    two values per channel (batch × spatial positions).
    """
    check_norm(norm)
    if norm == "batch":
        return BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)
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
        self.in_channels = int(in_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_channels(x, self.in_channels, "ConvBlock")
        return jax.nn.relu(self.norm(self.conv(x)))


def check_channels(x: Any, channels: int, where: str) -> None:
    """Raises ``ValueError`` unless ``x`` is an ``NHWC`` map (rank ≥ 3) with ``channels`` on the last axis.

    Catches ``NCHW`` inputs and images without a channel axis before the
    convolution does, with a message naming the layout.
    """
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) < 3 or shape[-1] != channels:
        raise ValueError(
            f"{where} expects NHWC images with {channels} channel(s) on the last axis, got shape {shape}"
            + (" (NCHW? transpose with x.transpose(0, 2, 3, 1))" if len(shape) == 4 and shape[1] == channels else "")
            + "."
        )


def _variable_ids(node: Any) -> set[int]:
    """The ids of the ``nnx.Variable`` objects (parameters, statistics) inside ``node`` (a module or a list of them)."""
    if isinstance(node, (list, tuple)):
        return set().union(*(_variable_ids(n) for n in node))
    if not isinstance(node, nnx.Module):
        return set()
    return {id(v) for _, v in nnx.iter_graph(node) if isinstance(v, nnx.Variable)}


def check_unshared(parts: Sequence[tuple[str, Any]]) -> None:
    """Raises ``ValueError`` when two named parts of a model hold the same ``nnx.Variable``.

    ``[head] * T`` (or one column module reused for every task) gives every
    task the same parameters: ``nnx.state`` lists them once, so the
    shared/task-specific partition of the gradient-balancing methods and
    :func:`~dbmtl_jax.architectures.hps_spec` would be wrong.
    """
    owner: dict[int, str] = {}
    for name, part in parts:
        for vid in _variable_ids(part):
            if vid in owner and owner[vid] != name:
                raise ValueError(
                    f"{name} and {owner[vid]} share parameters (the same module or Variable object); "
                    "build one per task, e.g. [make() for _ in range(T)] rather than [module] * T."
                )
            owner.setdefault(vid, name)


def resize_to(x: jax.Array, spatial: Sequence[int]) -> jax.Array:
    """Brings an ``NHWC`` map to the spatial size ``spatial``.

    Unchanged when the sizes agree; a max-pool when both sizes shrink by the
    same integer factor (the down-sampling used between MTAN stages);
    bilinear resizing otherwise (``jax.image.resize``, which antialiases when
    it shrinks, unlike PyTorch's ``F.interpolate``; upsampling is unaffected).
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

