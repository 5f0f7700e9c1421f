"""A hyperparameter injected by ``optax.inject_hyperparams`` under ``jit`` is a tracer: the factory cannot
raise for it.  One out of range must make its step invalid (every update leaf NaN, the method's state kept),
never give a finite update from a meaningless value (a momentum of 1.5, a negative temperature).

The bad values are the construction-time table of ``test_hyperparameter_validation`` (every numeric one of an
argument that may be injected) plus the solver methods, which that table leaves to their own files.  Integer ones too: a loss weighting
checks them per step, the solvers' loop bounds must be static or fall back.
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_hyperparameter_validation import BAD

from dbmtl_jax.methods import STATIC_ARGS, get_factory

T = 3
PARAMS = {"trunk": jnp.zeros((4, 2)), "head": jnp.zeros((2,))}
GRADS = jax.tree.map(lambda p: jax.random.normal(jax.random.key(0), (T,) + p.shape), PARAMS)
LOSSES = jnp.array([1.0, 0.5, 2.0])

EXTRA = [
    ("mgda", {"tol": 0.0}), ("mgda", {"tol": 1.0}),
    ("cagrad", {"c": -0.5}), ("cagrad", {"c": math.nan}), ("cagrad", {"eps": -1.0}), ("cagrad", {"tol": 0.0}),
    ("cagrad", {"num_bisections": 0}),
    ("upgrad", {"reg_eps": -1.0}), ("upgrad", {"tol": 1.5}), ("upgrad", {"pref_vector": [1.0, -1.0, 1.0]}),
    ("aligned_mtl", {"max_sweeps": 0}),
]


def _numeric(value) -> bool:
    if isinstance(value, (bool, str, tuple)) or value is None:
        return False
    try:
        arr = np.asarray(value)
    except Exception:  # noqa: BLE001
        return False
    return arr.dtype.kind in "fi"


def _cases() -> dict:
    """``{method: [(option, bad value), ...]}``."""
    rows = [(p.values[0], p.values[1], p.values[2], p.values[3]) for p in BAD]
    rows += [(m, T, kw, ValueError) for m, kw in EXTRA]
    out: dict = {}
    for method, num_tasks, kw, exc in rows:
        (option, value), = kw.items()
        if exc is not ValueError or num_tasks != T or not _numeric(value) or option in STATIC_ARGS[method]:
            continue
        if option not in inspect.signature(get_factory(method)).parameters:
            continue
        if np.ndim(value) and np.shape(value) != (T,):  # a shape error is a construction error, not a range one
            continue
        out.setdefault(method, []).append((option, value))
    return out


CASES = _cases()


def _start_value(method: str, option: str, bads: list) -> np.ndarray:
    """The factory's default (ones for a vector argument whose default is None), float32, shaped like the
    widest bad value."""
    default = inspect.signature(get_factory(method)).parameters[option].default
    shape = (T,) if any(np.ndim(b) for b in bads) else ()
    if default is None:
        return np.ones(shape, np.float32)
    value = np.asarray(default)
    return np.broadcast_to(value.astype(np.int32 if value.dtype.kind == "i" else np.float32), shape).copy()


@pytest.mark.parametrize("method", sorted(CASES))
def test_an_injected_value_out_of_range_makes_the_step_invalid_and_keeps_the_state(method):
    """One compiled step per method; every bad value of every option in turn, the others at their start values."""
    options = {o: _start_value(method, o, [b for oo, b in CASES[method] if oo == o]) for o, _ in CASES[method]}
    tx = optax.inject_hyperparams(get_factory(method), static_args=STATIC_ARGS[method])(num_tasks=T, **options)
    state = tx.init(PARAMS)
    assert set(options) <= set(state.hyperparams), sorted(state.hyperparams)
    step = jax.jit(lambda g, s, l, k: tx.update(g, s, PARAMS, losses=l, key=k))
    valid, state = step(GRADS, state, LOSSES, jax.random.key(1))  # a valid first step
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in valid.values())
    before = jax.tree.map(np.asarray, state.inner_state)
    for option, bad in CASES[method]:
        hp = dict(state.hyperparams)
        hp[option] = jnp.asarray(np.broadcast_to(bad, options[option].shape), hp[option].dtype)
        updates, new = step(GRADS, state._replace(hyperparams=hp), LOSSES * 0.5, jax.random.key(2))
        for name, u in updates.items():
            assert bool(jnp.all(jnp.isnan(u))), f"{method}: {option}={bad!r} gave a finite update for '{name}': {u}"
        for a, b in zip(jax.tree.leaves(new.inner_state), jax.tree.leaves(before)):
            np.testing.assert_array_equal(a, b, err_msg=f"{method}: {option}={bad!r} changed the state")
    # and the start values still give a valid step from the same state (the check is not always-invalid)
    updates, _ = step(GRADS, state, LOSSES * 0.5, jax.random.key(2))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in updates.values())


def test_the_table_covers_the_methods_with_injectable_real_hyperparameters():
    assert sum(len(v) for v in CASES.values()) > 40
    assert set(CASES) >= {"gls", "dwa", "uw", "imtl_l", "famo", "stch", "igbv2", "gradnorm", "graddrop", "gradvac",
                          "mtadam", "metabalance", "moco", "imtl", "excessmtl", "cagrad", "mgda", "upgrad",
                          "aligned_mtl"}
