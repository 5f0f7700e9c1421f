"""dbmtl_jax: dual-balancing multi-task learning (DB-MTL) and friends for JAX/Optax.

Reference: Lin et al., "Dual-Balancing for Multi-Task Learning".
"""

from dbmtl_jax import datasets, loss_weighting, metrics
from dbmtl_jax._version import __version__
from dbmtl_jax.dbmtl import ALPHA_MODES, DBMTLState, dbmtl
from dbmtl_jax.fused import FusedDBMTL, fused_dbmtl, fused_trunk_heads_dbmtl
from dbmtl_jax.metrics import delta_p
from dbmtl_jax.methods.registry import METHOD_GROUPS, METHODS, get_factory, get_method
from dbmtl_jax.multi_steps import TaskMultiSteps
from dbmtl_jax.guard import InvalidStepError, SkipState, reraise_invalid_step, skip_invalid_steps
from dbmtl_jax.task_axis import check_task_axis, flatten_tasks, resolve_shared, sum_tasks, task_norms
from dbmtl_jax.task_gradients import (
    STRATEGIES,
    fold_task_grads,
    trunk_heads_fold_task_grads,
    heads_to_task_axis,
    transform_losses,
    trunk_heads_task_grads,
    value_and_task_grads,
)

__all__ = [
    "__version__",
    "datasets",
    "loss_weighting",
    "metrics",
    "delta_p",
    "ALPHA_MODES",
    "DBMTLState",
    "dbmtl",
    "FusedDBMTL",
    "fused_dbmtl",
    "fused_trunk_heads_dbmtl",
    "METHODS",
    "METHOD_GROUPS",
    "get_method",
    "get_factory",
    "InvalidStepError",
    "reraise_invalid_step",
    "SkipState",
    "skip_invalid_steps",
    "TaskMultiSteps",
    "check_task_axis",
    "flatten_tasks",
    "resolve_shared",
    "sum_tasks",
    "task_norms",
    "STRATEGIES",
    "fold_task_grads",
    "trunk_heads_fold_task_grads",
    "heads_to_task_axis",
    "transform_losses",
    "trunk_heads_task_grads",
    "value_and_task_grads",
]
