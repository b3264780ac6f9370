"""Checkpoints on the shared volume: `step-NNNNNNNN/` folders, a manifest written last,
and a `latest` pointer replaced atomically. Only complete checkpoints are resumed.

Every rank writes its own shards (DeepSpeed) and RNG state; rank 0 then lists the
folder into `manifest.json`, swaps `latest`, and applies retention. Ranks of several
nodes may share one folder (a ReadWriteMany volume): only rank 0 writes shared files.

Beside the step folders, never resumed from or counted by retention: `diverged-step-N/`
(a checkpoint whose weights gave a NaN loss, kept for a look) and, for the moment of a
resume at another world size, `universal-step-N/` (its DeepSpeed universal conversion).
What a manifest holds, and which checkpoints this run may load, is manifest.py's.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator


from trainer import atomic, rng, shard_globals
from trainer.config import CheckpointConfig, ConfigError, LoraConfig
from trainer.contract import STEP_PREFIX, step_folder_name
from trainer.distributed import Runtime, barrier
from trainer.manifest import (
    MANIFEST,
    Manifest,
    TrainingShape,
    check_compatible,
    list_files,
    needs_universal,
    read_complete,
)

log = logging.getLogger(__name__)

LATEST = "latest"
# Keys of the trainer state stored beside DeepSpeed's own.
STEP_KEY = "step"
MICRO_STEP_KEY = "micro_step"
SAMPLES_KEY = "samples"
RECIPE_KEY = "recipe"  # the config keys that shape what a step computes, as the run that saved it had them


def save(engine, config: CheckpointConfig, runtime: Runtime, *, step: int, state: dict[str, Any],
         lora: LoraConfig | None = None) -> Path:
    """Collective: every rank calls it at the same step. A LoRA run saves only the
    adapters (MBs instead of GBs): the frozen base weights come from model.source again."""
    tag = step_folder_name(step)
    folder = config.dir / tag
    config.dir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(config.dir), tag=tag, client_state=state, save_latest=False,
                           exclude_frozen_parameters=lora is not None and lora.enabled)
    rng.save(folder / rng.file_name(runtime.rank), runtime.device)
    barrier()
    if runtime.is_main:
        # The totals let a restarted run's metrics start where this one left off (metrics.checkpoint_hint).
        Manifest(step=step, shape=TrainingShape.of(engine, runtime, lora), files=list_files(folder),
                 samples=state.get(SAMPLES_KEY, 0), skipped_steps=int(getattr(engine, "skipped_steps", 0)),
                 time=time.time()).write(folder)
        atomic.write_text(config.dir / LATEST, tag)
        apply_retention(config.dir, keep_last=config.keep_last, in_use=tag)
    barrier()
    return folder


def complete_checkpoints(directory: Path) -> list[Path]:
    """Step folders with a manifest, newest first."""
    if not directory.is_dir():
        return []
    folders = [path for path in directory.iterdir() if path.is_dir() and path.name.startswith(STEP_PREFIX)]
    return sorted((path for path in folders if (path / MANIFEST).is_file()), key=lambda path: path.name, reverse=True)


def remove_incomplete(directory: Path) -> list[Path]:
    """Step folders without a manifest, left by a run that died while writing them:
    removed at start (rank 0, before anyone saves) so no stale shard joins a new
    checkpoint of the same step."""
    if not directory.is_dir():
        return []
    stale = [path for path in directory.iterdir()
             if path.is_dir() and path.name.startswith(STEP_PREFIX) and not (path / MANIFEST).exists()]
    for folder in stale:
        log.warning("removing incomplete checkpoint %s", folder)
        shutil.rmtree(folder, ignore_errors=True)
    return stale


DIVERGED_PREFIX = "diverged-"


def retract(directory: Path, step: int) -> Path | None:
    """The checkpoint of `step`, whose weights turned out to give a NaN or infinite
    loss: renamed to `diverged-step-...` (kept for inspection; never resumed from, never
    counted by retention), and `latest` moved back to the newest complete checkpoint
    (removed when there is none). Returns the new `latest` folder, or None."""
    folder = directory / step_folder_name(step)
    if folder.is_dir():
        os.replace(folder, directory / f"{DIVERGED_PREFIX}{folder.name}")
    remaining = complete_checkpoints(directory)
    pointer = directory / LATEST
    if remaining:
        atomic.write_text(pointer, remaining[0].name)
        return remaining[0]
    pointer.unlink(missing_ok=True)
    return None


def apply_retention(directory: Path, *, keep_last: int, in_use: str) -> None:
    for folder in complete_checkpoints(directory)[keep_last:]:
        if folder.name != in_use:
            shutil.rmtree(folder, ignore_errors=True)


def verified(folder: Path) -> Manifest | None:
    manifest, problem = read_complete(folder)
    if problem is not None:
        log.warning("checkpoint %s skipped: %s", folder, problem)
    return manifest


def named_resume_point(config: CheckpointConfig) -> Path:
    """The folder checkpoint.resume names (neither auto nor never), refused unless complete."""
    folder = Path(config.resume)
    _, problem = read_complete(folder)
    if problem is not None:
        raise ConfigError(f"checkpoint.resume = {config.resume!r}: not a complete checkpoint folder: {problem}; "
                          "name a step-NNNNNNNN folder of checkpoint.dir, or set auto (the latest complete one) "
                          "or never (start over)")
    return folder


def _candidates_in_order(config: CheckpointConfig) -> list[Path]:
    """Checkpoints to try, best first, not yet verified: the one `latest` names, then
    older complete ones (a newer folder that `latest` does not name was never finished)."""
    if config.resume == "never":
        return []
    if config.resume != "auto":
        return [named_resume_point(config)]
    candidates = complete_checkpoints(config.dir)
    named = latest_pointed_to(config.dir)
    if named is not None:
        candidates = [named] + [path for path in candidates if path.name < named.name]
    return candidates


def latest_pointed_to(directory: Path) -> Path | None:
    """The step folder `latest` names, not yet verified; None without a pointer. A
    pointer that names anything but a step folder of `directory` is ignored, warned."""
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    named = directory / pointer.read_text().strip()
    if named.parent != directory or not named.name.startswith(STEP_PREFIX):
        log.warning("checkpoint pointer %s names %r, which is not a step folder; ignored", pointer, named.name)
        return None
    return named


def each_resume_candidate(config: CheckpointConfig) -> Iterator[Path]:
    """resume_candidates, each verified only when it is reached."""
    return (folder for folder in _candidates_in_order(config) if verified(folder) is not None)


def resume_candidates(config: CheckpointConfig) -> list[Path]:
    """The checkpoints to try whose files match their manifest, best first. Empty: start fresh."""
    return list(each_resume_candidate(config))


def find_resume_point(config: CheckpointConfig) -> Path | None:
    """The first of resume_candidates; only the folders up to it are verified."""
    return next(each_resume_candidate(config), None)


UNIVERSAL_PREFIX = "universal-"


class ConversionFailed(ConfigError):
    """DeepSpeed's universal conversion of a checkpoint failed (a damaged shard, or one
    refused before it was unpickled); `cause` says how, on rank 0."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


