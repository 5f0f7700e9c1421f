"""Reports from the runner's record files: a markdown table, CSV files and plots.

Records are ``*.json.gz`` files (format ``dbmtl_jax.experiment/2``) or plain
``*.json`` files of format ``/1``; both are read.  A directory's records are
the record files under it (recursively) plus, for a *study folder*, the
records its ``runs.txt`` lists (paths relative to the folder, usually into a
shared record store such as ``results/runs/``; see ``docs/experiments.md``).

Runs are grouped into *settings* (benchmark + training recipe + quick flag +
optimizer: quick and full runs, or runs with different optimizers, never mix)
and, within a setting, into rows (method label + config hash: the same method
with other hyperparameters is another row).  Per
row and metric the table gives the mean ± sample standard deviation (ddof 1)
of the test metric over seeds, and Δp (Eq. 3–4 of the DB-MTL paper, via
:func:`dbmtl_jax.delta_p`, in percent) of every seed's test metrics against the
STL row's mean metrics, as mean ± std over seeds.  The best mean of each
column is in bold (all rows, STL included, as in the paper's tables).

Files written by :func:`write_report` (into the results directory unless
``out`` is given): ``report.md``, ``summary.csv`` (long format: one line per
setting, row, task and metric, plus ``delta_p`` and timing lines),
``runs.csv`` (one line per run, task and metric) and, per setting, the plots
``<setting>_train_loss.png`` (per-task training loss), ``<setting>_grad_norm.png``
(per-task norm of the raw-loss shared gradient ``‖∇_θ ℓ_t‖``, the paper's Fig. 8)
``<setting>_grad_cosine.png`` (pairwise cosine similarity of the task
gradients, Fig. 10) and ``<setting>_epochs.png`` (validation Δp vs STL and,
with ``--test-curve``, test Δp by epoch), all averaged over seeds.  Gradient plots only show runs
that computed per-task gradients.

A record file that is not a usable run record (truncated or invalid JSON or
gzip data, another format, missing or malformed keys), a ``runs.txt`` entry
whose file is missing, and a ``.json`` file next to the ``.json.gz`` record of
the same run are skipped and reported, never silently (:func:`load_results`,
:func:`check_record`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from dbmtl_jax.metrics import delta_p

__all__ = ["load_results", "record_paths", "check_record", "BadResultFiles", "summarize", "markdown_table",
           "write_report", "Setting", "Row"]

_NONFINITE = ("inf", "-inf", "nan")  # how the runner writes non-finite floats (NaN is written as null)


def _is_metric_value(v: Any) -> bool:
    return v is None or v in _NONFINITE or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _metric_table_problem(table: Any, where: str) -> Optional[str]:
    """``task -> metric -> value`` mappings (``metrics.val``, ``metrics.test``)."""
    if not isinstance(table, dict):
        return f"'{where}' is not an object"
    for task, row in table.items():
        if not isinstance(row, dict):
            return f"'{where}.{task}' is not an object"
        for m, v in row.items():
            if not _is_metric_value(v):
                return f"'{where}.{task}.{m}' is not a number ({v!r})"
    return None


def check_record(rec: Any) -> Optional[str]:
    """Why ``rec`` (a parsed JSON file) is not a finished run record the report can use, or ``None``."""
    from dbmtl_jax.experiments.train import READABLE_FORMATS

    if not isinstance(rec, dict):
        return f"not a run record (a JSON {type(rec).__name__}, not an object)"
    if "format" not in rec:
        return "not a run record (no 'format' key)"
    if rec["format"] not in READABLE_FORMATS:
        return f"unknown format {rec['format']!r} (expected one of {list(READABLE_FORMATS)})"
    if rec.get("status") != "done":
        return f"status is {rec.get('status')!r}, not 'done'"
    required = ("benchmark", "method", "seed", "config_hash", "config", "tasks", "metrics", "selected_epoch")
    missing = [k for k in required if k not in rec]
    if missing:
        return f"missing key(s) {missing}"
    for k in ("benchmark", "method", "config_hash"):
        if not isinstance(rec[k], str):
            return f"{k!r} is not a string ({rec[k]!r})"
    if isinstance(rec["seed"], bool) or not isinstance(rec["seed"], int):
        return f"'seed' is not an int ({rec['seed']!r})"
    cfg = rec["config"]
    if not isinstance(cfg, dict):
        return "'config' is not an object"
    missing = [k for k in ("benchmark", "recipe", "quick") if k not in cfg]
    if missing:
        return f"missing config key(s) {missing}"
    if not isinstance(cfg["recipe"], dict):
        return "'config.recipe' is not an object"
    if not isinstance(cfg.get("hparams") or {}, dict):
        return "'config.hparams' is not an object"
    if "optimizer" in cfg and not isinstance(cfg["optimizer"], dict):
        return "'config.optimizer' is not an object"
    tasks = rec["tasks"]
    if not isinstance(tasks, dict) or not tasks:
        return "'tasks' is not a non-empty object"
    for t, info in tasks.items():
        if not isinstance(info, dict) or not isinstance(info.get("metrics"), dict):
            return f"'tasks.{t}' has no 'metrics' object"
        if not isinstance(info.get("units", {}), dict):
            return f"'tasks.{t}.units' is not an object"
    metrics = rec["metrics"]
    if not isinstance(metrics, dict):
        return "'metrics' is not an object"
    for split in ("val", "test"):
        if split not in metrics:
            return f"missing key 'metrics.{split}'"
        problem = _metric_table_problem(metrics[split], f"metrics.{split}")
        if problem:
            return problem
    if not isinstance(rec["selected_epoch"], dict):
        return "'selected_epoch' is not an object"
    curve = rec.get("curve")
    if curve is not None:
        if not isinstance(curve, dict):
            return "'curve' is not an object"
        for k, v in curve.items():
            if v is not None and not isinstance(v, list):
                return f"'curve.{k}' is not a list"
    return None


def record_paths(directory: os.PathLike, *, skipped: Optional[list] = None) -> list[Path]:
    """The record files of ``directory``: ``*.json.gz`` and ``*.json`` under it, and its ``runs.txt`` entries.

    Sorted, each file once.  A ``runs.txt`` entry whose file is missing is
    looked up in the other format (``.json`` <-> ``.json.gz``, after
    ``dbmtl-jax compact``); when neither exists it goes to ``skipped`` as
    ``(path, reason)``.  A ``.json`` file whose ``.json.gz`` twin (the same
    run) exists is superseded: it goes to ``skipped`` too.
    """
    from dbmtl_jax.experiments.train import LEGACY_SUFFIX, RESULT_SUFFIX, STUDY_INDEX, read_study, record_files

    directory = Path(directory)
    bad: list[tuple[str, str]] = []
    found = {p.resolve(): p for suffix in (LEGACY_SUFFIX, RESULT_SUFFIX) for p in directory.rglob("*" + suffix)
             if p.is_file()}
    for entry in read_study(directory):
        listed = directory / entry
        hit = next((f for f in record_files(listed) if f.is_file()), None)
        if hit is None:
            bad.append((str(listed), f"listed in {directory / STUDY_INDEX} but not found"))
        else:
            found.setdefault(hit.resolve(), hit)
    out = []
    for real, path in sorted(found.items(), key=lambda kv: str(kv[1])):
        if path.name.endswith(LEGACY_SUFFIX) and record_files(real)[0].is_file():
            bad.append((str(path), f"superseded by {record_files(path)[0].name} (the same run, format /2)"))
            continue
        out.append(path)
    if skipped is not None:
        skipped.extend(bad)
    return out


def load_results(
    directory: Union[os.PathLike, str, Sequence[Union[os.PathLike, str]]], *, skipped: Optional[list] = None
) -> list[dict[str, Any]]:
    """All finished run records of ``directory`` (or of several, read as one set), sorted by benchmark, method,
    config hash, seed.

    The files are those of :func:`record_paths` (recursively, and a study
    folder's ``runs.txt``), in both formats, each file once (a file listed by
    two directories is read once).  A file that is not a usable run
    record (unreadable, truncated or invalid JSON or gzip data, another
    format, an unfinished run, missing or malformed keys: :func:`check_record`)
    is left out and appended to ``skipped`` as ``(path, reason)``; without a
    ``skipped`` list, each one is a ``UserWarning`` instead.  Each record gets
    its file as ``_path``.
    """
    from dbmtl_jax.experiments.train import read_record

    out = []
    bad: list[tuple[str, str]] = []
    dirs = [directory] if isinstance(directory, (str, os.PathLike)) else list(directory)
    paths: dict[Path, Path] = {}
    for d in dirs:
        for p in record_paths(d, skipped=bad):
            paths.setdefault(p.resolve(), p)
    for path in sorted(paths.values(), key=str):
        try:
            rec = read_record(path)
        except OSError as e:
            bad.append((str(path), f"cannot be read ({e.strerror or e})"))
            continue
        except UnicodeDecodeError as e:
            bad.append((str(path), f"not UTF-8 text ({e.reason} at byte {e.start})"))
            continue
        except ValueError as e:  # json.JSONDecodeError or bad gzip data: truncated or not JSON
            bad.append((str(path), f"invalid JSON ({e}); a truncated or corrupted file?"
                        if not str(e).startswith("invalid gzip") else str(e)))
            continue
        problem = check_record(rec)
        if problem:
            bad.append((str(path), problem))
            continue
        rec["_path"] = str(path)
        out.append(rec)
    if skipped is not None:
        skipped.extend(bad)
    else:
        import warnings

        for path, reason in bad:
            warnings.warn(f"skipped {path}: {reason}", UserWarning, stacklevel=2)
    out.sort(key=lambda r: (r["benchmark"], r["method"], r["config_hash"], r["seed"]))
    return out


class BadResultFiles(ValueError):
    """``write_report(strict=True)`` found files that are not usable runs; ``skipped``: ``(path, reason)``."""

    def __init__(self, skipped: Sequence[tuple[str, str]]) -> None:
        self.skipped = list(skipped)
        lines = "\n".join(f"  {p}: {r}" for p, r in self.skipped)
        super().__init__(f"{len(self.skipped)} file(s) are not usable runs:\n{lines}")


class Row:
    """One table row: the runs of one (method, config) over seeds."""

    def __init__(self, method: str, config_hash: str, config: Mapping[str, Any]) -> None:
        self.method = method
        self.config_hash = config_hash
        self.config = config
        self.runs: list[dict[str, Any]] = []
        self.delta_p: list[float] = []

    @property
    def label(self) -> str:
        from dbmtl_jax.experiments.train import SELF_OPTIMIZING

        name = self.method
        if self.config.get("base_method") in SELF_OPTIMIZING and "final" not in self.config:
            name += " → adam"  # a run made before 0.3: its direction went through a second Adam (audit 42)
        hp = self.config.get("hparams") or {}
        if not hp:
            return name
        return f"{name} ({', '.join(f'{k}={v}' for k, v in sorted(hp.items()))})"

    @property
    def seeds(self) -> list[int]:
        return [r["seed"] for r in self.runs]

    def values(self, task: str, metric: str, split: str = "test") -> list[float]:
        out = []
        for r in self.runs:
            v = r["metrics"][split].get(task, {}).get(metric)
            out.append(float("nan") if v is None else float(v))
        return out

    def mean_metrics(self, tasks: Mapping[str, Mapping[str, bool]], split: str = "test") -> dict[str, dict[str, float]]:
        """Mean over the row's runs of each metric at the selected epoch, on ``split`` ("test" or "val")."""
        return {t: {m: _mean(self.values(t, m, split)) for m in ms} for t, ms in tasks.items()}

    def timing(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.runs if isinstance(r.get(key), (int, float))]


