"""Small ready-made encoders and heads for the library's benchmarks (Flax NNX).

* :class:`MLPEncoder` and :class:`MLPHead`: tabular data (e.g. UCI Adult).
* :class:`LeNetEncoder`: the LeNet-style network used for MultiMNIST
  (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
  NeurIPS 2018, and LibMTL): two 5×5 convolutions with 2×2 max-pooling and a
  dense layer, for 28×28 or 36×36 single-channel images; with
  ``MLPHead(50, 10, hidden=(50,))`` per task it is the usual MultiMNIST model.
* :class:`ConvEncoderDecoder`: a small fully-convolutional U-Net-style
  encoder-decoder giving per-pixel features at the input resolution (dense
  tasks on ~64×64 images, a scaled-down stand-in for the SegNet / DeepLab
  backbones of NYUv2 and Cityscapes).
* :class:`DenseHead` (1×1 or 3×3 convolution, optionally with a hidden
  3×3 block) and :class:`ASPPHead` (DeepLab-v3's atrous spatial pyramid
  pooling head: Chen et al., "Rethinking Atrous Convolution for Semantic Image
  Segmentation", arXiv:1706.05587, 2017), the heavy head LibMTL uses on NYUv2.

Layouts: dense inputs ``[batch, features]``; images ``NHWC``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

from dbmtl_jax.architectures._layers import ConvBlock, check_channels, check_norm, make_norm, resize_to

__all__ = ["MLPEncoder", "MLPHead", "LeNetEncoder", "ConvEncoderDecoder", "DenseHead", "ASPPHead"]

Activation = Callable[[jax.Array], jax.Array]


class MLPEncoder(nnx.Module):
    """``in_features → hidden[0] → … → hidden[-1]``, each layer ``dense → norm → activation``.

    Args:
      in_features: input width.
      hidden: the layer widths; ``out_features == hidden[-1]``.
      activation: the nonlinearity after every layer (default ReLU).
      norm: ``"none"`` (default), ``"batch"``, ``"layer"`` or ``"group"``.
      rngs: ``nnx.Rngs`` for initialisation.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (256, 128),
        *,
        activation: Activation = jax.nn.relu,
        norm: str = "none",
        rngs: nnx.Rngs,
    ):
        check_norm(norm)
        hidden = tuple(int(h) for h in hidden)
        if not hidden:
            raise ValueError("hidden must hold at least one layer width.")
        dims = (int(in_features),) + hidden
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.norms = nnx.List([make_norm(norm, b, rngs=rngs) for b in hidden])
        self.activation = activation
        self.out_features = hidden[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer, norm in zip(self.layers, self.norms):
            x = self.activation(norm(layer(x)))
        return x


class MLPHead(nnx.Module):
    """A per-task head ``in_features → hidden… → out_features`` (ReLU between layers, linear output).

    ``squeeze=True`` (with ``out_features == 1``) drops the last axis: a scalar
    output per example, ``[batch]``, for regression and binary (logit) tasks.
    """

    def __init__(self, in_features: int, out_features: int, *, hidden: Sequence[int] = (), squeeze: bool = False,
                 rngs: nnx.Rngs):
        if squeeze and int(out_features) != 1:
            raise ValueError(f"MLPHead: squeeze=True needs out_features == 1, got {out_features}.")
        dims = (int(in_features),) + tuple(int(h) for h in hidden) + (int(out_features),)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.squeeze = bool(squeeze)

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = jax.nn.relu(x)
        return x[..., 0] if self.squeeze else x


def _pair(v: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


class LeNetEncoder(nnx.Module):
    """LeNet-style MultiMNIST encoder (Sener & Koltun, NeurIPS 2018; LibMTL's MultiMNIST model).

    ``conv5×5(c_in→10) → maxpool 2 → ReLU → conv5×5(10→20) → maxpool 2 → ReLU →
    flatten → dense(→50) → ReLU`` with 'VALID' convolutions.  The flattened
    width follows from ``image_size``: 320 for 28×28 and 720 for 36×36 inputs.
    Sener & Koltun's network also has channel dropout after the second
    convolution (and dropout in its task heads); it is left out here.

    Args:
      in_channels: input channels (1 for MultiMNIST).
      image_size: ``H`` (square) or ``(H, W)`` of the inputs.
      channels: the two convolutions' output channels (default ``(10, 20)``).
      features: the output width (default 50).
      kernel_size: the convolution size (default 5).
      rngs: ``nnx.Rngs``.

    Inputs are ``[B, H, W, C]`` or, for one channel, ``[B, H, W]``, with
    ``(H, W) == image_size`` (anything else, e.g. ``NCHW``, is an error); ``B``
    may be 0.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: Union[int, Sequence[int]] = 28,
        *,
        channels: Sequence[int] = (10, 20),
        features: int = 50,
        kernel_size: int = 5,
        rngs: nnx.Rngs,
    ):
        c1, c2 = (int(c) for c in channels)
        k = int(kernel_size)
        h, w = _pair(image_size)
        for _ in range(2):
            h, w = (h - k + 1) // 2, (w - k + 1) // 2
        if h < 1 or w < 1:
            raise ValueError(f"image_size {image_size!r} is too small for two {k}×{k} convolutions with pooling.")
        self.conv1 = nnx.Conv(int(in_channels), c1, (k, k), padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (k, k), padding="VALID", rngs=rngs)
        self.fc = nnx.Linear(h * w * c2, int(features), rngs=rngs)
        self.in_channels = int(in_channels)
        self.image_size = _pair(image_size)
        self.out_features = int(features)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 3 and self.in_channels == 1:
            x = x[..., None]
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_size + (self.in_channels,):
            expected = ", ".join(map(str, self.image_size + (self.in_channels,)))
            raise ValueError(f"LeNetEncoder expects NHWC images [B, {expected}]"
                             + (" (or [B, H, W])" if self.in_channels == 1 else "")
                             + f", got shape {tuple(x.shape)}.")
        x = jax.nn.relu(nnx.max_pool(self.conv1(x), (2, 2), strides=(2, 2)))
        x = jax.nn.relu(nnx.max_pool(self.conv2(x), (2, 2), strides=(2, 2)))
        # The explicit width keeps an empty batch (B = 0) valid, where reshape(B, -1) is ambiguous.
        return jax.nn.relu(self.fc(x.reshape(x.shape[0], math.prod(x.shape[1:]))))


class ConvEncoderDecoder(nnx.Module):
    """A small U-Net-style fully-convolutional encoder-decoder with per-pixel output features.

    Encoder: a stem of two 3×3 blocks at full resolution (``channels[0]``), then
    for every further width a stride-2 3×3 block and a 3×3 block.  Decoder: for
    every encoder level, upsample (bilinear) to the skip connection's size,
    concatenate it and apply two 3×3 blocks.  A block is ``conv → norm → ReLU``.
    The output is ``[B, H, W, channels[0]]`` for an ``[B, H, W, in_channels]``
    input (any ``H``, ``W``: odd sizes are handled by resizing to the skip).

    Args:
      in_channels: input channels (3 for RGB).
      channels: widths per level, finest first (default ``(16, 32, 64)``:
        a 64×64 image is encoded down to 16×16).
      norm: ``"batch"`` (default), ``"group"``, ``"layer"`` or ``"none"``.
      rngs: ``nnx.Rngs``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (16, 32, 64),
        *,
        norm: str = "batch",
        rngs: nnx.Rngs,
    ):
        check_norm(norm)
        ch = tuple(int(c) for c in channels)
        if not ch:
            raise ValueError("channels must hold at least one width.")
        self.stem = nnx.Sequential(
            ConvBlock(int(in_channels), ch[0], norm=norm, rngs=rngs), ConvBlock(ch[0], ch[0], norm=norm, rngs=rngs)
        )
        self.down = nnx.List(
            [
                nnx.Sequential(
                    ConvBlock(a, b, stride=2, norm=norm, rngs=rngs), ConvBlock(b, b, norm=norm, rngs=rngs)
                )
                for a, b in zip(ch[:-1], ch[1:])
            ]
        )
        self.up = nnx.List(
            [
                nnx.Sequential(
                    ConvBlock(a + b, a, norm=norm, rngs=rngs), ConvBlock(a, a, norm=norm, rngs=rngs)
                )
                for a, b in zip(ch[:-1], ch[1:])
            ]
        )
        self.out_channels = ch[0]

    def __call__(self, x: jax.Array) -> jax.Array:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(skips[-1]))
        y = skips[-1]
        for level in reversed(range(len(self.up))):
            skip = skips[level]
            y = resize_to(y, skip.shape[-3:-1])
            y = self.up[level](jnp.concatenate([skip, y], axis=-1))
        return y


