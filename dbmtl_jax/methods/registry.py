"""Registry of multi-task methods: ``get_method(name, num_tasks, **hyperparameters)``.

Every method is an ``optax.GradientTransformationExtraArgs`` factory whose
``update(updates, state, params=None, *, losses=None, key=None)`` takes
task-axis updates (leaves ``[T, *shape]``) and returns one update per leaf.
Modules are imported lazily so that importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import optax

__all__ = ["METHODS", "METHOD_GROUPS", "STATIC_ARGS", "get_method", "get_factory"]

# name -> (group, module under dbmtl_jax.methods, factory attribute)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "dbmtl": ("dbmtl", "dbmtl_jax.dbmtl", "dbmtl"),
    # loss balancing
    "ew": ("loss", "dbmtl_jax.methods.ew", "ew"),
    "gls": ("loss", "dbmtl_jax.methods.gls", "gls"),
    "rlw": ("loss", "dbmtl_jax.methods.rlw", "rlw"),
    "uw": ("loss", "dbmtl_jax.methods.uw", "uw"),
    "dwa": ("loss", "dbmtl_jax.methods.dwa", "dwa"),
    "imtl_l": ("loss", "dbmtl_jax.methods.imtl_l", "imtl_l"),
    "igbv2": ("loss", "dbmtl_jax.methods.igbv2", "igbv2"),
    # gradient balancing
    "mgda": ("gradient", "dbmtl_jax.methods.mgda", "mgda"),
    "gradnorm": ("gradient", "dbmtl_jax.methods.gradnorm", "gradnorm"),
    "pcgrad": ("gradient", "dbmtl_jax.methods.pcgrad", "pcgrad"),
    "graddrop": ("gradient", "dbmtl_jax.methods.graddrop", "graddrop"),
    "gradvac": ("gradient", "dbmtl_jax.methods.gradvac", "gradvac"),
    "imtl_g": ("gradient", "dbmtl_jax.methods.imtl_g", "imtl_g"),
    "cagrad": ("gradient", "dbmtl_jax.methods.cagrad", "cagrad"),
    "mtadam": ("gradient", "dbmtl_jax.methods.mtadam", "mtadam"),
    "nash_mtl": ("gradient", "dbmtl_jax.methods.nash_mtl", "nash_mtl"),
    "metabalance": ("gradient", "dbmtl_jax.methods.metabalance", "metabalance"),
    "moco": ("gradient", "dbmtl_jax.methods.moco", "moco"),
    "aligned_mtl": ("gradient", "dbmtl_jax.methods.aligned_mtl", "aligned_mtl"),
    # hybrid
    "imtl": ("hybrid", "dbmtl_jax.methods.imtl", "imtl"),
    # beyond the paper
    "famo": ("loss", "dbmtl_jax.methods.famo", "famo"),
    "upgrad": ("gradient", "dbmtl_jax.methods.upgrad", "upgrad"),
    "fairgrad": ("gradient", "dbmtl_jax.methods.fairgrad", "fairgrad"),
    "stch": ("loss", "dbmtl_jax.methods.stch", "stch"),
    "excessmtl": ("gradient", "dbmtl_jax.methods.excessmtl", "excessmtl"),
}


METHODS: tuple[str, ...] = tuple(_REGISTRY)
METHOD_GROUPS: dict[str, str] = {name: _REGISTRY[name][0] for name in METHODS}

# The `static_args` of optax.inject_hyperparams for each method: the arguments that must not be injected,
# beyond the strings, bools, None and optimizers that inject_hyperparams keeps static by itself. num_tasks
# sizes the state; shared, and any other callable (gradnorm's norm_leaves, dbmtl's ema_dtype given as a
# dtype class), would be called as a schedule with the step count; the rest are numbers the factory's Python
# code reads (a branch, an index, a loop bound), each of which raises a ValueError naming it when traced, and
# the values only init reads (an initial weight, a seed), which injected later would change nothing.
_EXTRA_STATIC: dict[str, tuple[str, ...]] = {
    "uw": ("init",),
    "imtl_l": ("init",),
    "igbv2": ("buffer_size", "seed", "init_alpha"),  # the replay buffer's size and the agent's NumPy init
    "gradnorm": ("norm_leaves",),
    "mgda": ("max_iter",),
    "cagrad": ("rescale", "max_iter"),
    "upgrad": ("max_iter",),
    "nash_mtl": ("max_norm", "ridge", "tol", "update_weights_every"),
    "fairgrad": ("alpha", "max_norm", "ridge", "tol"),
    "metabalance": ("main_task",),
}
_DBMTL_STATIC = ("num_tasks", "alpha", "shared", "ema_dtype")  # a string alpha picks the α rule
STATIC_ARGS: dict[str, tuple[str, ...]] = {
    name: _DBMTL_STATIC if name == "dbmtl" else ("num_tasks", "shared") + _EXTRA_STATIC.get(name, ())
    for name in METHODS
}


def get_factory(name: str) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """The factory of method ``name`` (``factory(num_tasks, **hyperparameters)``).

    Use it where a factory is needed, e.g.
    ``optax.inject_hyperparams(get_factory("uw"), static_args=STATIC_ARGS["uw"])``
    (:data:`STATIC_ARGS`: the arguments that must not be injected).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}.")
    _, module, attr = _REGISTRY[name]
    return getattr(importlib.import_module(module), attr)


def get_method(name: str, num_tasks: int, **hyperparameters: Any) -> optax.GradientTransformationExtraArgs:
    """Builds the method ``name`` (one of :data:`METHODS`) for ``num_tasks`` tasks with the given hyperparameters.

    Same as ``get_factory(name)(num_tasks, **hyperparameters)``; the methods, their hyperparameters and
    defaults are listed in docs/methods.md.  Raises ``ValueError`` for an unknown name (listing the
    available ones) and whatever the factory raises for a hyperparameter it does not take or out of range.
    """
    return get_factory(name)(num_tasks, **hyperparameters)
