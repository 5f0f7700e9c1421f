"""Console entry point ``dbmtl-jax`` (also ``python -m dbmtl_jax.experiments``).

Commands::

    dbmtl-jax run <benchmark> --methods stl,ew,dbmtl --seeds 3 [--quick] [--out results/]
                  [--hp dbmtl.beta=0.5 ...] [--log] [--grad-stats] [--import my_module]
                  [--optimizer adam|sgdm] [--b1 0.0] [--b2 0.9] [--momentum 0.9] [--lr-schedule cosine]
                  [--study DIR] [--dry-run]
    dbmtl-jax report <dir> [--out DIR] [--no-plots] [--strict]
    dbmtl-jax compact <dir> [--store STORE] [--dry-run]
    dbmtl-jax select <dir> [--method dbmtl] [--print-grid-best]
    dbmtl-jax breakdown <dir> [<dir> ...]
    dbmtl-jax summary <prefix>              (e.g. results/dense_8ep: <prefix>_main, _beta, ...)
    dbmtl-jax time <dir> [--out DIR] [--no-plots]
    dbmtl-jax paired <dir> [<dir> ...] [--ref METHOD ...] [--average-last F | --average-epochs A-B | --smooth W]
                            [--across] [--out FILE]
    dbmtl-jax curves <dir> [<dir> ...] [--ref ew] [--smooth W] [--split test|val] [--out FILE]
    dbmtl-jax index <dir> [--out FILE]
    dbmtl-jax list [--import my_module]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


def _import_user(specs: Sequence[str]) -> None:
    """Imports modules (dotted names or .py files) that register benchmarks.

    As ``python -m`` does, the current directory is searched for a dotted name,
    and a ``.py`` file's own directory is searched for the modules it imports
    (``from my_data import load`` beside ``my_bench.py``).  A module that
    fails to import raises ``ValueError`` naming it and the cause (its
    traceback chained).
    """
    for spec in specs:
        path = Path(spec)
        try:
            if spec.endswith(".py") or path.is_file():
                if not path.is_file():
                    raise FileNotFoundError(f"no such file {str(path)!r}")
                name = "dbmtl_jax_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
                if name in sys.modules:  # imported already (registering twice would fail)
                    continue
                _search_first(path.resolve().parent)
                mod_spec = importlib.util.spec_from_file_location(name, path)
                assert mod_spec is not None and mod_spec.loader is not None
                module = importlib.util.module_from_spec(mod_spec)
                sys.modules[name] = module
                try:
                    mod_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
            else:
                _search_first(Path.cwd())
                importlib.import_module(spec)
        except Exception as e:  # noqa: BLE001 - the user's module: name it and its error
            raise ValueError(f"--import {spec}: {type(e).__name__}: {e}") from e


def _search_first(directory: Path) -> None:
    """Puts ``directory`` on ``sys.path`` (front) unless it is there already."""
    text = str(directory)
    if text not in sys.path and not (text == str(Path.cwd()) and "" in sys.path):
        sys.path.insert(0, text)


def _epoch_range(text: str) -> tuple[int, int]:
    """``41-160`` -> (41, 160): 1-based epochs, inclusive, first <= last."""
    from dbmtl_jax.experiments.reselect import check_epoch_range

    parts = text.strip().split("-")
    try:
        first, last = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give the epochs as A-B, e.g. 41-160.") from None
    try:
        check_epoch_range(first, last)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return first, last


def _seeds(text: str) -> list[int]:
    """``3`` -> [0, 1, 2]; ``0,5,7`` -> [0, 5, 7] (no duplicates, no negative seed)."""
    from dbmtl_jax.experiments.train import validate_seeds

    text = text.strip()
    if "," in text:
        items = [s.strip() for s in text.split(",") if s.strip()]
        try:
            seeds = [int(s) for s in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: seeds must be integers, e.g. 0,3,7.") from None
        try:
            return validate_seeds(seeds)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a count (3) or a list (0,3,7).") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the count of seeds must be >= 1 (a list names seeds: 0,3,7; "
                                         f"one seed alone with a comma: {max(n, 0)},).")
    return list(range(n))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dbmtl-jax", description="Multi-task learning experiments with dbmtl_jax.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train methods on a benchmark (resumable; one .json.gz record per run)")
    r.add_argument("benchmark", help="registered benchmark name (see `dbmtl-jax list`)")
    r.add_argument("--methods", default="stl,ew,dbmtl",
                   help="comma-separated: stl, registry names, NAME+log / NAME+nolog, or 'all' (default stl,ew,dbmtl)")
    r.add_argument("--seeds", type=_seeds, default=[0],
                   help="number of seeds (3: seeds 0, 1, 2) or a list like 0,3,7; one explicit seed: 5, (with the "
                        "comma); default: seed 0")
    r.add_argument("--quick", action="store_true", help="the benchmark's quick recipe (under 2 minutes per run)")
    r.add_argument("--out", default="results",
                   help="record store: records go to OUT/<benchmark>/ (default results/)")
    r.add_argument("--study", metavar="DIR",
                   help="also list every run's record in DIR/runs.txt, a study folder that `dbmtl-jax report DIR` "
                        "reads from the store (finished runs found in the store are listed, not rerun)")
    r.add_argument("--dry-run", action="store_true",
                   help="print which runs are finished and which would run; train and write nothing")
    r.add_argument("--hp", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="method hyperparameter, repeatable (e.g. dbmtl.beta=0.5)")
    r.add_argument("--log", action="store_true", help="log-transform the losses of every method except STL (Fig. 1)")
    r.add_argument("--grad-stats", action="store_true",
                   help="per-task gradients for loss-weighting methods too, to record gradient norms/cosines")
    r.add_argument("--epochs", type=int, help="override the recipe's epochs")
    r.add_argument("--lr", type=float, help="override the recipe's learning rate")
    r.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    r.add_argument("--max-train-examples", type=int, metavar="N",
                   help="override the recipe's cap on training examples (a fixed random subset of N)")
    r.add_argument("--max-eval-examples", type=int, metavar="N",
                   help="override the recipe's cap on validation and on test examples (a fixed random subset of "
                        "N of each)")
    r.add_argument("--data-option", action="append", default=[], metavar="NAME=VALUE",
                   help="an option of the benchmark's data provider, repeatable (VALUE is read as --hp reads it: a "
                        "number, list, true/none, else a string), e.g. dense's num_test=2000 or qm9's limit=13000; "
                        "it is part of the config hash")
    r.add_argument("--lr-schedule", choices=("recipe", "cosine"), default="recipe",
                   help="learning-rate schedule: the recipe's (default; constant for the built-in benchmarks) or "
                        "cosine decay to 0 over all epochs, so that training ends where the updates vanish")
    r.add_argument("--test-curve", action="store_true",
                   help="also evaluate test after every epoch (diagnostic only, never used for selection)")
    r.add_argument("--no-resume", action="store_true",
                   help="rerun finished runs; unfinished runs start afresh (their checkpoints are discarded)")
    r.add_argument("--stop-on-error", action="store_true",
                   help="stop at the first failing run and show its traceback (default: report the failure in one "
                        "line, go on with the other runs, exit with status 1 at the end)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="module or .py file that registers more benchmarks (repeatable)")
    r.add_argument("--no-compile-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache (default: <cache dir>/jax_compilation_cache)")
    r.add_argument("--optimizer", choices=("adam", "sgdm"),
                   help="final optimizer of every method and of STL: adam (default; optax.adam) or sgdm "
                        "(optax.sgd with momentum); the learning rate is the recipe's (--lr)")
    r.add_argument("--b1", type=float, help="Adam's b1 (default 0.9; e.g. 0 for Adam without momentum)")
    r.add_argument("--b2", type=float, help="Adam's b2 (default 0.999; e.g. 0.9 for a second moment of ~10 steps)")
    r.add_argument("--momentum", type=float, help="SGD momentum of --optimizer sgdm (default 0.9)")

    rp = sub.add_parser("report", help="markdown table, CSV and plots from a results directory")
    rp.add_argument("dir", help="results directory (searched recursively)")
    rp.add_argument("--out", help="where to write the report (default: the results directory)")
    rp.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    rp.add_argument("--strict", action="store_true",
                    help="exit with status 1, writing nothing, when a JSON file cannot be read as a run "
                         "(default: report it on stderr, skip it and report the others)")

    cp = sub.add_parser("compact", help="convert older .json records to the compact .json.gz format; with --store, "
                                        "move them into one record store, each run once, indexed by study folder")
    cp.add_argument("dir", help="directory searched recursively for records")
    cp.add_argument("--store", metavar="STORE",
                    help="record store (e.g. results/runs): records move to STORE/<benchmark>/, duplicates of a run "
                         "are merged, and each folder they came from lists them in its runs.txt")
    cp.add_argument("--dry-run", action="store_true", help="report what would change; change nothing")

    se = sub.add_parser("select", help="rank one method's configurations by validation Δp vs STL (DIR/val_selection.md)")
    se.add_argument("dir", help="results directory or study folder")
    se.add_argument("--method", default="dbmtl", help="method label whose rows are ranked (default dbmtl)")
    se.add_argument("--print-grid-best", action="store_true",
                    help="print 'beta sigma' of the validation-best row of the paper's β grid and write nothing")
    se.add_argument("--vary", metavar="KEYS",
                    help="rank only the rows whose explicit hyperparameters are among KEYS (comma-separated; "
                         "e.g. beta,beta_sigma for the β grid of a folder that also holds α rows); "
                         "default: every row of the method")

    bd = sub.add_parser("breakdown", help="per-task changes vs STL behind each row's Δp (DIR/breakdown.md)")
    bd.add_argument("dirs", nargs="+", metavar="dir", help="results directories or study folders")

    sm = sub.add_parser("summary", help="the tables of one study side by side (PREFIX_summary.md)")
    sm.add_argument("prefix", help="study prefix, e.g. results/dense_8ep: reads PREFIX_main, PREFIX_beta, "
                                   "PREFIX_ablation, PREFIX_log, PREFIX_alpha, PREFIX_budget (missing ones skipped)")

    tm = sub.add_parser("time", help="training time per epoch per method, the Fig. 7 analogue "
                                     "(time_per_epoch.csv / .md / .png)")
    tm.add_argument("dir", help="results directory or study folder (runs with default hyperparameters are used)")
    tm.add_argument("--out", help="where to write (default: DIR)")
    tm.add_argument("--no-plots", "--no-plot", dest="no_plot", action="store_true", help="write no PNG plot")

    pa = sub.add_parser("paired", help="paired per-seed Δp differences (95 %% t-intervals), rank ranges and "
                                       "convergence figures, one table per setting")
    pa.add_argument("dirs", nargs="+", metavar="dir",
                    help="results directories or study folders; several are read as one set of runs (a run listed in "
                         "two counts once), e.g. to pair rows of two studies that share seeds and settings")
    pa.add_argument("--ref", action="append", default=None, metavar="METHOD",
                    help="reference row: a row label as printed (e.g. 'dbmtl (beta_sigma=0.0)') or a method name "
                         "(its default-hyperparameter row), repeatable (default: ew and dbmtl where present)")
    pa.add_argument("--baseline", default="stl", metavar="METHOD",
                    help="row that Δp is measured against: stl (default, the paper's Eq. 3-4) or another row "
                         "(a row label or method name, as --ref)")
    pa.add_argument("--average-last", type=float, default=None, metavar="F",
                    help="no model selection: every run's metrics are the means of its recorded validation and test "
                         "curves over its last fraction F of epochs (e.g. 0.2; runs trained with --test-curve)")
    pa.add_argument("--average-epochs", type=_epoch_range, default=None, metavar="A-B",
                    help="no model selection, as --average-last, over the 1-based epochs A to B inclusive (e.g. "
                         "41-160: a stretch of training before its end)")
    pa.add_argument("--smooth", type=int, default=None, metavar="W",
                    help="re-select every run's epoch on the W-epoch (odd, at most the run's epochs) centred moving "
                         "average of its validation curve, with test metrics from its recorded test curve (runs "
                         "trained with --test-curve; others are left out)")
    pa.add_argument("--across", action="store_true",
                    help="compare settings instead of rows: for each pair of settings of one benchmark (e.g. two "
                         "optimizers or schedules) the per-seed gain of every shared row and its interaction with "
                         "the --ref rows (gain minus the reference's gain), Δp of both against the first setting's STL")
    pa.add_argument("--split", choices=("test", "val"), default="test",
                    help="Δp on the test split (default, the result) or on the validation split (the selection split: "
                         "for choosing a hyperparameter, e.g. a learning rate, from a pilot)")
    pa.add_argument("--out", help="write to this file instead of stdout")

    cu = sub.add_parser("curves", help="how each row ends training: final training loss against EW's and the test "
                                       "curve's peak and fall after it (overfitting), one table per setting")
    cu.add_argument("dirs", nargs="+", metavar="dir",
                    help="results directories or study folders, read as one set of runs (as paired reads them)")
    cu.add_argument("--ref", default=None, metavar="METHOD",
                    help="the row the final training loss and each seed's fall are compared with: a row label or "
                         "method name (default: ew where present)")
    cu.add_argument("--smooth", type=int, default=None, metavar="W",
                    help="centred moving-average window (odd, epochs) the peak is found on (default: 2*(E//30)+1, "
                         "21 for 320 epochs)")
    cu.add_argument("--split", choices=("test", "val"), default="test",
                    help="the curve of the test split (default) or of the validation split")
    cu.add_argument("--out", help="write to this file instead of stdout")

    ix = sub.add_parser("index", help="a markdown index of the study folders (folders with runs.txt) under DIR")
    ix.add_argument("dir", help="results root, e.g. results/")
    ix.add_argument("--out", help="write to this file instead of stdout")

    ls = sub.add_parser("list", help="list benchmarks and methods")
    ls.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="module or .py file that registers more benchmarks (repeatable)")
    return p


def _enable_compile_cache() -> None:
    """JAX's persistent compilation cache under the dbmtl_jax cache directory.

    Runs that differ only by their seed trace to the same programs, so the
    second seed (and a resumed sweep) skips most of the compilation.
    """
    import jax

    from dbmtl_jax.datasets import cache_dir

    try:
        path = cache_dir() / "jax_compilation_cache"
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    except (OSError, AttributeError, ValueError) as e:  # a cache is an optimisation only
        print(f"note: persistent compilation cache disabled ({e}).", file=sys.stderr)


def _optimizer(args: argparse.Namespace) -> Optional[dict]:
    """``--optimizer`` / ``--b1`` / ``--b2`` / ``--momentum`` -> the runner's optimizer (``None``: default Adam)."""
    from dbmtl_jax.experiments.train import OPTIMIZERS, normalize_optimizer

    name = args.optimizer or "adam"
    given = {k: getattr(args, k) for k in ("b1", "b2", "momentum") if getattr(args, k) is not None}
    for key in given:
        if key not in OPTIMIZERS[name]:
            owner = next(n for n, opts in OPTIMIZERS.items() if key in opts)
            raise ValueError(f"--{key} is an option of --optimizer {owner}, not of --optimizer {name}.")
    for key, v in given.items():
        try:
            normalize_optimizer({"name": name, key: v})
        except ValueError as e:
            raise ValueError(f"--{key}: {e}") from None
    return normalize_optimizer({"name": name, **given})


