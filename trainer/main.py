"""Entry point: `torchrun [args] trainer/main.py --config FILE.yaml [--set section.key=value ...]`.

Exit codes: 0 done, 2 bad config or input (nothing written to output.dir),
3 trained and exported but the upload to output.uri failed (the model is in output.dir;
a retry resumes from the final checkpoint and uploads again),
4 diverged: the loss stayed NaN or infinite (training.max_nonfinite_steps); nothing
exported, the checkpoints from before the divergence kept,
143 stopped by SIGTERM (or Ctrl-C) after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (torchrun trainer/main.py): import the package, not its siblings.
    repo_root = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [repo_root] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from trainer.config import ConfigError, TrainerConfig, load_config, recipe  # noqa: E402

EXIT_CONFIG_ERROR = 2
EXIT_UPLOAD_FAILED = 3
EXIT_DIVERGED = 4
EXIT_TERMINATED = 143


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainer/main.py", description="DreamBooth fine-tuning of Stable Diffusion.")
    parser.add_argument("--config", required=True, help="trainer YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    return parser.parse_args(argv)


def fetch_inputs(config: TrainerConfig) -> Path | None:
    """Before any process group starts: the base model into its cache and the photos
    from data.instance_url onto the volume, each once for all ranks and nodes.
    Returns the local model folder (None for a built-in model)."""
    from trainer.model_cache import model_folder
    from trainer.sources import fetch_instance_images

    fetch_instance_images(config.data)
    return model_folder(config.model)


def check_inputs(config: TrainerConfig) -> None:
    """What can be checked before any process group starts: the instance photos, the
    folders the run writes (found out at the first checkpoint or the export otherwise),
    and a checkpoint named to resume from."""
    from trainer.checkpoint import named_resume_point
    from trainer.data import load_image_set

    load_image_set(config.data.instance_dir, "data.instance_dir", config.data.resolution,
                   captions=config.data.caption_files)
    folders = {"checkpoint.dir": config.checkpoint.dir, "output.dir": config.output.dir, "data.class_dir": config.data.class_dir}
    for key, folder in folders.items():
        if folder is not None:
            check_writable_folder(folder, key)
    if config.checkpoint.resume not in ("auto", "never"):
        named_resume_point(config.checkpoint)


def check_writable_folder(folder: Path, key: str) -> None:
    """`folder` is one, or can be made where it is named, by this user."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key} = {str(folder)!r}: exists and is not a folder; name a folder")
    existing = folder if folder.exists() else next(parent for parent in folder.absolute().parents if parent.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key} = {str(folder)!r}: {existing} is a file, so no folder can be made there; "
                          "name another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} = {str(folder)!r}: {existing} is not writable by this user (uid {os.getuid()}); "
                          "name a folder it may write, or give it access (a volume's fsGroup)")


class StopFlag:
    """SIGTERM (preemption, suspend, delete) asks for a checkpoint at the end of the
    current step. If that has not finished within `grace_seconds`, the process exits
    anyway, before the kubelet's SIGKILL: the half-written checkpoint has no manifest
    and is skipped on resume, so the previous one is used. Ctrl-C (SIGINT) does the
    same for a run in a terminal; a second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_seconds: float):
        self.requested = False
        self.signal_name = "a signal"
        self.grace_seconds = grace_seconds
        self._watchdog: threading.Timer | None = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        self._watchdog = threading.Timer(self.grace_seconds, self._give_up)
        self._watchdog.daemon = True
        self._watchdog.start()

    def close(self) -> None:
        """The previous handlers back, and no exit pending: the run is over."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _give_up(self):
        sys.stderr.write(f"no checkpoint within checkpoint.grace_seconds={self.grace_seconds}; exiting\n")
        sys.stderr.flush()
        os._exit(EXIT_TERMINATED)

    def __call__(self) -> bool:
        return self.requested


def quiet_libraries() -> None:
    """Keep the console for our progress lines: the libraries' import-time notices
    (DeepSpeed's accelerator guess, transformers' optional backends) say nothing to act on."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import diffusers
    import torch
    import transformers

    # Their bars for loading and saving weights: carriage-return noise in a pod's log.
    # The hub's download bars stay (minutes for a real model, worth watching).
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def restore_training_state(engine, config: TrainerConfig, runtime, universal: Path | None = None):
    """(state, checkpoint folder) from the best loadable checkpoint, or a fresh state and
    None. Collective. Leftovers of checkpoints that were never finished are removed.
    `universal`: the resume point's conversion for this world size (removed once loaded)."""
    from trainer import checkpoint
    from trainer.distributed import barrier
    from trainer.engine import apply_optimizer_settings
    from trainer.loop import TrainState
    from trainer.manifest import Manifest
    from trainer.progress import report_event

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
    changed = apply_optimizer_settings(engine, config)
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
    return state, folder


