"""Converting and deduplicating run records: ``dbmtl-jax compact``.

* :func:`compact_directory` without a store rewrites every record of format
  ``dbmtl_jax.experiment/1`` (plain ``.json``) under a directory into the
  current format (``.json.gz``, :func:`~dbmtl_jax.experiments.train.compact_record`)
  in place and removes the ``.json`` file.  Nothing is rerun; tables are
  unchanged (metrics keep full precision).
* With ``store``, every record under the directory (either format) is moved
  into the store, ``<store>/<benchmark>/<run id>.json.gz``, each run once,
  and the folder it came from becomes a *study folder* whose ``runs.txt``
  lists it (the older layout ``<study>/<benchmark>/<file>`` gives
  ``<study>/runs.txt``).  Records of the same run (same benchmark, method,
  seed and config hash) found twice are merged (:func:`merge_records`).

A run is identified by its file name (``<benchmark>__<method>__seed<seed>__<hash>``);
two records of one run must agree on everything but their timings and
provenance, otherwise they conflict and are left where they are.

* Every record's config is restated under the current method defaults
  (:func:`~dbmtl_jax.experiments.train.upgrade_config`: a DB-MTL record from
  before its defaults were recorded names the σ it ran with), which can change
  its hash and file name.  Two records that thereby turn out to be the same
  configuration trained twice (e.g. ``beta=0.0`` and ``beta=0.0,
  beta_sigma=0.0``) are one run: the earlier is kept and the other's metrics,
  selected epochs and timings go to its ``reruns`` (``same_config``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from dbmtl_jax.experiments.data_summary import summary_difference
from dbmtl_jax.experiments.train import (
    LEGACY_SUFFIX,
    RESULT_SUFFIX,
    STUDY_INDEX,
    RunConfig,
    compact_record,
    config_hash,
    encode_record,
    read_record,
    read_study,
    record_files,
    run_id,
    upgrade_config,
    write_study,
)

__all__ = ["TIMING_KEYS", "RecordConflict", "merge_records", "CompactResult", "compact_directory"]

TIMING_KEYS = ("created", "versions", "device", "cpu_cores", "cpu_model", "allocator", "wall_time_s",
               "median_step_time_s", "first_step_time_s")
"""What two records of the same run may differ in (with ``history.epoch_time_s``): when and where it ran."""


class RecordConflict(ValueError):
    """Two records of the same run differ in more than their timings and provenance."""


def _numbers(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A compacted record without timings, provenance, ``reruns`` and the data summary (compared on its own,
    within its tolerance): what must agree exactly."""
    out = {k: v for k, v in rec.items() if k not in TIMING_KEYS and k not in ("reruns", "_path", "data_summary")}
    if isinstance(out.get("history"), dict):
        out["history"] = {k: v for k, v in out["history"].items() if k != "epoch_time_s"}
    return out


def _timing(rec: Mapping[str, Any], source: Optional[str]) -> dict[str, Any]:
    entry = {k: rec.get(k) for k in TIMING_KEYS}
    entry["epoch_time_s"] = (rec.get("history") or {}).get("epoch_time_s")
    if source is not None:
        entry["source"] = source
    return entry


def _same_timing(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in (*TIMING_KEYS, "epoch_time_s"))


def merge_records(a: Mapping[str, Any], b: Mapping[str, Any], *, a_source: Optional[str] = None,
                  b_source: Optional[str] = None) -> dict[str, Any]:
    """One record from two records of the same run (compacted, current format).

    Identical records (copies) give the record.  Records that differ only in
    :data:`TIMING_KEYS` and ``history.epoch_time_s`` (the same run trained
    twice, deterministically) give the earlier one (by ``created``) with the
    other's timings, versions, device, creation time and ``source`` file
    appended to ``reruns``; nothing is lost.  Their data summaries must agree
    within :func:`~dbmtl_jax.experiments.data_summary.summary_difference`'s
    tolerance (a record without one, from before summaries, takes the other's).
    Anything else raises :class:`RecordConflict`.
    """
    a, b = compact_record(a), compact_record(b)
    a.pop("_path", None)
    b.pop("_path", None)
    run = f"two records of the run {a.get('benchmark')}/{a.get('method')}/seed {a.get('seed')}/{a.get('config_hash')}"
    if _numbers(a) != _numbers(b):
        keys = sorted(k for k in set(_numbers(a)) | set(_numbers(b)) if _numbers(a).get(k) != _numbers(b).get(k))
        raise RecordConflict(f"{run} differ in {keys} (not only in timings).")
    if a.get("data_summary") is not None and b.get("data_summary") is not None:
        diff = summary_difference(a["data_summary"], b["data_summary"], labels=("in one", "in the other"))
        if diff is not None:
            raise RecordConflict(f"{run} were made from other data ({diff}).")
    first, second = (a, b) if str(a.get("created")) <= str(b.get("created")) else (b, a)
    first_source, second_source = (a_source, b_source) if first is a else (b_source, a_source)
    entries = [*(a.get("reruns") or []), *(b.get("reruns") or [])]
    if not _same_timing(_timing(first, None), _timing(second, None)):
        entries.append(_timing(second, second_source))
    out = {k: v for k, v in first.items() if k != "reruns"}
    if out.get("data_summary") is None and second.get("data_summary") is not None:  # an older record has none
        out["data_summary"] = second["data_summary"]
    kept: list[dict[str, Any]] = []
    for e in sorted(entries, key=lambda e: str(e.get("created"))):
        if not _same_timing(e, _timing(first, first_source)) and not any(_same_timing(e, k) for k in kept):
            kept.append(e)
    if kept:
        out["reruns"] = kept
    return out


