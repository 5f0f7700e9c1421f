"""dbmtl_jax: dual-balancing multi-task learning (DB-MTL) and friends for JAX/Optax.

Reference: Lin et al., "Dual-Balancing for Multi-Task Learning".

The top level holds what a training script needs: the transform
(:func:`dbmtl`), per-task gradients (:func:`value_and_task_grads` of a
``loss_fn`` or of a :class:`TrunkHeads` spec), the fused step
(:func:`fused_dbmtl`), the method registry, the invalid-step guard and
``delta_p``.  Everything else lives in its submodule (``task_axis``,
``task_gradients``, ``guard``, ``methods``, ``architectures``, ...).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from dbmtl_jax import datasets, loss_weighting, metrics
from dbmtl_jax._version import __version__
from dbmtl_jax.dbmtl import DBMTLState, dbmtl
from dbmtl_jax.fused import FusedDBMTL, fused_dbmtl
from dbmtl_jax.guard import InvalidStepError, reraise_invalid_step, skip_invalid_steps
from dbmtl_jax.methods.registry import METHOD_GROUPS, METHODS, get_method
from dbmtl_jax.metrics import delta_p
from dbmtl_jax.multi_steps import TaskMultiSteps
from dbmtl_jax.task_gradients import TrunkHeads, value_and_task_grads

__all__ = [
    "__version__",
    "datasets",
    "loss_weighting",
    "metrics",
    "dbmtl",
    "DBMTLState",
    "value_and_task_grads",
    "TrunkHeads",
    "fused_dbmtl",
    "FusedDBMTL",
    "METHODS",
    "METHOD_GROUPS",
    "get_method",
    "skip_invalid_steps",
    "InvalidStepError",
    "reraise_invalid_step",
    "TaskMultiSteps",
    "delta_p",
]

# Names that left the top level in 0.2.0 (removed there in 0.3.0): name -> the module that keeps them.
_MOVED = {
    "ALPHA_MODES": "dbmtl_jax.dbmtl",
    "get_factory": "dbmtl_jax.methods",
    "SkipState": "dbmtl_jax.guard",
    "check_task_axis": "dbmtl_jax.task_axis",
    "flatten_tasks": "dbmtl_jax.task_axis",
    "resolve_shared": "dbmtl_jax.task_axis",
    "sum_tasks": "dbmtl_jax.task_axis",
    "task_norms": "dbmtl_jax.task_axis",
    "STRATEGIES": "dbmtl_jax.task_gradients",
    "transform_losses": "dbmtl_jax.task_gradients",
}
# Deprecated functions: they warn when called, naming their replacement.
_DEPRECATED = {
    "fused_trunk_heads_dbmtl": "dbmtl_jax.fused",
    "trunk_heads_task_grads": "dbmtl_jax.task_gradients",
    "heads_to_task_axis": "dbmtl_jax.task_gradients",
    "fold_task_grads": "dbmtl_jax.task_gradients",
    "trunk_heads_fold_task_grads": "dbmtl_jax.task_gradients",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        module = _MOVED[name]
        warnings.warn(f"dbmtl_jax.{name} is deprecated (0.2.0; removed from the top level in 0.3.0): use "
                      f"from {module} import {name}.", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), name)
    if name in _DEPRECATED:
        return getattr(importlib.import_module(_DEPRECATED[name]), name)
    raise AttributeError(f"module 'dbmtl_jax' has no attribute {name!r}")