class Setting:
    """The rows of one benchmark under one recipe."""

    def __init__(self, key: str, benchmark: str, recipe: Mapping[str, Any], quick: bool,
                 tasks: Mapping[str, Any], optimizer: Optional[Mapping[str, Any]] = None) -> None:
        self.key = key
        self.benchmark = benchmark
        self.recipe = recipe
        self.quick = quick
        self.optimizer = optimizer  # None: the default Adam (b1 = 0.9)
        self.tasks = tasks  # task -> {"metrics": {name: hib}, "select_metric": ..., "units": ...}
        self.rows: dict[tuple[str, str], Row] = {}

    @property
    def higher_is_better(self) -> dict[str, dict[str, bool]]:
        return {t: dict(info["metrics"]) for t, info in self.tasks.items()}

    @property
    def stl(self) -> Optional[Row]:
        rows = [r for r in self.rows.values() if r.method == "stl"]
        return rows[0] if rows else None


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else float("nan")


def _std(xs: Sequence[float]) -> float:
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan")


def _setting_key(rec: Mapping[str, Any]) -> str:
    cfg = rec["config"]
    key: dict[str, Any] = {"b": cfg["benchmark"], "r": cfg["recipe"], "q": cfg["quick"]}
    if cfg.get("optimizer") is not None:  # only non-default optimizers: older setting keys are unchanged
        key["o"] = cfg["optimizer"]
    text = json.dumps(key, sort_keys=True)
    return f"{cfg['benchmark']}-{'quick' if cfg['quick'] else 'full'}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"