@dataclasses.dataclass
class CompactResult:
    """What :func:`compact_directory` did (paths as strings)."""

    converted: list[str] = dataclasses.field(default_factory=list)  # format /1 files rewritten as .json.gz
    moved: list[str] = dataclasses.field(default_factory=list)  # records moved into the store
    copies: list[str] = dataclasses.field(default_factory=list)  # identical copies of a stored run, removed
    reruns: list[str] = dataclasses.field(default_factory=list)  # same run trained again: merged into `reruns`
    upgraded: list[str] = dataclasses.field(default_factory=list)  # config restated under current defaults
    same_config: list[str] = dataclasses.field(default_factory=list)  # same configuration trained twice: merged
    conflicts: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # left in place, with the reason
    not_records: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # left in place, with the reason
    studies: list[str] = dataclasses.field(default_factory=list)  # runs.txt files written or updated
    bytes_before: int = 0
    bytes_after: int = 0


def _within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _stem(path: Path) -> str:
    return record_files(path)[0].name[: -len(RESULT_SUFFIX)]


def upgrade_record(rec: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """``rec`` with its config restated under the current defaults and the hash to match; ``None``: unchanged."""
    config = upgrade_config(rec["config"])
    if config == rec["config"]:
        return None
    return {**rec, "config": config, "config_hash": config_hash(RunConfig(**config))}


def merge_same_config(kept: Mapping[str, Any], other: Mapping[str, Any], *, source: Optional[str]) -> dict[str, Any]:
    """``kept`` with ``other`` (the same configuration, trained separately) summarised in its ``reruns``."""
    entry = _timing(compact_record(other), source)
    entry.update(same_config=True, metrics=other.get("metrics"), selected_epoch=other.get("selected_epoch"))
    return {**kept, "reruns": [*(kept.get("reruns") or []), entry]}


def _record_files(root: Path) -> list[Path]:
    return sorted(p for suffix in (LEGACY_SUFFIX, RESULT_SUFFIX) for p in root.rglob("*" + suffix) if p.is_file())


def _relpath(path: Path, start: Path) -> str:
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(start))).as_posix()


