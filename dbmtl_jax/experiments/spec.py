"""The benchmark specification: the public "bring your own dataset" API.

A :class:`Benchmark` bundles everything the runner needs to train and evaluate
multi-task models on a data set (in the spirit of LibMTL's ``task_dict``):

* its :class:`Task` s: a name, a loss ``(pred, target) -> scalar``, a streaming
  metric from :mod:`dbmtl_jax.metrics` (``init`` / ``update`` / ``compute``),
  the metric names kept for the tables with their direction
  (``higher_is_better``), and the metric used for model selection on the
  validation split;
* a data provider ``data(recipe) -> DataSplits`` giving train / val / test
  batches of NumPy arrays (:class:`ArraySplits` covers in-memory arrays);
* a model factory ``model(rngs) -> nnx.Module`` whose ``__call__(inputs)``
  returns a tuple of per-task outputs, and a ``shared`` path predicate marking
  the shared (trunk) parameters for the gradient-balancing methods;
* the training :class:`Recipe` (Adam learning rate, batch size, epochs, ...)
  and a ``quick`` recipe for smoke runs.

A batch is ``(inputs, targets)``: ``inputs`` any pytree of arrays with a
leading batch axis (fed to the model as is), ``targets`` a tuple with one array
per task.  Register a benchmark under a name for the console command with
:func:`register_benchmark`::

    @register_benchmark("mine")
    def mine() -> Benchmark:
        return Benchmark(name="mine", tasks=(...), data=..., model=..., ...)

    # dbmtl-jax run mine --import my_module --methods stl,ew,dbmtl
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Iterator, Mapping, MutableMapping, Optional, Protocol, Sequence, Union

import numpy as np

__all__ = [
    "Task",
    "Recipe",
    "Benchmark",
    "DataSplits",
    "ArraySplits",
    "Batch",
    "BENCHMARKS",
    "register_benchmark",
    "get_benchmark",
]

Batch = tuple  # (inputs pytree, tuple of T target arrays)
SPLITS = ("train", "val", "test")


def _required_args(f: Callable[..., Any]) -> int:
    """How many positional arguments ``f`` requires (0 when its signature cannot be read)."""
    try:
        params = inspect.signature(f).parameters.values()
    except (TypeError, ValueError):
        return 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params)


def _identity_metric_input(pred: Any, target: Any) -> tuple[Any, Any]:
    return pred, target


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a benchmark.

    Attributes:
      name: the task name (a key of the result tables).
      loss: ``loss(pred, target) -> scalar`` (mean over the batch), traced under jit.
      metric: factory returning a streaming metric of :mod:`dbmtl_jax.metrics`
        (or any object with ``init()``, ``update(state, pred, target)``,
        ``compute(state) -> dict``): ``metric()``, or ``metric(data)`` when the
        metric depends on the loaded data (e.g. a target scale): it is then
        given the run's data provider (what ``Benchmark.data`` returned).
      metrics: the entries of ``metric.compute`` that are reported, mapped to
        ``higher_is_better`` (e.g. ``{"accuracy": True}``); every value must be a
        scalar.  The order is the column order of the tables.
      select_metric: the metric used for model selection on the validation
        split (default: the first of ``metrics``).
      metric_input: maps ``(pred, target)`` to the arguments of
        ``metric.update``: ``(pred, target)`` or ``(pred, target, mask)``
        (e.g. logits to 0/1 labels, or a padding mask); default identity.
        Targets may be any pytree (e.g. ``(values, mask)`` for padded batches).
      units: optional unit of each metric, for the tables (``{"mae": "years"}``).
    """

    name: str
    loss: Callable[[Any, Any], Any]
    metric: Callable[..., Any]
    metrics: Mapping[str, bool]
    select_metric: Optional[str] = None
    metric_input: Callable[[Any, Any], tuple[Any, Any]] = _identity_metric_input
    units: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def make_metric(self, data: Any = None) -> Any:
        """A fresh streaming metric: ``metric(data)`` if the factory takes an argument, else ``metric()``."""
        if _required_args(self.metric) == 0:
            return self.metric()
        if data is None:
            raise ValueError(f"task {self.name!r}: its metric factory takes the data provider; none was given.")
        return self.metric(data)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"task name must be a non-empty string without '/', got {self.name!r}.")
        if not self.metrics:
            raise ValueError(f"task {self.name!r}: metrics names no metric.")
        for k, v in self.metrics.items():
            if not isinstance(v, (bool, np.bool_)):
                raise ValueError(f"task {self.name!r}: higher_is_better of {k!r} must be a bool, got {v!r}.")
        object.__setattr__(self, "metrics", dict(self.metrics))
        if self.select_metric is None:
            object.__setattr__(self, "select_metric", next(iter(self.metrics)))
        elif self.select_metric not in self.metrics:
            raise ValueError(
                f"task {self.name!r}: select_metric {self.select_metric!r} is not one of {list(self.metrics)}."
            )

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return dict(self.metrics)


