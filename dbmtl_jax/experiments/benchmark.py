"""Deprecated: renamed :mod:`dbmtl_jax.experiments.spec` in 0.2.0 (this alias goes in 0.3.0).

"benchmark" meant three things (this spec API, the built-in benchmarks and the speed benchmarks under
``benchmarks/``); the spec API is :mod:`dbmtl_jax.experiments.spec`, also exported by
:mod:`dbmtl_jax.experiments` itself.
"""

from __future__ import annotations

import warnings
from typing import Any

from dbmtl_jax.experiments import spec as _new


def __getattr__(name: str) -> Any:
    value = getattr(_new, name)
    warnings.warn("dbmtl_jax.experiments.benchmark is deprecated (renamed in 0.2.0): import from "
                  "dbmtl_jax.experiments or dbmtl_jax.experiments.spec.", DeprecationWarning, stacklevel=2)
    return value