def _cmd_run(args: argparse.Namespace) -> int:
    from dbmtl_jax import experiments as ex
    from dbmtl_jax.experiments.train import parse_data_options

    if not args.no_compile_cache:
        _enable_compile_cache()
    try:
        _import_user(args.imports)
        bench = ex.get_benchmark(args.benchmark)
        methods = ex.parse_methods(args.methods, force_log=args.log)
        hparams = ex.parse_hparams(args.hp)
        optimizer = _optimizer(args)
        data_options = parse_data_options(args.data_option)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    recipe = bench.quick if args.quick else bench.recipe
    if data_options:
        recipe = recipe.replace(data_options={**recipe.data_options, **data_options})
    changes = {k: v for k, v in (("epochs", args.epochs), ("learning_rate", args.lr),
                                 ("batch_size", args.batch_size), ("max_train_examples", args.max_train_examples),
                                 ("max_eval_examples", args.max_eval_examples)) if v is not None}
    if args.lr_schedule == "cosine":
        changes.update(lr_schedule="cosine", lr_decay_epoch=None)
    try:
        recipe = recipe.replace(**changes) if changes else recipe
        paths = ex.run_experiments(
            bench, methods, args.seeds, args.out, quick=args.quick, recipe=recipe, hparams=hparams,
            grad_stats=args.grad_stats, test_curve=args.test_curve, resume=not args.no_resume,
            progress=not args.no_progress, optimizer=optimizer, study=args.study, dry_run=args.dry_run,
            echo=print if args.dry_run else None, stop_on_error=args.stop_on_error,
        )
    except ex.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        if args.stop_on_error:
            traceback.print_exception(e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    where = f"; listed in {Path(args.study) / 'runs.txt'}" if args.study else ""
    print(f"{len(paths)} run(s) finished (records in {Path(args.out) / bench.name}{where}); "
          f"`dbmtl-jax report {args.study or args.out}` summarises them.")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from dbmtl_jax.experiments.report import BadResultFiles, write_report

    if not Path(args.dir).is_dir():
        print(f"error: {args.dir} is not a directory.", file=sys.stderr)
        return 2
    skipped: list = []
    try:
        res = write_report(args.dir, args.out, plots=not args.no_plots, skipped=skipped, strict=args.strict)
    except BadResultFiles:
        res = None
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are not usable runs"
              + ("; --strict: no report written." if res is None else "."), file=sys.stderr)
    if res is None:
        return 1
    files = [res["report"], *res["csv"], *res["plots"]]
    try:
        print(res["markdown"])
        print(f"\n{res['num_runs']} run(s); wrote " + ", ".join(str(f) for f in files))
    except BrokenPipeError:  # `dbmtl-jax report dir | head`
        sys.stderr.close()
    return 0 if res["num_runs"] else 1