def converted_folder(universal: Path) -> Path:
    """The checkpoint that convert_to_universal converted into `universal`."""
    return universal.parent / universal.name.removeprefix(UNIVERSAL_PREFIX)


def convert_to_universal(folder: Path, runtime: Runtime) -> Path:
    """Collective. Rank 0 rewrites `folder` in DeepSpeed's universal format (each
    parameter's weights and optimizer moments whole, for any world size) as
    `universal-step-N` beside it, out of the resume and retention paths; it is removed
    once loaded. The checkpoint itself is left as it is."""
    import argparse
    import contextlib
    import io

    from trainer.distributed import wait_for_main_rank

    target = folder.parent / f"{UNIVERSAL_PREFIX}{folder.name}"
    error = None
    if runtime.is_main:
        from deepspeed.checkpoint import ds_to_universal

        shutil.rmtree(target, ignore_errors=True)
        output = io.StringIO()
        # One worker: the conversion then runs in this process (no fork beside a process group).
        options = argparse.Namespace(input_folder=str(folder), output_folder=str(target), num_extract_workers=1,
                                     num_merge_workers=1, keep_temp_folder=False, strict=True,
                                     inject_missing_state=True)
        try:
            shard_globals.check(folder)
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output), \
                    shard_globals.weights_only_loads():
                ds_to_universal.main(options)
        except Exception as caught:  # whatever DeepSpeed's converter raises, it is this run's end
            error = caught
            shutil.rmtree(target, ignore_errors=True)
    # Minutes to hours for a real model: longer than the default group lets anyone wait.
    if wait_for_main_rank(f"the universal conversion of {folder}", failed=error is not None):
        saved = Manifest.read(folder).shape.world_size
        cause = str(error or "failed on rank 0")
        raise ConversionFailed(
            f"checkpoint {folder} was written by {saved} processes, this run has {runtime.world_size}, and DeepSpeed "
            f"could not convert it for another world size ({cause}); resume with the same nodes x processes per "
            "node, or set checkpoint.resume=never to start over", cause)
    return target


