"""Entry point: `torchrun [args] trainer/main.py --config FILE.yaml [--set section.key=value ...]`.

Exit codes: 0 done, 2 bad config or input (nothing written to output.dir),
3 trained and exported but the upload to output.uri failed (the model is in output.dir;
a retry resumes from the final checkpoint and uploads again),
4 diverged: the loss stayed NaN or infinite (training.max_nonfinite_steps), or fp16
gradients overflowed at the minimum loss scale; nothing
exported, the checkpoints from before the divergence kept,
143 stopped by SIGTERM (or Ctrl-C) after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):
    # Run as a script (torchrun trainer/main.py): import the package, not its siblings.
    repo_root = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [repo_root] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from trainer.config import ConfigError, TrainerConfig  # noqa: E402
from trainer.config_file import load_config  # noqa: E402
from trainer.contract import EXIT_CONFIG_ERROR, EXIT_DIVERGED, EXIT_TERMINATED, EXIT_UPLOAD_FAILED  # noqa: E402
from trainer.signals import StopFlag  # noqa: E402

if TYPE_CHECKING:  # imported where used: torch and the libraries take seconds
    from trainer.data import DreamBoothData
    from trainer.distributed import Runtime
    from trainer.loop import DenoisingStep, TrainState
    from trainer.metrics import TrainerMetrics


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


def build_base_model(config: TrainerConfig, model_dir: Path | None, runtime):
    """The base pipeline's components, and what can be checked once they are loaded,
    before minutes of class-image generation: the resolution the base was trained at,
    and the modules LoRA adapts."""
    import torch

    from trainer.models import build_components
    from trainer.progress import report_event

    torch.manual_seed(config.training.seed)
    components = build_components(config.model.source, model_dir)
    if config.data.resolution < components.native_resolution and runtime.is_main:
        # Allowed (a smaller resolution trains faster, e.g. to try settings), but rarely what was meant.
        report_event(f"warning: data.resolution = {config.data.resolution} is below the {components.native_resolution} "
                     f"px the base model was trained at; its fine-tune will lose detail. Set data.resolution: "
                     f"{components.native_resolution} unless this is a trial", json_format=config.logging.format == "json")
    if config.lora.enabled:
        from trainer.lora import check_targets

        check_targets(components, config.lora, train_text_encoder=config.training.train_text_encoder)
    return components


def generate_missing_class_images(config: TrainerConfig, components, runtime, metrics, stop_requested) -> int | None:
    """Collective. Prior preservation's class images that are not there yet, split across
    the ranks. Returns how many all ranks generated, or None when a stop was requested
    meanwhile (the finished images stay for the next run)."""
    from trainer import metrics as m
    from trainer.class_images import generate_class_images
    from trainer.distributed import sum_over_ranks
    from trainer.progress import report_event

    json_logs = config.logging.format == "json"
    metrics.set_phase(m.PHASE_GENERATING_CLASS_IMAGES)
    mine = generate_class_images(config, components, runtime, stop_requested=stop_requested)
    if mine is None:  # on every rank, whichever had the stop request
        by = stop_requested.signal_name if stop_requested() else "another rank's stop request"
        report_event(f"stopped by {by} during class-image generation", json_format=json_logs)
        metrics.set_phase(m.PHASE_STOPPED)
        return None
    report_event("class images", json_format=json_logs, rank=runtime.rank, generated=mine)
    generated = sum_over_ranks(mine)
    metrics.set_class_images_generated(generated)
    return generated


def build_module(config: TrainerConfig, components, runtime):
    """The module the engine trains: the UNet (and text encoders, or their adapters) on the device."""
    from trainer.objective import build_denoiser, compile_unet

    module = build_denoiser(components, train_text_encoder=config.training.train_text_encoder,
                            gradient_checkpointing=config.training.gradient_checkpointing, device=runtime.device,
                            channels_last=config.training.channels_last, lora=config.lora)
    if config.training.compile:
        compile_unet(module, backend=config.training.compile_backend, mode=config.training.compile_mode)
    return module


def upload_failed(config: TrainerConfig, runtime) -> bool:
    """Rank 0 uploads the exported folder to output.uri, when one is set; true when that failed."""
    if not runtime.is_main or config.output.uri is None:
        return False
    from trainer.publish import upload_and_record

    upload = upload_and_record(config.output.dir, config.output.uri)
    if not upload["ok"]:
        print(f"error: {upload['error']}", file=sys.stderr, flush=True)
    return not upload["ok"]


@dataclass
class RunSession:
    """What every stage of one run shares: its config, this process's place in the world,
    the precision, the metrics endpoint and the stop flag."""

    config: TrainerConfig
    runtime: Runtime
    precision: str
    metrics: TrainerMetrics
    stop_requested: StopFlag
    started: float  # time.monotonic()

    @property
    def json_logs(self) -> bool:
        return self.config.logging.format == "json"

    def end_unfinished(self, outcome: str, phase: str, exit_code: int, **run_facts: Any) -> int:
        """End a run that exports nothing (stopped, diverged): rank 0 records its run.json,
        every rank its phase. Returns `exit_code`."""
        from trainer.export import describe_run, record_unfinished_run

        if self.runtime.is_main:
            record_unfinished_run(self.config.output.dir, describe_run(
                self.config, self.runtime, self.precision, outcome=outcome, started=self.started, **run_facts))
        self.metrics.set_phase(phase)
        return exit_code


@dataclass
class Training:
    """What is trained, on what, and where training stands (`state`, trained in place)."""

    data: DreamBoothData
    module: Any  # the UNet (and text encoders, or their adapters): objective.build_denoiser
    engine: Any  # DeepSpeed's engine around it
    denoising_step: DenoisingStep
    state: TrainState
    resumed_from: int | None  # the step of the checkpoint resumed from


def run(config: TrainerConfig, model_dir: Path | None) -> int:
    quiet_libraries()
    from trainer import metrics as m
    from trainer.distributed import init_process_group, read_runtime, shutdown
    from trainer.engine import resolve_precision

    started = time.monotonic()
    runtime = read_runtime()
    precision = resolve_precision(config.training.precision, runtime.device)
    # Rank 0 binds its port before the process group starts: a taken port fails at once.
    metrics = m.TrainerMetrics.start(config, runtime)
    init_process_group(runtime)
    # Installed only now: a process blocked in the C++ rendezvous cannot run a Python
    # handler, and must stay killable by the default SIGTERM action until it returns.
    stop_requested = StopFlag(config.checkpoint.grace_seconds)
    try:
        return train_and_export(RunSession(config, runtime, precision, metrics, stop_requested, started), model_dir)
    finally:
        shutdown()
        # The end states a scrape must see: done, and diverged (an alert names it).
        metrics.close(linger_seconds=config.metrics.linger_seconds if metrics.phase in (m.PHASE_DONE, m.PHASE_DIVERGED)
                      else 0, stop_requested=stop_requested)
        stop_requested.close()


def train_and_export(session: RunSession, model_dir: Path | None) -> int:
    """Collective. The run from the base model to the exported (and uploaded) one, or to
    the stop or divergence that ends it first; returns the exit code."""
    from trainer import metrics as m
    from trainer.export import describe_model, describe_run
    from trainer.loop import TrainingDiverged, train
    from trainer.monitor import TrainingMonitor
    from trainer.progress import report_event

    config, runtime, metrics = session.config, session.runtime, session.metrics
    components = build_base_model(config, model_dir, runtime)
    class_images_generated = 0
    if config.data.with_prior_preservation:
        class_images_generated = generate_missing_class_images(config, components, runtime, metrics,
                                                               session.stop_requested)
        if class_images_generated is None:  # training stands where the checkpoint to resume left it
            return session.end_unfinished("stopped", m.PHASE_STOPPED, EXIT_TERMINATED, resumed_from=None,
                                          final_step=m.checkpoint_hint(config.checkpoint).step)
    training = prepare_training(session, components)
    eval_batch = training.data.instance_batch()
    eval_before = training.denoising_step.instance_eval_loss(eval_batch)
    samples_before, train_started = training.state.samples, time.monotonic()

    def run_facts() -> dict[str, Any]:  # where the run ended
        return {"final_step": training.state.step, "resumed_from": training.resumed_from,
                "trained_samples": training.state.samples - samples_before,
                "train_seconds": time.monotonic() - train_started}

    monitor = TrainingMonitor(config, runtime, metrics, training.engine, components)
    metrics.set_phase(m.PHASE_TRAINING)
    try:
        train(config, training.engine, training.denoising_step, training.data, runtime, training.state,
              stop_requested=session.stop_requested, on_step=monitor.on_step, after_step=monitor.after_step,
              metrics=metrics)
    except TrainingDiverged as diverged:
        if runtime.is_main:
            print(f"error: {diverged}", file=sys.stderr, flush=True)
        return session.end_unfinished("diverged", m.PHASE_DIVERGED, EXIT_DIVERGED, **run_facts())
    finally:
        monitor.close()
    if session.stop_requested() or training.state.step < config.training.max_steps:
        if runtime.is_main:
            report_event(f"stopped by {session.stop_requested.signal_name}", json_format=session.json_logs,
                         step=training.state.step)
        return session.end_unfinished("stopped", m.PHASE_STOPPED, EXIT_TERMINATED, **run_facts())

    run_info = describe_run(config, runtime, session.precision, outcome="done", started=session.started,
                            **run_facts())  # timed before the evaluation below
    run_info |= describe_model(config, components, training.module, class_images_generated=class_images_generated,
                               eval_before=eval_before,
                               eval_after=training.denoising_step.instance_eval_loss(eval_batch))
    return export_and_upload(session, training, components, run_info)


def prepare_training(session: RunSession, components) -> Training:
    """Collective. The data, the module on the device, its DeepSpeed engine, and the state
    restored from the latest loadable checkpoint (converted first when the world size
    changed), or a fresh one."""
    from trainer.data import DreamBoothData
    from trainer.engine import build_engine
    from trainer.loop import DenoisingStep
    from trainer.resume import convert_if_resized, restore_training_state

    config, runtime = session.config, session.runtime
    data = DreamBoothData(config.data, components.tokenizers, seed=config.training.seed, rank=runtime.rank,
                          world_size=runtime.world_size, batch_size=config.training.batch_size)
    module = build_module(config, components, runtime)
    universal = convert_if_resized(config, runtime, module, session.precision)
    engine = build_engine(config, module, precision=session.precision, world_size=runtime.world_size,
                          device_type=runtime.device.type, load_universal=universal is not None)
    denoising_step = DenoisingStep(engine, components, config, runtime, session.precision)
    state, resume_point = restore_training_state(engine, config, runtime, session.metrics, universal)
    return Training(data, module, engine, denoising_step, state,
                    resumed_from=state.step if resume_point is not None else None)


def export_and_upload(session: RunSession, training: Training, components, run_info: dict[str, Any]) -> int:
    """Collective. The trained pipeline into output.dir (and output.uri); returns the exit code."""
    from trainer import metrics as m
    from trainer.export import RUN_FILE, export_pipeline
    from trainer.model_card import SAMPLES_FILE, model_card
    from trainer.progress import report_event
    from trainer.validation import sample_path, samples_dir

    config, runtime = session.config, session.runtime
    session.metrics.set_phase(m.PHASE_EXPORTING)
    # The grid of the exported weights (validation samples at the last step), shown on the card.
    final_grid = sample_path(samples_dir(config), run_info["final_step"])
    samples = final_grid if runtime.is_main and final_grid.is_file() else None
    run_info = run_info | {"samples": SAMPLES_FILE if samples is not None else None}
    export_pipeline(training.engine, components, config.output.dir, runtime, run_info, model_card(config, run_info),
                    samples=samples)
    if upload_failed(config, runtime):
        return EXIT_UPLOAD_FAILED
    session.metrics.set_phase(m.PHASE_DONE)
    if runtime.is_main:
        report_event("done", json_format=session.json_logs, model=str(config.output.dir),
                     checkpoints=str(config.checkpoint.dir), run=str(config.output.dir / RUN_FILE))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.set)
        from trainer.distributed import check_devices

        # Before the model download: a pod without its GPUs would otherwise go on, on CPU.
        check_devices()
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