def runs_delta_p(row: Row, base: Mapping[str, Mapping[str, float]], hib: Mapping[str, Mapping[str, bool]],
                 split: str = "test") -> list[float]:
    """Each run's Δp on ``split`` against the metrics ``base`` (NaN where it is undefined), in the row's run order."""
    out = []
    for r in row.runs:
        try:
            out.append(delta_p(r["metrics"][split], base, hib))
        except ValueError:
            out.append(float("nan"))
    return out


def rebase_delta_p(st: Setting, baseline: Row, split: str = "test") -> None:
    """Sets every row's per-run Δp on ``split`` ("test" or "val"; NaN where it is undefined) against
    ``baseline``'s mean metrics on the same split."""
    hib = st.higher_is_better
    base = baseline.mean_metrics(hib, split)
    for row in st.rows.values():
        row.delta_p = runs_delta_p(row, base, hib, split)


def summarize(records: Iterable[Mapping[str, Any]]) -> list[Setting]:
    """Groups run records into settings and rows and computes Δp against each setting's STL row.

    Raises ``ValueError`` when two records are the same run (method, config and seed), when runs of
    one setting disagree on their tasks' metrics, directions or selection metrics or on their data
    (records that carry a data summary, :mod:`~dbmtl_jax.experiments.data_summary`), or when a setting
    holds two STL configurations (which of them Δp is measured against would be a guess).
    """
    from dbmtl_jax.experiments.data_summary import summary_difference
    from dbmtl_jax.experiments.train import task_semantics

    settings: dict[str, Setting] = {}
    seen_data: dict[str, tuple[Mapping[str, Any], str]] = {}  # setting -> (a data summary, whose)
    for rec in records:
        key = _setting_key(rec)
        cfg = rec["config"]
        st = settings.get(key)
        if st is None:
            st = settings[key] = Setting(key, cfg["benchmark"], cfg["recipe"], cfg["quick"], rec["tasks"],
                                         cfg.get("optimizer"))
        where = rec.get("_path") or f"{rec['method']} seed {rec['seed']}"
        if task_semantics(rec["tasks"]) != task_semantics(st.tasks):
            raise ValueError(f"{where}: its tasks (metrics, directions, selection metrics) differ from those of the "
                             f"other runs of setting {key}; the benchmark's tasks changed between runs, so they "
                             "cannot share a table (rerun them with --no-resume).")
        if rec.get("data_summary") is not None:
            first = seen_data.setdefault(key, (rec["data_summary"], where))
            diff = summary_difference(first[0], rec["data_summary"], labels=("there", "here"))
            if diff is not None:
                raise ValueError(f"{where}: made from other data than {first[1]} ({diff}), though both are runs of "
                                 f"setting {key}; runs on two data sets cannot share a table (report them from "
                                 "separate folders, or rerun one set with --no-resume).")
        rk = (rec["method"], rec["config_hash"])
        row = st.rows.get(rk)
        if row is None:
            row = st.rows[rk] = Row(rec["method"], rec["config_hash"], cfg)
        twin = next((r for r in row.runs if r["seed"] == rec["seed"]), None)
        if twin is not None:
            raise ValueError(f"two records of run {rec['method']} seed {rec['seed']} (config {rec['config_hash']}): "
                             f"{twin.get('_path', '?')} and {rec.get('_path', '?')}; a seed counts once "
                             "(`dbmtl-jax compact DIR --store STORE` merges copies).")
        row.runs.append(dict(rec))
    for st in settings.values():
        stls = [r for r in st.rows.values() if r.method == "stl"]
        if len(stls) > 1:
            differ = sorted(k for k in set().union(*(r.config for r in stls))
                            if len({json.dumps(r.config.get(k), sort_keys=True) for r in stls}) > 1)
            raise ValueError(f"setting {st.key} has {len(stls)} STL configurations ("
                             + ", ".join(f"{r.config_hash}: {len(r.runs)} runs" for r in stls)
                             + f"; they differ in {', '.join(differ) or 'nothing recorded'}): Δp needs one. "
                             "List one of them in the study (runs.txt) or report them from separate folders.")
        if st.stl is not None:
            rebase_delta_p(st, st.stl)
    ordered = sorted(settings.values(), key=lambda s: s.key)
    for st in ordered:
        st.rows = dict(sorted(st.rows.items(), key=lambda kv: (kv[0][0] != "stl", kv[0][0], kv[0][1])))
    return ordered


