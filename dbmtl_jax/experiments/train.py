"""Training and evaluation loop of the experiment runner.

One *run* trains one model of a :class:`~dbmtl_jax.experiments.spec.Benchmark`
with one method and one seed, and writes one record (gzip-compressed JSON,
``<benchmark>__<method>__seed<seed>__<hash>.json.gz``, format
:data:`RESULT_FORMAT`; see :func:`compact_record`).  Only the public API
of the library is used:

* gradient-balancing, hybrid and DB-MTL methods (and loss-weighting methods
  with the log transform or ``grad_stats=True``): per-task gradients from
  ``dbmtl_jax.value_and_task_grads(loss_fn, log=...)``, then
  ``optax.chain(get_method(name, T, shared=..., **hp), [add_decayed_weights], adam(lr))``
  with ``losses=`` (the raw task losses) and ``key=`` passed as extra args
  (the final optimizer is Adam unless the run's ``optimizer`` says otherwise:
  :func:`normalize_optimizer`; STL uses the same one);
* loss-weighting methods (``METHOD_GROUPS[name] == "loss"``): the cheap path
  of :mod:`dbmtl_jax.loss_weighting` (one backward pass of
  ``Σ_t stop_gradient(w_t) ℓ_t``, the method built with ``grads="weighted"``);
* ``stl``: single-task learning, T independent copies of the benchmark's model
  (each with all heads, only head ``t`` of copy ``t`` is trained and used),
  trained together by minimising ``Σ_t ℓ_t(copy_t)`` with one Adam.  Copies
  share no parameter and Adam is per-coordinate, so this is exactly T separate
  single-task runs on the same batches; model selection is done per task (each
  copy at its own best validation epoch), as for separate runs.

Method labels: ``name`` uses the method's natural loss transform (log for
``dbmtl``, raw losses for the others); ``name+log`` / ``name+nolog`` force
``log(ℓ_t + ε)`` gradients or raw gradients (the paper's Fig. 1 and Table 5).
With the log transform, ``losses=`` still receives the raw losses.

Model selection: after every epoch the validation split is evaluated; the
selected epoch maximises the mean over tasks of the signed relative change of
each task's ``select_metric`` with respect to the first epoch (LibMTL's
validation-based selection, restricted to the selection metrics).  The
parameters of the best epoch are kept in host memory and the test split is
evaluated once, at the end, with them: test data never influences selection.

Resumption: finished runs are skipped; an unfinished one continues from its
mid-run checkpoint (:mod:`dbmtl_jax.experiments.checkpoint`).  Records and
checkpoints keep a summary of the data (:mod:`dbmtl_jax.experiments.data_summary`),
checked before either is resumed.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import statistics
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dbmtl_jax
from dbmtl_jax import loss_weighting, task_axis
from dbmtl_jax.datasets._cache import DatasetUnavailableError
from dbmtl_jax.experiments import data_summary as ds
from dbmtl_jax.guard import finite_flags
from dbmtl_jax.experiments.spec import Benchmark, Recipe, Task

__all__ = [
    "RESULT_FORMAT",
    "READABLE_FORMATS",
    "RESULT_SUFFIX",
    "CURVE_DIGITS",
    "MethodSpec",
    "parse_method",
    "parse_methods",
    "parse_hparams",
    "validate_hparams",
    "validate_seeds",
    "OPTIMIZERS",
    "SELF_OPTIMIZING",
    "normalize_optimizer",
    "make_optimizer",
    "ReplayStep",
    "replay_steps",
    "RunConfig",
    "make_config",
    "RECORDED_DEFAULTS",
    "method_defaults",
    "resolved_hparams",
    "upgrade_config",
    "config_hash",
    "result_path",
    "run_id",
    "record_files",
    "find_finished",
    "is_finished",
    "read_record",
    "write_record",
    "compact_record",
    "STUDY_INDEX",
    "read_study",
    "write_study",
    "add_to_study",
    "train_run",
    "run_experiments",
]

RESULT_FORMAT = "dbmtl_jax.experiment/2"
"""Format of the records the runner writes: gzip-compressed JSON without indentation, the curves and
per-epoch histories rounded to :data:`CURVE_DIGITS` significant digits (:func:`compact_record`)."""
READABLE_FORMATS = ("dbmtl_jax.experiment/1", RESULT_FORMAT)
"""Formats the readers accept; ``/1`` is the older plain, indented JSON with full-precision curves."""
RESULT_SUFFIX = ".json.gz"
LEGACY_SUFFIX = ".json"  # format /1 files (still read, and recognised as finished by resume)
CURVE_DIGITS = 4
"""Significant digits of the stored curves and histories (plots need no more); metrics, selection
scores and timings are stored at full precision."""
STUDY_INDEX = "runs.txt"
"""A study folder's list of its runs (paths relative to the folder), written by ``run(study=...)``."""
LOG_EPS = 1e-8  # the ε of log(ℓ + ε), value_and_task_grads' default