def _cmd_compact(args: argparse.Namespace) -> int:
    from dbmtl_jax.experiments.store import compact_directory

    if not Path(args.dir).is_dir():
        print(f"error: {args.dir} is not a directory.", file=sys.stderr)
        return 2
    res = compact_directory(args.dir, store=args.store, dry_run=args.dry_run,
                            echo=lambda line: print(line, file=sys.stderr))
    mb = 1024 * 1024
    print(f"{len(res.converted)} record(s) {'would be ' if args.dry_run else ''}converted to the compact format"
          + (f", {len(res.moved)} moved into {args.store}" if args.store else "")
          + f"; {len(res.upgraded)} restated under the current method defaults"
          + f"; {len(res.copies)} identical copies, {len(res.reruns)} reruns of a run and "
          + f"{len(res.same_config)} second runs of one configuration merged"
          + f"; {len(res.studies)} study index(es) written; records {res.bytes_before / mb:.1f} MiB -> "
          + f"{res.bytes_after / mb:.1f} MiB" + (" (dry run: nothing changed)" if args.dry_run else "") + ".")
    if res.not_records:
        print(f"{len(res.not_records)} file(s) are not run records and were left alone.", file=sys.stderr)
    if res.conflicts:
        print(f"error: {len(res.conflicts)} record(s) conflict with another record of the same run "
              f"(not only in timings) and were left in place.", file=sys.stderr)
        return 1
    return 0


