"""Rank 0's Prometheus endpoint: the trainer's progress as the operator and Grafana see it.

The metric names are a contract (DESIGN.md, docs/metrics.md), spelled once in
contract.py: the operator reads `dreambooth_step` and friends from here, and the
dashboard queries them. Every series
carries the constant labels `job` and `namespace` when the operator set JOB_NAME and
JOB_NAMESPACE. All ranks keep a `TrainerMetrics` so that the training code has one path;
only rank 0 serves it.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from trainer.config import CheckpointConfig, ConfigError, TrainerConfig
from trainer.contract import (
    JOB_NAME_ENV,
    JOB_NAMESPACE_ENV,
    METRIC_CHECKPOINT_SECONDS,
    METRIC_CHECKPOINT_STEP,
    METRIC_CLASS_IMAGES_GENERATED,
    METRIC_ETA_SECONDS,
    METRIC_GPU_MEMORY_BYTES,
    METRIC_INSTANCE_LOSS,
    METRIC_LEARNING_RATE,
    METRIC_LOSS,
    METRIC_LOSS_SCALE,
    METRIC_MAX_STEPS,
    METRIC_PHASE,
    METRIC_PRIOR_LOSS,
    METRIC_SAMPLES_PER_SECOND,
    METRIC_SAMPLES_TOTAL,
    METRIC_SKIPPED_STEPS_TOTAL,
    METRIC_STEP,
    METRIC_STEP_SECONDS,
)

LINGER_POLL_SECONDS = 0.2

JOB_LABEL = "job"
NAMESPACE_LABEL = "namespace"
PHASE_LABEL = "phase"

PHASE_STARTING = "starting"
PHASE_GENERATING_CLASS_IMAGES = "generating_class_images"
PHASE_TRAINING = "training"
PHASE_CHECKPOINTING = "checkpointing"
PHASE_VALIDATING = "validating"
PHASE_EXPORTING = "exporting"
PHASE_DONE = "done"
PHASE_STOPPED = "stopped"
PHASE_DIVERGED = "diverged"
PHASES = (
    PHASE_STARTING, PHASE_GENERATING_CLASS_IMAGES, PHASE_TRAINING, PHASE_CHECKPOINTING, PHASE_VALIDATING,
    PHASE_EXPORTING, PHASE_DONE, PHASE_STOPPED, PHASE_DIVERGED,
)

# From a fast GPU step (tens of ms) to a slow CPU one; checkpoints of SD take seconds to minutes.
STEP_SECONDS_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CHECKPOINT_SECONDS_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def constant_labels(environ=os.environ) -> dict[str, str]:
    """`job` and `namespace` from the env the operator sets on every worker pod."""
    labels = {}
    if environ.get(JOB_NAME_ENV):
        labels[JOB_LABEL] = environ[JOB_NAME_ENV]
    if environ.get(JOB_NAMESPACE_ENV):
        labels[NAMESPACE_LABEL] = environ[JOB_NAMESPACE_ENV]
    return labels


def engine_loss_scale(engine) -> float:
    """The dynamic fp16 loss scale; 1 where there is none (bf16, fp32: nothing is scaled)."""
    scale = getattr(getattr(engine, "optimizer", None), "loss_scale", None)
    if not engine.fp16_enabled() or scale is None:
        return 1.0
    return float(scale)


@dataclass(frozen=True)
class Position:
    """Where a run stands: its step gauge and its counters' totals."""

    step: int = 0
    samples: int = 0
    skipped_steps: int = 0