# --------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method as the runner trains it.

    Attributes:
      name: registry name (``dbmtl_jax.METHODS``) or ``"stl"``.
      log: differentiate ``log(ℓ_t + ε)`` instead of ``ℓ_t``.
      label: canonical label (``"pcgrad+log"``; the suffix only when ``log``
        differs from the method's default), used in file names and tables.
    """

    name: str
    log: bool
    label: str

    @property
    def group(self) -> str:
        return "stl" if self.name == "stl" else dbmtl_jax.METHOD_GROUPS[self.name]


def default_log(name: str) -> bool:
    """Whether a method differentiates the log losses by default (DB-MTL only)."""
    return dbmtl_jax.METHOD_GROUPS.get(name) == "dbmtl"


def parse_method(spec: str) -> MethodSpec:
    """Parses ``name``, ``name+log`` or ``name+nolog``."""
    spec = spec.strip()
    base, _, suffix = spec.partition("+")
    base = base.strip().lower()
    if base == "stl":
        if suffix:
            raise ValueError(f"method {spec!r}: stl takes no '+{suffix}' suffix.")
        return MethodSpec("stl", False, "stl")
    if base not in dbmtl_jax.METHODS:
        raise ValueError(f"unknown method {base!r}; available: stl, {', '.join(dbmtl_jax.METHODS)}.")
    if suffix not in ("", "log", "nolog"):
        raise ValueError(f"method {spec!r}: unknown suffix '+{suffix}'; expected '+log' or '+nolog'.")
    log = default_log(base) if not suffix else suffix == "log"
    label = base if log == default_log(base) else f"{base}+{'log' if log else 'nolog'}"
    return MethodSpec(base, log, label)


def parse_methods(text: str, *, force_log: bool = False) -> list[MethodSpec]:
    """Comma-separated method labels; ``all`` expands to stl and every registered method.

    ``force_log`` turns on the log transform for every method but ``stl``
    (the CLI's ``--log``).
    """
    out: list[MethodSpec] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        items = ["stl", *dbmtl_jax.METHODS] if item.lower() == "all" else [item]
        for it in items:
            spec = parse_method(it)
            if force_log and spec.name != "stl" and not spec.log:
                spec = parse_method(f"{spec.name}+log")
            if spec not in out:
                out.append(spec)
    if not out:
        raise ValueError("no method given.")
    return out


def _literal(text: str) -> Any:
    import ast

    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def parse_hparams(items: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``["dbmtl.beta=0.5", "pcgrad+log.reduction=mean"]`` -> ``{method: {name: value}}``.

    The method part is a registry name (applies to all its variants) or a full
    label (applies to that variant only, after the name's values).
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, eq, value = item.partition("=")
        method, dot, key = head.partition(".")
        if not eq or not dot or not method.strip() or not key.strip():
            raise ValueError(f"--hp {item!r}: expected METHOD.NAME=VALUE, e.g. dbmtl.beta=0.5.")
        out.setdefault(method.strip().lower(), {})[key.strip()] = _literal(value)
    return out


def parse_data_options(items: Iterable[str]) -> dict[str, Any]:
    """``["num_test=2000", "name=x"]`` -> ``{"num_test": 2000, "name": "x"}`` (values read as ``--hp`` reads them)."""
    out: dict[str, Any] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"--data-option {item!r}: expected NAME=VALUE.")
        out[name.strip()] = _literal(value)
    return out


def _factory(name: str) -> Optional[Callable[..., Any]]:
    """The registered factory of ``name`` (for signature inspection only)."""
    from dbmtl_jax.methods.registry import METHODS, get_factory

    return get_factory(name) if name in METHODS else None


def _accepts(name: str, arg: str) -> bool:
    f = _factory(name)
    if f is None:
        return False
    try:
        return arg in inspect.signature(f).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- recorded defaults

RECORDED_DEFAULTS: Mapping[str, tuple[str, ...]] = {"dbmtl": ("beta", "beta_sigma")}
"""Hyperparameters whose default values a run's config records (key ``defaults``).

DB-MTL's default σ changed (0 → 0.5, dbmtl_jax 0.2.0): a config states the
defaults it ran under, so a record written under one default is never taken
for a run under another (its config hash differs).  Other defaults are not
recorded (keeping every stored hash valid): changing one means adding it here
and its old value to :data:`LEGACY_DEFAULTS` (a test pins them all)."""

LEGACY_DEFAULTS: Mapping[str, Mapping[str, Any]] = {"dbmtl": {"beta": 0.9, "beta_sigma": 0.0}}
"""The defaults of the :data:`RECORDED_DEFAULTS` in force for a config without ``defaults`` (before 0.2.0)."""


def method_defaults(name: str) -> dict[str, Any]:
    """The current defaults of ``name``'s :data:`RECORDED_DEFAULTS` (``{}`` for other methods)."""
    keys = RECORDED_DEFAULTS.get(name, ())
    if not keys:
        return {}
    params = inspect.signature(_factory(name)).parameters
    return {k: _jsonable(params[k].default) for k in keys}


def canonical_hparams(name: str, hparams: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``hparams`` without values equal to ``defaults`` (and DB-MTL's σ when β = 0, where it has no effect)."""
    hp = {k: v for k, v in hparams.items() if not (k in defaults and _same_value(v, defaults[k]))}
    for k, v in hp.items():  # 0 and 0.0 are one setting: spelled as the default's type
        if k in defaults and isinstance(defaults[k], float) and isinstance(v, int) and not isinstance(v, bool):
            hp[k] = float(v)
    if name == "dbmtl" and _same_value(hp.get("beta", defaults.get("beta")), 0.0):
        hp.pop("beta_sigma", None)  # β_k = 0 / k^σ = 0 for every σ: one run, one hash
    return hp


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return a == b
    return float(a) == float(b)


def resolved_hparams(config: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters a stored run ran with: its explicit ``hparams`` over the defaults in force then."""
    name = config.get("base_method", "")
    in_force = config.get("defaults") or LEGACY_DEFAULTS.get(name, {})
    return {**in_force, **(config.get("hparams") or {})}


def upgrade_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` restated under the current :func:`method_defaults` (same run, maybe another hash).

    A DB-MTL record written before the defaults were recorded ran with
    :data:`LEGACY_DEFAULTS`; its hyperparameters are spelled out where they
    differ from today's defaults, and ``defaults`` is added.  Other configs
    are returned unchanged.
    """
    name = config.get("base_method", "")
    current = method_defaults(name)
    out = dict(config)
    if not current or config.get("defaults") == current:
        return out
    out["hparams"] = canonical_hparams(name, resolved_hparams(config), current)
    out["defaults"] = current
    return out


def uses_cheap_path(spec: MethodSpec, grad_stats: bool) -> bool:
    """Loss-weighting methods use the one-backward-pass weighted loss (of ``log(ℓ_t + ε)`` for ``+log``)."""
    return (
        spec.name != "stl"
        and spec.group == "loss"
        and not grad_stats
        and _accepts(spec.name, "grads")
    )


def method_hparams(
    spec: MethodSpec, benchmark: Benchmark, user: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The method's hyperparameters: benchmark defaults, then ``--hp NAME.*``, then ``--hp LABEL.*``."""
    hp: dict[str, Any] = {}
    for key in dict.fromkeys([spec.name, spec.label]):
        hp.update(benchmark.method_hparams.get(key, {}))
    for key in dict.fromkeys([spec.name, spec.label]):
        hp.update(user.get(key, {}))
    return hp


def _hp_text(key: str, name: str, value: Any) -> str:
    """``METHOD.NAME=VALUE`` as written on the command line."""
    text = str(value).lower() if isinstance(value, bool) or value is None else str(value)
    return f"{key}.{name}={text}"


def _hp_sources(
    spec: MethodSpec, benchmark: Benchmark, user: Mapping[str, Mapping[str, Any]]
) -> dict[str, str]:
    """``hyperparameter -> where its value comes from`` (``--hp dbmtl.beta=0.5`` or the benchmark's default)."""
    out: dict[str, str] = {}
    for key in dict.fromkeys([spec.name, spec.label]):
        for k, v in benchmark.method_hparams.get(key, {}).items():
            out[k] = f"benchmark {benchmark.name!r} default {_hp_text(key, k, v)}"
    for key in dict.fromkeys([spec.name, spec.label]):
        for k, v in user.get(key, {}).items():
            out[k] = f"--hp {_hp_text(key, k, v)}"
    return out


_NUMERIC_ANNOTATION_WORDS = {"Optional", "Union", "int", "float", "bool", "Sequence", "tuple", "Tuple", "list",
                             "List", "jax", "Array", "np", "ndarray", "None", "typing"}


def _check_hp_value(spec: MethodSpec, param: inspect.Parameter, value: Any, source: str) -> None:
    """Rejects values of the wrong kind, judged from the factory's default and annotation."""
    default = param.default
    kind = None
    if default is not inspect.Parameter.empty and default is not None and not isinstance(default, str):
        kind = "a bool" if isinstance(default, bool) else (
            "a number" if isinstance(default, (int, float)) else f"a {type(default).__name__}")
    elif isinstance(value, str) and param.annotation is not inspect.Parameter.empty:
        import re

        words = set(re.findall(r"[A-Za-z_]+", str(param.annotation)))
        if words and words <= _NUMERIC_ANNOTATION_WORDS:
            kind = f"a value of type {param.annotation}"
    if kind is None:
        return
    if isinstance(value, str):
        raise ValueError(
            f"{source}: method {spec.label!r} expects {kind} for {param.name!r} (default {default!r}), "
            f"got the string {value!r}."
        )
    if kind == "a number" and isinstance(value, bool):
        raise ValueError(
            f"{source}: method {spec.label!r} expects a number for {param.name!r} (default {default!r}), "
            f"got {value!r}."
        )


def validate_hparams(
    benchmark: Benchmark,
    specs: Sequence[MethodSpec],
    hparams: Mapping[str, Mapping[str, Any]],
    *,
    grad_stats: bool = False,
) -> None:
    """Checks every method's hyperparameters before anything runs; raises ``ValueError`` naming the option.

    Rejected: ``--hp`` entries for unknown methods or methods that are not being
    run, hyperparameter names the method's factory does not take, strings where
    the factory's default is a number or a bool (``dbmtl.beta=abc``), and
    values the factory itself rejects: each method is built once, for the
    benchmark's task count, with its hyperparameters.
    """
    available = ", ".join(("stl", *dbmtl_jax.METHODS))
    known = {s.name for s in specs} | {s.label for s in specs}
    for key, values in hparams.items():
        opts = ", ".join(f"--hp {_hp_text(key, k, v)}" for k, v in values.items()) or f"--hp {key}"
        try:
            parsed = parse_method(key)
        except ValueError:
            raise ValueError(f"{opts}: unknown method {key!r}; available: {available}.") from None
        if parsed.name == "stl":
            raise ValueError(f"{opts}: stl takes no hyperparameters.")
        if key not in known:
            raise ValueError(f"{opts}: --hp names method(s) [{key!r}] that are not being run ({sorted(known)}).")
        if "shared" in values:
            raise ValueError(f"--hp {_hp_text(key, 'shared', values['shared'])}: which parameters are shared is the "
                             "benchmark's (Benchmark.shared, used by every method alike), not a method "
                             "hyperparameter; define it in the benchmark.")
    for spec in specs:
        if spec.name == "stl":
            continue
        hp = method_hparams(spec, benchmark, hparams)
        sources = _hp_sources(spec, benchmark, hparams)
        factory = _factory(spec.name)
        params: dict[str, inspect.Parameter] = {}
        var_kw = False
        if factory is not None:
            try:
                sig = inspect.signature(factory)
            except (TypeError, ValueError):
                sig = None
            if sig is not None:
                plist = list(sig.parameters.values())
                var_kw = any(p.kind is p.VAR_KEYWORD for p in plist)
                params = {p.name: p for p in plist[1:]  # the first one is num_tasks
                          if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        for name, value in hp.items():
            source = sources.get(name, f"hyperparameter {name!r}")
            if name not in params:
                if var_kw and name != "num_tasks":
                    continue
                raise ValueError(
                    f"{source}: method {spec.label!r} has no hyperparameter {name!r}; "
                    f"it takes: {', '.join(params) or 'none'}."
                )
            _check_hp_value(spec, params[name], value, source)
            default = params[name].default
            if (source.startswith("--hp") and name not in RECORDED_DEFAULTS.get(spec.name, ())
                    and default is not inspect.Parameter.empty and _same_value(_jsonable(value), _jsonable(default))):
                warnings.warn(f"{source} equals the default of {name!r}: it is recorded as an explicit setting, so "
                              f"it is a configuration of its own (another config hash, trained again, a report row "
                              f"labelled with it); leave it out to reuse the default runs.", stacklevel=2)
        built = dict(hp)
        if "shared" in params:
            built.setdefault("shared", benchmark.shared)
        if "steps_per_epoch" in params:
            built.setdefault("steps_per_epoch", 1)
        if uses_cheap_path(spec, grad_stats):
            built["grads"] = "weighted"
        try:
            dbmtl_jax.get_method(spec.name, benchmark.num_tasks, **built)
        except Exception as e:  # noqa: BLE001 - whatever the factory raises, nothing has run yet
            opts = ", ".join(sources[k] for k in hp if k in sources) or f"method {spec.label!r}"
            raise ValueError(
                f"{opts}: method {spec.label!r} rejects its hyperparameters {dict(hp)} "
                f"for {benchmark.num_tasks} tasks ({type(e).__name__}: {e})."
            ) from e


def validate_seeds(seeds: Iterable[Any]) -> list[int]:
    """The seeds as ints; duplicates, negative and non-integer seeds raise ``ValueError``."""
    out: list[int] = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise ValueError(f"seed {s!r} is not an int.")
        if s < 0:
            raise ValueError(f"seed {int(s)} is negative; seeds must be >= 0.")
        out.append(int(s))
    if not out:
        raise ValueError("no seed given.")
    dup = sorted({s for s in out if out.count(s) > 1})
    if dup:
        raise ValueError(f"duplicate seed(s) {dup}; give each seed once (a repeated seed would run once "
                         f"and be counted twice).")
    return out


# --------------------------------------------------------------------------- optimizers

OPTIMIZERS: dict[str, dict[str, float]] = {
    "adam": {"b1": 0.9, "b2": 0.999},  # optax.adam(lr, b1=b1, b2=b2); eps = 1e-8
    "sgdm": {"momentum": 0.9},  # optax.sgd(lr, momentum=momentum) (PyTorch SGD: v <- g + mu v)
}
"""The final optimizer of the runner's chain and its options (with their defaults)."""

_LISTED_WHEN_SET: dict[str, tuple[str, ...]] = {"adam": ("b2",)}
"""Options added after runs were recorded: the canonical form lists them only when not at their default, so the
configs (and hashes) of the runs made before keep their meaning (Adam's b2 came after b1)."""


def normalize_optimizer(optimizer: Any = None) -> Optional[dict[str, Any]]:
    """Canonical form of an optimizer choice; ``None`` for the default (Adam, ``b1 = 0.9``).

    ``optimizer`` is ``None``, a name of :data:`OPTIMIZERS` (``"adam"``,
    ``"sgdm"``) or a mapping ``{"name": ..., <option>: value}`` (options left
    out or ``None`` take their defaults).  The canonical form lists the name
    and every option; the default is ``None`` so that the configs (and the
    file names) of runs with the default optimizer are those of the runs made
    before the option existed.
    """
    if optimizer is None:
        return None
    if isinstance(optimizer, str):
        spec: dict[str, Any] = {"name": optimizer}
    elif isinstance(optimizer, Mapping):
        spec = dict(optimizer)
    else:
        raise ValueError(f"optimizer: expected a name or a mapping, got {optimizer!r}.")
    name = str(spec.pop("name", "adam")).strip().lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(OPTIMIZERS)}.")
    defaults = OPTIMIZERS[name]
    out: dict[str, Any] = {"name": name}
    for key, default in defaults.items():
        v = spec.pop(key, None)
        v = default if v is None else v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v < 1:
            raise ValueError(f"optimizer {name!r}: {key} must be a number in [0, 1), got {v!r}.")
        if not (key in _LISTED_WHEN_SET.get(name, ()) and float(v) == default):
            out[key] = float(v)
    extra = {k: v for k, v in spec.items() if v is not None}
    if extra:
        raise ValueError(f"optimizer {name!r} has no option(s) {sorted(extra)}; it takes: {', '.join(defaults)}.")
    if out == {"name": "adam", "b1": OPTIMIZERS["adam"]["b1"]}:
        return None
    return out


SELF_OPTIMIZING: frozenset[str] = frozenset({"mtadam"})
"""Methods that return an adaptive optimizer's direction themselves (MTAdam keeps Adam moments per task): the
runner chains them with the learning rate only, ``optax.scale_by_learning_rate`` (weight decay, where the recipe has
it, goes before that step, decoupled as in AdamW), never into another optimizer; ``--optimizer`` does not apply to
them.  Their configs record it (``final``), so the runs made before dbmtl_jax 0.3, which chained MTAdam into Adam
(audit 42), hash differently and are labelled ``mtadam → adam`` in reports."""


def make_optimizer(optimizer: Any, learning_rate: Any) -> optax.GradientTransformation:
    """The final optimizer of the chain (``None``: ``optax.adam(learning_rate)``, the default)."""
    spec = normalize_optimizer(optimizer)
    if spec is None:
        return optax.adam(learning_rate)
    if spec["name"] == "adam":
        return optax.adam(learning_rate, b1=spec["b1"], b2=spec.get("b2", OPTIMIZERS["adam"]["b2"]))
    return optax.sgd(learning_rate, momentum=spec["momentum"] or None)


# --------------------------------------------------------------------------- configs and files


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run except the seed (hashed into the file name)."""

    benchmark: str
    method: str
    base_method: str
    log: bool
    hparams: Mapping[str, Any]
    recipe: Mapping[str, Any]
    quick: bool
    grad_path: str
    optimizer: Optional[Mapping[str, Any]] = None  # None: Adam (b1 = 0.9), the key is then left out
    defaults: Optional[Mapping[str, Any]] = None  # RECORDED_DEFAULTS in force (None: not recorded, key left out)
    final: Optional[str] = None  # "learning_rate" for SELF_OPTIMIZING methods (None: the optimizer, key left out)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "benchmark": self.benchmark,
            "method": self.method,
            "base_method": self.base_method,
            "log": self.log,
            "hparams": dict(self.hparams),
            "recipe": dict(self.recipe),
            "quick": self.quick,
            "grad_path": self.grad_path,
        }
        if self.optimizer is not None:  # absent for the default, so older config hashes stay valid
            out["optimizer"] = dict(self.optimizer)
        if self.defaults is not None:
            out["defaults"] = dict(self.defaults)
        if self.final is not None:
            out["final"] = self.final
        return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)


def make_config(
    benchmark: Benchmark,
    spec: MethodSpec,
    recipe: Recipe,
    *,
    quick: bool,
    hparams: Mapping[str, Any],
    grad_stats: bool = False,
    optimizer: Any = None,
) -> RunConfig:
    grad_path = "stl" if spec.name == "stl" else ("weighted" if uses_cheap_path(spec, grad_stats) else "per_task")
    defaults = method_defaults(spec.name)
    optimizer = normalize_optimizer(optimizer)
    final = None
    if spec.name in SELF_OPTIMIZING:
        if optimizer is not None:
            raise ValueError(f"method {spec.label!r} is itself an Adam-type optimizer: the runner applies its direction "
                             f"with the learning rate only, so --optimizer {optimizer['name']} "
                             "does not apply to it (run it without --optimizer).")
        final = "learning_rate"
    return RunConfig(
        benchmark=benchmark.name,
        method=spec.label,
        base_method=spec.name,
        log=spec.log,
        hparams=canonical_hparams(spec.name, _jsonable(dict(hparams)), defaults),
        recipe=_jsonable(recipe.to_dict()),
        quick=quick,
        grad_path=grad_path,
        optimizer=optimizer,
        defaults=defaults or None,
        final=final,
    )


def config_hash(config: RunConfig) -> str:
    """10 hex digits of the SHA-256 of the canonical JSON of ``config`` (seed excluded)."""
    text = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def run_id(config: RunConfig, seed: int) -> str:
    """``<benchmark>__<method>__seed<seed>__<hash>``: one run, whatever its file format."""
    return f"{config.benchmark}__{config.method}__seed{seed}__{config_hash(config)}"


def result_path(out_dir: os.PathLike, config: RunConfig, seed: int) -> Path:
    """``out/<benchmark>/<benchmark>__<method>__seed<seed>__<hash>.json.gz``."""
    return Path(out_dir) / config.benchmark / (run_id(config, seed) + RESULT_SUFFIX)


def _stem(path: Path) -> str:
    name = Path(path).name
    for suffix in (RESULT_SUFFIX, LEGACY_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def record_files(path: os.PathLike) -> list[Path]:
    """The files that may hold the run of ``path``: the ``.json.gz`` record, then the format /1 ``.json``."""
    path = Path(path)
    stem = _stem(path)
    return [path.with_name(stem + RESULT_SUFFIX), path.with_name(stem + LEGACY_SUFFIX)]


def read_record(path: os.PathLike) -> Any:
    """The parsed JSON of a record file (``.json.gz`` or plain ``.json``).

    Raises ``OSError`` when the file cannot be read, ``UnicodeDecodeError`` /
    ``ValueError`` when it is not (gzip-compressed) UTF-8 JSON.
    """
    path = Path(path)
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise ValueError(f"invalid gzip data ({e}); a truncated or corrupted file?") from None
    return json.loads(data.decode("utf-8"))


def find_finished(path: os.PathLike) -> Optional[Path]:
    """The file holding the finished run of ``path`` (``.json.gz`` or a format /1 ``.json``), or ``None``."""
    for f in record_files(path):
        try:
            rec = read_record(f)
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("status") == "done":
            return f
    return None


def is_finished(path: os.PathLike) -> bool:
    """Whether ``path`` (or its other-format twin) holds a finished run (resume skips it)."""
    return find_finished(path) is not None


def _round_sig(x: Any, digits: int = CURVE_DIGITS) -> Any:
    """Every finite float of a nested list / dict rounded to ``digits`` significant digits."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else x
    if isinstance(x, list):
        return [_round_sig(v, digits) for v in x]
    if isinstance(x, dict):
        return {k: _round_sig(v, digits) for k, v in x.items()}
    return x


_ROUNDED_HISTORY = ("train_loss", "grad_norm", "raw_grad_norm", "grad_cosine", "val", "test")


def compact_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record in the current format: ``format`` :data:`RESULT_FORMAT`, curves rounded.

    ``curve`` (all but ``step``) and the per-epoch ``history`` of training
    losses, gradient norms / cosines and val / test metrics are rounded to
    :data:`CURVE_DIGITS` significant digits (``curve_digits`` says so);
    ``metrics``, ``selected_epoch``, ``history.selection_score``,
    ``history.epoch_time_s`` and the timings keep full precision, so tables
    and selections are unchanged.  Converting a format /1 record gives the
    record the runner writes now; already compact records are returned as is.
    """
    rec = _jsonable(dict(record))
    hist = rec.get("history")
    if isinstance(hist, dict):
        rec["history"] = {k: _round_sig(v) if k in _ROUNDED_HISTORY else v for k, v in hist.items()}
    curve = rec.get("curve")
    if isinstance(curve, dict):
        rec["curve"] = {k: v if k == "step" else _round_sig(v) for k, v in curve.items()}
    rec["format"] = RESULT_FORMAT
    rec["curve_digits"] = CURVE_DIGITS
    return rec


def encode_record(record: Mapping[str, Any]) -> bytes:
    """The bytes of a ``.json.gz`` record: compact JSON, gzip with a fixed header (same record, same bytes)."""
    text = json.dumps(compact_record(record), separators=(",", ":"))
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def write_record(path: os.PathLike, record: Mapping[str, Any]) -> Path:
    """Writes ``record`` (compacted) to ``path`` (a ``.json.gz`` name) atomically; returns the path.

    A format /1 ``.json`` twin of the same run is removed afterwards, so a run
    is never stored twice.
    """
    path = Path(path)
    if not path.name.endswith(RESULT_SUFFIX):
        raise ValueError(f"{path}: record files end in {RESULT_SUFFIX}.")
    data = encode_record(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written result
    legacy = record_files(path)[1]
    if legacy.exists():
        legacy.unlink()
    return path


def read_study(study_dir: os.PathLike) -> list[str]:
    """The entries of ``<study_dir>/runs.txt`` (paths relative to the folder), or ``[]``."""
    index = Path(study_dir) / STUDY_INDEX
    try:
        text = index.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


_STUDY_HEADER = ("# The runs of this study, one record per line, relative to this folder (written by\n"
                 "# `dbmtl-jax run --study`; `dbmtl-jax report` reads them from the record store).\n")


def write_study(study_dir: os.PathLike, entries: Iterable[str]) -> Path:
    """Writes ``<study_dir>/runs.txt`` with ``entries`` (sorted, unique), atomically."""
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    index = study_dir / STUDY_INDEX
    tmp = index.with_name(index.name + f".tmp{os.getpid()}")
    tmp.write_text(_STUDY_HEADER + "".join(f"{e}\n" for e in sorted(set(entries))), encoding="utf-8")
    os.replace(tmp, index)
    return index


def add_to_study(study_dir: os.PathLike, paths: Iterable[os.PathLike]) -> Path:
    """Adds record files to a study's ``runs.txt`` (a run listed in another format is replaced)."""
    study_dir = Path(study_dir)
    new = {_rel(p, study_dir) for p in paths}
    stems = {_stem(Path(e)) for e in new}
    kept = [e for e in read_study(study_dir) if _stem(Path(e)) not in stems]
    return write_study(study_dir, [*kept, *new])


def _rel(path: os.PathLike, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), start.resolve())).as_posix()


def tasks_block(benchmark: Benchmark) -> dict[str, Any]:
    """The ``tasks`` block of a run record: each task's metrics (name -> higher is better), selection
    metric and units."""
    return {t.name: {"metrics": dict(t.metrics), "select_metric": t.select_metric, "units": dict(t.units)}
            for t in benchmark.tasks}


def task_semantics(tasks: Mapping[str, Any]) -> dict[str, Any]:
    """What a ``tasks`` block means for selection and Δp (metrics with their directions and the
    selection metric, per task); units are labels and left out."""
    return {t: {"metrics": dict(info.get("metrics") or {}), "select_metric": info.get("select_metric")}
            for t, info in tasks.items()}


def _git_commit() -> Optional[str]:
    """The commit of the dbmtl_jax checkout in use (editable installs), or None."""
    import subprocess

    root = Path(dbmtl_jax.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit or None


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "dbmtl_jax": dbmtl_jax.__version__}
    commit = _git_commit()
    if commit:
        out["dbmtl_jax_git_commit"] = commit
    for mod in ("jax", "jaxlib", "optax", "flax", "numpy", "chex"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except (ImportError, AttributeError):
            pass
    return out


# --------------------------------------------------------------------------- models and steps


def _nnx():
    try:
        from flax import nnx
    except ImportError as e:  # pragma: no cover - flax is in every extra
        raise ImportError("the experiment runner needs flax (pip install 'dbmtl-jax[examples]').") from e
    return nnx


def model_num_params(benchmark: Benchmark, stl: bool = False) -> int:
    """The number of trainable (``nnx.Param``) entries of the benchmark's model (its STL model: T copies),
    as the run records store it, from shapes only (``nnx.eval_shape``: nothing is initialised)."""
    nnx = _nnx()
    abstract = nnx.eval_shape(lambda: _stl_model(benchmark, nnx.Rngs(0)) if stl else benchmark.model(nnx.Rngs(0)))
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nnx.state(abstract, nnx.Param))))


def _stl_model(benchmark: Benchmark, rngs: Any) -> Any:
    """T independent copies of the benchmark's model; output ``t`` comes from copy ``t``."""
    nnx = _nnx()

    class STLModel(nnx.Module):
        def __init__(self) -> None:
            self.members = nnx.List([benchmark.model(rngs) for _ in range(benchmark.num_tasks)])

        def __call__(self, inputs: Any) -> tuple:
            return tuple(m(inputs)[t] for t, m in enumerate(self.members))

    return STLModel()


def _set_mode(model: Any, train: bool) -> None:
    fn = getattr(model, "train" if train else "eval", None)
    if callable(fn):
        fn()


def _check_outputs(tasks: Sequence[Task], outputs: Any) -> None:
    if not isinstance(outputs, (tuple, list)) or len(outputs) != len(tasks):
        got = (f"{type(outputs).__name__} of {len(outputs)}" if isinstance(outputs, (tuple, list))
               else f"one array of shape {tuple(jnp.shape(outputs))}" if hasattr(outputs, "shape")
               else type(outputs).__name__)
        raise ValueError(
            f"the model must return a tuple of {len(tasks)} per-task outputs (in the order of the tasks), got "
            f"{got}; a model that concatenates its heads can return tuple(out[..., t] for t in range(T))."
        )


def _task_losses(tasks: Sequence[Task], outputs: Any, targets: Sequence[Any]) -> jax.Array:
    _check_outputs(tasks, outputs)
    if len(targets) != len(tasks):
        raise ValueError(f"a batch holds {len(targets)} targets for {len(tasks)} tasks.")
    losses = []
    for task, out, y in zip(tasks, outputs, targets):
        # arrays only: outputs and targets may be pytrees (QM9's targets are (values, graph_mask))
        o_shape = tuple(out.shape) if hasattr(out, "shape") else None
        y_shape = tuple(y.shape) if hasattr(y, "shape") else None
        if (o_shape is not None and y_shape and len(o_shape) == len(y_shape) + 1 and o_shape[-1] == 1
                and o_shape[:-1] == y_shape):
            warnings.warn(
                f"task {task.name!r}: the output has shape {o_shape} and the target {y_shape}; an elementwise "
                f"loss broadcasts them to {y_shape + y_shape[-1:]}: squeeze the output's last axis (e.g. "
                "MLPHead(..., squeeze=True)) unless the loss handles it.",
                UserWarning,
                stacklevel=2,
            )
        loss = jnp.asarray(task.loss(out, y))
        if loss.ndim != 0:
            raise ValueError(f"task {task.name!r}: loss must return a scalar, got shape {loss.shape}.")
        losses.append(loss.astype(jnp.promote_types(loss.dtype, jnp.float32)))
    return jnp.stack(losses)


def _path_str(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


class _Trainer:
    """Builds the jitted train / eval steps of one run."""

    def __init__(
        self,
        benchmark: Benchmark,
        spec: MethodSpec,
        recipe: Recipe,
        hparams: Mapping[str, Any],
        seed: int,
        steps_per_epoch: int,
        grad_stats: bool,
        optimizer: Any = None,
        *,
        data: Any = None,
    ) -> None:
        nnx = _nnx()
        self.nnx = nnx
        self.benchmark = benchmark
        self.tasks = benchmark.tasks
        self.spec = spec
        self.seed = seed
        T = benchmark.num_tasks
        rngs = nnx.Rngs(seed)
        model = _stl_model(benchmark, rngs) if spec.name == "stl" else benchmark.model(rngs)
        _set_mode(model, True)
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        _set_mode(model, False)
        self.eval_graphdef, _, _ = nnx.split(model, nnx.Param, ...)
        del model

        lr: Any = recipe.learning_rate
        if recipe.lr_schedule == "cosine":
            lr = optax.cosine_decay_schedule(recipe.learning_rate, recipe.epochs * steps_per_epoch)
        elif recipe.lr_decay_epoch is not None:
            lr = optax.piecewise_constant_schedule(
                recipe.learning_rate, {recipe.lr_decay_epoch * steps_per_epoch: recipe.lr_decay_factor}
            )
        tail = [optax.add_decayed_weights(recipe.weight_decay)] if recipe.weight_decay else []
        if spec.name in SELF_OPTIMIZING:  # its own moments: the learning rate only (make_config refused --optimizer)
            tail.append(optax.scale_by_learning_rate(lr))
        else:
            tail.append(make_optimizer(optimizer, lr))

        self.cheap = uses_cheap_path(spec, grad_stats)
        if spec.name == "stl":
            self.tx = optax.chain(*tail)
        else:
            hp = dict(hparams)
            if "shared" not in hp and _accepts(spec.name, "shared"):
                hp["shared"] = benchmark.shared
            if "steps_per_epoch" not in hp and _accepts(spec.name, "steps_per_epoch"):
                hp["steps_per_epoch"] = steps_per_epoch
            if self.cheap:
                hp["grads"] = "weighted"
            try:
                method = dbmtl_jax.get_method(spec.name, T, **hp)
            except TypeError as e:
                raise ValueError(f"method {spec.label!r}: bad hyperparameters {sorted(hparams)} ({e}).") from e
            self.tx = optax.chain(method, *tail)
        self.opt_state = self.tx.init(self.params)
        self.metrics = [t.make_metric(data) for t in benchmark.tasks]
        self.record_grads = spec.name != "stl" and not self.cheap
        self.shared_flags: list[bool] = []  # the gradient statistics' shared leaves (STL's model has none)
        if self.record_grads:
            mask = task_axis.resolve_shared(benchmark.shared, self.params)
            self.shared_flags = [bool(f) for f in jax.tree_util.tree_leaves(mask)]
        self.train_step = jax.jit(self._make_train_step())
        self.eval_step = jax.jit(self._make_eval_step())

    # -- steps

    def _loss_fn(self, params: Any, rest: Any, inputs: Any, targets: Any) -> tuple[jax.Array, Any]:
        nnx = self.nnx
        model = nnx.merge(self.graphdef, params, rest, copy=True)
        losses = _task_losses(self.tasks, model(inputs), targets)
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return losses, new_rest

    def _grad_stats(self, grads: Any, losses: jax.Array) -> dict[str, jax.Array]:
        """Per-task norms and pairwise cosines of the shared gradients (global over shared leaves)."""
        leaves = [g for g, f in zip(jax.tree_util.tree_leaves(grads), self.shared_flags) if f]
        T = self.benchmark.num_tasks
        gram = jnp.zeros((T, T), jnp.float32)
        for g in leaves:
            flat = g.reshape(T, -1).astype(jnp.float32)
            gram = gram + flat @ flat.T
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        den = norms[:, None] * norms[None, :]
        cos = jnp.where(den > 0, gram / jnp.where(den > 0, den, 1.0), 0.0)
        # With the log transform the gradients are ∇ℓ_t / (ℓ_t + ε); the raw norm is rescaled back.
        raw = norms * (losses.astype(jnp.float32) + LOG_EPS) if self.spec.log else norms
        return {"grad_norm": norms, "raw_grad_norm": raw, "grad_cosine": cos}

    def _make_train_step(self) -> Callable:
        tx, spec = self.tx, self.spec
        # The seed's key is an argument, not a constant, so runs that differ only by the seed
        # trace to the same program (and hit the persistent compilation cache).
        def step(params, rest, opt_state, inputs, targets, base_key, step_idx):
            key = jax.random.fold_in(base_key, step_idx)
            stats: dict[str, jax.Array] = {}
            if spec.name == "stl":
                def total(p, r):
                    losses, new_rest = self._loss_fn(p, r, inputs, targets)
                    return jnp.sum(losses), (losses, new_rest)

                (_, (losses, new_rest)), grads = jax.value_and_grad(total, has_aux=True)(params, rest)
            elif self.cheap:
                vg = loss_weighting.value_and_weighted_grad(self._loss_fn, has_aux=True, log=spec.log, eps=LOG_EPS)
                (losses, new_rest), grads = vg(opt_state, params, rest, inputs, targets, key=key)
            else:
                vg = dbmtl_jax.value_and_task_grads(self._loss_fn, log=spec.log, eps=LOG_EPS, has_aux=True)
                (losses, new_rest), grads = vg(params, rest, inputs, targets)
                stats = self._grad_stats(grads, losses)
            updates, opt_state = tx.update(grads, opt_state, params, losses=losses, key=key)
            params = optax.apply_updates(params, updates)
            return params, new_rest, opt_state, losses, stats

        return step

    def _make_eval_step(self) -> Callable:
        nnx, tasks, metrics = self.nnx, self.tasks, self.metrics

        def step(params, rest, states, inputs, targets):
            model = nnx.merge(self.eval_graphdef, params, rest, copy=True)
            outputs = model(inputs)
            _check_outputs(tasks, outputs)
            new = []
            for task, metric, st, out, y in zip(tasks, metrics, states, outputs, targets):
                args = task.metric_input(out, y)  # (pred, target) or (pred, target, mask)
                try:
                    new.append(metric.update(st, *args))
                except (ValueError, TypeError) as e:
                    raise type(e)(f"task {task.name!r}: {e}") from e
            return tuple(new)

        return step


def evaluate(trainer: _Trainer, data: Any, split: str, params: Any, rest: Any) -> dict[str, dict[str, float]]:
    """Metrics of every task on ``split`` (``task -> metric -> float``)."""
    tasks = trainer.tasks
    states = tuple(m.init() for m in trainer.metrics)
    n = 0
    for inputs, targets in data.eval_batches(split):
        states = trainer.eval_step(params, rest, states, inputs, tuple(targets))
        n += 1
    if n == 0:
        raise ValueError(f"the {split} split yielded no batch.")
    out: dict[str, dict[str, float]] = {}
    for task, metric, st in zip(tasks, trainer.metrics, states):
        values = metric.compute(st)
        row = {}
        for name in task.metrics:
            if name not in values:
                raise ValueError(f"task {task.name!r}: the metric's compute() has no {name!r} (has {sorted(values)}).")
            v = np.asarray(values[name])
            if v.size != 1:
                raise ValueError(f"task {task.name!r}: metric {name!r} is not a scalar (shape {v.shape}).")
            row[name] = float(v.reshape(()))
        out[task.name] = row
    return out


class ReplayStep(NamedTuple):
    """One training step of :func:`replay_steps`: the state after it and what it computed."""

    epoch: int
    step: int
    params: Any
    rest: Any
    opt_state: Any
    losses: jax.Array
    stats: Mapping[str, jax.Array]


def replay_steps(
    benchmark: Benchmark,
    method: Union[str, MethodSpec],
    recipe: Recipe,
    seed: int,
    *,
    hparams: Optional[Mapping[str, Mapping[str, Any]]] = None,
    optimizer: Any = None,
    grad_stats: bool = True,
) -> Iterator[ReplayStep]:
    """The training steps of one run as :func:`run_experiments` takes them (same initialisation, batch order,
    PRNG keys and jitted step), yielded one by one: for reading what a record does not keep, such as a
    method's state (its task weights) or the optimizer's moments.  Nothing is evaluated, selected or written.

    ``hparams`` and ``optimizer`` are :func:`run_experiments`' (``{"method": {"name": value}}``); with
    ``grad_stats`` (the studies' ``--grad-stats``) every method takes the per-task-gradient path, as the
    recorded runs did.  A replay follows its record to float rounding: the two drift apart as any two reruns
    do, after many steps or, where training amplifies rounding, within a few epochs."""
    spec = parse_method(method) if isinstance(method, str) else method
    hp = method_hparams(spec, benchmark, hparams or {}) if spec.name != "stl" else {}
    data = benchmark.data(recipe)
    steps_per_epoch = _steps_per_epoch(data)
    tr = _Trainer(benchmark, spec, recipe, hp, seed, steps_per_epoch, grad_stats,
                  normalize_optimizer(optimizer), data=data)
    params, rest, opt_state = tr.params, tr.rest, tr.opt_state
    order_rng = np.random.default_rng(seed)  # as train_run: the batch order, then the step keys
    base_key = jax.random.PRNGKey(seed)
    step = 0
    for epoch in range(1, recipe.epochs + 1):
        for inputs, targets in _epoch_batches(data, order_rng, epoch, steps_per_epoch):
            params, rest, opt_state, losses, stats = tr.train_step(
                params, rest, opt_state, inputs, tuple(targets), base_key, jnp.asarray(step, jnp.int32))
            step += 1
            yield ReplayStep(epoch, step, params, rest, opt_state, losses, stats)


def _signed_change(value: float, base: float, higher: bool) -> float:
    if not (math.isfinite(value) and math.isfinite(base)):
        return -math.inf
    d = (value - base) / abs(base) if base != 0 else (value - base)
    return d if higher else -d


def selection_score(val: Mapping[str, Mapping[str, float]], first: Mapping[str, Mapping[str, float]],
                    tasks: Sequence[Task]) -> float:
    """Mean over tasks of the signed relative change of ``select_metric`` w.r.t. the first epoch.

    A task whose reference value is exactly 0 contributes its absolute change (a relative one is undefined);
    the runner warns and the record's ``selection`` names it."""
    changes = [
        _signed_change(val[t.name][t.select_metric], first[t.name][t.select_metric], t.metrics[t.select_metric])
        for t in tasks
    ]
    return sum(changes) / len(changes)


def _steps_per_epoch(data: Any) -> int:
    """The data provider's ``steps_per_epoch``, at least 1."""
    steps_per_epoch = int(data.steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError("the data provider reports no training step per epoch.")
    return steps_per_epoch


def _epoch_batches(data: Any, order_rng: np.random.Generator, epoch: int, steps_per_epoch: int) -> Iterator[Any]:
    """One epoch's ``(inputs, targets)`` training batches from ``data.train_batches(order_rng)``; an error
    naming the problem if the epoch is not ``steps_per_epoch`` batches long (raised before a batch too many is
    trained on: the learning-rate schedule, logging and checkpoints count on the length)."""
    count = 0
    for batch in data.train_batches(order_rng):
        if count == steps_per_epoch:
            raise _batch_count_error(epoch, f"more than {steps_per_epoch}", steps_per_epoch)
        count += 1
        yield batch
    if count != steps_per_epoch:
        raise _batch_count_error(epoch, str(count), steps_per_epoch)


def _batch_count_error(epoch: int, yielded: str, steps_per_epoch: int) -> ValueError:
    """The error for a data provider whose epoch is not ``steps_per_epoch`` batches long."""
    return ValueError(f"the data provider yielded {yielded} training batches in epoch {epoch}, not the "
                      f"{steps_per_epoch} its steps_per_epoch reports (the learning-rate schedule, logging and "
                      "checkpoints count on it).")


def _finite_selection(val: Mapping[str, Mapping[str, float]], tasks: Sequence[Task]) -> bool:
    """Every task's selection metric in ``val`` is finite (such an epoch can be the score's reference)."""
    return all(math.isfinite(val[t.name][t.select_metric]) for t in tasks)


def _selection_text(val_curve: Sequence[Mapping[str, Mapping[str, float]]], tasks: Sequence[Task]) -> str:
    """How a multi-task run's epoch was selected: against the first epoch whose selection metrics are all
    finite (epoch 1 unless a metric was NaN/inf there)."""
    for e, val in enumerate(val_curve, start=1):
        if _finite_selection(val, tasks):
            zero = _zero_reference(val, tasks)
            return (f"mean signed relative change of select_metric on val vs epoch {e}"
                    + (f" (absolute change for {', '.join(zero)}, whose reference value is 0)" if zero else ""))
    return "none: no epoch had a finite select_metric for every task; epoch 1 kept"


def _zero_reference(val: Mapping[str, Mapping[str, float]], tasks: Sequence[Task]) -> list[str]:
    """``task select_metric`` of the tasks whose selection metric in ``val`` is exactly 0: a relative change
    against it is undefined, so :func:`selection_score` uses the absolute change for them."""
    return [f"{t.name} {t.select_metric}" for t in tasks if val[t.name][t.select_metric] == 0]


def _stl_selection_text(val_curve: Sequence[Mapping[str, Mapping[str, float]]], tasks: Sequence[Task]) -> str:
    """How an STL run's epochs were selected: per task, naming the tasks that had no finite epoch."""
    never = [t.name for t in tasks if not any(math.isfinite(v[t.name][t.select_metric]) for v in val_curve)]
    text = "per task: best select_metric on val"
    if never:
        text += f"; none: no epoch had a finite select_metric for task(s) {', '.join(never)}: epoch 1 kept"
    return text


def _better(value: float, best: Optional[float], higher: bool) -> bool:
    if not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value > best if higher else value < best


class _Snapshots:
    """Host copies of the best parameters, per selection group (all leaves, or STL copy ``t``)."""

    def __init__(self, params: Any, rest: Any, groups: Sequence[Optional[str]]) -> None:
        flat, self.treedef = jax.tree_util.tree_flatten_with_path((params, rest))
        self.paths = [_path_str(p) for p, _ in flat]
        # "" for the (params, rest) tuple index prefix, e.g. "0/members/1/..."
        self.groups = list(groups)
        self.members = []
        for g in self.groups:
            if g is None:
                self.members.append(list(range(len(flat))))
            else:
                self.members.append([i for i, p in enumerate(self.paths) if p.split("/", 1)[-1].startswith(g)])
        self.saved: list[Optional[dict[int, np.ndarray]]] = [None] * len(self.groups)

    def save(self, group: int, params: Any, rest: Any) -> None:
        leaves = jax.tree_util.tree_leaves((params, rest))
        idx = self.members[group]
        host = jax.device_get([leaves[i] for i in idx])
        self.saved[group] = {i: np.array(h, copy=True) for i, h in zip(idx, host)}

    def restore(self, params: Any, rest: Any) -> tuple[Any, Any]:
        leaves = list(jax.tree_util.tree_leaves((params, rest)))
        for saved in self.saved:
            if saved is None:
                continue
            for i, v in saved.items():
                leaves[i] = jnp.asarray(v)
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _mean_rows(rows: list[np.ndarray]) -> Optional[list]:
    if not rows:
        return None
    return np.mean(np.stack(rows), axis=0).tolist()


def train_run(
    benchmark: Benchmark,
    spec: MethodSpec,
    seed: int,
    data: Any,
    recipe: Recipe,
    *,
    hparams: Mapping[str, Any],
    grad_stats: bool = False,
    test_curve: bool = False,
    log_points: int = 100,
    progress: bool = True,
    desc: str = "",
    optimizer: Any = None,
    checkpoint: Optional[os.PathLike] = None,
    checkpoint_every_s: float = 60.0,
    run: str = "",
    data_summary: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """Trains and evaluates one run; returns the result record (without config/file fields).

    Args:
      benchmark: the benchmark.
      spec: the method.
      seed: initialisation, batch-order and method-key seed.
      data: the benchmark's ``DataSplits`` for ``recipe``.
      recipe: the training recipe.
      hparams: method hyperparameters (``shared`` and ``steps_per_epoch`` are
        filled in when the method takes them and they are not given).
      grad_stats: force the per-task gradient path for loss-weighting
        methods, to record gradient norms and cosines.
      test_curve: also evaluate the test split after every epoch and record
        it as ``history.test`` (a diagnostic; never used for selection).
      log_points: about how many points the step-level curve keeps.
      progress: show a tqdm bar.
      optimizer: the final optimizer of the chain (see :func:`normalize_optimizer`;
        ``None``: Adam with ``b1 = 0.9``); STL uses it too.
      checkpoint: a file for mid-run checkpoints (:mod:`dbmtl_jax.experiments.checkpoint`):
        if it holds run ``run``'s checkpoint, training continues after its
        epoch; the state is saved there at the end of an epoch at most every
        ``checkpoint_every_s`` seconds (not after the last epoch).  A
        checkpoint of another run or of other arrays is an error.
      run: the run's id, stored in and checked against the checkpoint.
      data_summary: :func:`~dbmtl_jax.experiments.data_summary.data_summary` of ``data``, stored in and
        checked against the checkpoint (a checkpoint made from other data is a mismatch); ``None``: not checked.
    """
    from tqdm.auto import tqdm

    from dbmtl_jax.experiments.checkpoint import CheckpointMismatch, load_checkpoint, save_checkpoint

    steps_per_epoch = _steps_per_epoch(data)
    tr = _Trainer(benchmark, spec, recipe, hparams, seed, steps_per_epoch, grad_stats,
                  normalize_optimizer(optimizer), data=data)
    params, rest, opt_state = tr.params, tr.rest, tr.opt_state
    tasks = benchmark.tasks
    T = len(tasks)
    total = recipe.epochs * steps_per_epoch
    interval = max(1, total // max(1, log_points))
    order_rng = np.random.default_rng(seed)
    base_key = jax.random.PRNGKey(seed)

    groups = [f"members/{t}/" for t in range(T)] if spec.name == "stl" else [None]
    snaps = _Snapshots(params, rest, groups)
    best_score: list[Optional[float]] = [None] * len(groups)
    selected = [0] * len(groups)
    first_val: Optional[dict] = None

    hist: dict[str, list] = {k: [] for k in ("epoch", "step", "train_loss", "grad_norm", "raw_grad_norm",
                                             "grad_cosine", "val", "selection_score", "epoch_time_s")}
    if test_curve:
        hist["test"] = []
    curve: dict[str, list] = {k: [] for k in ("step", "train_loss", "grad_norm", "raw_grad_norm", "grad_cosine")}
    step_times: list[float] = []
    nonfinite = 0
    last_finite = True  # the last step's losses were finite (its update may still not be: checked at the end)
    step = 0
    start_epoch = 1
    elapsed_before = 0.0
    semantics = task_semantics(tasks_block(benchmark))  # what the selection state in a checkpoint depends on
    if checkpoint is not None and Path(checkpoint).is_file():
        ck = load_checkpoint(checkpoint, run=run, template=(params, rest, opt_state))
        if test_curve and "test" not in ck.loop["history"]:
            raise CheckpointMismatch(f"{checkpoint}: written without the test curve this run records.")
        if ck.loop["step"] != ck.loop["epoch"] * steps_per_epoch:
            raise CheckpointMismatch(f"{checkpoint}: {ck.loop['step']} steps in {ck.loop['epoch']} epochs, but the "
                                     f"data provider now has {steps_per_epoch} steps per epoch (other data).")
        if list(ck.loop.get("tasks", semantics).items()) != list(semantics.items()):  # older ones: not checked
            raise CheckpointMismatch(f"{checkpoint}: written with other tasks (metrics, their directions or "
                                     "selection metrics) than the benchmark has now.")
        old_summary = ck.loop.get("data_summary")  # older checkpoints, or runs without a summary: not checked
        diff = (ds.summary_difference(old_summary, data_summary)
                if old_summary is not None and data_summary is not None else None)
        if diff is not None:
            raise CheckpointMismatch(f"{checkpoint}: written while training on other data ({diff}).")
        params, rest, opt_state = ck.tree
        snaps.saved = ck.snapshots
        lp = ck.loop
        start_epoch, step, nonfinite = lp["epoch"] + 1, lp["step"], lp["nonfinite"]
        elapsed_before, step_times = lp["elapsed_s"], lp["step_times"]
        best_score, selected, first_val = lp["best_score"], lp["selected"], lp["first_val"]
        hist = {k: lp["history"][k] for k in hist}
        curve = lp["curve"]
        order_rng.bit_generator.state = lp["order_rng"]
    t_start = time.perf_counter()
    t_saved = t_start
    bar = tqdm(total=total, initial=step, desc=desc or f"{benchmark.name} {spec.label} s{seed}", unit="step",
               disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for epoch in range(start_epoch, recipe.epochs + 1):
            t_epoch = time.perf_counter()
            ep_loss: list[np.ndarray] = []
            ep_stats: dict[str, list[np.ndarray]] = {"grad_norm": [], "raw_grad_norm": [], "grad_cosine": []}
            win_loss: list[np.ndarray] = []
            win_stats: dict[str, list[np.ndarray]] = {"grad_norm": [], "raw_grad_norm": [], "grad_cosine": []}
            for inputs, targets in _epoch_batches(data, order_rng, epoch, steps_per_epoch):
                t0 = time.perf_counter()
                params, rest, opt_state, losses, stats = tr.train_step(
                    params, rest, opt_state, inputs, tuple(targets), base_key, jnp.asarray(step, jnp.int32)
                )
                losses = np.asarray(jax.device_get(losses))  # waits for the step
                step_times.append(time.perf_counter() - t0)
                step += 1
                last_finite = bool(np.all(np.isfinite(losses)))
                if not last_finite:
                    nonfinite += 1
                ep_loss.append(losses)
                win_loss.append(losses)
                if stats:
                    host = jax.device_get(stats)
                    for k in ep_stats:
                        ep_stats[k].append(np.asarray(host[k]))
                        win_stats[k].append(np.asarray(host[k]))
                if step % interval == 0 or step == total:
                    curve["step"].append(step)
                    curve["train_loss"].append(_mean_rows(win_loss))
                    for k in win_stats:
                        curve[k].append(_mean_rows(win_stats[k]))
                    win_loss = []
                    win_stats = {k: [] for k in win_stats}
                bar.update()
                if step % max(1, min(20, steps_per_epoch)) == 0 or step == total:
                    bar.set_postfix_str(f"ep {epoch} loss " + " ".join(f"{v:.3g}" for v in losses), refresh=False)
            val = evaluate(tr, data, "val", params, rest)
            if first_val is None and _finite_selection(val, tasks):
                first_val = val  # the reference of the selection score: the first epoch with finite metrics
                zero = _zero_reference(first_val, tasks)
                if zero and spec.name != "stl":
                    warnings.warn(f"{run or spec.label}: the validation {', '.join(zero)} of epoch {epoch}, the "
                                  "selection score's reference, is exactly 0, so its term in the score is an "
                                  "absolute change, on another scale than the other tasks' relative changes; the "
                                  "record's `selection` says so.", stacklevel=2)
            if spec.name == "stl":
                scores = []
                for g, task in enumerate(tasks):
                    v = val[task.name][task.select_metric]
                    scores.append(v)
                    if _better(v, best_score[g], task.metrics[task.select_metric]):
                        best_score[g], selected[g] = v, epoch
                        snaps.save(g, params, rest)
                    elif selected[g] == 0:  # not finite: epoch 1 is kept until a finite epoch comes, as in MTL
                        selected[g] = epoch
                        snaps.save(g, params, rest)
                score = float("nan")
            else:
                score = selection_score(val, first_val, tasks) if first_val is not None else -math.inf
                if best_score[0] is None or (math.isfinite(score) and score > best_score[0]):
                    best_score[0], selected[0] = score, epoch
                    snaps.save(0, params, rest)
            hist["epoch"].append(epoch)
            hist["step"].append(step)
            hist["train_loss"].append(_mean_rows(ep_loss))
            for k in ep_stats:
                hist[k].append(_mean_rows(ep_stats[k]))
            hist["val"].append(val)
            hist["selection_score"].append(score)
            if test_curve:
                hist["test"].append(evaluate(tr, data, "test", params, rest))
            hist["epoch_time_s"].append(time.perf_counter() - t_epoch)
            now = time.perf_counter()
            if checkpoint is not None and epoch < recipe.epochs and now - t_saved >= checkpoint_every_s:
                loop = {"epoch": epoch, "step": step, "nonfinite": nonfinite,
                        "elapsed_s": elapsed_before + now - t_start, "step_times": step_times,
                        "best_score": best_score, "selected": selected, "first_val": first_val,
                        "history": hist, "curve": curve, "order_rng": order_rng.bit_generator.state,
                        "tasks": semantics, "data_summary": data_summary}
                save_checkpoint(checkpoint, run=run, tree=(params, rest, opt_state), snapshots=snaps.saved,
                                loop=loop)
                t_saved = time.perf_counter()
    finally:
        bar.close()

    if step and last_finite and not all(finite_flags((params, rest))):
        nonfinite += 1  # the last update left non-finite parameters: no later step's losses would show it
    best_params, best_rest = snaps.restore(params, rest)
    test = evaluate(tr, data, "test", best_params, best_rest)
    if spec.name == "stl":
        sel = {t.name: selected[g] for g, t in enumerate(tasks)}
    else:
        sel = {t.name: selected[0] for t in tasks}
    val_sel = {t.name: hist["val"][sel[t.name] - 1][t.name] for t in tasks}
    if not tr.record_grads:
        for k in ("grad_norm", "raw_grad_norm", "grad_cosine"):
            hist[k] = None
            curve[k] = None
    wall = elapsed_before + time.perf_counter() - t_start
    return {
        "metrics": {"val": val_sel, "test": test},
        "selected_epoch": sel,
        "selection": (_stl_selection_text(hist["val"], tasks) if spec.name == "stl"
                      else _selection_text(hist["val"], tasks)),
        "history": hist,
        "curve": curve,
        "wall_time_s": wall,
        "median_step_time_s": statistics.median(step_times[1:]) if len(step_times) > 1 else None,
        "first_step_time_s": step_times[0] if step_times else None,
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "nonfinite_steps": nonfinite,
        "num_params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params))),
    }


def _device() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')}".rstrip(":")


def _cpu_cores() -> int:
    """The CPU cores this process may run on (``taskset`` pins it to fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``; ``""`` if unknown), so that
    wall times from different machines can be told apart."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def run_experiments(
    benchmark: Benchmark,
    methods: Sequence[MethodSpec],
    seeds: Sequence[int],
    out_dir: os.PathLike,
    *,
    quick: bool = False,
    recipe: Optional[Recipe] = None,
    hparams: Optional[Mapping[str, Mapping[str, Any]]] = None,
    grad_stats: bool = False,
    test_curve: bool = False,
    resume: bool = True,
    progress: bool = True,
    stop_on_error: bool = False,
    echo: Optional[Callable[[str], None]] = None,
    optimizer: Any = None,
    study: Optional[os.PathLike] = None,
    dry_run: bool = False,
    checkpoint_every_s: float = 60.0,
) -> list[Path]:
    """Runs every (method, seed) pair not finished yet and writes one record per run.

    A run stopped part-way continues from its last mid-run checkpoint
    (:mod:`dbmtl_jax.experiments.checkpoint`, saved at the end of an epoch at
    most every ``checkpoint_every_s`` seconds) unless ``resume`` is false,
    which also discards it.

    Records go to ``out_dir/<benchmark>/<run id>.json.gz`` (:func:`result_path`,
    :func:`write_record`).  A run is finished when that file, or the format /1
    ``.json`` file of the same run, holds a finished record: with ``resume``
    it is skipped.  Returns the record paths of all pairs (for skipped ones,
    the file found).  A failing run is reported through ``echo`` and skipped
    (nothing written), unless ``stop_on_error``; :class:`RunError` lists the
    failures at the end.

    ``study``: a study folder whose ``runs.txt`` lists the records of its
    table (:func:`add_to_study`): every pair's record is added, the finished
    ones at once and the others as they finish, so that one record store
    (``out_dir``) serves many studies without copies.  ``dry_run``: only
    report (through ``echo``) which runs are finished and which would run;
    nothing is loaded, trained or written.

    Before anything is loaded or trained, the seeds (:func:`validate_seeds`),
    the optimizer (:func:`normalize_optimizer`; ``None`` is Adam with
    ``b1 = 0.9``, used by every method and STL) and every method's
    hyperparameters (:func:`validate_hparams`) are checked: ``ValueError``.
    Before a finished record is skipped, its tasks, model size and data summary
    (:func:`~dbmtl_jax.experiments.data_summary.data_summary`; the data is loaded
    for it) must match the benchmark's now: ``ValueError`` naming the difference.
    """
    from tqdm.auto import tqdm

    from dbmtl_jax.experiments.checkpoint import CheckpointMismatch, checkpoint_path

    echo = echo or tqdm.write  # prints above the progress bars
    hparams = hparams or {}
    recipe = recipe or (benchmark.quick if quick else benchmark.recipe)
    specs = list(methods)
    # Fail fast on bad seeds, optimizers, methods or hyperparameters, before any data is loaded.
    seeds = validate_seeds(seeds)
    optimizer = normalize_optimizer(optimizer)
    validate_hparams(benchmark, specs, hparams, grad_stats=grad_stats)

    jobs = []
    for spec in specs:
        hp = method_hparams(spec, benchmark, hparams) if spec.name != "stl" else {}
        cfg = make_config(benchmark, spec, recipe, quick=quick, hparams=hp, grad_stats=grad_stats,
                          optimizer=optimizer)
        for seed in seeds:
            path = result_path(out_dir, cfg, int(seed))
            found = find_finished(path) if resume else None
            jobs.append((spec, hp, cfg, int(seed), path, found))
    now = task_semantics(tasks_block(benchmark))
    sizes: dict[bool, Optional[int]] = {}
    summaries = []  # (record, its data summary): compared with the data once it is loaded
    for j in jobs:
        if j[5] is None:
            continue
        old = read_record(j[5])
        if old.get("data_summary") is not None:
            summaries.append((j[5], old["data_summary"]))
        if task_semantics(old.get("tasks") or {}) != now:
            raise ValueError(f"{j[5]}: this finished run was made with other tasks (metrics, their directions or "
                             f"selection metrics) than benchmark {benchmark.name!r} has now, so resuming would "
                             "mix two definitions in one table; rerun with --no-resume (or move the old records).")
        stl = j[0].name == "stl"
        if stl not in sizes:
            try:
                sizes[stl] = model_num_params(benchmark, stl)
            except DatasetUnavailableError:  # a model built from its data (dense's depth bias): nothing to check
                sizes[stl] = None
        if sizes[stl] is not None and "num_params" in old and int(old["num_params"]) != sizes[stl]:
            raise ValueError(f"{j[5]}: this finished run was made with a model of {int(old['num_params']):,} "
                             f"parameters, benchmark {benchmark.name!r} builds one of {sizes[stl]:,} now (its model "
                             "changed under the same name), so resuming would mix two models in one table; rename "
                             "the benchmark, use another --out, or rerun with --no-resume.")
    todo = [j for j in jobs if j[5] is None]
    done = [j[5] for j in jobs if j[5] is not None]
    if dry_run:
        for j in jobs:
            partial = j[5] is None and resume and checkpoint_path(j[4]).is_file()
            echo(f"{'finished' if j[5] is not None else 'to run'}: {j[5] or j[4]}"
                 + (" (continues from its checkpoint)" if partial else "")
                 + (f" (study {study})" if study is not None else ""))
        echo(f"{benchmark.name}: {len(done)} finished, {len(todo)} to run (dry run: nothing written).")
        return [j[5] or j[4] for j in jobs]
    data = seen = None  # the data and its summary
    if todo or summaries:
        try:
            data = benchmark.data(recipe)
        except DatasetUnavailableError:
            if todo:
                raise
            echo(f"{benchmark.name}: its data is not available here, so the finished runs were not checked against it.")
        if data is not None:
            seen = ds.data_summary(data)
            for path, old_summary in summaries:
                diff = ds.summary_difference(old_summary, seen)
                if diff is not None:
                    raise ValueError(f"{path}: this finished run was made with other data than benchmark "
                                     f"{benchmark.name!r} gives now ({diff}), so resuming would mix two data sets in "
                                     "one table; use another --out, or rerun with --no-resume.")
    if done:
        echo(f"{benchmark.name}: {len(done)} finished run(s) skipped (resume).")
        if study is not None:
            add_to_study(study, done)
    if not todo:
        return [j[5] for j in jobs]

    failures = []
    outer = tqdm(todo, desc=f"{benchmark.name} runs", unit="run", disable=not progress or len(todo) < 2,
                 dynamic_ncols=True)
    for spec, hp, cfg, seed, path, _ in outer:
        ckpt = checkpoint_path(path)
        if not resume:
            ckpt.unlink(missing_ok=True)

        def train() -> dict[str, Any]:
            return train_run(benchmark, spec, seed, data, recipe, hparams=hp, grad_stats=grad_stats,
                             test_curve=test_curve, progress=progress, desc=f"{spec.label} s{seed}",
                             optimizer=optimizer, checkpoint=ckpt, checkpoint_every_s=checkpoint_every_s,
                             run=path.name, data_summary=seen)

        try:
            try:
                res = train()
            except CheckpointMismatch as e:  # e.g. the model changed under the same config: start afresh
                echo(f"discarding the checkpoint of {benchmark.name} {cfg.method} seed {seed}: {e}")
                ckpt.unlink(missing_ok=True)
                res = train()
        except Exception as e:  # noqa: BLE001 - one failing run must not lose the others
            if stop_on_error:
                raise
            failures.append((cfg.method, seed, f"{type(e).__name__}: {e}"))
            echo(f"FAILED {benchmark.name} {cfg.method} seed {seed}: {type(e).__name__}: {e}")
            continue
        record = {
            "format": RESULT_FORMAT,
            "status": "done",
            "benchmark": benchmark.name,
            "method": cfg.method,
            "seed": seed,
            "config_hash": config_hash(cfg),
            "config": cfg.to_dict(),
            "tasks": tasks_block(benchmark),
            "versions": package_versions(),
            "device": _device(),
            "cpu_cores": _cpu_cores(),
            "cpu_model": _cpu_model(),
            "allocator": "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "default",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "data_summary": seen,
            **res,
        }
        write_record(path, record)
        ckpt.unlink(missing_ok=True)
        if study is not None:
            add_to_study(study, [path])
        summary = " ".join(
            f"{t}:{'/'.join(f'{v:.4g}' for v in m.values())}" for t, m in res["metrics"]["test"].items()
        )
        echo(f"{benchmark.name} {cfg.method} seed {seed}: test {summary} ({res['wall_time_s']:.1f}s) -> {path}")
    if failures:
        raise RunError(failures)
    return [j[5] or j[4] for j in jobs]


class RunError(RuntimeError):
    """Some runs failed; ``failures`` lists ``(method, seed, message)``."""

    def __init__(self, failures: list[tuple[str, int, str]]) -> None:
        self.failures = failures
        lines = "\n".join(f"  {m} seed {s}: {msg}" for m, s, msg in failures)
        super().__init__(f"{len(failures)} run(s) failed:\n{lines}")
