"""Checkpoints on the shared volume: `step-NNNNNNNN/` folders, a manifest written last,
and a `latest` pointer replaced atomically. Only complete checkpoints are resumed.

Every rank writes its own shards (DeepSpeed) and RNG state; rank 0 then lists the
folder into `manifest.json`, swaps `latest`, and applies retention. Ranks of several
nodes may share one folder (a ReadWriteMany volume): only rank 0 writes shared files.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import CheckpointConfig, ConfigError
from trainer.distributed import Runtime, barrier

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
STEP_PREFIX = "step-"
# Keys of the trainer state stored beside DeepSpeed's own.
STEP_KEY = "step"
MICRO_STEP_KEY = "micro_step"
SAMPLES_KEY = "samples"


def step_folder_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class Manifest:
    step: int
    world_size: int
    zero_stage: int
    files: dict[str, int]  # relative path -> size in bytes

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        raw = json.loads((folder / MANIFEST).read_text())
        return cls(step=raw["step"], world_size=raw["world_size"], zero_stage=raw["zero_stage"], files=raw["files"])

    def problems(self, folder: Path) -> list[str]:
        found = []
        for name, size in self.files.items():
            path = folder / name
            if not path.is_file():
                found.append(f"{name} is missing")
            elif path.stat().st_size != size:
                found.append(f"{name} has {path.stat().st_size} bytes, the manifest says {size}")
        return found


def list_files(folder: Path) -> dict[str, int]:
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST and not path.name.startswith(".")
    }


def save(engine, config: CheckpointConfig, runtime: Runtime, *, step: int, state: dict[str, Any], zero_stage: int) -> Path:
    """Collective: every rank calls it at the same step."""
    tag = step_folder_name(step)
    folder = config.dir / tag
    config.dir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(config.dir), tag=tag, client_state=state, save_latest=False)
    torch.save(rng_state(), folder / f"rng-rank{runtime.rank:05d}.pt")
    barrier()
    if runtime.is_main:
        manifest = {"step": step, "world_size": runtime.world_size, "zero_stage": zero_stage,
                    "time": time.time(), "files": list_files(folder)}
        write_atomically(folder / MANIFEST, json.dumps(manifest, indent=1))
        write_atomically(config.dir / LATEST, tag)
        apply_retention(config.dir, keep_last=config.keep_last, in_use=tag)
    barrier()
    return folder


def complete_checkpoints(directory: Path) -> list[Path]:
    """Step folders with a manifest, newest first."""
    if not directory.is_dir():
        return []
    folders = [path for path in directory.iterdir() if path.is_dir() and path.name.startswith(STEP_PREFIX)]
    return sorted((path for path in folders if (path / MANIFEST).is_file()), key=lambda path: path.name, reverse=True)


def apply_retention(directory: Path, *, keep_last: int, in_use: str) -> None:
    for folder in complete_checkpoints(directory)[keep_last:]:
        if folder.name != in_use:
            shutil.rmtree(folder, ignore_errors=True)


def verified(folder: Path) -> Manifest | None:
    try:
        manifest = Manifest.read(folder)
    except (OSError, ValueError, KeyError) as error:
        log.warning("checkpoint %s skipped: unreadable manifest (%s)", folder, error)
        return None
    problems = manifest.problems(folder)
    if problems:
        log.warning("checkpoint %s skipped: %s", folder, "; ".join(problems))
        return None
    return manifest


def find_resume_point(config: CheckpointConfig) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start."""
    if config.resume == "never":
        return None
    if config.resume != "auto":
        folder = Path(config.resume)
        if verified(folder) is None:
            raise ConfigError(f"checkpoint.resume = {config.resume!r}: not a complete checkpoint folder (no valid manifest)")
        return folder
    candidates = complete_checkpoints(config.dir)
    pointer = config.dir / LATEST
    if pointer.is_file():
        named = config.dir / pointer.read_text().strip()
        # `latest` first, then older ones: a newer folder without the pointer swap is suspect.
        candidates = [named] + [path for path in candidates if path.name < named.name]
    for folder in candidates:
        if verified(folder) is not None:
            return folder
    return None


def load(engine, folder: Path, runtime: Runtime) -> dict[str, Any]:
    manifest = Manifest.read(folder)
    if manifest.world_size != runtime.world_size:
        raise ConfigError(
            f"checkpoint {folder} was written by {manifest.world_size} processes, this run has {runtime.world_size}; "
            "resume with the same nodes x processes, or set checkpoint.resume=never to start over"
        )
    _, state = engine.load_checkpoint(
        str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if state is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {folder}")
    rng_file = folder / f"rng-rank{runtime.rank:05d}.pt"
    if rng_file.is_file():
        restore_rng_state(torch.load(rng_file, weights_only=False))
    return state
