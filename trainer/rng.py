"""Each rank's random generators (Python's, NumPy's, torch's CPU and CUDA ones), saved in
every checkpoint and restored on resume, so that dropout and any other global draw
continue where they stopped.

The file lies on a shared volume, and every rank reads it at resume: unpickled in full,
a file someone swapped in would run their code on all of them. So it is read with
`torch.load(weights_only=True)` and holds only what that loader builds on its own:
tensors, tuples, ints, floats, strings. A file of an older checkpoint format (manifest
`format` 1) holds NumPy's key as an ndarray; it is read with exactly the NumPy globals
that one ndarray needs allowed, and nothing else.
"""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

# What rebuilds a uint32 ndarray from its pickle, and nothing more; the second name of
# _reconstruct is where NumPy 1.x files (numpy>=1.26 is allowed) find it.
LEGACY_NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType,
                        (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]


class UnsafeRngFile(ValueError):
    """The file holds something besides generator state: not unpickled."""


def file_name(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def current_state() -> dict[str, Any]:
    name, key, *position = np.random.get_state()
    state = {"python": random.getstate(),
             # The 624 uint32 words as int64: a tensor, not an ndarray the loader would have to allow.
             "numpy": (name, torch.from_numpy(key.astype(np.int64)), *position),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Either format: NumPy's key as a tensor or (format 1) as an ndarray."""
    random.setstate(state["python"])
    name, key, *position = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *position))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path) -> None:
    torch.save(current_state(), path)


def read(path: Path, *, legacy: bool = False) -> dict[str, Any]:
    """The state in `path`, unpickled only as far as plain data goes. `legacy`: the
    checkpoint's manifest says format 1 (NumPy's key pickled as an ndarray)."""
    try:
        with torch.serialization.safe_globals(LEGACY_NUMPY_GLOBALS if legacy else []):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message ends in advice to load with weights_only=False: exactly what must not happen here.
        named = re.search(r"Unsupported global: GLOBAL (\S+)|but got (<[^>]+>)", str(error))
        what = next((group for group in named.groups() if group), None) if named else None
        raise UnsafeRngFile(
            f"{path} is not generator state as this trainer writes it ({f'it names {what}' if what else 'unsafe pickle'}); "
            "it was not unpickled, since that could run code someone put on the volume"
        ) from None
