"""What watches a run besides the log lines: Prometheus metrics, TensorBoard and
validation samples, behind the two hooks of `loop.train()`.

`on_step(values)` gets each logged step's figures (every rank; rank 0 records them).
`after_step(step)` runs on every rank after each step and its checkpoint; it makes the
validation samples (a collective) and says whether it paused training, so that the
loop keeps the pause out of its throughput window.
"""

from __future__ import annotations

import time

from trainer import metrics as m
from trainer.config import TrainerConfig
from trainer.distributed import Runtime
from trainer.progress import report_event
from trainer.validation import generate_samples, is_validation_step, samples_dir, save_grid

# TensorBoard tags: the same figures as the Prometheus series, grouped as TensorBoard likes.
SCALAR_TAGS = {
    "loss": "loss/total",
    "instance_loss": "loss/instance",
    "prior_loss": "loss/prior",
    "learning_rate": "optimizer/learning_rate",
    "samples_per_second": "throughput/samples_per_second",
}
SAMPLES_TAG = "validation/samples"


def tensorboard_dir(config: TrainerConfig):
    return config.tensorboard.dir or config.checkpoint.dir.parent / "tensorboard"


class TrainingMonitor:
    def __init__(self, config: TrainerConfig, runtime: Runtime, metrics: m.TrainerMetrics, engine, components):
        self.config = config
        self.runtime = runtime
        self.metrics = metrics
        self.engine = engine
        self.components = components
        self.writer = None
        if config.tensorboard.enabled and runtime.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir(config)))

    def on_step(self, values: dict) -> None:
        self.metrics.record_values(values)
        if self.writer is not None:
            for key, tag in SCALAR_TAGS.items():
                if values.get(key) is not None:
                    self.writer.add_scalar(tag, values[key], values["step"])
            self.writer.add_scalar("optimizer/loss_scale", m.engine_loss_scale(self.engine), values["step"])

    def after_step(self, step: int) -> bool:
        """Collective. True when it made samples (training paused meanwhile)."""
        if not is_validation_step(self.config, step):
            return False
        previous, started = self.metrics.phase, time.monotonic()
        self.metrics.set_phase(m.PHASE_VALIDATING)
        grid = generate_samples(self.engine, self.components, self.config, self.runtime)
        if self.runtime.is_main:
            path = save_grid(grid, samples_dir(self.config), step)
            if self.writer is not None:
                import numpy as np

                self.writer.add_image(SAMPLES_TAG, np.asarray(grid), step, dataformats="HWC")
                self.writer.flush()
            report_event("samples saved", json_format=self.config.logging.format == "json", step=step,
                         path=str(path), seconds=round(time.monotonic() - started, 3))
        self.metrics.set_phase(previous)
        return True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
