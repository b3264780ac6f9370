"""Each rank's random generators (Python's, NumPy's, torch's CPU and CUDA ones), saved in
every checkpoint and restored on resume, so that dropout and any other global draw
continue where they stopped.

The file lies on a shared volume, and every rank reads it at resume: unpickled in full,
a file someone swapped in would run their code on all of them. So it is read with
`torch.load(weights_only=True)` and holds only what that loader builds on its own:
tensors, tuples, ints, floats, strings. A file of an older checkpoint format (manifest
`format` 1) holds NumPy's key as an ndarray; it is read with exactly the NumPy globals
that one ndarray needs allowed, and nothing else.

CUDA's generator is saved for the rank's own device alone: the next run may give its
pods another number of devices (2 nodes x 8 GPUs resumed as 4 x 4), and a state per
visible device would not fit there, or would fail the load of a sound checkpoint.
"""

from __future__ import annotations

import logging
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

try:  # NumPy 2 (importing numpy.core there warns)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # NumPy 1.x (numpy>=1.26 is allowed) has only numpy.core
    from numpy.core.multiarray import _reconstruct

# What rebuilds a uint32 ndarray from its pickle, and nothing more. A file names
# _reconstruct by the module path of the NumPy that wrote it, whichever NumPy reads it.
LEGACY_NUMPY_GLOBALS = [(_reconstruct, "numpy._core.multiarray._reconstruct"),
                        (_reconstruct, "numpy.core.multiarray._reconstruct"),
                        np.ndarray, np.dtype, np.dtypes.UInt32DType]


class UnsafeRngFile(ValueError):
    """The file holds something besides generator state: not unpickled."""


def file_name(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def current_state(device: torch.device) -> dict[str, Any]:
    """`device`: the rank's own (Runtime.device); on a CUDA one its generator is saved too."""
    name, key, *position = np.random.get_state()
    state = {"python": random.getstate(),
             # The 624 uint32 words as int64: a tensor, not an ndarray the loader would have to allow.
             "numpy": (name, torch.from_numpy(key.astype(np.int64)), *position),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        # Not get_rng_state_all: that also starts a context on every other device the pod sees.
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def cuda_state(saved: torch.Tensor | list[torch.Tensor] | None, device: torch.device) -> torch.Tensor | None:
    """The CUDA generator state to restore on `device`, if any. Format 2 saved the
    rank's own device's state; format 1 a list, one per device the saving pod saw, in
    which the rank's own was at its local device index. A list too short for this
    pod's layout (fewer devices per pod then) restores none: the generator starts from
    the step's seeds, and the checkpoint still loads."""
    if saved is None or device.type != "cuda":
        return None
    if isinstance(saved, torch.Tensor):
        return saved
    index = device.index or 0
    if index < len(saved):
        return saved[index]
    log.warning("the checkpoint's CUDA generator states cover %d device(s), this rank runs on device %d: "
                "its CUDA generator is not restored (the pods had fewer devices each when it was saved)",
                len(saved), index)
    return None


def restore(state: dict[str, Any], device: torch.device) -> None:
    """Either format: NumPy's key as a tensor or (format 1) as an ndarray; CUDA's as
    cuda_state picks it for `device`, the rank's own."""
    random.setstate(state["python"])
    name, key, *position = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *position))
    torch.set_rng_state(state["torch"])
    cuda = cuda_state(state.get("cuda"), device)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def save(path: Path, device: torch.device) -> None:
    torch.save(current_state(device), path)


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
