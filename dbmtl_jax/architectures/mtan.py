"""MTAN: a shared backbone with per-task soft-attention masks at every stage.

Reference: S. Liu, E. Johns, A. J. Davison, "End-to-End Multi-Task Learning
with Attention", CVPR 2019 (Multi-Task Attention Network).

The backbone runs once, shared by all tasks.  At stage ``j`` it gives an
intermediate map ``u_j`` and an output ``p_j`` (a stage may return the pair
``(u_j, p_j)``, or just ``p_j``, in which case ``u_j = p_j``).  Task ``t``
keeps its own attended features::

    a_t^(0) = m_t^(0)(u_0) ⊙ p_0
    a_t^(j) = m_t^(j)([u_j ; f_j(a_t^(j−1))]) ⊙ p_j            (j ≥ 1)
    m(z)    = σ(norm(W₂ · ReLU(norm(W₁ z))))       (1×1 conv → norm → ReLU → 1×1 conv → norm → sigmoid)

``[· ; ·]`` concatenates channels, ``f_j`` ("bridge") maps stage ``j−1``'s
width to stage ``j``'s (a 3×3 ``conv → norm → ReLU`` block for images,
followed by max-pooling to ``u_j``'s spatial size when it shrinks by an integer
factor, bilinear resizing otherwise; a ``dense → norm → ReLU`` layer for the
MLP variant) and is shared by the tasks, as in the official code.  Head ``t``
reads ``a_t^(L−1)``.  The masks lie in (0, 1).  ``kind="mlp"`` applies the same
construction to hidden features ``[batch, width]`` (a 1×1 convolution is a
dense layer on the channel axis), so MTAN also applies to tabular data.

Variant choices:

* the mask ends with a second normalisation before the sigmoid, as in the
  official code and LibMTL; the mask's hidden width is the stage width
  (official code; LibMTL divides it by the ResNet expansion);
* each task has its own attention modules (the official code; LibMTL's
  ``[module] * T`` list makes them one module shared by all tasks);
* shared parameters for gradient balancing: by default only the backbone,
  as in LibMTL's ``get_share_params`` (the bridges, though used by every
  task, then get the plain sum of task gradients like the task-specific
  parameters); ``mtan_shared_predicate(include_bridges=True)`` adds them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dbmtl_jax.architectures._layers import (
    ConvBlock,
    check_norm,
    check_unshared,
    make_norm,
    prefix_predicate,
    resize_to,
)

__all__ = [
    "AttentionMask",
    "MTAN",
    "MTAN_KINDS",
    "mtan_shared",
    "mtan_shared_predicate",
    "mtan_mlp",
    "mtan_conv",
    "ConvStage",
]

MTAN_KINDS = ("conv", "mlp")

mtan_shared: Callable[[str], bool] = prefix_predicate("backbone")
"""``shared=`` callable for :class:`MTAN` (LibMTL's choice): paths under ``backbone/``."""


def mtan_shared_predicate(include_bridges: bool = False) -> Callable[[str], bool]:
    """The ``shared=`` callable: the backbone, plus the task-shared bridges when ``include_bridges``."""
    return prefix_predicate("backbone", "bridges") if include_bridges else mtan_shared


class AttentionMask(nnx.Module):
    """MTAN attention module: ``1×1 conv → norm → ReLU → 1×1 conv → norm → sigmoid`` on the last axis."""

    def __init__(self, in_features: int, out_features: int, *, hidden: int | None = None, norm: str = "batch",
                 rngs: nnx.Rngs):
        hidden = int(out_features if hidden is None else hidden)
        self.conv1 = nnx.Linear(int(in_features), hidden, rngs=rngs)
        self.norm1 = make_norm(norm, hidden, rngs=rngs)
        self.conv2 = nnx.Linear(hidden, int(out_features), rngs=rngs)
        self.norm2 = make_norm(norm, int(out_features), rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.norm1(self.conv1(z)))
        return jax.nn.sigmoid(self.norm2(self.conv2(h)))


class _DenseBridge(nnx.Module):
    """``dense → norm → ReLU`` between MLP stages."""

    def __init__(self, in_features: int, out_features: int, *, norm: str, rngs: nnx.Rngs):
        self.dense = nnx.Linear(in_features, out_features, rngs=rngs)
        self.norm = make_norm(norm, out_features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.norm(self.dense(x)))


def _split_stage_output(out: Any) -> tuple[jax.Array, jax.Array]:
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(f"an MTAN stage must return p or (u, p); got a sequence of {len(out)} items.")
        return out[0], out[1]
    return out, out


class MTAN(nnx.Module):
    """Multi-Task Attention Network (Liu, Johns & Davison, CVPR 2019).

    Args:
      backbone: the shared stages, applied in sequence; each returns ``p_j`` or
        ``(u_j, p_j)`` (``p_j`` feeds the next stage).  ``u_j`` and ``p_j``
        have the same shape, with ``channels[j]`` features on the last axis.
      channels: the stage widths ``C_j``.
      heads: one head per task, applied to the task's last attended features.
      kind: ``"conv"`` (``NHWC`` maps, 3×3 conv bridges with pooling) or
        ``"mlp"`` (``[batch, C]`` features, dense bridges).
      norm: normalisation inside masks and bridges: ``"batch"`` (default, as
        the paper), ``"layer"``, ``"group"`` or ``"none"``.
      rngs: ``nnx.Rngs``.

    Parameter paths: ``backbone/…`` (shared), ``bridges/<j−1>/…`` (shared by
    the tasks), ``attention/<t>/<j>/…`` and ``heads/<t>/…`` (task-specific).
    Heads holding the same parameters (``[head] * T``), or the backbone's, are
    an error; so is a stage whose ``u_j`` and ``p_j`` differ in shape or do not
    have ``channels[j]`` features (the mask would broadcast silently).
    """

    is_shared = staticmethod(mtan_shared)

    def __init__(
        self,
        backbone: Sequence[nnx.Module],
        channels: Sequence[int],
        heads: Sequence[nnx.Module],
        *,
        kind: str = "conv",
        norm: str = "batch",
        rngs: nnx.Rngs,
    ):
        if kind not in MTAN_KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {MTAN_KINDS}.")
        check_norm(norm)
        backbone, heads = list(backbone), list(heads)
        ch = tuple(int(c) for c in channels)
        if not backbone:
            raise ValueError("backbone is empty; give at least one stage.")
        if len(ch) != len(backbone):
            raise ValueError(f"channels has {len(ch)} entries but the backbone has {len(backbone)} stages.")
        if not heads:
            raise ValueError("heads is empty; give one head per task.")
        check_unshared([("backbone", backbone)] + [(f"heads[{t}]", h) for t, h in enumerate(heads)])
        if kind == "conv":
            bridges = [ConvBlock(a, b, kernel_size=3, norm=norm, rngs=rngs) for a, b in zip(ch[:-1], ch[1:])]
        else:
            bridges = [_DenseBridge(a, b, norm=norm, rngs=rngs) for a, b in zip(ch[:-1], ch[1:])]
        self.backbone = nnx.List(backbone)
        self.bridges = nnx.List(bridges)
        self.attention = nnx.List(
            [
                nnx.List([AttentionMask(c if j == 0 else 2 * c, c, norm=norm, rngs=rngs) for j, c in enumerate(ch)])
                for _ in heads
            ]
        )
        self.heads = nnx.List(heads)
        self.kind = kind
        self.channels = ch

    @property
    def num_tasks(self) -> int:
        """``T``, the number of heads."""
        return len(self.heads)

    def shared_features(self, x: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        """The backbone's ``(u_j, p_j)`` for every stage."""
        out = []
        for j, stage in enumerate(self.backbone):
            u, p = _split_stage_output(stage(x))
            if u.shape != p.shape or u.shape[-1:] != (self.channels[j],):
                raise ValueError(
                    f"MTAN stage {j} returned u of shape {tuple(u.shape)} and p of shape {tuple(p.shape)}; both must "
                    f"have the same shape with channels[{j}] = {self.channels[j]} features on the last axis."
                )
            out.append((u, p))
            x = p
        return out

    def _attend(self, shared: list[tuple[jax.Array, jax.Array]], t: int) -> tuple[jax.Array, list[jax.Array]]:
        masks, a = [], None
        for j, (u, p) in enumerate(shared):
            if j == 0:
                z = u
            else:
                b = self.bridges[j - 1](a)
                if self.kind == "conv":
                    b = resize_to(b, u.shape[-3:-1])
                z = jnp.concatenate([u, b.astype(u.dtype)], axis=-1)
            m = self.attention[t][j](z)
            masks.append(m)
            a = m * p
        return a, masks

    def masks(self, x: jax.Array) -> tuple[list[jax.Array], ...]:
        """``masks(x)[t][j]``: task ``t``'s attention mask at stage ``j`` (values in (0, 1))."""
        shared = self.shared_features(x)
        return tuple(self._attend(shared, t)[1] for t in range(self.num_tasks))

    def features(self, x: jax.Array) -> list[jax.Array]:
        """The T attended feature maps ``a_t^(L−1)`` (the heads' inputs)."""
        shared = self.shared_features(x)
        return [self._attend(shared, t)[0] for t in range(self.num_tasks)]

    def __call__(self, x: jax.Array) -> tuple:
        """The tuple of the T task outputs."""
        return tuple(h(z) for h, z in zip(self.heads, self.features(x)))


class ConvStage(nnx.Module):
    """A backbone stage returning ``(u, p)``: ``u = block₁(x)`` (stride ``stride``), ``p = block₂(u)``."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, norm: str = "batch",
                 rngs: nnx.Rngs):
        self.block1 = ConvBlock(in_channels, out_channels, stride=stride, norm=norm, rngs=rngs)
        self.block2 = ConvBlock(out_channels, out_channels, norm=norm, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        u = self.block1(x)
        return u, self.block2(u)


def mtan_conv(
    in_channels: int,
    channels: Sequence[int],
    heads: Sequence[nnx.Module],
    *,
    norm: str = "batch",
    rngs: nnx.Rngs,
) -> MTAN:
    """A small conv MTAN: stage ``j`` is a :class:`ConvStage` (stride 2 for ``j ≥ 1``), ``NHWC`` input.

    The heads read features at ``1/2^(L−1)`` of the input resolution with
    ``channels[-1]`` channels.
    """
    ch = tuple(int(c) for c in channels)
    dims = (int(in_channels),) + ch
    stages = [ConvStage(dims[j], dims[j + 1], stride=1 if j == 0 else 2, norm=norm, rngs=rngs) for j in range(len(ch))]
    return MTAN(stages, ch, heads, kind="conv", norm=norm, rngs=rngs)


def mtan_mlp(
    in_features: int,
    hidden: Sequence[int],
    heads: Sequence[nnx.Module],
    *,
    norm: str = "batch",
    rngs: nnx.Rngs,
) -> MTAN:
    """MTAN for tabular data: stages ``dense → ReLU`` of widths ``hidden``, masks on the hidden features."""
    dims = (int(in_features),) + tuple(int(h) for h in hidden)
    stages = [nnx.Sequential(nnx.Linear(a, b, rngs=rngs), jax.nn.relu) for a, b in zip(dims[:-1], dims[1:])]
    return MTAN(stages, dims[1:], heads, kind="mlp", norm=norm, rngs=rngs)
