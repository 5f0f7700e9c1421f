"""Jittable training steps for the benchmark: EW + Adam and DB-MTL + Adam per strategy.

Every step has the signature ``step(params, opt_state, batch) -> (params,
opt_state, losses)`` and is meant to be jitted with ``donate_argnums=(0, 1)``.

Variants (``VARIANTS``):

* ``ew``: one backward pass of ``Σ_t ℓ_t`` (equal weighting), then Adam.
* ``vmap`` / ``loop``: DB-MTL with :func:`dbmtl_jax.value_and_task_grads` of the
  ``loss_fn`` and that ``strategy`` (``jacrev``, measured in RESULTS.md, compiled
  to the same program as ``vmap`` and is now an alias of it).
* ``chunk``: ``strategy="vmap"`` with ``chunk_size`` (``lax.map`` over task chunks).
* ``trunk-vmap`` / ``trunk-loop`` / ``trunk-chunk``: DB-MTL with
  :func:`dbmtl_jax.value_and_task_grads` of a :class:`dbmtl_jax.TrunkHeads` spec
  (each head differentiated once, only the trunk pull-back is per task) and that
  trunk strategy.
* ``fused``: the library's streamed step :func:`dbmtl_jax.fused_dbmtl` of the spec
  (trunk-once gradients folded ``chunk_size`` tasks at a time into the EMA,
  then Adam; exact guard, task loop unrolled automatically for convolutions on
  CPU); ``fused-inplace``: the same with ``in_place=True`` (EMA updated in the
  donated buffer); ``fused-unroll``: exact guard, loop always unrolled.

A ``sum:`` prefix (``sum:trunk-loop``) computes the same per-task gradients but
replaces the DB-MTL transform by a plain sum over tasks; the difference in step
time is the marginal cost of the transform (EMA, norms, scaling).
``sum:fused`` streams the same trunk gradients into a running sum (no EMA).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

import dbmtl_jax
from dbmtl_jax import task_axis as ta
from dbmtl_jax.task_gradients import _trunk_heads_fold_task_grads

from models import Problem, is_shared

__all__ = ["VARIANTS", "StepFns", "build_step", "to_jax", "grads_fn"]

PyTree = Any

VARIANTS = ("ew", "vmap", "loop", "chunk", "trunk-vmap", "trunk-loop", "trunk-chunk", "fused", "fused-inplace",
            "fused-unroll")
FUSED = ("fused", "fused-inplace", "fused-unroll")


class StepFns(NamedTuple):
    """``init(params) -> opt_state`` and the un-jitted ``step``."""

    init: Callable[[PyTree], PyTree]
    step: Callable[[PyTree, PyTree, Any], tuple]


def to_jax(tree: PyTree) -> PyTree:
    """NumPy leaves to (fresh, donatable) JAX arrays."""
    return jax.tree_util.tree_map(jnp.array, tree)


def _split_variant(variant: str) -> tuple[bool, str]:
    plain_sum = variant.startswith("sum:")
    base = variant[4:] if plain_sum else variant
    if base not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS} (optionally 'sum:'-prefixed).")
    if plain_sum and base in ("ew", "fused-inplace", "fused-unroll"):
        raise ValueError(f"'sum:{base}' is not a variant.")
    return plain_sum, base


def _spec(problem: Problem) -> dbmtl_jax.TrunkHeads:
    """The problem's trunk and heads over its params ``{"trunk": …, "heads": (…)}``."""
    return dbmtl_jax.TrunkHeads(problem.trunk_fn, problem.head_loss_fns, split=lambda p: (p["trunk"], p["heads"]),
                                join=lambda trunk, heads: {"trunk": trunk, "heads": tuple(heads)})


def grads_fn(problem: Problem, base: str, *, chunk_size: Optional[int] = None) -> Callable:
    """``(params, batch) -> (losses, task-axis grads)`` for a per-task-gradient variant."""
    if base in ("vmap", "loop", "chunk"):
        strategy = "vmap" if base == "chunk" else base
        vg = dbmtl_jax.value_and_task_grads(
            problem.loss_fn, strategy=strategy, chunk_size=chunk_size if base == "chunk" else None
        )
        return vg
    if base.startswith("trunk-"):
        sub = base[len("trunk-"):]
        strategy = "vmap" if sub == "chunk" else sub
        return dbmtl_jax.value_and_task_grads(
            _spec(problem), strategy=strategy, chunk_size=chunk_size if sub == "chunk" else None
        )
    raise ValueError(f"variant {base!r} has no per-task gradients.")


