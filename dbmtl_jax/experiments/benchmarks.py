"""Deprecated: renamed :mod:`dbmtl_jax.experiments.builtin` in 0.2.0 (this alias goes in 0.3.0).

``MLPHPS(in_dim, hidden, T, head_bias=, rngs=)`` is now
:func:`dbmtl_jax.experiments.builtin.mlp_hps`, an ``HPS(MLPEncoder, [MLPHead(squeeze=True)] * T)`` with the
same initial values and outputs (its parameter paths are ``encoder/layers/i/…`` and ``heads/t/layers/0/…``).
"""

from __future__ import annotations

import warnings
from typing import Any

from dbmtl_jax.experiments import builtin as _new


def __getattr__(name: str) -> Any:
    value = _new.mlp_hps if name == "MLPHPS" else getattr(_new, name)
    new = "dbmtl_jax.experiments.builtin" + (".mlp_hps" if name == "MLPHPS" else "")
    warnings.warn(f"dbmtl_jax.experiments.benchmarks.{name} is deprecated (renamed in 0.2.0): use {new}.",
                  DeprecationWarning, stacklevel=2)
    return value