def describe_run(config: TrainerConfig, runtime, precision: str, *, outcome: str, final_step: int,
                 resumed_from: int | None, started: float, trained_samples: int = 0, train_seconds: float = 0.0) -> dict:
    """What run.json holds for every run (DESIGN.md's fields, and what ended it:
    `done`, `stopped` by a signal, or `diverged`); a finished run adds its model's."""
    return {
        "outcome": outcome,
        "final_step": final_step,
        "max_steps": config.training.max_steps,
        "resumed_from_step": resumed_from,
        "world_size": runtime.world_size,
        "precision": precision,
        "zero_stage": config.deepspeed.zero_stage,
        "train_text_encoder": config.training.train_text_encoder,
        "lora_rank": config.lora.rank,
        "lora_use_dora": config.lora.use_dora,
        "wall_seconds": time.monotonic() - started,
        "samples_per_second": trained_samples / train_seconds if train_seconds > 0 else 0.0,
    }


def run(config: TrainerConfig, model_dir: Path | None) -> int:
    quiet_libraries()
    import torch

    from trainer import checkpoint
    from trainer import metrics as m
    from trainer.class_images import generate_class_images
    from trainer.data import DreamBoothData
    from trainer.distributed import init_process_group, read_runtime, shutdown, sum_over_ranks
    from trainer.engine import build_engine, resolve_precision
    from trainer.export import export_pipeline, record_unfinished_run
    from trainer.loop import DenoisingStep, TrainingDiverged, train
    from trainer.model_card import SDXL_PIPELINE, model_card
    from trainer.models import build_components
    from trainer.monitor import TrainingMonitor
    from trainer.objective import build_denoiser, compile_report, compile_unet
    from trainer.progress import report_event

    started = time.monotonic()
    runtime = read_runtime()
    json_logs = config.logging.format == "json"
    precision = resolve_precision(config.training.precision, runtime.device)
    # Rank 0 binds its port before the process group starts: a taken port fails at once.
    metrics = m.TrainerMetrics.start(config, runtime)
    init_process_group(runtime)
    # Installed only now: a process blocked in the C++ rendezvous cannot run a Python
    # handler, and must stay killable by the default SIGTERM action until it returns.
    stop = StopFlag(config.checkpoint.grace_seconds)
    try:
        torch.manual_seed(config.training.seed)
        components = build_components(config.model.source, model_dir)
        if config.data.resolution < components.native_resolution and runtime.is_main:
            # Allowed (a smaller resolution trains faster, e.g. to try settings), but rarely what was meant.
            report_event(f"warning: data.resolution = {config.data.resolution} is below the {components.native_resolution} "
                         f"px the base model was trained at; its fine-tune will lose detail. Set data.resolution: "
                         f"{components.native_resolution} unless this is a trial", json_format=json_logs)
        if config.lora.enabled:  # before minutes of class-image generation
            from trainer.lora import check_targets

            check_targets(components, config.lora, train_text_encoder=config.training.train_text_encoder)
        class_images_generated = 0
        if config.data.with_prior_preservation:
            metrics.set_phase(m.PHASE_GENERATING_CLASS_IMAGES)
            mine = generate_class_images(config, components, runtime, stop_requested=stop)
            if stop.requested:
                report_event(f"stopped by {stop.signal_name} during class-image generation", json_format=json_logs)
                metrics.set_phase(m.PHASE_STOPPED)
                if runtime.is_main:  # training stands where the checkpoint to resume left it
                    record_unfinished_run(config.output.dir, describe_run(
                        config, runtime, precision, outcome="stopped", resumed_from=None, started=started,
                        final_step=m.checkpoint_hint(config.checkpoint).step))
                return EXIT_TERMINATED
            report_event("class images", json_format=json_logs, rank=runtime.rank, generated=mine)
            class_images_generated = sum_over_ranks(mine)
            metrics.set_class_images_generated(class_images_generated)
        data = DreamBoothData(config.data, components.tokenizers, seed=config.training.seed, rank=runtime.rank,
                              world_size=runtime.world_size, batch_size=config.training.batch_size)
        module = build_denoiser(components, train_text_encoder=config.training.train_text_encoder,
                                gradient_checkpointing=config.training.gradient_checkpointing, device=runtime.device,
                                channels_last=config.training.channels_last, lora=config.lora)
        if config.training.compile:
            compile_unet(module, backend=config.training.compile_backend, mode=config.training.compile_mode)
        # A gang of another size than the one that wrote the checkpoint: converted first.
        resized_from = checkpoint.written_for_another_world_size(config.checkpoint, runtime)
        universal = checkpoint.convert_to_universal(resized_from, runtime) if resized_from is not None else None
        engine = build_engine(config, module, precision=precision, world_size=runtime.world_size,
                              device_type=runtime.device.type, load_universal=universal is not None)
        step_fn = DenoisingStep(engine, components, config, runtime, precision)

        state, resume_point = restore_training_state(engine, config, runtime, universal)
        resumed_from = state.step if resume_point is not None else None
        if resume_point is not None:
            metrics.record_resume(step=state.step, samples=state.samples)
        if state.step > config.training.max_steps and runtime.is_main:
            report_event(f"warning: checkpoint {resume_point.name} is past training.max_steps = "
                         f"{config.training.max_steps}: nothing is trained, and its step-{state.step} weights are "
                         "exported; to export an earlier step, set checkpoint.resume to that step's folder",
                         json_format=json_logs)
        eval_batch = data.instance_batch()
        eval_before = step_fn.instance_eval_loss(eval_batch)
        samples_before, train_started = state.samples, time.monotonic()
        monitor = TrainingMonitor(config, runtime, metrics, engine, components)
        metrics.set_phase(m.PHASE_TRAINING)

        def ended(outcome: str) -> dict:  # state is trained in place: it stands where the run ended
            return describe_run(config, runtime, precision, outcome=outcome, final_step=state.step,
                                resumed_from=resumed_from, started=started, trained_samples=state.samples - samples_before,
                                train_seconds=time.monotonic() - train_started)

        try:
            state = train(config, engine, step_fn, data, runtime, state, stop_requested=stop,
                          on_step=monitor.on_step, after_step=monitor.after_step, metrics=metrics)
        except TrainingDiverged as diverged:
            if runtime.is_main:
                print(f"error: {diverged}", file=sys.stderr, flush=True)
                record_unfinished_run(config.output.dir, ended("diverged"))
            metrics.set_phase(m.PHASE_DIVERGED)
            return EXIT_DIVERGED
        finally:
            monitor.close()
        if stop.requested or state.step < config.training.max_steps:
            if runtime.is_main:
                report_event(f"stopped by {stop.signal_name}", json_format=json_logs, step=state.step)
                record_unfinished_run(config.output.dir, ended("stopped"))
            metrics.set_phase(m.PHASE_STOPPED)
            return EXIT_TERMINATED
        run_info = ended("done")
        eval_after = step_fn.instance_eval_loss(eval_batch)
        run_info |= {
            "pipeline": SDXL_PIPELINE if components.is_sdxl else "StableDiffusionPipeline",
            "output_dtype": config.output.dtype,
            "trained_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "compile": ({"backend": config.training.compile_backend, "mode": config.training.compile_mode,
                         **compile_report()} if config.training.compile else None),
            "prior_preservation": config.data.with_prior_preservation,
            "class_images_generated": class_images_generated,
            "instance_eval_loss_before": eval_before,
            "instance_eval_loss_after": eval_after,
        }
        metrics.set_phase(m.PHASE_EXPORTING)
        export_pipeline(engine, components, config.output.dir, runtime, run_info, model_card(config, run_info))
        if runtime.is_main and config.output.uri is not None:
            from trainer.publish import upload_and_record

            upload = upload_and_record(config.output.dir, config.output.uri)
            if not upload["ok"]:
                print(f"error: {upload['error']}", file=sys.stderr, flush=True)
                return EXIT_UPLOAD_FAILED
        metrics.set_phase(m.PHASE_DONE)
        if runtime.is_main:
            report_event("done", json_format=json_logs, model=str(config.output.dir),
                         checkpoints=str(config.checkpoint.dir), run=str(config.output.dir / "run.json"))
        return 0
    finally:
        shutdown()
        # The end states a scrape must see: done, and diverged (an alert names it).
        metrics.close(linger_seconds=config.metrics.linger_seconds if metrics.phase in (m.PHASE_DONE, m.PHASE_DIVERGED)
                      else 0, interrupted=stop)
        stop.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.set)
        model_dir = fetch_inputs(config)
        check_inputs(config)
        return run(config, model_dir)
    except ConfigError as error:
        # Every process of a node finds the same problem: one copy per node, not interleaved ones.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown. By now everything is written, flushed and
    closed, and the process group is destroyed; yet a library's C++ thread still joinable
    at exit can abort a finished run ("terminate called without an active exception",
    SIGABRT, seen once on rank 1 after `done` with gloo and DeepSpeed on CPU). The
    operator would take that for a failure and restart a finished gang."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