class DenseHead(nnx.Module):
    """A light per-pixel head: one ``k×k`` convolution (``k`` = 1 or 3), or ``3×3 block → 1×1`` with ``hidden``.

    Args:
      in_channels: feature channels.
      out_channels: per-pixel outputs (classes, 1 for depth, 3 for normals).
      kernel_size: 1 (default) or 3, for the single convolution.
      hidden: if given, a ``conv3×3 → norm → ReLU`` block of this width first.
      norm: the norm of the hidden block (default ``"batch"``).
      rngs: ``nnx.Rngs``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 1,
        hidden: Union[int, None] = None,
        norm: str = "batch",
        rngs: nnx.Rngs,
    ):
        check_norm(norm)
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size must be 1 or 3, got {kernel_size!r}.")
        self.in_channels = int(in_channels)
        if hidden is None:
            self.hidden = None
            self.out = nnx.Conv(int(in_channels), int(out_channels), (kernel_size, kernel_size), rngs=rngs)
        else:
            self.hidden = ConvBlock(int(in_channels), int(hidden), kernel_size=3, norm=norm, rngs=rngs)
            self.out = nnx.Conv(int(hidden), int(out_channels), (1, 1), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_channels(x, self.in_channels, "DenseHead")
        if self.hidden is not None:
            x = self.hidden(x)
        return self.out(x)


class _ImagePooling(nnx.Module):
    """ASPP's image-level branch: global average → 1×1 conv → norm → ReLU → broadcast.

    The pooled map is 1×1, so group norm would normalise groups of a few
    scalars; ``norm="group"`` uses layer norm here instead.
    """

    def __init__(self, in_channels: int, out_channels: int, *, norm: str, rngs: nnx.Rngs):
        self.proj = nnx.Linear(in_channels, out_channels, use_bias=norm == "none", rngs=rngs)
        self.norm = make_norm("layer" if norm == "group" else norm, out_channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        g = jnp.mean(x, axis=(-3, -2), keepdims=True)
        g = jax.nn.relu(self.norm(self.proj(g)))
        return jnp.broadcast_to(g, x.shape[:-1] + g.shape[-1:])


class ASPPHead(nnx.Module):
    """DeepLab-v3 ASPP head (Chen et al., arXiv:1706.05587, 2017), as LibMTL's NYUv2 decoder.

    Parallel branches on the same features: a 1×1 block, one 3×3 block per
    dilation rate and (``image_pooling=True``) an image-level pooling branch;
    their concatenation goes through a 1×1 projection block, a 3×3 block and a
    final 1×1 convolution to ``out_channels``.  Blocks are
    ``conv → norm → ReLU``.  DeepLab's dropout after the projection is left out.

    Args:
      in_channels: feature channels.
      out_channels: per-pixel outputs.
      channels: width of every branch (default 64; DeepLab uses 256).
      rates: the 3×3 branches' dilations (default ``(6, 12, 18)``, DeepLab-v3 at
        output stride 16; LibMTL uses ``(12, 24, 36)`` at output stride 8).
      image_pooling: include the global-average branch (default True).
      norm: ``"batch"`` (default, as DeepLab), ``"group"``, ``"layer"``, ``"none"``.
        With ``"batch"`` the image-pooling branch is normalised over the batch
        of pooled vectors, which is ill-conditioned for very small batches
        (as in DeepLab) and an error for a training batch of one; prefer
        ``"layer"`` there.
      rngs: ``nnx.Rngs``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        channels: int = 64,
        rates: Sequence[int] = (6, 12, 18),
        image_pooling: bool = True,
        norm: str = "batch",
        rngs: nnx.Rngs,
    ):
        check_norm(norm)
        c_in, ch = int(in_channels), int(channels)
        branches = [ConvBlock(c_in, ch, kernel_size=1, norm=norm, rngs=rngs)]
        branches += [ConvBlock(c_in, ch, kernel_size=3, dilation=int(r), norm=norm, rngs=rngs) for r in rates]
        self.branches = nnx.List(branches)
        self.pooling = _ImagePooling(c_in, ch, norm=norm, rngs=rngs) if image_pooling else None
        n = len(branches) + (1 if image_pooling else 0)
        self.project = ConvBlock(n * ch, ch, kernel_size=1, norm=norm, rngs=rngs)
        self.refine = ConvBlock(ch, ch, kernel_size=3, norm=norm, rngs=rngs)
        self.out = nnx.Conv(ch, int(out_channels), (1, 1), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        parts = [b(x) for b in self.branches]
        if self.pooling is not None:
            parts.append(self.pooling(x))
        y = self.project(jnp.concatenate(parts, axis=-1))
        return self.out(self.refine(y))
