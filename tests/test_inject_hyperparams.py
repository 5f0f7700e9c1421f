"""optax.inject_hyperparams around every method: the STATIC_ARGS recipe, must-be-static arguments, callables.

inject_hyperparams injects every numeric argument not in static_args (a tracer inside a jitted update) and calls
every callable one as a schedule with the step count; the library's side is tested here.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dbmtl_jax
from dbmtl_jax.methods import METHODS, STATIC_ARGS, get_factory

T = 3
PARAMS = {"trunk": jnp.zeros((4, 2)), "head": jnp.zeros((2,))}
GRADS = jax.tree.map(lambda p: jax.random.normal(jax.random.key(0), (T,) + p.shape) * 3.0, PARAMS)
LOSSES = jnp.array([1.0, 0.5, 2.0])


def _is_trunk(path: str) -> bool:
    return path != "head"  # called with the step count as a schedule, this is True: "every leaf shared"


def _kwargs(name: str) -> dict:
    kw = {"shared": _is_trunk}
    if "weight_heads" in inspect.signature(get_factory(name)).parameters and name not in ("nash_mtl", "fairgrad"):
        kw["weight_heads"] = False  # so that `shared` decides what the head leaf gets
    return kw


def _two_updates(tx: optax.GradientTransformation) -> tuple:
    state = tx.init(PARAMS)

    @jax.jit
    def run(state):
        u1, state = tx.update(GRADS, state, PARAMS, losses=LOSSES, key=jax.random.key(1))
        u2, state = tx.update(GRADS, state, PARAMS, losses=LOSSES * 0.5, key=jax.random.key(2))
        return u1, u2

    return run(state)


@pytest.mark.parametrize("name", [m for m in METHODS if m != "igbv2"])  # igbv2's agent: test_lw_igbv2.py
def test_static_args_recipe_matches_the_plain_transform(name):
    """inject_hyperparams(get_factory(name), static_args=STATIC_ARGS[name]) under jit gives the plain method's
    updates, with a shared= predicate that inject_hyperparams would otherwise call as a schedule."""
    kw = _kwargs(name)
    wrapped = optax.inject_hyperparams(get_factory(name), static_args=STATIC_ARGS[name])(num_tasks=T, **kw)
    assert "shared" not in wrapped.init(PARAMS).hyperparams
    for a, b in zip(_two_updates(wrapped), _two_updates(get_factory(name)(T, **kw))):
        for n in PARAMS:
            np.testing.assert_allclose(a[n], b[n], rtol=1e-5, atol=1e-7, err_msg=f"{name} {n}")


MUST_BE_STATIC = [("cagrad", "rescale", 2), ("cagrad", "max_iter", 30), ("mgda", "max_iter", 30),
                  ("upgrad", "max_iter", 30), ("nash_mtl", "max_norm", 0.5), ("nash_mtl", "ridge", 1e-5),
                  ("nash_mtl", "tol", 1e-3), ("nash_mtl", "update_weights_every", 2), ("fairgrad", "alpha", 1.5),
                  ("fairgrad", "max_norm", 0.5), ("fairgrad", "ridge", 1e-5), ("fairgrad", "tol", 1e-3),
                  ("metabalance", "main_task", 1), ("igbv2", "buffer_size", 64), ("igbv2", "seed", 1)]


@pytest.mark.parametrize("name,arg,value", MUST_BE_STATIC, ids=[f"{m}-{a}" for m, a, _ in MUST_BE_STATIC])
def test_an_argument_that_must_be_static_raises_a_clear_error_when_injected(name, arg, value):
    """Traced (injected and jitted), these raised raw tracer errors; now a ValueError naming the fix. They are
    in STATIC_ARGS, and a traced value is refused when the factory is built."""
    assert arg in STATIC_ARGS[name]
    static = tuple(a for a in STATIC_ARGS[name] if a != arg)
    tx = optax.inject_hyperparams(get_factory(name), static_args=static)(num_tasks=T, **{arg: value})
    state = tx.init(PARAMS)
    assert arg in state.hyperparams
    msg = rf"{name}: {arg} must be static under optax.inject_hyperparams .*add it to static_args"
    with pytest.raises(ValueError, match=msg):
        jax.jit(tx.update)(GRADS, state, PARAMS, losses=LOSSES)
    with pytest.raises(ValueError, match=msg):
        jax.make_jaxpr(lambda v: get_factory(name)(T, **{arg: v}))(value)


def test_cagrad_rescale_as_a_concrete_array_is_read_as_its_int():
    """Outside jit inject_hyperparams passes a concrete int32 array for rescale."""
    a = _two_updates(get_factory("cagrad")(T, rescale=jnp.asarray(2, jnp.int32)))
    b = _two_updates(get_factory("cagrad")(T, rescale=2))
    c = _two_updates(get_factory("cagrad")(T, rescale=1))
    for n in PARAMS:
        np.testing.assert_array_equal(a[1][n], b[1][n])
    assert not np.allclose(a[1]["trunk"], c[1]["trunk"])


def test_upgrad_pref_vector_can_be_injected():
    pref = jnp.array([0.2, 0.3, 0.5])
    tx = optax.inject_hyperparams(get_factory("upgrad"), static_args=STATIC_ARGS["upgrad"])(num_tasks=T,
                                                                                          pref_vector=pref)
    assert "pref_vector" in tx.init(PARAMS).hyperparams
    for a, b in zip(_two_updates(tx), _two_updates(get_factory("upgrad")(T, pref_vector=pref))):
        for n in PARAMS:
            np.testing.assert_allclose(a[n], b[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["dbmtl", "uw", "pcgrad", "gradnorm", "nash_mtl", "moco"])
def test_shared_that_arrives_as_a_jax_array_is_refused(name):
    """What inject_hyperparams passes for a callable shared= whose schedule call returns an array."""
    with pytest.raises(ValueError, match=rf"{name}: shared must be .*got a JAX array.*add 'shared' to static_args"):
        get_factory(name)(T, shared=jnp.asarray(True))
    get_factory(name)(T, shared=True)  # Python bools, pytrees and callables stay valid
    get_factory(name)(T, shared={"trunk": True, "head": False})
    get_factory(name)(T, shared=_is_trunk)


def test_gradnorm_norm_leaves_evaluated_as_a_schedule_names_static_args():
    for value in (True, jnp.asarray(False)):
        with pytest.raises(TypeError, match=r"norm_leaves must be None or a callable.*add 'norm_leaves' to static_args"):
            get_factory("gradnorm")(T, norm_leaves=value)


def test_fused_dbmtl_refuses_an_array_shared():
    with pytest.raises(ValueError, match="fused_dbmtl: shared must be"):
        dbmtl_jax.fused_dbmtl(lambda p: jnp.stack([p["trunk"].sum()] * T), T, optax.sgd(0.1),
                              shared=jnp.asarray(True))


def test_ema_dtype_class_is_refused_unless_static():
    """A dtype class is callable: inject_hyperparams called jnp.bfloat16(count) and passed Array(0, bfloat16)."""
    make = optax.inject_hyperparams(dbmtl_jax.dbmtl, static_args=("num_tasks", "alpha"))
    with pytest.raises(ValueError, match=r"ema_dtype must be a dtype .*got a JAX array.*'ema_dtype'"):
        make(num_tasks=T, ema_dtype=jnp.bfloat16).init(PARAMS)
    tx = optax.inject_hyperparams(dbmtl_jax.dbmtl, static_args=STATIC_ARGS["dbmtl"])(num_tasks=T,
                                                                                     ema_dtype=jnp.bfloat16)
    state = tx.init(PARAMS)
    assert "ema_dtype" not in state.hyperparams
    _, state = jax.jit(tx.update)(GRADS, state, PARAMS)
    assert state.inner_state.ema["trunk"].dtype == jnp.bfloat16


def test_injected_beta_schedule_with_a_rejected_step_under_skip_invalid_steps():
    """The README's composition with a β schedule injected: skip_invalid_steps around the whole chain keeps
    inject_hyperparams' count on a rejected step, so the valid steps see the β they would see without it."""
    sched = lambda c: jnp.where(c < 1, 0.0, 0.5)  # noqa: E731

    def make():
        inner = optax.inject_hyperparams(dbmtl_jax.dbmtl, static_args=STATIC_ARGS["dbmtl"])(
            num_tasks=T, beta=sched, beta_sigma=0.0)
        return dbmtl_jax.skip_invalid_steps(optax.chain(inner, optax.sgd(1.0)))

    good = [jax.tree.map(lambda g: g * (i + 1), GRADS) for i in range(3)]
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), GRADS)
    runs = []
    for seq in (good, [good[0], bad, good[1], good[2]]):
        tx = make()
        state = tx.init(PARAMS)
        for g in seq:
            _, state = jax.jit(tx.update)(g, state, PARAMS, losses=LOSSES)
        runs.append(state)
    assert int(runs[1].num_skipped) == 1
    for a, b in zip(jax.tree.leaves(runs[0].inner_state), jax.tree.leaves(runs[1].inner_state)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", METHODS)
def test_injected_state_can_be_donated_to_a_jitted_step(name):
    """inject_hyperparams keeps the values in ``hyperparams`` and a loss weighting keeps them in its state too:
    one buffer in both places made a donated jitted step fail ("Attempt to donate the same buffer twice")."""
    factory = get_factory(name)
    kw = {k: p.default for k, p in inspect.signature(factory).parameters.items()
          if k not in STATIC_ARGS[name] and isinstance(p.default, (int, float)) and not isinstance(p.default, bool)}
    tx = optax.chain(optax.inject_hyperparams(factory, static_args=STATIC_ARGS[name])(num_tasks=T, **kw),
                     optax.sgd(0.1))
    state = tx.init(PARAMS)
    step = jax.jit(lambda s, k: tx.update(GRADS, s, PARAMS, losses=LOSSES, key=k), donate_argnums=0)
    for i in range(3):
        updates, state = step(state, jax.random.key(i))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