def checkpoint_hint(config: CheckpointConfig) -> Position:
    """Where a restarted run will most likely resume (the checkpoint `latest` names, or
    checkpoint.resume), read from its manifest before anything loads. The endpoint then
    starts there: it does not say step 0 while a restarted run loads, and its counters
    do not jump from 0 to the restored totals, which rate() and increase() would count
    as samples trained and steps skipped just now. Zeros when there is none or it
    cannot be read (a manifest from before the totals were kept: the step alone)."""
    from trainer import checkpoint
    from trainer.manifest import Manifest

    if config.resume == "never":
        return Position()
    if config.resume != "auto":
        folder = Path(config.resume)
    else:
        try:
            folder = checkpoint.latest_pointed_to(config.dir)
        except OSError:
            return Position()
        if folder is None:
            return Position()
    try:
        manifest = Manifest.read(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return Position()
    return Position(step=manifest.step, samples=manifest.samples, skipped_steps=manifest.skipped_steps)


def gpu_memory_bytes(device) -> int:
    """Peak bytes held by tensors on this rank's GPU since the previous reading; 0 on CPU."""
    import torch

    if device.type != "cuda":
        return 0
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return int(peak)


class TrainerMetrics:
    """The trainer's series in a private registry (tests read it directly), served over
    HTTP by `serve()` on rank 0."""

    def __init__(self, *, max_steps: int, labels: dict[str, str] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = dict(labels or {})
        self._server = None
        self._samples_counted = 0
        self._skipped_counted = 0
        names = tuple(self.labels)

        def gauge(name, documentation, extra=()):
            return Gauge(name, documentation, names + extra, registry=self.registry)

        def histogram(name, documentation, buckets):
            return Histogram(name, documentation, names, buckets=buckets, registry=self.registry)

        def counter(name, documentation):
            return Counter(name, documentation, names, registry=self.registry)

        self.step = self._child(gauge(METRIC_STEP, "Optimizer steps done (global, continues after a resume)."))
        self.max_steps = self._child(gauge(METRIC_MAX_STEPS, "Optimizer steps the run trains in total."))
        self.loss = self._child(gauge(METRIC_LOSS, "Training loss of the last logged step, mean over ranks."))
        self.instance_loss = self._child(gauge(METRIC_INSTANCE_LOSS, "Denoising loss on the instance images, last logged step."))
        self.prior_loss = self._child(gauge(METRIC_PRIOR_LOSS, "Denoising loss on the class images, last logged step (0 without prior preservation)."))
        self.learning_rate = self._child(gauge(METRIC_LEARNING_RATE, "Learning rate of the last logged step."))
        self.samples_total = self._child(counter(METRIC_SAMPLES_TOTAL, "Images trained on, all ranks, instance and class, since the run began (restored on resume)."))
        self.samples_per_second = self._child(gauge(METRIC_SAMPLES_PER_SECOND, "Training throughput over a sliding window of steps, all ranks."))
        self.eta_seconds = self._child(gauge(METRIC_ETA_SECONDS, "Estimated seconds until max_steps at the current step rate (NaN until known)."))
        self.step_seconds = self._child(histogram(METRIC_STEP_SECONDS, "Wall time of one optimizer step on rank 0.", STEP_SECONDS_BUCKETS))
        self.checkpoint_seconds = self._child(histogram(METRIC_CHECKPOINT_SECONDS, "Wall time of one checkpoint save.", CHECKPOINT_SECONDS_BUCKETS))
        self.checkpoint_step = self._child(gauge(METRIC_CHECKPOINT_STEP, "Step of the latest complete checkpoint (0: none yet)."))
        self.class_images_generated = self._child(gauge(METRIC_CLASS_IMAGES_GENERATED, "Class images generated by this run, all ranks."))
        self.gpu_memory = self._child(gauge(METRIC_GPU_MEMORY_BYTES, "Peak bytes allocated by tensors on rank 0's GPU during the last step (0 on CPU)."))
        self.loss_scale = self._child(gauge(METRIC_LOSS_SCALE, "Dynamic fp16 loss scale (1 under bf16/fp32)."))
        self.skipped_steps = self._child(counter(METRIC_SKIPPED_STEPS_TOTAL, "Optimizer steps skipped for fp16 overflow (restored on resume)."))
        phase = gauge(METRIC_PHASE, "1 for the phase the trainer is in, 0 for the others.", (PHASE_LABEL,))
        self._phases = {name: phase.labels(**self.labels, **{PHASE_LABEL: name}) for name in PHASES}
        self.max_steps.set(max_steps)
        self.loss_scale.set(1.0)
        self.eta_seconds.set(float("nan"))  # unknown until steps are timed, not 0 (done)
        self.phase = None
        self.set_phase(PHASE_STARTING)

    def _child(self, metric):
        return metric.labels(**self.labels) if self.labels else metric

    @classmethod
    def start(cls, config: TrainerConfig, runtime) -> "TrainerMetrics":
        """Every rank builds one; rank 0 also binds the endpoint, before any process
        group exists, so that a taken port fails the run at once (exit code 2)."""
        metrics = cls(max_steps=config.training.max_steps, labels=constant_labels())
        if runtime.is_main and config.metrics.port:
            hint = checkpoint_hint(config.checkpoint)
            metrics.record_position(step=hint.step, samples=hint.samples)
            metrics.record_skipped_steps(hint.skipped_steps)
            metrics.serve(config.metrics.host, config.metrics.port)
        return metrics

    def serve(self, host: str, port: int) -> None:
        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"metrics.port = {port}: {host}:{port} is already in use by another process; "
                    "choose a free port (--set metrics.port=N) or 0 to disable the endpoint"
                ) from None
            raise ConfigError(f"metrics.host = {host!r}, metrics.port = {port}: cannot listen there ({error.strerror})") from None

    @property
    def serving_port(self) -> int | None:
        return self._server.server_port if self._server is not None else None

    def set_phase(self, phase: str) -> None:
        if phase not in self._phases:
            raise ValueError(f"unknown phase {phase!r}; one of {', '.join(PHASES)}")
        for name, child in self._phases.items():
            child.set(1 if name == phase else 0)
        self.phase = phase

    def record_position(self, *, step: int, samples: int) -> None:
        """Where the run stands: at start or after a resume, and after every step."""
        self.step.set(step)
        if samples > self._samples_counted:
            self.samples_total.inc(samples - self._samples_counted)
            self._samples_counted = samples

    def record_resume(self, *, step: int, samples: int) -> None:
        """A resumed run starts where its checkpoint left off, counters included."""
        self.record_position(step=step, samples=samples)
        self.checkpoint_step.set(step)

    def record_step(self, *, step: int, samples: int, seconds: float, engine) -> None:
        """After every optimizer step (cheap: no collectives)."""
        self.record_position(step=step, samples=samples)
        self.step_seconds.observe(seconds)
        self.loss_scale.set(engine_loss_scale(engine))
        # The engine counts overflow skips itself and restores the count from a checkpoint.
        self.record_skipped_steps(int(getattr(engine, "skipped_steps", 0)))
        self.gpu_memory.set(gpu_memory_bytes(engine.device))

    def record_skipped_steps(self, total: int) -> None:
        """A counter only grows: a total below what it holds (a hint from a checkpoint
        that then did not load) waits until the run passes it."""
        if total > self._skipped_counted:
            self.skipped_steps.inc(total - self._skipped_counted)
            self._skipped_counted = total

    def record_values(self, values: dict) -> None:
        """The figures of a logged step (the loop's `on_step`)."""
        self.loss.set(values["loss"])
        self.instance_loss.set(values["instance_loss"])
        self.prior_loss.set(values["prior_loss"] if values.get("prior_loss") is not None else 0.0)
        self.learning_rate.set(values["learning_rate"])
        self.samples_per_second.set(values["samples_per_second"])
        self.eta_seconds.set(values["eta_seconds"])

    def record_checkpoint(self, *, step: int, seconds: float) -> None:
        self.checkpoint_seconds.observe(seconds)
        self.checkpoint_step.set(step)

    def set_class_images_generated(self, count: int) -> None:
        self.class_images_generated.set(count)

    def close(self, *, linger_seconds: float = 0.0, stop_requested=lambda: False) -> None:
        """Stops serving; after `linger_seconds`, so that a last scrape sees the end state,
        or sooner once `stop_requested()` is true (a SIGTERM: the pod is going away, and a
        process still lingering at the end of the grace period would be killed)."""
        if self._server is None:
            return
        deadline = time.monotonic() + linger_seconds
        while time.monotonic() < deadline and not stop_requested():
            time.sleep(min(LINGER_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        self._server.shutdown()
        self._server.server_close()
        self._server = None