def signed(x: float, digits: int = 2) -> str:
    """``x`` with its sign and ``digits`` decimals; a value that rounds to zero is ``+0.00``, never ``-0.00``."""
    return f"{round(float(x), digits) + 0.0:+.{digits}f}"


def _fmt(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.4g}"


def _cell(xs: Sequence[float], bold: bool, with_sign: bool = False) -> str:
    m, s = _mean(xs), _std(xs)
    if with_sign and math.isfinite(m):
        text = signed(m)
        text += f" ± {s:.2f}" if math.isfinite(s) else ""
    else:
        text = _fmt(m) + (f" ± {s:.2g}" if math.isfinite(s) else "")
    return f"**{text}**" if bold else text


def _best(means: list[float], higher: bool) -> Optional[float]:
    finite = [m for m in means if math.isfinite(m)]
    if not finite:
        return None
    return max(finite) if higher else min(finite)


def markdown_table(st: Setting) -> str:
    """The paper-style table of one setting (see the module docstring)."""
    hib = st.higher_is_better
    rows = list(st.rows.values())
    cols: list[tuple[str, str, bool]] = [(t, m, h) for t, ms in hib.items() for m, h in ms.items()]
    header = ["Method"]
    for t, m, h in cols:
        unit = st.tasks[t].get("units", {}).get(m)
        header.append(f"{t} {m}{f' ({unit})' if unit else ''} {'↑' if h else '↓'}")
    has_stl = st.stl is not None
    header += ["Δp ↑ (%)", "seeds", "step (ms)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    best = {(t, m): _best([_mean(r.values(t, m)) for r in rows], h) for t, m, h in cols}
    best_dp = _best([_mean(r.delta_p) for r in rows], True) if has_stl else None
    labels = [r.label for r in rows]
    for r in rows:
        label = r.label
        if labels.count(label) > 1:  # same method and hyperparameters, other settings (e.g. --grad-stats)
            label += f" [{r.config.get('grad_path', '')} {r.config_hash}]"
        cells = [label]
        for t, m, h in cols:
            xs = r.values(t, m)
            cells.append(_cell(xs, best[(t, m)] is not None and _mean(xs) == best[(t, m)]))
        if has_stl:
            cells.append(_cell(r.delta_p, best_dp is not None and _mean(r.delta_p) == best_dp, with_sign=True))
        else:
            cells.append("—")
        cells.append(",".join(str(s) for s in r.seeds))
        steps = r.timing("median_step_time_s")
        cells.append(f"{1e3 * statistics.median(steps):.2f}" if steps else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def schedule_text(rc: Mapping[str, Any]) -> str:
    """The learning-rate schedule of a recorded recipe in words (``""`` for a constant rate)."""
    if rc.get("lr_schedule") == "cosine":
        return "cosine decay to 0"
    if rc.get("lr_decay_epoch") is not None:
        return f"lr ×{rc.get('lr_decay_factor')} from epoch {rc['lr_decay_epoch']}"
    return ""


_OPTIMIZER_NAMES = {"adam": "Adam", "sgdm": "SGD"}  # the runner's optimizer names as titles print them


def optimizer_text(opt: Optional[Mapping[str, Any]]) -> str:
    """A recorded optimizer in words; no record means the recipes' Adam with optax's default b1."""
    if not opt:
        return "Adam (b1 = 0.9)"
    rest = ", ".join(f"{k} = {v}" for k, v in opt.items() if k != "name")
    name = _OPTIMIZER_NAMES.get(str(opt.get("name")), str(opt.get("name")))
    return name + (f" ({rest})" if rest else "")


def wall_time_by_device(runs: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, float]]:
    """``device -> (runs, summed wall_time_s)``, the device as a record names it ("cpu:cpu", "gpu:NVIDIA H200")."""
    per: dict[str, tuple[int, float]] = {}
    for r in runs:
        dev = str(r.get("device") or "cpu:cpu")
        n, t = per.get(dev, (0, 0.0))
        per[dev] = (n + 1, t + float(r.get("wall_time_s") or 0.0))
    return dict(sorted(per.items()))


def device_text(device: str) -> str:
    """A record's device in words: "CPU" for "cpu:cpu", the accelerator's name otherwise."""
    return "CPU" if device == "cpu:cpu" else device.split(":", 1)[-1]


def setting_title(st: Setting) -> str:
    """``benchmark (quick|full recipe: lr, batch, epochs, ...) [setting key]``: names a setting."""
    rc = st.recipe
    parts = [f"{name} {rc[k]}" for k, name in (("learning_rate", "lr"), ("batch_size", "batch")) if rc.get(k) is not None]
    parts.append(f"{rc.get('epochs')} epochs")
    if schedule_text(rc):
        parts.append(schedule_text(rc))
    if rc.get("max_steps_per_epoch"):
        parts.append(f"≤{rc['max_steps_per_epoch']} steps/epoch")
    if rc.get("max_train_examples"):
        parts.append(f"≤{rc['max_train_examples']} train examples")
    if rc.get("max_eval_examples"):
        parts.append(f"≤{rc['max_eval_examples']} val/test examples")
    if rc.get("weight_decay"):
        parts.append(f"weight decay {rc['weight_decay']}")
    if rc.get("data_options"):
        parts.append("data " + ", ".join(f"{k}={v}" for k, v in sorted(rc["data_options"].items())))
    parts.append(f"optimizer {optimizer_text(st.optimizer)}")
    return f"{st.benchmark} ({'quick' if st.quick else 'full'} recipe: {', '.join(parts)}) [{st.key}]"


def render_markdown(settings: Sequence[Setting]) -> str:
    out = ["# Results", ""]
    if not settings:
        out.append("No finished runs found.")
    for st in settings:
        out += [f"## {setting_title(st)}", ""]
        out.append(markdown_table(st))
        out.append("")
        notes = ["Test metrics at the validation-selected epoch, mean ± std (ddof 1) over seeds."]
        if st.stl is None:
            notes.append("No STL run in this setting: Δp is not available (run `--methods stl,...`).")
        else:
            notes.append("Δp: Eq. (3)–(4) of each seed vs the mean STL metrics; positive is better than STL.")
        bad = [f"{r.label} seed {x['seed']}" for r in st.rows.values() for x in r.runs if x.get("nonfinite_steps")]
        if bad:
            notes.append(f"Non-finite training losses occurred in: {', '.join(bad)}.")
        out += [" ".join(notes), ""]
    return "\n".join(out)


def _write_csvs(settings: Sequence[Setting], out: Path) -> list[Path]:
    summary, runs = out / "summary.csv", out / "runs.csv"
    with open(summary, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "benchmark", "quick", "method", "config_hash", "hparams", "task", "metric",
                    "higher_is_better", "mean", "std", "n"])
        for st in settings:
            for r in st.rows.values():
                hp = json.dumps(r.config.get("hparams") or {}, sort_keys=True)
                base = [st.key, st.benchmark, st.quick, r.method, r.config_hash, hp]
                for t, ms in st.higher_is_better.items():
                    for m, h in ms.items():
                        xs = r.values(t, m)
                        w.writerow(base + [t, m, h, _mean(xs), _std(xs), len(xs)])
                if r.delta_p:
                    w.writerow(base + ["", "delta_p", True, _mean(r.delta_p), _std(r.delta_p), len(r.delta_p)])
                for key in ("median_step_time_s", "wall_time_s"):
                    xs = r.timing(key)
                    if xs:
                        w.writerow(base + ["", key, False, _mean(xs), _std(xs), len(xs)])
    with open(runs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "benchmark", "method", "config_hash", "seed", "split", "task", "metric", "value",
                    "selected_epoch"])
        for st in settings:
            for r in st.rows.values():
                for rec in r.runs:
                    for split in ("val", "test"):
                        for t, ms in rec["metrics"][split].items():
                            for m, v in ms.items():
                                w.writerow([st.key, st.benchmark, r.method, r.config_hash, rec["seed"], split, t,
                                            m, v, rec["selected_epoch"].get(t)])
    return [summary, runs]


