"""Cross-stitch networks: one column per task, mixed by learnable cross-stitch units.

Reference: I. Misra, A. Shrivastava, A. Gupta, M. Hebert, "Cross-stitch
Networks for Multi-task Learning", CVPR 2016.

Every task ``t`` has its own copy of a column of ``L`` stages (layers or
blocks).  After stage ``l`` the T activations are mixed by a cross-stitch unit
``α^(l) ∈ R^{T×T}``::

    x̃_t^(l) = Σ_s α^(l)_{ts} x_s^(l)          (x_s^(l) = stage l of column s)

and ``x̃_t^(l)`` is the input of stage ``l+1`` of column ``t``; head ``t`` reads
``x̃_t^(L)``.  Initialisation (paper Sec. 5, "(α_S, α_D) = (0.9, 0.1)"):
``α_tt = diagonal`` (0.9) and ``α_ts = (1 − diagonal)/(T − 1)`` off the
diagonal, so each row is a convex combination; ``T = 1`` gets ``α = [[1]]``.

Variant choices:

* a stitch unit after *every* stage, including the last (the paper stitches
  after every pooling and fully-connected layer before the task-specific
  output); LibMTL stitches between ResNet stages only and initialises the
  units to all-ones;
* by default one scalar per task pair and stage (as LibMTL); with
  ``channels=`` one α per task pair *and channel* (``[T, T, C_l]``, the
  channel-wise variant of other public implementations);
* for gradient balancing, *all* encoder parameters (every column and every
  stitch unit) are treated as shared, as LibMTL does: each column receives
  gradient from every task through the stitch units.  :data:`cross_stitch_shared`
  / :attr:`CrossStitch.is_shared` select paths under ``columns/`` and
  ``stitches/``; the heads are task-specific.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dbmtl_jax.architectures._layers import check_unshared, prefix_predicate

__all__ = ["CrossStitch", "cross_stitch_shared", "stitch_init"]

cross_stitch_shared: Callable[[str], bool] = prefix_predicate("columns", "stitches")
"""``shared=`` callable for :class:`CrossStitch`: the columns and the stitch units."""


def stitch_init(num_tasks: int, diagonal: float = 0.9, off_diagonal: Optional[float] = None) -> np.ndarray:
    """The initial ``[T, T]`` stitch matrix: ``diagonal`` on, ``(1 − diagonal)/(T − 1)`` off the diagonal."""
    t = int(num_tasks)
    if t < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks!r}.")
    if t == 1:
        return np.ones((1, 1), np.float32)
    off = (1.0 - float(diagonal)) / (t - 1) if off_diagonal is None else float(off_diagonal)
    a = np.full((t, t), off, np.float32)
    np.fill_diagonal(a, float(diagonal))
    return a


class CrossStitch(nnx.Module):
    """Cross-stitch network (Misra et al., CVPR 2016) over T task columns.

    Args:
      columns: ``columns[t][l]`` is stage ``l`` of task ``t``'s column; all
        columns have the same number of stages, and stage ``l`` gives the same
        output shape in every column.  The columns receive the same input.
      heads: one head per task, applied to the last stitched features.
      diagonal: initial ``α_tt`` (default 0.9).
      off_diagonal: initial ``α_ts`` for ``s ≠ t`` (default ``(1 − diagonal)/(T − 1)``).
      channels: ``None`` (default): one ``[T, T]`` unit per stage.  Otherwise
        the channel counts ``C_l`` of the stage outputs (last axis): units of
        shape ``[T, T, C_l]``, one α per task pair and channel.

    Parameter paths: ``columns/<t>/<l>/…``, ``stitches/<l>``, ``heads/<t>/…``.
    Columns or heads holding the same parameters (``[column] * T``) are an error.
    """

    is_shared = staticmethod(cross_stitch_shared)

    def __init__(
        self,
        columns: Sequence[Sequence[nnx.Module]],
        heads: Sequence[nnx.Module],
        *,
        diagonal: float = 0.9,
        off_diagonal: Optional[float] = None,
        channels: Optional[Sequence[int]] = None,
    ):
        columns = [list(c) for c in columns]
        heads = list(heads)
        if not columns:
            raise ValueError("columns is empty; give one column per task.")
        if len(heads) != len(columns):
            raise ValueError(f"got {len(columns)} columns but {len(heads)} heads; give one of each per task.")
        depth = len(columns[0])
        if depth == 0 or any(len(c) != depth for c in columns):
            raise ValueError(f"every column must have the same, nonzero number of stages; got {[len(c) for c in columns]}.")
        if channels is not None and len(channels) != depth:
            raise ValueError(f"channels has {len(channels)} entries but the columns have {depth} stages.")
        check_unshared([(f"columns[{i}]", c) for i, c in enumerate(columns)]
                       + [(f"heads[{i}]", h) for i, h in enumerate(heads)])
        t = len(columns)
        base = stitch_init(t, diagonal, off_diagonal)
        if channels is None:
            units = [nnx.Param(jnp.asarray(base)) for _ in range(depth)]
        else:
            units = [nnx.Param(jnp.asarray(np.repeat(base[:, :, None], int(c), axis=2))) for c in channels]
        self.columns = nnx.List([nnx.List(c) for c in columns])
        self.stitches = nnx.List(units)
        self.heads = nnx.List(heads)

    @property
    def num_tasks(self) -> int:
        """``T``, the number of columns."""
        return len(self.columns)

    @classmethod
    def from_factory(
        cls,
        make_column: Callable[[nnx.Rngs], Sequence[nnx.Module]],
        heads: Sequence[nnx.Module],
        *,
        rngs: nnx.Rngs,
        **kwargs,
    ) -> "CrossStitch":
        """Builds one freshly initialised column per head with ``make_column(rngs)``."""
        return cls([make_column(rngs) for _ in range(len(heads))], heads, **kwargs)

    def stitch(self, layer: int, xs: Sequence[jax.Array]) -> list[jax.Array]:
        """Applies stitch unit ``layer`` to the T stage outputs ``xs``."""
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) != 1:
            raise ValueError(f"stage {layer} gives different output shapes across columns: {sorted(shapes)}.")
        y = jnp.stack(xs)
        alpha = self.stitches[layer][...]
        acc = jnp.promote_types(y.dtype, jnp.float32)
        if alpha.ndim == 2:
            mixed = jnp.tensordot(alpha.astype(acc), y.astype(acc), axes=(1, 0))
        else:
            if y.shape[-1] != alpha.shape[-1]:
                raise ValueError(
                    f"stitch unit {layer} has {alpha.shape[-1]} channels but stage {layer} outputs {y.shape[-1]}."
                )
            mixed = jnp.einsum("tsc,s...c->t...c", alpha.astype(acc), y.astype(acc))
        # Back to a floating input's dtype (bf16 stays bf16); integer stage outputs are not truncated.
        out = y.dtype if jnp.issubdtype(y.dtype, jnp.inexact) else acc
        return [mixed[i].astype(out) for i in range(len(xs))]

    def features(self, x: jax.Array) -> list[jax.Array]:
        """The T stitched column outputs (the heads' inputs)."""
        xs = [x] * self.num_tasks
        for layer in range(len(self.stitches)):
            xs = [self.columns[t][layer](xs[t]) for t in range(self.num_tasks)]
            xs = self.stitch(layer, xs)
        return xs

    def __call__(self, x: jax.Array) -> tuple:
        """The tuple of the T task outputs."""
        return tuple(h(z) for h, z in zip(self.heads, self.features(x)))
