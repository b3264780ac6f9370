"""Resuming: the engine loaded from the best checkpoint this run may use, leftovers of
unfinished checkpoints removed, and what this run's config changed reported. Which
checkpoints exist and whether they load is checkpoint.py's; this is the start-up step
that puts one into a freshly built engine."""

from __future__ import annotations

import logging
from pathlib import Path

from trainer import checkpoint
from trainer.config import ConfigError, TrainerConfig, recipe
from trainer.distributed import Runtime, barrier
from trainer.engine import apply_optimizer_settings
from trainer.loop import TrainState
from trainer.manifest import Manifest, TrainingShape, check_compatible
from trainer.progress import report_event


log = logging.getLogger(__name__)


def shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def convert_if_resized(config: TrainerConfig, runtime: Runtime, module, precision: str) -> Path | None:
    """Collective, before the engine is built. A gang of another size than the one that
    wrote the checkpoint to resume: that checkpoint converted for any world size (the
    engine then loads it with checkpoint.load_universal). None: nothing to convert. A
    checkpoint this run could not load anyway (another ZeRO stage, precision, adapters or
    model) is refused first: the conversion takes minutes to hours for a real model.
    Under checkpoint.resume = auto, one whose conversion fails (a damaged shard, or one
    refused before it was unpickled) is skipped for the one before, as a failed load is."""
    this_run = TrainingShape.planned(module, runtime, zero_stage=config.deepspeed.zero_stage, precision=precision,
                                     lora=config.lora)
    for folder in checkpoint.each_resume_candidate(config.checkpoint):
        saved = Manifest.read(folder).shape
        if not checkpoint.needs_universal(saved, runtime.world_size):
            return None
        check_compatible(folder, saved, this_run, any_world_size=True)
        if runtime.is_main:
            report_event("converting checkpoint for another world size", json_format=config.logging.format == "json",
                         checkpoint=str(folder), world_size=f"{saved.world_size} -> {runtime.world_size}")
        try:
            return checkpoint.convert_to_universal(folder, runtime)
        except checkpoint.ConversionFailed as failed:
            if config.checkpoint.resume != "auto":  # the one asked for: no other is tried
                raise
            if runtime.is_main:
                log.warning("checkpoint %s skipped: DeepSpeed could not convert it for this world size (%s)",
                            folder, failed.cause)
    return None


def restore_training_state(engine, config: TrainerConfig, runtime: Runtime, metrics, universal: Path | None = None):
    """(state, checkpoint folder) from the best loadable checkpoint, or a fresh state and
    None. Collective. Leftovers of checkpoints that were never finished are removed, and
    `metrics` (a TrainerMetrics) start where the checkpoint left off. `universal`: the
    resume point's conversion for this world size (removed once loaded)."""
    try:
        folder, saved = checkpoint.load_latest(engine, config.checkpoint, runtime, lora=config.lora,
                                               universal=universal)
    except ConfigError:
        # Refused on every rank alike, before or after every rank tried it: nobody reads it any more.
        if universal is not None and runtime.is_main:
            checkpoint.remove_universal(universal)
        raise
    barrier()
    if runtime.is_main:
        checkpoint.remove_incomplete(config.checkpoint.dir)
        if universal is not None:
            checkpoint.remove_universal(universal)
    barrier()
    if folder is None:
        return TrainState(), None
    state = TrainState.from_state_dict(saved)
    changed = apply_optimizer_settings(engine, config, runtime.world_size)
    # A checkpoint from before the recipe was kept compares nothing.
    saved_recipe = saved.get(checkpoint.RECIPE_KEY, {})
    changed |= {key: (saved_recipe[key], value) for key, value in recipe(config).items()
                if key in saved_recipe and saved_recipe[key] != value}
    if runtime.is_main:
        json_logs = config.logging.format == "json"
        resized = {}
        if universal is not None:
            resized = {"world_size": f"{Manifest.read(folder).shape.world_size} -> {runtime.world_size}"}
        report_event("resumed", json_format=json_logs, checkpoint=str(folder), step=state.step, **resized)
        if changed:
            # DeepSpeed would restore the checkpoint's values; this run's config wins.
            report_event("changed since the checkpoint", json_format=json_logs,
                         **{key: f"{shown(old)} -> {shown(new)}" for key, (old, new) in changed.items()})
    metrics.record_resume(step=state.step, samples=state.samples)
    if state.step > config.training.max_steps and runtime.is_main:
        report_event(f"warning: checkpoint {folder.name} is past training.max_steps = "
                     f"{config.training.max_steps}: nothing is trained, and its step-{state.step} weights are "
                     "exported; to export an earlier step, set checkpoint.resume to that step's folder",
                     json_format=config.logging.format == "json")
    return state, folder
