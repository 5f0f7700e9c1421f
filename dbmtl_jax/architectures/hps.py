"""Hard parameter sharing (HPS): one shared encoder, one head per task.

Reference: R. Caruana, "Multitask Learning: A Knowledge-Based Source of
Inductive Bias", ICML 1993 (and Caruana, Machine Learning 28, 1997).  This is
the architecture of every DB-MTL experiment (Lin et al., "Dual-Balancing for
Multi-Task Learning", Sec. 4).

The encoder parameters are the shared parameters θ of the gradient-balancing
methods; the heads are task-specific::

    model = HPS(MLPEncoder(d, (64,), rngs=rngs), [nnx.Linear(64, 1, rngs=rngs) for _ in range(T)])
    tx = optax.chain(dbmtl_jax.dbmtl(T, shared=HPS.is_shared), optax.adam(1e-3))

``model.features(x)`` / ``model.head(t, z)`` expose trunk and heads separately,
which :func:`hps_task_grads` uses to run :func:`dbmtl_jax.trunk_heads_task_grads`
(each head back-propagated once, only the trunk pull-back batched over tasks).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
from flax import nnx

from dbmtl_jax.architectures._layers import prefix_predicate
from dbmtl_jax.task_gradients import heads_to_task_axis, trunk_heads_task_grads

__all__ = ["HPS", "hps_shared", "hps_task_grads"]

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
    marks the encoder leaves as shared.
    """

    is_shared = staticmethod(hps_shared)

    def __init__(self, encoder: nnx.Module, heads: Sequence[nnx.Module]):
        heads = list(heads)
        if not heads:
            raise ValueError("heads is empty; give one head per task.")
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


def hps_task_grads(
    head_losses: Sequence[Callable[[Any, Any], jax.Array]],
    *,
    log: bool = True,
    eps: float = 1e-8,
    strategy: str = "loop",
    chunk_size: Optional[int] = None,
) -> Callable[[HPS, Any, Any], tuple[jax.Array, nnx.State]]:
    """Per-task gradients of an :class:`HPS` model through :func:`dbmtl_jax.trunk_heads_task_grads`.

    Args:
      head_losses: ``head_losses[t](output_t, targets) -> scalar`` loss ``ℓ_t``.
      log, eps, strategy, chunk_size: as in :func:`dbmtl_jax.trunk_heads_task_grads`.

    Returns:
      ``fn(model, x, targets) -> (losses [T], grads)`` where ``grads`` is an
      ``nnx.State`` with the structure of ``nnx.state(model, nnx.Param)`` and
      every leaf carrying the task axis ``[T, *shape]`` (head ``t``'s gradient
      in row ``t``, zeros elsewhere), ready for ``nnx.Optimizer.update``.  It
      equals ``value_and_task_grads`` on the full model but back-propagates
      each head once.  Non-parameter state (batch-norm statistics) is read, not
      updated: run the model forward separately to update running statistics.
    """
    head_losses = tuple(head_losses)
    if not head_losses:
        raise ValueError("head_losses is empty; give one loss per task.")

    def fn(model: HPS, x: Any, targets: Any) -> tuple[jax.Array, nnx.State]:
        if model.num_tasks != len(head_losses):
            raise ValueError(f"the model has {model.num_tasks} heads but {len(head_losses)} head losses were given.")
        enc_def, enc_params, enc_rest = nnx.split(model.encoder, nnx.Param, ...)
        head_splits = [nnx.split(h, nnx.Param, ...) for h in model.heads]

        def trunk_fn(p: nnx.State, batch: Any) -> Any:
            return nnx.merge(enc_def, p, enc_rest, copy=True)(batch[0])

        def head_fn(t: int) -> Callable[[nnx.State, Any, Any], jax.Array]:
            h_def, _, h_rest = head_splits[t]

            def loss(hp: nnx.State, z: Any, batch: Any) -> jax.Array:
                return head_losses[t](nnx.merge(h_def, hp, h_rest, copy=True)(z), batch[1])

            return loss

        grad_fn = trunk_heads_task_grads(
            trunk_fn, [head_fn(t) for t in range(len(head_losses))],
            log=log, eps=eps, strategy=strategy, chunk_size=chunk_size,
        )
        losses, (trunk_g, head_g) = grad_fn(enc_params, [s[1] for s in head_splits], (x, targets))
        head_g = heads_to_task_axis(head_g)
        # Reassemble in the layout of nnx.split(model, nnx.Param): 'encoder' leaves, then heads 0, 1, ….
        full = nnx.split(model, nnx.Param, ...)[1]
        leaves = jax.tree.leaves(trunk_g) + [x for g in head_g for x in jax.tree.leaves(g)]
        treedef = jax.tree.structure(full)
        if treedef.num_leaves != len(leaves):
            raise ValueError(
                "the model has parameters outside 'encoder' and 'heads'; hps_task_grads only handles the "
                "HPS layout."
            )
        return losses, jax.tree.unflatten(treedef, leaves)

    return fn
