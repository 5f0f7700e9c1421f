"""Mid-run checkpoints: a run stopped between epochs continues where it stopped.

A converged study has runs longer than a working session (a 5-seed QM9 row is
hours of one core), so the runner saves, at most every ``every_s`` seconds at
the end of an epoch, everything the rest of the run depends on: parameters,
model state and optimizer state (which holds every method's state, e.g.
DB-MTL's EMA and step count), the batch-order generator, the best epoch's
parameters, and the history so far.  Resuming replays nothing and draws the
same batches, so a resumed run gives the record an uninterrupted run gives
(timings aside): the tests check it bit for bit.

Files: ``<store>/<benchmark>/.partial/<run id>.ckpt.npz`` beside the record
they will become, deleted once the record is written.  One ``.npz`` holds
the arrays and a JSON ``meta`` entry (no pickle).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CHECKPOINT_FORMAT", "CheckpointMismatch", "Checkpoint", "checkpoint_path", "save_checkpoint",
           "load_checkpoint"]

CHECKPOINT_FORMAT = "dbmtl_jax.checkpoint/1"


class CheckpointMismatch(ValueError):
    """The checkpoint is not one of this run (another run id, or arrays of other shapes or types)."""


class Checkpoint(NamedTuple):
    """A loaded checkpoint: the ``(params, rest, opt_state)`` tree, the best-epoch snapshots
    (per selection group: ``{leaf index: array}`` or ``None``), and the loop's JSON state."""

    tree: Any
    snapshots: list[Optional[dict[int, np.ndarray]]]
    loop: dict[str, Any]


def checkpoint_path(record_path: os.PathLike) -> Path:
    """Where the checkpoint of the run whose record goes to ``record_path`` lives."""
    p = Path(record_path)
    name = p.name[: -len(".json.gz")] if p.name.endswith(".json.gz") else p.stem
    return p.parent / ".partial" / f"{name}.ckpt.npz"


def _plain(x: Any) -> Any:
    """JSON-able copy of nested containers of numpy / JAX values; floats stay floats (NaN and ±inf
    included, written as JSON's NaN / Infinity), so the loop state round-trips exactly."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    return x


def save_checkpoint(path: os.PathLike, *, run: str, tree: Any,
                    snapshots: Sequence[Optional[Mapping[int, np.ndarray]]], loop: Mapping[str, Any]) -> Path:
    """Writes the checkpoint atomically (a stopped writer leaves the previous one intact).

    ``run``: the run's id (its record file name), checked on load; ``loop``: JSON-able loop state.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    leaves = jax.device_get(jax.tree_util.tree_leaves(tree))
    arrays = {f"leaf{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    groups = []
    for g, snap in enumerate(snapshots):
        if snap is None:
            groups.append(None)
            continue
        groups.append(sorted(int(i) for i in snap))
        for i, a in snap.items():
            arrays[f"snap{g}_{int(i)}"] = np.asarray(a)
    meta = {"format": CHECKPOINT_FORMAT, "run": run, "leaves": len(leaves),
            "snapshot_groups": groups, "loop": _plain(loop)}
    arrays["meta"] = np.asarray(json.dumps(meta, allow_nan=True))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def _restore_leaf(template: Any, value: np.ndarray, i: int) -> Any:
    t = np.asarray(template)
    if value.shape != t.shape or value.dtype != t.dtype:
        raise CheckpointMismatch(f"leaf {i}: checkpoint has {value.dtype}{list(value.shape)}, "
                                 f"the run has {t.dtype}{list(t.shape)}.")
    if isinstance(template, jax.Array):
        if getattr(template, "weak_type", False) and value.ndim == 0:
            out = jnp.asarray(value.item())  # a Python scalar stays weakly typed: the same traced signature
            if out.dtype == t.dtype:
                return out
        return jnp.asarray(value)
    if isinstance(template, (bool, int, float)):
        return type(template)(value.item())
    return value


def load_checkpoint(path: os.PathLike, *, run: str, template: Any) -> Checkpoint:
    """Loads the checkpoint of run ``run`` onto the structure of ``template`` (the freshly initialised
    ``(params, rest, opt_state)``).  Raises :class:`CheckpointMismatch` if it is not this run's, or
    ``ValueError`` if the file is not a readable checkpoint."""
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
        meta = json.loads(str(files.pop("meta")))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a readable checkpoint ({e}).") from e
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatch(f"{path}: format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}.")
    if meta.get("run") != run:
        raise CheckpointMismatch(f"{path}: checkpoint of run {meta.get('run')!r}, not {run!r}.")
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if meta["leaves"] != len(leaves):
        raise CheckpointMismatch(f"{path}: {meta['leaves']} arrays, the run has {len(leaves)}.")
    restored = [_restore_leaf(t, files[f"leaf{i}"], i) for i, t in enumerate(leaves)]
    snaps: list[Optional[dict[int, np.ndarray]]] = []
    for g, idx in enumerate(meta["snapshot_groups"]):
        snaps.append(None if idx is None else {int(i): files[f"snap{g}_{int(i)}"] for i in idx})
    return Checkpoint(jax.tree_util.tree_unflatten(treedef, restored), snaps, meta["loop"])
