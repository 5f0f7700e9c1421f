"""Experiment runner: benchmarks, training/evaluation loop, reports, console command.

Public API (the "bring your own dataset" part is :class:`Task`,
:class:`Benchmark`, :class:`Recipe`, :class:`ArraySplits` and
:func:`register_benchmark`)::

    from dbmtl_jax.experiments import get_benchmark, parse_methods, run_experiments, write_report
    bench = get_benchmark("toy")
    run_experiments(bench, parse_methods("stl,ew,dbmtl"), seeds=[0, 1], out_dir="results", quick=True)
    write_report("results")

Console: ``dbmtl-jax run <benchmark> --methods stl,ew,dbmtl --seeds 3 --quick``
and ``dbmtl-jax report results/``.  See ``docs/experiments.md``.
"""

from dbmtl_jax.experiments.spec import (
    BENCHMARKS,
    ArraySplits,
    Benchmark,
    DataSplits,
    Recipe,
    Task,
    get_benchmark,
    register_benchmark,
)
from dbmtl_jax.experiments.builtin import register_builtin as _register_builtin
from dbmtl_jax.experiments.report import load_results, summarize, write_report
from dbmtl_jax.experiments.train import (
    MethodSpec,
    RunError,
    config_hash,
    parse_hparams,
    parse_method,
    parse_methods,
    ReplayStep,
    replay_steps,
    run_experiments,
    train_run,
)

_register_builtin()

__all__ = [
    "BENCHMARKS",
    "ArraySplits",
    "Benchmark",
    "DataSplits",
    "Recipe",
    "Task",
    "get_benchmark",
    "register_benchmark",
    "MethodSpec",
    "RunError",
    "config_hash",
    "parse_hparams",
    "parse_method",
    "parse_methods",
    "run_experiments",
    "replay_steps",
    "ReplayStep",
    "train_run",
    "load_results",
    "summarize",
    "write_report",
]