def _report_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are not usable runs.", file=sys.stderr)


def _print(text: str) -> None:
    try:
        print(text, end="" if text.endswith("\n") else "\n")
    except BrokenPipeError:  # `dbmtl-jax ... | head`
        sys.stderr.close()


def _write_or_print(text: str, out: Optional[str]) -> int:
    """Writes the page to ``out`` (``--out``) or prints it; exit status 0."""
    if out:
        Path(out).write_text(text)
    else:
        _print(text)
    return 0


def _dirs_exist(*dirs: str) -> bool:
    missing = [d for d in dirs if not Path(d).is_dir()]
    for d in missing:
        print(f"error: {d} is not a directory.", file=sys.stderr)
    return not missing


def _cmd_select(args: argparse.Namespace) -> int:
    from dbmtl_jax.experiments import analysis as an

    if not _dirs_exist(args.dir):
        return 2
    skipped: list = []
    settings = an.load_settings(args.dir, skipped=skipped)
    _report_skipped(skipped)
    if args.vary is not None:
        from dbmtl_jax.experiments.train import _factory

        keys = [k.strip() for k in args.vary.split(",") if k.strip()]
        factory = _factory(args.method.split("+")[0])
        unknown = [k for k in keys if factory is not None and k not in inspect.signature(factory).parameters]
        if not keys or unknown:
            why = (f"{', '.join(unknown)}: not a hyperparameter of {args.method}" if unknown
                   else "names no hyperparameter")
            print(f"error: --vary {args.vary!r} {why}; nothing written.", file=sys.stderr)
            return 2
        settings = an.restrict_rows(settings, args.method, keys)
    if args.print_grid_best:
        best = an.grid_best(settings, args.method)
        if best is None:
            print(f"error: {args.dir}: no {args.method} row of the paper's β grid next to an STL row.", file=sys.stderr)
            return 1
        print(*best)
        return 0
    if not any(an.reference_stl(settings, st) is not None and any(r.method == args.method for r in st.rows.values())
               for st in settings):
        present = sorted({r.method for st in settings for r in st.rows.values()})
        print(f"error: {args.dir}: no {args.method} row next to an STL row (methods there: "
              f"{', '.join(present) or 'none, no run records'}); nothing written.", file=sys.stderr)
        return 1
    text = an.val_selection_markdown(settings, args.method, title=args.dir.rstrip("/"))
    (Path(args.dir) / "val_selection.md").write_text(text)
    _print(text)
    return 0


