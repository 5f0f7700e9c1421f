"""Hard parameter sharing (HPS): one shared encoder, one head per task.

Reference: R. Caruana, "Multitask Learning: A Knowledge-Based Source of
Inductive Bias", ICML 1993 (and Caruana, Machine Learning 28, 1997).  This is
the architecture of every DB-MTL experiment (Lin et al., "Dual-Balancing for
Multi-Task Learning", Sec. 4).

The encoder parameters are the shared parameters θ of the gradient-balancing
methods; the heads are task-specific::

    model = HPS(MLPEncoder(d, (64,), rngs=rngs), [nnx.Linear(64, 1, rngs=rngs) for _ in range(T)])
    tx = optax.chain(dbmtl_jax.dbmtl(T, shared=HPS.is_shared), optax.adam(1e-3))

``model.features(x)`` / ``model.head(t, z)`` expose trunk and heads separately;
:func:`hps_spec` turns the model into a :class:`dbmtl_jax.TrunkHeads` spec for
:func:`dbmtl_jax.value_and_task_grads` and :func:`dbmtl_jax.fused_dbmtl` (each
head back-propagated once, only the trunk pull-back run per task)::

    params = nnx.state(model, nnx.Param)
    losses, grads = dbmtl_jax.value_and_task_grads(hps_spec(model, head_losses))(params, (x, targets))
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
from flax import nnx

from dbmtl_jax.architectures._layers import check_unshared, prefix_predicate
from dbmtl_jax.task_gradients import TrunkHeads, _deprecated, value_and_task_grads

__all__ = ["HPS", "hps_shared", "hps_spec", "hps_task_grads"]  # the last deprecated (0.2.0)

hps_shared: Callable[[str], bool] = prefix_predicate("encoder")
"""``shared=`` callable for :class:`HPS`: True exactly for paths under ``encoder/``."""


class HPS(nnx.Module):
    """Hard parameter sharing (Caruana, ICML 1993): ``y_t = head_t(encoder(x))``.

    Args:
      encoder: the shared trunk, any ``nnx.Module`` (or callable module) mapping
        the input to features.
      heads: one module per task mapping the features to that task's output.

    Attributes ``encoder`` and ``heads`` (an ``nnx.List``) give parameter paths
    ``encoder/…`` and ``heads/<t>/…``; :attr:`is_shared` (= :data:`hps_shared`)
    marks the encoder leaves as shared.  Heads holding the same parameters
    (``[head] * T``), or a head sharing the encoder's, are an error.
    """

    is_shared = staticmethod(hps_shared)

    def __init__(self, encoder: nnx.Module, heads: Sequence[nnx.Module]):
        heads = list(heads)
        if not heads:
            raise ValueError("heads is empty; give one head per task.")
        check_unshared([("encoder", encoder)] + [(f"heads[{t}]", h) for t, h in enumerate(heads)])
        self.encoder = encoder
        self.heads = nnx.List(heads)

    @property
    def num_tasks(self) -> int:
        """``T``, the number of heads."""
        return len(self.heads)

    def features(self, x: Any) -> Any:
        """The shared representation ``encoder(x)``."""
        return self.encoder(x)

    def head(self, t: int, features: Any) -> Any:
        """Head ``t`` applied to ``features``."""
        return self.heads[t](features)

    def __call__(self, x: Any) -> tuple:
        """The tuple of the ``T`` task outputs."""
        z = self.features(x)
        return tuple(self.head(t, z) for t in range(self.num_tasks))


def hps_spec(model: HPS, head_losses: Sequence[Callable[[Any, Any], jax.Array]]) -> TrunkHeads:
    """The :class:`dbmtl_jax.TrunkHeads` spec of an :class:`HPS` model: trunk = encoder, head ``t`` = ``heads[t]``.

    Args:
      model: the model; its graph and non-parameter state (batch-norm
        statistics, RNG counts) are read now, so build the spec inside the
        (``nnx.jit``-ed) step, from the current model.
      head_losses: ``head_losses[t](output_t, targets) -> scalar`` loss ``ℓ_t``.

    The spec's parameters are ``nnx.state(model, nnx.Param)`` and its batch is
    ``(x, targets)``; gradients come back in that layout (every leaf with the
    task axis ``[T, *shape]``, head ``t``'s gradient in row ``t``), ready for
    ``nnx.Optimizer.update``.  Non-parameter state is read, not updated: run
    the model forward separately to update running statistics.
    """
    head_losses = tuple(head_losses)
    if not head_losses:
        raise ValueError("head_losses is empty; give one loss per task.")
    if model.num_tasks != len(head_losses):
        raise ValueError(f"the model has {model.num_tasks} heads but {len(head_losses)} head losses were given.")
    enc_def, enc_params, enc_rest = nnx.split(model.encoder, nnx.Param, ...)
    head_splits = [nnx.split(h, nnx.Param, ...) for h in model.heads]
    # The layout of nnx.split(model, nnx.Param): 'encoder' leaves, then heads 0, 1, ….
    full = jax.tree.structure(nnx.split(model, nnx.Param, ...)[1])
    part_defs = [jax.tree.structure(enc_params)] + [jax.tree.structure(s[1]) for s in head_splits]
    if full.num_leaves != sum(d.num_leaves for d in part_defs):
        raise ValueError(
            "the model has parameters outside 'encoder' and 'heads'; hps_spec only handles the HPS layout."
        )

    def split(params: Any) -> tuple[Any, list]:
        leaves, parts, start = jax.tree.leaves(params), [], 0
        for d in part_defs:
            parts.append(jax.tree.unflatten(d, leaves[start : start + d.num_leaves]))
            start += d.num_leaves
        return parts[0], parts[1:]

    def join(trunk: Any, heads: Sequence[Any]) -> Any:
        return jax.tree.unflatten(full, jax.tree.leaves(trunk) + [x for h in heads for x in jax.tree.leaves(h)])

    def trunk_fn(p: nnx.State, batch: Any) -> Any:
        return nnx.merge(enc_def, p, enc_rest, copy=True)(batch[0])

    def head_fn(t: int) -> Callable[[nnx.State, Any, Any], jax.Array]:
        h_def, _, h_rest = head_splits[t]

        def loss(hp: nnx.State, z: Any, batch: Any) -> jax.Array:
            return head_losses[t](nnx.merge(h_def, hp, h_rest, copy=True)(z), batch[1])

        return loss

    return TrunkHeads(trunk_fn, [head_fn(t) for t in range(len(head_losses))], split, join)


def hps_task_grads(
    head_losses: Sequence[Callable[[Any, Any], jax.Array]],
    *,
    log: bool = True,
    eps: float = 1e-8,
    strategy: str = "loop",
    chunk_size: Optional[int] = None,
) -> Callable[[HPS, Any, Any], tuple[jax.Array, nnx.State]]:
    """Deprecated: ``value_and_task_grads(hps_spec(model, head_losses))(nnx.state(model, nnx.Param), (x, targets))``.

    Returns ``fn(model, x, targets) -> (losses [T], grads)`` (see :func:`hps_spec`).
    """
    _deprecated("dbmtl_jax.architectures.hps_task_grads", "dbmtl_jax.value_and_task_grads(hps_spec(model, "
                "head_losses))(nnx.state(model, nnx.Param), (x, targets))")
    head_losses = tuple(head_losses)
    if not head_losses:
        raise ValueError("head_losses is empty; give one loss per task.")

    def fn(model: HPS, x: Any, targets: Any) -> tuple[jax.Array, nnx.State]:
        grad_fn = value_and_task_grads(hps_spec(model, head_losses), log=log, eps=eps, strategy=strategy,
                                       chunk_size=chunk_size)
        return grad_fn(nnx.split(model, nnx.Param, ...)[1], (x, targets))

    return fn