LR_SCHEDULES = ("cosine",)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to train: Adam (optionally with L2 weight decay as in PyTorch's ``Adam``) on the method's update.

    Attributes:
      learning_rate: Adam learning rate.
      batch_size: training batch size (the ragged last batch of an epoch is dropped).
      epochs: number of epochs; the validation split is evaluated after each.
      max_steps_per_epoch: cap on the steps of an epoch (``None``: a full pass).
      weight_decay: L2 coefficient added to the gradient before Adam (PyTorch
        ``Adam(weight_decay=...)`` semantics); 0 disables it.
      eval_batch_size: batch size for val/test (default ``batch_size``).
      max_train_examples, max_eval_examples: subsample the splits (fixed
        subset, the same for every method and seed), for quick runs.
      lr_decay_epoch, lr_decay_factor: multiply the learning rate by
        ``lr_decay_factor`` from epoch ``lr_decay_epoch`` on (the paper's NYUv2
        recipe halves it after 100 of 200 epochs); ``None``: constant.
      lr_schedule: ``None`` (the learning rate above, with the optional step
        decay) or ``"cosine"``: cosine decay from ``learning_rate`` to 0 over
        all ``epochs`` (``optax.cosine_decay_schedule``), so that the end of
        training is well defined (the updates vanish at the last epoch).
      data_options: free-form options for the benchmark's data provider
        (e.g. ``{"limit": 13000}`` molecules for a quick QM9 run); JSON values.
    """

    learning_rate: float
    batch_size: int
    epochs: int
    max_steps_per_epoch: Optional[int] = None
    weight_decay: float = 0.0
    eval_batch_size: Optional[int] = None
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    lr_decay_epoch: Optional[int] = None
    lr_decay_factor: float = 1.0
    lr_schedule: Optional[str] = None
    data_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Recipe.{name} must be a positive int, got {v!r}.")
        for name in ("max_steps_per_epoch", "eval_batch_size", "max_train_examples", "max_eval_examples",
                     "lr_decay_epoch"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"Recipe.{name} must be a positive int or None, got {v!r}.")
        if not (isinstance(self.learning_rate, (int, float)) and not isinstance(self.learning_rate, bool)
                and math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"Recipe.learning_rate must be a positive float, got {self.learning_rate!r}.")
        for name in ("weight_decay", "lr_decay_factor"):  # a NaN would be recorded in the config as null
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Recipe.{name} must be a finite number >= 0, got {v!r}.")
        if self.lr_schedule is not None:
            if self.lr_schedule not in LR_SCHEDULES:
                raise ValueError(f"Recipe.lr_schedule: unknown schedule {self.lr_schedule!r}; "
                                 f"available: None (constant), {', '.join(map(repr, LR_SCHEDULES))}.")
            if self.lr_decay_epoch is not None:
                raise ValueError("Recipe.lr_schedule and Recipe.lr_decay_epoch are two learning-rate schedules; "
                                 "give one of them.")
        object.__setattr__(self, "data_options", dict(self.data_options))

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not out["data_options"]:
            del out["data_options"]  # keeps the config hashes of recipes without options unchanged
        if out["lr_schedule"] is None:
            del out["lr_schedule"]  # likewise for the recipes made before the option existed
        return out


class DataSplits(Protocol):
    """What a benchmark's data provider returns.

    ``train_batches(rng)`` yields the training batches of one epoch (shuffled
    with ``rng``, a ``numpy.random.Generator`` seeded from the run's seed; all
    of its randomness must come from ``rng``, whose state a mid-run checkpoint
    saves);
    ``eval_batches(split)`` yields the batches of ``"val"`` or ``"test"`` in a
    fixed order; ``steps_per_epoch`` is the number of training batches that
    every epoch yields (the runner stops with an error if an epoch yields another
    number: learning-rate schedules count on it).
    """

    steps_per_epoch: int

    def train_batches(self, rng: np.random.Generator) -> Iterator[Batch]: ...

    def eval_batches(self, split: str) -> Iterator[Batch]: ...


def _tree_len(tree: Any) -> int:
    leaves = _leaves(tree)
    if not leaves:
        raise ValueError("a split holds no arrays.")
    n = {int(np.shape(x)[0]) for x in leaves}
    if len(n) != 1:
        raise ValueError(f"the arrays of a split disagree on their leading (example) size: {sorted(n)}.")
    return n.pop()


def _leaves(tree: Any) -> list:
    if isinstance(tree, Mapping):
        return [x for k in tree for x in _leaves(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [x for v in tree for x in _leaves(v)]
    return [tree]


def _take(tree: Any, idx: np.ndarray) -> Any:
    if isinstance(tree, Mapping):
        return {k: _take(v, idx) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_take(v, idx) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_take(v, idx) for v in tree)
    return np.asarray(tree)[idx]


class ArraySplits:
    """In-memory splits: each is ``(inputs, targets)`` with a leading example axis on every array.

    Args:
      train, val, test: ``(inputs, targets)``; ``inputs`` an array or a
        dict/tuple of arrays, ``targets`` a tuple with one array per task.
      recipe: gives ``batch_size``, ``eval_batch_size`` and the optional
        ``max_train_examples`` / ``max_eval_examples`` / ``max_steps_per_epoch``.
      subset_seed: seed of the fixed subsample taken when a split is capped
        (the same for every method and run seed).  The subsets are drawn from
        one generator in the order train, val, test, so the val and test
        subsets also depend on whether and how far the training split is
        capped: runs with other ``max_train_examples`` are evaluated on other
        examples even with the same ``max_eval_examples`` (compare them on
        uncapped evaluation splits).
      collate: ``collate(split_data, index_array) -> batch``; the default
        indexes every array.  Override it for inputs that are not plain arrays
        (e.g. padded graph batches).
    """

    def __init__(
        self,
        train: tuple[Any, Sequence[np.ndarray]],
        val: tuple[Any, Sequence[np.ndarray]],
        test: tuple[Any, Sequence[np.ndarray]],
        recipe: Recipe,
        *,
        subset_seed: int = 0,
        collate: Optional[Callable[[Any, np.ndarray], Batch]] = None,
    ) -> None:
        self._data = {"train": train, "val": val, "test": test}
        self._collate = collate or (lambda data, idx: (_take(data[0], idx), tuple(_take(tuple(data[1]), idx))))
        self.batch_size = recipe.batch_size
        self.eval_batch_size = recipe.eval_batch_size or recipe.batch_size
        rng = np.random.default_rng(subset_seed)
        self._index: dict[str, np.ndarray] = {}
        for split, data in self._data.items():
            if not isinstance(data, tuple) or len(data) != 2:
                raise ValueError(f"split {split!r} must be an (inputs, targets) pair.")
            n = _tree_len(data)
            cap = recipe.max_train_examples if split == "train" else recipe.max_eval_examples
            idx = np.arange(n)
            if cap is not None and cap < n:
                idx = np.sort(rng.choice(n, cap, replace=False))
            self._index[split] = idx
        n_train = len(self._index["train"])
        if n_train < self.batch_size:
            raise ValueError(f"the training split has {n_train} examples, fewer than the batch size {self.batch_size}.")
        steps = n_train // self.batch_size
        if recipe.max_steps_per_epoch is not None:
            steps = min(steps, recipe.max_steps_per_epoch)
        self.steps_per_epoch = steps

    def size(self, split: str) -> int:
        """Number of examples used from ``split``."""
        return len(self._index[split])

    def train_batches(self, rng: np.random.Generator) -> Iterator[Batch]:
        perm = self._index["train"][rng.permutation(len(self._index["train"]))]
        for i in range(self.steps_per_epoch):
            yield self._collate(self._data["train"], perm[i * self.batch_size : (i + 1) * self.batch_size])

    def eval_batches(self, split: str) -> Iterator[Batch]:
        if split not in ("val", "test"):
            raise ValueError(f"unknown split {split!r}; expected 'val' or 'test'.")
        idx = self._index[split]
        for i in range(0, len(idx), self.eval_batch_size):
            yield self._collate(self._data[split], idx[i : i + self.eval_batch_size])


def _all_shared(path: str) -> bool:
    del path
    return True


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A multi-task benchmark (see the module docstring).

    Attributes:
      name: registry name.
      tasks: the tasks, in the order of the model's outputs.
      data: ``data(recipe) -> DataSplits``; called once per recipe and reused
        for every method and seed (so a loader may be slow).
      model: ``model(rngs: nnx.Rngs) -> nnx.Module``; ``module(inputs)`` returns
        a tuple of T per-task outputs.
      recipe: the full training recipe.
      quick: the smoke-test recipe (``--quick``; under 2 minutes per run on a CPU).
      shared: ``shared(path) -> bool`` for the parameter paths (``"encoder/..."``)
        of the model's ``nnx.Param`` state: True for the shared trunk.  Default:
        every parameter is shared.
      description: one line for ``dbmtl-jax list``.
      method_hparams: default method hyperparameters for this benchmark,
        ``{method: {name: value}}`` (overridden by the user's ``--hp``).
    """

    name: str
    tasks: tuple[Task, ...]
    data: Callable[[Recipe], DataSplits]
    model: Callable[[Any], Any]
    recipe: Recipe
    quick: Recipe
    shared: Callable[[str], bool] = _all_shared
    description: str = ""
    method_hparams: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.tasks:
            raise ValueError(f"benchmark {self.name!r} has no task.")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"benchmark {self.name!r} has duplicate task names: {names}.")
        for attr in ("recipe", "quick"):
            if not isinstance(getattr(self, attr), Recipe):
                raise TypeError(f"Benchmark.{attr} must be a Recipe, got {type(getattr(self, attr)).__name__}.")

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def higher_is_better(self) -> dict[str, dict[str, bool]]:
        """``task -> metric -> bool``, the layout :func:`dbmtl_jax.delta_p` takes."""
        return {t.name: dict(t.metrics) for t in self.tasks}