def _curve(row: Row, key: str) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Seed-averaged step curve ``key`` of a row (steps, values) or (None, None)."""
    curves = [(r.get("curve") or {}) for r in row.runs]
    curves = [c for c in curves if c.get(key) and all(v is not None for v in c[key])]
    if not curves:
        return None, None
    n = min(len(c["step"]) for c in curves)
    steps = np.asarray(curves[0]["step"][:n])
    vals = np.stack([np.asarray(c[key][:n], dtype=float) for c in curves])
    return steps, np.nanmean(vals, axis=0)


_LINESTYLES = ("-", "--", "-.", ":")


def _style(i: int) -> dict[str, Any]:
    """Distinct colour/line-style pairs for up to 40 methods."""
    return {"color": f"C{i % 10}", "linestyle": _LINESTYLES[(i // 10) % 4]}


def _finish(fig: Any, axes: Any, title: str, path: Path) -> None:
    """Legend outside the panels (right), title, save, close."""
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(title)
    if handles:
        fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize="small",
                   ncol=max(1, math.ceil(len(labels) / 24)), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


def _plots(st: Setting, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(st.tasks)
    T = len(tasks)
    written = []
    rows = list(st.rows.values())
    ncols = min(T, 4)
    nrows = math.ceil(T / ncols)
    for key, ylabel, fname in (("train_loss", "training loss", "train_loss"),
                               ("raw_grad_norm", "‖∇θ ℓ_t‖ (shared)", "grad_norm")):
        series = [(r, *_curve(r, key)) for r in rows]
        series = [s for s in series if s[1] is not None]
        if not series:
            continue
        fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), squeeze=False)
        for t, name in enumerate(tasks):
            ax = axes[t // ncols][t % ncols]
            for i, (r, steps, vals) in enumerate(series):
                ax.plot(steps, vals[:, t], label=r.label, **_style(i))
            if all(np.all(v[:, t][np.isfinite(v[:, t])] > 0) for _, _, v in series):
                ax.set_yscale("log")
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
        for k in range(T, nrows * ncols):
            axes[k // ncols][k % ncols].axis("off")
        path = out / f"{st.key}_{fname}.png"
        _finish(fig, axes, f"{st.benchmark}: {ylabel} (mean over seeds)", path)
        written.append(path)

    series = [(r, *_curve(r, "grad_cosine")) for r in rows]
    series = [s for s in series if s[1] is not None]
    if series and T > 1:
        pairs = [(i, j) for i in range(T) for j in range(i + 1, T)]
        per_pair = len(pairs) <= 6
        panels = pairs if per_pair else [None]
        nc = min(len(panels), 3)
        nr = math.ceil(len(panels) / nc)
        fig, axes = plt.subplots(nr, nc, figsize=(4 * nc, 3 * nr), squeeze=False)
        iu = np.triu_indices(T, 1)
        for k, pair in enumerate(panels):
            ax = axes[k // nc][k % nc]
            for i, (r, steps, vals) in enumerate(series):
                y = vals[:, pair[0], pair[1]] if pair else vals[:, iu[0], iu[1]].mean(axis=1)
                ax.plot(steps, y, label=r.label, **_style(i))
            ax.axhline(0.0, color="gray", lw=0.5)
            ax.set_title(f"{tasks[pair[0]]} vs {tasks[pair[1]]}" if pair else "mean over task pairs")
            ax.set_xlabel("step")
            ax.set_ylabel("cosine similarity")
        for k in range(len(panels), nr * nc):
            axes[k // nc][k % nc].axis("off")
        path = out / f"{st.key}_grad_cosine.png"
        _finish(fig, axes, f"{st.benchmark}: task gradient cosine similarity (mean over seeds)", path)
        written.append(path)
    path = _epoch_plot(st, rows, out)
    if path is not None:
        written.append(path)
    return written


def _epoch_plot(st: Setting, rows: Sequence[Row], out: Path) -> Optional[Path]:
    """``<setting>_epochs.png``: per epoch, mean over seeds, each multi-task row's validation Δp against
    the STL row's selected validation metrics (without STL: the runner's selection score, which is
    relative to each run's first epoch and so not comparable across rows) and, for rows trained with
    ``--test-curve``, its test Δp against STL's selected test metrics; each row's mean selected epoch
    is marked.  Shows how long each row keeps improving.  An epoch with a non-finite metric (a diverged
    run) is NaN in its run's curve and breaks the row's mean curve there."""
    import matplotlib.pyplot as plt

    hib = st.higher_is_better

    def dp(m: Mapping[str, Mapping[str, float]], ref: Mapping[str, Mapping[str, float]]) -> float:
        try:
            return delta_p(m, ref, hib)
        except ValueError:  # a NaN / inf metric
            return math.nan
    stl = st.stl
    if stl is not None:
        val_ref, test_ref = stl.mean_metrics(hib, "val"), stl.mean_metrics(hib)
    val, test = [], []
    for r in rows:
        if r.method == "stl":
            continue
        if stl is not None:
            val.append((r, [[dp(m, val_ref) for m in run["history"]["val"]] for run in r.runs]))
        else:
            val.append((r, [[math.nan if v is None else float(v) for v in run["history"]["selection_score"]]
                            for run in r.runs]))
        if stl is not None and r.runs and all(run["history"].get("test") for run in r.runs):
            test.append((r, [[dp(m, test_ref) for m in run["history"]["test"]] for run in r.runs]))
    if not val:
        return None
    vlabel = "validation Δp % vs STL" if stl is not None else "validation selection score (vs epoch 1)"
    panels = [(vlabel, val)] + ([("test Δp % vs STL (diagnostic)", test)] if test else [])
    order = sorted(st.rows.values(), key=lambda x: x.label)  # the same colour for a row in both panels
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for k, (ylabel, series) in enumerate(panels):
        ax = axes[0][k]
        for i, (r, curves) in enumerate(series):
            n = min(len(c) for c in curves)
            y = np.mean(np.asarray([c[:n] for c in curves], float), axis=0)  # NaN where a seed diverged
            style = _style(order.index(r))
            ax.plot(np.arange(1, n + 1), y, label=r.label, **style)
            sel = np.mean([max(run["selected_epoch"].values()) for run in r.runs])
            ax.plot([sel], [y[min(n, int(round(sel))) - 1]], marker="o", color=style["color"])
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        tails = [v for line in ax.get_lines() for v in line.get_ydata()[len(line.get_ydata()) // 5:]
                 if np.isfinite(v)]
        if tails:  # the first fifth (the climb from initialisation) would flatten the part that matters
            lo, hi = min(tails), max(tails)
            pad = 0.1 * (hi - lo) or 0.5
            ax.set_ylim(lo - pad, hi + pad)
    path = out / f"{st.key}_epochs.png"
    _finish(fig, axes, f"{st.benchmark}: per-epoch curves (mean over seeds; dot: mean selected epoch)", path)
    return path


def write_report(directory: os.PathLike, out: Optional[os.PathLike] = None, *, plots: bool = True,
                 skipped: Optional[list] = None, strict: bool = False) -> dict[str, Any]:
    """Writes ``report.md``, ``summary.csv``, ``runs.csv`` and the plots; returns paths and the markdown.

    JSON files that are not usable runs are left out (see :func:`load_results`):
    appended to ``skipped`` as ``(path, reason)`` when a list is given (else
    warned about) and listed as ``"skipped"`` in the returned dict.  With
    ``strict``, any such file raises :class:`BadResultFiles` and nothing is
    written.
    """
    bad: list[tuple[str, str]] = []
    records = load_results(directory, skipped=bad)
    if skipped is not None:
        skipped.extend(bad)
    elif not strict:
        import warnings

        for path, reason in bad:
            warnings.warn(f"skipped {path}: {reason}", UserWarning, stacklevel=2)
    if strict and bad:
        raise BadResultFiles(bad)
    settings = summarize(records)
    out_dir = Path(out) if out is not None else Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = render_markdown(settings)
    md_path = out_dir / "report.md"
    md_path.write_text(md + "\n")
    csvs = _write_csvs(settings, out_dir)
    figs: list[Path] = []
    if plots:
        for st in settings:
            figs += _plots(st, out_dir)
    return {"markdown": md, "report": md_path, "csv": csvs, "plots": figs, "settings": settings,
            "num_runs": len(records), "skipped": bad}
