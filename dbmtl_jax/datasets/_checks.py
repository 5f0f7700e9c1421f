"""Argument checks shared by the dataset loaders."""

from __future__ import annotations

import numpy as np


def check_int(name: str, value: object, least: int = 1) -> int:
    """``value`` as a Python int ``>= least``, else a ``ValueError`` naming ``name``.

    A bool (which would count as 0 or 1), a float (truncated by ``int``, slicing or ``range``: 2.5 read 3 items)
    and a string are refused; a NumPy integer becomes the plain int, so it keys a cache as that int does.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}.")
    return int(value)