def build_step(
    problem: Problem,
    variant: str,
    *,
    chunk_size: Optional[int] = None,
    learning_rate: float = 1e-4,
    beta: float = 0.9,
) -> StepFns:
    """The init and step functions of ``variant`` (see module docstring) on ``problem``."""
    plain_sum, base = _split_variant(variant)
    if (base.endswith("chunk") or base.startswith("fused")) and chunk_size is None:
        raise ValueError(f"variant {variant!r} needs chunk_size.")
    adam = optax.adam(learning_rate)

    if base == "ew":

        def ew_step(params: PyTree, opt_state: PyTree, batch: Any) -> tuple:
            def total(p: PyTree) -> tuple:
                losses = problem.loss_fn(p, batch)
                return jnp.sum(losses), losses

            (_, losses), g = jax.value_and_grad(total, has_aux=True)(params)
            updates, opt_state = adam.update(g, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, losses

        return StepFns(adam.init, ew_step)

    if base in FUSED:
        return _fused_step(problem, base, plain_sum, chunk_size=chunk_size, adam=adam, beta=beta)

    vg = grads_fn(problem, base, chunk_size=chunk_size)
    if plain_sum:
        tx = adam

        def aggregate(g: PyTree, state: PyTree, params: PyTree) -> tuple:
            return tx.update(ta.sum_tasks(g), state, params)

        init = tx.init
    else:
        tx = optax.chain(dbmtl_jax.dbmtl(problem.num_tasks, beta=beta, beta_sigma=0.0, shared=is_shared), adam)

        def aggregate(g: PyTree, state: PyTree, params: PyTree) -> tuple:
            return tx.update(g, state, params)

        init = tx.init

    def step(params: PyTree, opt_state: PyTree, batch: Any) -> tuple:
        losses, g = vg(params, batch)
        updates, opt_state = aggregate(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses

    return StepFns(init, step)


def _fused_step(problem: Problem, base: str, plain_sum: bool, *, chunk_size: int, adam: Any, beta: float) -> StepFns:
    """The library's fused step (params ``{"trunk", "heads"}`` ↔ the API's ``(trunk, heads)``), or with
    ``plain_sum`` the same streamed trunk gradients summed into one accumulator (no EMA) + Adam."""
    if plain_sum:
        def fold(acc: list, start: jax.Array, grads: PyTree) -> list:
            return [a + jnp.sum(g, axis=0) for a, g in zip(acc, jax.tree_util.tree_leaves(grads))]

        stream = _trunk_heads_fold_task_grads(problem.trunk_fn, problem.head_loss_fns, fold, chunk_size=chunk_size)

        def sum_step(params: PyTree, opt_state: PyTree, batch: Any) -> tuple:
            leaves, treedef = jax.tree_util.tree_flatten(params["trunk"])
            losses, head_grads, acc = stream([jnp.zeros_like(x) for x in leaves], params["trunk"], params["heads"],
                                             batch)
            g = {"trunk": jax.tree_util.tree_unflatten(treedef, acc), "heads": tuple(head_grads)}
            updates, opt_state = adam.update(g, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, losses

        return StepFns(adam.init, sum_step)

    fused = dbmtl_jax.fused_dbmtl(
        dbmtl_jax.TrunkHeads(problem.trunk_fn, problem.head_loss_fns), problem.num_tasks, adam,
        beta=beta, beta_sigma=0.0,  # LibMTL's constant β, as the PyTorch mirror and the NumPy reference
        chunk_size=chunk_size,
        in_place=base == "fused-inplace", unroll=True if base == "fused-unroll" else None,
    )

    def step(params: PyTree, opt_state: PyTree, batch: Any) -> tuple:
        pair = (params["trunk"], tuple(params["heads"]))
        losses, updates, opt_state = fused.update(opt_state, pair, batch)
        pair = optax.apply_updates(pair, updates)
        return {"trunk": pair[0], "heads": pair[1]}, opt_state, losses

    return StepFns(lambda params: fused.init((params["trunk"], tuple(params["heads"]))), step)


def transform_only(problem: Problem, *, beta: float = 0.9) -> tuple[Callable, Callable, Callable]:
    """The DB-MTL transform alone: ``(init, update(grads, state) -> (out, state), make_grads())``.

    ``make_grads()`` returns random task-axis gradients with the problem's
    parameter shapes, to time the transform (EMA, norms, scaling) in isolation.
    """
    tx = dbmtl_jax.dbmtl(problem.num_tasks, beta=beta, beta_sigma=0.0, shared=is_shared)
    params = to_jax(problem.params)

    def update(g: PyTree, state: PyTree) -> tuple:
        return tx.update(g, state, params)

    def make_grads() -> PyTree:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
        return jax.tree_util.tree_unflatten(
            treedef, [jax.random.normal(k, (problem.num_tasks,) + x.shape, x.dtype) for k, x in zip(keys, leaves)]
        )

    return (lambda: tx.init(params)), update, make_grads
