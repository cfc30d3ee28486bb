"""Arrays built once and kept as an .npz file, so that every later process just reads them.

In deployment every round starts fresh ClientApp processes; parsing or generating a dataset
again in each of them costs seconds per client per round.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np


def cached_arrays(path: Path, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays stored at `path`, or `build()`'s, written there first (atomically: clients
    starting at the same time never read half a file)."""
    if path.is_file():
        with np.load(path) as cached:
            return {name: cached[name] for name in cached.files}
    arrays = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return arrays
