"""Audit 32: the state a method is given is the state it was built for.

A restored checkpoint of another run (another ``num_tasks``, another EMA dtype) is an error that names
the state field, not a raw JAX error nor a silent broadcast; ``init`` gives one buffer per state leaf
(donation); a gradient without the task axis is reported as such; ``optax.masked`` over a Flax NNX state
works with every method.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dbmtl_jax
from dbmtl_jax.methods.registry import get_factory

T = 3
PARAMS = {"trunk": jnp.ones((4, 5)), "head": jnp.ones((5,))}


def _grads(t: int, seed: int = 0) -> dict:
    return jax.tree.map(lambda p: jax.random.normal(jax.random.key(seed), (t,) + p.shape), PARAMS)


def _buffer_aliases(tree) -> list:
    """Pairs of state paths that share one device buffer."""
    seen, out = {}, []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        ptr = x.unsafe_buffer_pointer()
        if ptr in seen:
            out.append((jax.tree_util.keystr(seen[ptr]), jax.tree_util.keystr(path)))
        seen[ptr] = path
    return out


# -- C4: one buffer per state leaf -----------------------------------------------------------------


@pytest.mark.parametrize("method", dbmtl_jax.METHODS)
def test_init_gives_every_state_leaf_its_own_buffer(method):
    """No method's init puts one array in two state fields (CAGrad's weights and dual_weights did)."""
    assert _buffer_aliases(dbmtl_jax.get_method(method, T).init(PARAMS)) == []


@pytest.mark.parametrize("wrap", ["skip", "multisteps"])
def test_cagrad_state_can_be_donated_under_the_wrappers(wrap):
    """A jitted step that donates the whole state (the README's pattern) runs for CAGrad under
    skip_invalid_steps and TaskMultiSteps (it failed: 'Attempt to donate the same buffer twice')."""
    base = optax.chain(dbmtl_jax.get_method("cagrad", T), optax.adam(1e-3))
    tx = dbmtl_jax.skip_invalid_steps(base) if wrap == "skip" else dbmtl_jax.TaskMultiSteps(base, T, 2)
    step = jax.jit(lambda g, s: tx.update(g, s, PARAMS), donate_argnums=(1,))
    state = tx.init(PARAMS)
    for i in range(3):
        u, state = step(_grads(T, i), state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    assert int(dbmtl_jax.get_method("cagrad", T).init(PARAMS).count) == 0


# -- C6: a gradient without the task axis is reported as such ---------------------------------------


@pytest.mark.parametrize("method", ["dbmtl", "pcgrad", "uw"])
def test_a_gradient_without_the_task_axis_is_named_so(method):
    """A plain gradient (parameter-shaped leaves) whose first dimension is not T: the error says the task
    axis is missing, not 'a leading task axis of size 4'."""
    params = {"w": jnp.zeros((4, 5)), "b": jnp.zeros((4,))}
    tx = dbmtl_jax.get_method(method, T)
    plain = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(ValueError, match=r"leaf '\w' has shape \(4,?\d*\), its parameter's shape; expected "
                       r"\[num_tasks, \*param_shape\] = \(3, 4.*lacks the leading task axis.*TaskMultiSteps"):
        tx.update(plain, tx.init(params), params, losses=jnp.ones(T), key=jax.random.key(0))


def test_optax_multisteps_around_the_chain_is_named_in_the_error():
    """optax.MultiSteps' parameter-shaped accumulator drops the task axis of correct [T, ...] gradients:
    the error points to TaskMultiSteps."""
    params = {"w": jnp.zeros((4, 5)), "b": jnp.zeros((4,))}
    tx = optax.MultiSteps(optax.chain(dbmtl_jax.dbmtl(T), optax.adam(1e-3)), 2)
    g = jax.tree.map(lambda p: jnp.ones((T,) + p.shape), params)
    with pytest.raises(ValueError, match="lacks the leading task axis.*optax.MultiSteps.*dbmtl_jax.TaskMultiSteps"):
        tx.update(g, tx.init(params), params)


def test_a_scalar_parameter_without_the_task_axis_is_named_so():
    params = {"s": jnp.zeros(()), "w": jnp.zeros((3,))}
    tx = dbmtl_jax.dbmtl(T)
    with pytest.raises(ValueError, match=r"leaf 's' has shape \(\), its parameter's shape.*lacks the leading"):
        tx.update({"s": jnp.ones(()), "w": jnp.ones((T, 3))}, tx.init(params), params)
