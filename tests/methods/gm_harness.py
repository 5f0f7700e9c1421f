"""A toy parameter tree and a float64 jitted runner shared by the gradient-method reference tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dbmtl_jax.methods import get_method

SHAPES = {"a": (3, 2), "b": (4,), "h": (2,)}
SHARED = {"a": True, "b": True, "h": False}
SHARED_NAMES = ("a", "b")  # flattening order of the shared leaves

_CACHE: dict = {}


def random_grads(rng: np.random.Generator, T: int, scales=None) -> dict:
    """One step of per-task gradients ``{name: [T, *shape]}``, task ``t`` scaled by ``scales[t]``."""
    scales = np.ones(T) if scales is None else np.asarray(scales, np.float64)
    return {n: rng.standard_normal((T,) + s) * scales.reshape((T,) + (1,) * len(s)) for n, s in SHAPES.items()}


def run_method(name: str, T: int, grads: list, losses=None, keys=None, **hp) -> tuple[list, list]:
    """Runs registry method ``name`` under jit in float64 over the steps ``grads`` (with per-step ``losses``
    and PRNG ``keys`` when given); returns per-step outputs (dicts of NumPy arrays) and states (NumPy
    pytrees).  Compiled updates are cached per configuration."""
    with jax.enable_x64(True):
        params = {n: jnp.zeros(s, jnp.float64) for n, s in SHAPES.items()}
        ck = (name, T, repr(sorted(hp.items())))
        if ck not in _CACHE:
            tx = get_method(name, T, shared=SHARED, **hp)
            _CACHE[ck] = (tx, jax.jit(tx.update))
        tx, update = _CACHE[ck]
        state = tx.init(params)
        outs, states = [], []
        for i, g in enumerate(grads):
            extra = {} if losses is None else {"losses": jnp.asarray(losses[i], jnp.float64)}
            if keys is not None:
                extra["key"] = keys[i]
            out, state = update({n: jnp.asarray(v) for n, v in g.items()}, state, params, **extra)
            outs.append({n: np.asarray(v) for n, v in out.items()})
            states.append(jax.tree.map(np.asarray, state))
        return outs, states