def compact_directory(directory: os.PathLike, *, store: Optional[os.PathLike] = None, dry_run: bool = False,
                      echo: Optional[Callable[[str], None]] = None) -> CompactResult:
    """Converts (and, with ``store``, deduplicates into the store) every record under ``directory``.

    See the module docstring.  Files that are not run records are left alone
    and listed in ``not_records``; a record of a run that conflicts with the
    one kept is left alone and listed in ``conflicts``.  Every ``runs.txt``
    under ``directory`` is updated to the new file names.  The store's own
    records are kept where they are (converted when older).  ``dry_run``:
    compute and report, change nothing.
    """
    from dbmtl_jax.experiments.report import check_record

    root = Path(directory)
    store_dir = Path(store) if store is not None else None
    res = CompactResult()

    def in_store(f: Path) -> bool:
        return store_dir is not None and _within(f, store_dir)

    files = _record_files(root)
    if store_dir is not None and store_dir.is_dir() and not _within(store_dir, root):
        files += _record_files(store_dir)
    records = []
    for f in files:
        try:
            rec = read_record(f)
        except (OSError, ValueError) as e:
            res.not_records.append((str(f), f"cannot be read as a record ({e})"))
            continue
        problem = check_record(rec)
        if problem:
            res.not_records.append((str(f), problem))
            continue
        res.bytes_before += f.stat().st_size
        records.append((f, rec))
    records.sort(key=lambda fr: (not in_store(fr[0]), str(fr[0])))  # the store's own records first

    kept: dict[Path, tuple[dict[str, Any], Optional[str]]] = {}  # target file -> (record, its source)
    first_hashes: dict[Path, Optional[str]] = {}  # target file -> config hash its first record was written with
    moved: dict[Path, Path] = {}  # absolute old file -> target file holding its run now
    members: dict[Path, set[Path]] = {}  # study folder -> target files to list
    for f, rec in records:
        rel = _relpath(f, root)
        stem = _stem(f)
        first_hash = rec.get("config_hash")  # before any restating: one run's records share it
        upgraded = upgrade_record(rec)
        if upgraded is not None:
            rec = upgraded
            stem = run_id(RunConfig(**rec["config"]), rec["seed"])
            res.upgraded.append(str(f))
        if store_dir is None or in_store(f):
            target = record_files(f)[0].with_name(stem + RESULT_SUFFIX)
        else:
            target = store_dir / rec["benchmark"] / (stem + RESULT_SUFFIX)
        target = Path(os.path.abspath(target))
        if target in kept:
            prev, prev_source = kept[target]
            try:
                merged = merge_records(prev, rec, a_source=prev_source, b_source=rel)
            except RecordConflict as e:
                if prev["config"] != rec["config"] or first_hashes[target] == first_hash:
                    res.conflicts.append((str(f), str(e)))
                    continue
                # The same configuration trained twice (two spellings before the upgrade): keep the earlier.
                if str(prev.get("created")) <= str(rec.get("created")):
                    kept[target] = (merge_same_config(prev, rec, source=rel), prev_source)
                else:
                    first = compact_record(rec)
                    first.pop("_path", None)
                    kept[target] = (merge_same_config(first, prev, source=prev_source), rel)
                res.same_config.append(str(f))
            else:
                same = _same_timing(_timing(prev, None), _timing(compact_record(rec), None))
                (res.copies if same else res.reruns).append(str(f))
                kept[target] = (merged, prev_source if merged.get("created") == prev.get("created") else rel)
        else:
            compacted = compact_record(rec)
            compacted.pop("_path", None)
            kept[target] = (compacted, rel)
            first_hashes[target] = first_hash
            if rec.get("format") != compacted["format"] or f.name.endswith(LEGACY_SUFFIX):
                res.converted.append(str(f))
        if Path(os.path.abspath(f)) != target:
            moved[Path(os.path.abspath(f))] = target
            if store_dir is not None and not in_store(f):
                res.moved.append(str(f))
        if store_dir is not None and not in_store(f):
            study = f.parent.parent if f.parent.name == rec["benchmark"] else f.parent
            members.setdefault(study if _within(study, root) else root, set()).add(target)

    # study indices: the new memberships, and entries whose file moved or changed format
    indices: dict[Path, list[str]] = {}
    for study in sorted({p.parent for p in root.rglob(STUDY_INDEX)} | set(members)):
        old = read_study(study)
        entries = set(_relpath(t, study) for t in members.get(study, ()))
        for e in old:
            hits = [moved.get(Path(os.path.abspath(c))) for c in record_files(study / e)]
            target = next((t for t in hits if t is not None), None)
            entries.add(_relpath(target, study) if target is not None else e)
        if sorted(entries) != sorted(set(old)) or not (study / STUDY_INDEX).exists():
            indices[study] = sorted(entries)

    writes = {t: encode_record(r) for t, (r, _) in kept.items()}
    writes = {t: b for t, b in writes.items() if not t.is_file() or t.read_bytes() != b}
    res.bytes_after = sum(len(b) if t in writes else t.stat().st_size for t, b in
                          ((t, writes.get(t)) for t in kept))
    res.studies = [str(s / STUDY_INDEX) for s in indices]
    if not dry_run:
        for t, data in sorted(writes.items()):
            t.parent.mkdir(parents=True, exist_ok=True)
            tmp = t.with_name(t.name + f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, t)
        for f in sorted(moved):
            if f not in kept and f.exists():
                f.unlink()
        for study, entries in indices.items():
            write_study(study, entries)
        for d in sorted({p for f in moved for p in f.parents if _within(p, root)}, key=lambda p: -len(p.parts)):
            if d != Path(os.path.abspath(root)) and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    if echo is not None:
        for f, reason in res.conflicts:
            echo(f"conflict, left in place: {f}: {reason}")
        for f, reason in res.not_records:
            echo(f"not a run record, left in place: {f}: {reason}")
    return res