BenchmarkFactory = Callable[[], Benchmark]
BENCHMARKS: MutableMapping[str, BenchmarkFactory] = {}


def register_benchmark(
    name: str, factory: Union[BenchmarkFactory, Benchmark, None] = None, *, overwrite: bool = False
) -> Any:
    """Registers ``factory`` (a zero-argument callable returning a :class:`Benchmark`, or a Benchmark).

    Usable as ``register_benchmark("name", factory)`` or as a decorator
    ``@register_benchmark("name")``.  The factory is called by
    :func:`get_benchmark`, so loading data can wait until a run needs it.
    Re-registering a name raises unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name or any(c in name for c in "/\\ "):
        raise ValueError(f"benchmark name must be a non-empty string without '/', '\\' or spaces, got {name!r}.")

    def add(f: Union[BenchmarkFactory, Benchmark]) -> Union[BenchmarkFactory, Benchmark]:
        if name in BENCHMARKS and not overwrite:
            raise ValueError(f"benchmark {name!r} is already registered; pass overwrite=True to replace it.")
        if isinstance(f, Benchmark):
            bench = f
            BENCHMARKS[name] = lambda: bench
        elif callable(f):
            BENCHMARKS[name] = f
        else:
            raise TypeError(f"register_benchmark needs a Benchmark or a factory, got {type(f).__name__}.")
        return f

    if factory is None:
        return add
    add(factory)
    return factory


def get_benchmark(name: str) -> Benchmark:
    """Builds the registered benchmark ``name``."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; registered: {', '.join(sorted(BENCHMARKS)) or 'none'} "
                         "(a benchmark of your own is registered when its module is imported: on the command line "
                         "pass --import my_bench.py or --import my_module).")
    bench = BENCHMARKS[name]()
    if not isinstance(bench, Benchmark):
        raise TypeError(f"the factory of benchmark {name!r} returned {type(bench).__name__}, not a Benchmark.")
    return bench
