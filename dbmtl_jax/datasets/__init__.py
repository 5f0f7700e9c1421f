"""Small data sets for examples and tests (NumPy arrays; nothing here needs a GPU)."""

from dbmtl_jax.datasets.adult import (
    AdultData,
    DatasetUnavailableError,
    TaskInfo,
    cache_dir,
    load_adult,
)

__all__ = ["AdultData", "DatasetUnavailableError", "TaskInfo", "cache_dir", "load_adult"]