def _cmd_breakdown(args: argparse.Namespace) -> int:
    from dbmtl_jax.experiments import analysis as an

    if not _dirs_exist(*args.dirs):
        return 2
    for d in args.dirs:
        skipped: list = []
        settings = an.load_settings(d, skipped=skipped)
        _report_skipped(skipped)
        if not any(st.stl is not None for st in settings):
            print(f"error: {d}: no run records with an STL row (the breakdown is per task against STL); "
                  "nothing written.", file=sys.stderr)
            return 1
        text = an.breakdown_markdown(settings)
        (Path(d) / "breakdown.md").write_text(text)
        # one folder: stdout is the page itself, so `breakdown DIR > DIR/breakdown.md` writes the same file
        _print(text if len(args.dirs) == 1 else f"{d}\n{text}")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from dbmtl_jax.experiments import analysis as an

    prefix = Path(args.prefix.rstrip("/"))
    skipped: list = []
    try:
        text = an.summary_markdown(prefix, skipped=skipped)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _report_skipped(skipped)
    prefix.with_name(prefix.name + "_summary.md").write_text(text)
    _print(text)
    return 0


def _cmd_time(args: argparse.Namespace) -> int:
    from dbmtl_jax.experiments import analysis as an
    from dbmtl_jax.experiments.report import load_results

    if not _dirs_exist(args.dir):
        return 2
    skipped: list = []
    records = load_results(args.dir, skipped=skipped)
    _report_skipped(skipped)
    rows = an.time_rows(records)
    if not rows:
        print(f"error: {args.dir}: no finished run with default hyperparameters.", file=sys.stderr)
        return 1
    benchmarks = sorted({r["benchmark"] for r in records})
    devices = sorted({str(r.get("device")) for r in records})
    an.write_time(rows, args.out or args.dir, plot=not args.no_plot,
                  title=f"{', '.join(benchmarks)} ({', '.join(devices)})")
    _print(an.time_markdown(rows))
    return 0