def remove_universal(universal: Path) -> None:
    """The conversion, once loaded, and the pointer DeepSpeed's converter writes beside it."""
    shutil.rmtree(universal, ignore_errors=True)
    (universal.parent / "latest_universal").unlink(missing_ok=True)


def load(engine, folder: Path, runtime: Runtime, lora: LoraConfig | None = None,
         universal: Path | None = None) -> dict[str, Any]:
    """`universal`: `folder` converted by convert_to_universal, to load instead (the
    engine was built with checkpoint.load_universal)."""
    manifest = Manifest.read(folder)
    saved = manifest.shape
    check_compatible(folder, saved, TrainingShape.of(engine, runtime, lora),
                     any_world_size=universal is not None or not needs_universal(saved, runtime.world_size))
    source = universal or folder
    # Another world size has other ranks: their generators start from the step's seeds alone.
    rng_file = source / rng.file_name(runtime.rank)
    # Read first: a file that is not generator state skips the checkpoint before any shard loads.
    generators = rng.read(rng_file, legacy=manifest.format < 2) if rng_file.is_file() else None
    shard_globals.check(source)  # DeepSpeed unpickles its files in full: nothing of them loads before this
    # A LoRA checkpoint holds only the adapters; the module's frozen weights stay as built.
    with shard_globals.weights_only_loads():
        _, state = engine.load_checkpoint(
            str(source.parent), tag=source.name, load_optimizer_states=True, load_lr_scheduler_states=True,
            load_module_strict=lora is None or not lora.enabled,
        )
    if state is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {source}")
    if generators is not None:
        rng.restore(generators, runtime.device)
    return state


def load_latest(engine, config: CheckpointConfig, runtime: Runtime, lora: LoraConfig | None = None,
                universal: Path | None = None) -> tuple[Path | None, dict[str, Any] | None]:
    """Loads the best checkpoint that loads on every rank; a corrupt one is skipped with
    a warning. Collective: every rank walks the same candidate list in step. With
    `universal` (a candidate's conversion for this world size) only that one is tried;
    without, a candidate of another world size is one whose conversion failed."""
    from trainer.distributed import any_rank

    candidates = resume_candidates(config)
    for folder in [converted_folder(universal)] if universal is not None else candidates:
        if universal is None and needs_universal(Manifest.read(folder).shape, runtime.world_size):
            log.warning("checkpoint %s skipped: it was written for another world size and not converted", folder)
            continue
        error = None
        try:
            state = load(engine, folder, runtime, lora, universal)
        except ConfigError:
            raise
        except Exception as caught:  # a truncated or garbled shard: torch/pickle/zip errors vary
            error, state = caught, None
        if not any_rank(error is not None):
            return folder, state
        # Skipped, the run would start over and retention would delete the progress.
        if universal is not None:
            raise ConfigError(f"checkpoint {folder}, converted for this world size, does not load "
                              f"({error or 'failed on another rank'}); resume with the nodes x processes per node "
                              "that wrote it, or set checkpoint.resume=never to start over")
        if config.resume != "auto":  # the one asked for: no other is tried
            raise ConfigError(f"checkpoint.resume = {config.resume!r} does not load ({error or 'failed on another rank'}); "
                              "name another checkpoint folder, or set auto (the latest complete one that loads)")
        log.warning("checkpoint %s skipped: it does not load (%s)", folder, error or "failed on another rank")
    if candidates:
        # A failed load may have put part of a checkpoint into the engine (DeepSpeed loads
        # the weights before the optimizer state): training on from step 0 would start
        # from those, and retention would then delete the checkpoints themselves.
        raise ConfigError(
            f"none of the {len(candidates)} complete checkpoint(s) in checkpoint.dir = {str(config.dir)!r} loads "
            f"({', '.join(folder.name for folder in candidates)}; each skipped above with its error). Move them "
            "away to keep them, or set checkpoint.resume=never to start over from the base model")
    return None, None
