"""What DeepSpeed's own checkpoint files may name when they are unpickled.

DeepSpeed loads its shards (`mp_rank_*_model_states.pt`, `*_optim_states.pt`, and a
universal conversion's `zero/optimizer_state.pt` and per-parameter files) with
`torch.load(weights_only=False)`: a full unpickle, which runs whatever the pickle names.
The checkpoint folder lies on a shared volume that others may write, so before any of
it is loaded every such file's pickle is read as opcodes, never executed
(`torch.serialization.get_unsafe_globals_in_checkpoint`), and a file that names anything
beyond what torch's weights-only loader builds by itself and the few DeepSpeed classes
below makes its checkpoint one that does not load. The loads themselves then run with
torch forced to its weights-only loader, those classes allowed: a file swapped in
between the check and the load fails to load, it does not run.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# Beyond what torch.load(weights_only=True) builds by itself (tensors, storages, dicts,
# OrderedDict, torch.Size, lists, numbers, strings), the globals DeepSpeed 0.19's saves
# hold, found by saving real checkpoints with the trainer on the tiny model (ZeRO 0, 1,
# 2 and 3; bf16, fp32 and fp16; LoRA and DoRA; torch's Adam and DeepSpeed's CPU Adam;
# the universal conversion of each). ZeRO 0 in bf16 or fp32 saves none of them.
DEEPSPEED_GLOBALS = (
    # ZeRO 1-3 optimizer state "loss_scaler" (bf16/fp32: static scale 1), also in a
    # universal conversion's zero/optimizer_state.pt.
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    # The same key under fp16 (dynamic loss scaling), at every ZeRO stage.
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    # ZeRO 1-3 optimizer state "zero_stage", also in zero/optimizer_state.pt.
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    # ZeRO 1-2 optimizer state "param_slice_mappings": where each parameter lies in the flat partition.
    "deepspeed.utils.tensor_fragment.fragment_address",
)

# The trainer's own generator files, read by rng.read with the weights-only loader;
# DeepSpeed never opens them.
OWN_FILES = "rng-rank*.pt"


class UnexpectedGlobals(ValueError):
    """A DeepSpeed file of the checkpoint names globals outside DEEPSPEED_GLOBALS: not loaded."""


def deepspeed_files(folder: Path) -> list[Path]:
    """Every file DeepSpeed may unpickle when it loads `folder`: all of them end in .pt
    (its model, optimizer and universal per-parameter files), at any depth."""
    return sorted(path for path in folder.rglob("*.pt") if path.is_file() and not path.match(OWN_FILES))


def unexpected_globals(path: Path) -> list[str]:
    """The globals `path`'s pickle names that neither torch's weights-only loader nor
    DEEPSPEED_GLOBALS allow, sorted. Reads only the pickle record (data.pkl), not the
    tensor data. A file it cannot read that way (not a torch.save zip, or an opcode the
    weights-only loader refuses) raises UnexpectedGlobals too: only that loader's subset of
    pickle is checked, and anything outside it could name globals the reader cannot see."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as error:  # zip, pickle and record errors vary by torch version
        raise UnexpectedGlobals(f"{path} is not a checkpoint file as DeepSpeed writes it ({error}); "
                                "it was not unpickled") from None
    return sorted(set(found) - set(DEEPSPEED_GLOBALS))


def check(folder: Path) -> None:
    """Raises UnexpectedGlobals for the first DeepSpeed file of `folder` whose pickle
    names a global DeepSpeed's own saves never hold, before anything unpickles it."""
    for path in deepspeed_files(folder):
        names = unexpected_globals(path)
        if names:
            raise UnexpectedGlobals(
                f"{path} names {', '.join(names)}, which DeepSpeed's own checkpoints never hold; it was not "
                "unpickled, since that could run code someone put on the volume")


def _resolved(name: str) -> object:
    module, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


# torch reads both on each torch.load; the first overrides even an explicit weights_only=False.
FORCE_WEIGHTS_ONLY, FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside, DeepSpeed's weights_only=False ones included, runs torch's
    weights-only loader with DEEPSPEED_GLOBALS allowed."""
    previous = {name: os.environ.pop(name, None) for name in (FORCE_WEIGHTS_ONLY, FORCE_NO_WEIGHTS_ONLY)}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"  # with both set, torch refuses every load
    try:
        with torch.serialization.safe_globals([_resolved(name) for name in DEEPSPEED_GLOBALS]):
            yield
    finally:
        for name, value in previous.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