def _cmd_paired(args: argparse.Namespace) -> int:
    from dbmtl_jax.experiments.paired import across_settings_report, paired_report
    from dbmtl_jax.experiments.report import load_results, summarize

    if not _dirs_exist(*args.dirs):
        return 2
    skipped: list = []
    records = load_results(args.dirs, skipped=skipped)
    where = " ".join(args.dirs)
    found = bool(records)
    head = ""
    given = [f for f, v in (("--smooth", args.smooth), ("--average-last", args.average_last),
                            ("--average-epochs", args.average_epochs)) if v is not None]
    if len(given) > 1:
        print(f"error: {' and '.join(given)}: --smooth re-selects an epoch, --average-last and --average-epochs "
              "select none: give one of them.", file=sys.stderr)
        return 2
    if found and given:
        from dbmtl_jax.experiments import reselect as rs

        try:
            if args.smooth is not None:
                head = (f"Selection re-made after training on the {args.smooth}-epoch centred moving average of "
                        "each run's validation curve; test metrics at that epoch from the run's recorded test curve."
                        "\n\n")
                records = rs.reselect_all(records, args.smooth, skipped=skipped)
            elif args.average_last is not None:
                head = (f"No model selection: every metric is the mean of the run's recorded curve over its last "
                        f"{args.average_last:g} of epochs (STL's too).\n\n")
                records = rs.average_all(records, args.average_last, skipped=skipped)
            else:
                first, last = args.average_epochs
                head = (f"No model selection: every metric is the mean of the run's recorded curve over epochs "
                        f"{first}-{last} (STL's too).\n\n")
                records = rs.average_epochs_all(records, first, last, skipped=skipped)
        except ValueError as e:  # a bad window, fraction or range
            print(f"error: {given[0]}: {e}", file=sys.stderr)
            return 2
    _report_skipped(skipped)
    if not records:
        why = "no run with a recorded test curve (--test-curve) to re-select" if found else "no run records"
        print(f"error: {why} under {where}.", file=sys.stderr)
        return 1
    settings = summarize(records)  # a ValueError here (records that cannot share a table) exits 1 in main
    try:
        body = (across_settings_report if args.across else paired_report)(settings, args.ref, args.baseline, args.split)
    except ValueError as e:  # a --ref / --baseline that names no row
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.split == "val":
        head += ("Δp on the validation split (the selection split, against the baseline's validation metrics): for "
                 "choosing hyperparameters, not a result.\n\n")
    text = head + body
    if not body.strip() and args.across:
        print(f"error: {where}: no table: no two settings of one benchmark share a row "
              f"(and have {'an STL' if args.baseline == 'stl' else f'a {args.baseline}'} row).", file=sys.stderr)
        return 1
    if not body.strip():
        print(f"error: {where}: no table: no setting has an STL row with finite metrics to measure Δp against "
              "(give --baseline ROW, e.g. --baseline ew).", file=sys.stderr)
        return 1
    return _write_or_print(text, args.out)


