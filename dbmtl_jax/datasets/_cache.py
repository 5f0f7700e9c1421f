"""Private helpers shared by the offline loaders: cached ``.npz`` artefacts,
package-file lookup and error messages.

Cache files live in :func:`cache_dir` (``$DBMTL_JAX_CACHE``,
else ``$XDG_CACHE_HOME/dbmtl_jax``, else ``~/.cache/dbmtl_jax``) under one
sub-folder per data set.  A file's name carries a hash of everything that
determines its content (loader version, options, source file sizes), so
changing an option never reads a stale artefact.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

__all__ = ["DatasetUnavailableError", "artefact_path", "cache_dir", "file_digest", "load_artefact", "package_file",
           "save_artefact", "unavailable"]


class DatasetUnavailableError(FileNotFoundError):
    """A data set's files are missing (or a shipped copy is corrupt); the message says how to provide them."""


def cache_dir() -> Path:
    """``$DBMTL_JAX_CACHE``, else ``$XDG_CACHE_HOME/dbmtl_jax``, else ``~/.cache/dbmtl_jax``."""
    env = os.environ.get("DBMTL_JAX_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "dbmtl_jax"
    return Path.home() / ".cache" / "dbmtl_jax"


def unavailable(dataset: str, reason: str, how: str) -> DatasetUnavailableError:
    """A :class:`DatasetUnavailableError` whose message says what is missing and how to provide it."""
    return DatasetUnavailableError(f"{dataset} data unavailable: {reason}\n{how}")


def artefact_path(dataset: str, key: Mapping[str, Any], root: Optional[Path] = None) -> Path:
    """``<cache>/<dataset>/<dataset>-<hash of key>.npz``; ``key`` must be JSON-serialisable."""
    blob = json.dumps(dict(key), sort_keys=True, default=str).encode()
    digest = hashlib.sha256(blob).hexdigest()[:16]
    base = cache_dir() if root is None else Path(root)
    return base / dataset / f"{dataset}-{digest}.npz"


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (hex), read in 1 MiB blocks: a cache key part that changes with the content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_artefact(path: Path, arrays: Mapping[str, np.ndarray]) -> bool:
    """Writes ``arrays`` to ``path`` atomically (temp file + rename); returns False if the cache is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # concurrent writers never expose a partial file
        return True
    except OSError:
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_artefact(path: Path) -> Optional[dict[str, np.ndarray]]:
    """The arrays of a cached ``.npz``, or None if it is missing or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def package_file(distribution: str, suffix: str) -> Optional[Path]:
    """The installed file of ``distribution`` whose path ends with ``suffix`` (read via
    ``importlib.metadata``, never by importing the package), or None."""
    try:
        files = importlib.metadata.files(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files or ():
        if str(f).replace("\\", "/").endswith(suffix):
            p = Path(f.locate())
            if p.is_file():
                return p
    return None