def _cmd_curves(args: argparse.Namespace) -> int:
    from dbmtl_jax.experiments.curves import curves_report
    from dbmtl_jax.experiments.report import load_results, summarize

    if not _dirs_exist(*args.dirs):
        return 2
    skipped: list = []
    records = load_results(args.dirs, skipped=skipped)
    _report_skipped(skipped)
    where = " ".join(args.dirs)
    if not records:
        print(f"error: no run records under {where}.", file=sys.stderr)
        return 1
    settings = summarize(records)  # a ValueError here (records that cannot share a table) exits 1 in main
    try:
        text = curves_report(settings, args.ref, window=args.smooth, split=args.split)
    except ValueError as e:  # a --ref that names no row, a bad --smooth
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not text.strip():
        print(f"error: {where}: no table: no setting has an STL row to measure Δp against.", file=sys.stderr)
        return 1
    return _write_or_print(text, args.out)


def _cmd_index(args: argparse.Namespace) -> int:
    from dbmtl_jax.experiments import analysis as an

    if not _dirs_exist(args.dir):
        return 2
    skipped: list = []
    text = an.index_markdown(args.dir, skipped=skipped)
    _report_skipped(skipped)
    return _write_or_print(text, args.out)


def _cmd_list(args: argparse.Namespace) -> int:
    import dbmtl_jax
    from dbmtl_jax import experiments as ex

    try:
        _import_user(args.imports)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("Benchmarks:")
    for name in sorted(ex.BENCHMARKS):
        try:
            b = ex.get_benchmark(name)
            print(f"  {name:<14} {b.num_tasks} tasks ({', '.join(b.task_names)}): {b.description}")
        except Exception as e:  # noqa: BLE001 - a broken user benchmark must not hide the others
            print(f"  {name:<14} (cannot be built: {type(e).__name__}: {e})")
    print("Methods: stl, " + ", ".join(f"{m} [{dbmtl_jax.METHOD_GROUPS[m]}]" for m in dbmtl_jax.METHODS))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``dbmtl-jax`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return _cmd_run(args)
    if args.command == "compact":
        return _cmd_compact(args)
    commands = {"report": _cmd_report, "select": _cmd_select, "breakdown": _cmd_breakdown, "summary": _cmd_summary,
                "time": _cmd_time, "index": _cmd_index, "paired": _cmd_paired, "curves": _cmd_curves}
    if args.command in commands:
        try:
            return commands[args.command](args)
        except ValueError as e:  # records that cannot share a table (duplicates, changed tasks, mixed settings)
            print(f"error: {e}", file=sys.stderr)
            return 1
    return _cmd_list(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
