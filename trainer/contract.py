"""What the trainer and the operator agree on besides the config file (DESIGN.md
"Contracts"): the trainer's exit codes, the name of a checkpoint's step folder, the
environment variables the operator sets on every worker, and rank 0's metric names.

Both halves import this module, so it imports nothing: the operator's image has no
torch, and this must not need the trainer's other modules.
"""

from __future__ import annotations

# Exit codes of trainer/main.py, which trainer.launch passes on unchanged (plain
# torchrun would turn every failure into 1). The operator fails a job on 2 and 4 without
# a retry, since the same spec would fail the same way, and does not count 143 against
# runPolicy.backoffLimit.
EXIT_CONFIG_ERROR = 2  # the config or the inputs were rejected; nothing written to output.dir
EXIT_UPLOAD_FAILED = 3  # trained and exported, but the upload to output.uri failed
EXIT_DIVERGED = 4  # the loss stayed NaN or infinite (training.max_nonfinite_steps), or fp16 overflowed at the minimum loss scale
EXIT_TERMINATED = 143  # 128 + SIGTERM: stopped (preempted, suspended, deleted) after saving a checkpoint

# Checkpoints are `<checkpoint.dir>/step-00000500/`; the operator reports that path in
# status.latestCheckpoint from the step rank 0 exports.
STEP_PREFIX = "step-"


def step_folder_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


# Set by the operator on every worker pod.
POD_IP_ENV = "POD_IP"  # from the downward API: rank 0 binds its metrics endpoint there
JOB_NAME_ENV = "JOB_NAME"  # with JOB_NAMESPACE_ENV: the `job` and `namespace` labels of every metric
JOB_NAMESPACE_ENV = "JOB_NAMESPACE"
# Only on a job that asks for GPUs (spec.workers.gpusPerNode > 0): the CUDA devices each
# node's processes expect to see. Without it a pod that sees none (no device plugin or
# runtimeClass, an old driver) would train on CPU for days instead of failing at once.
GPUS_PER_NODE_ENV = "DREAMBOOTH_GPUS_PER_NODE"


# Rank 0's Prometheus series (DESIGN.md "Metrics"): trainer/metrics.py exports them, the
# operator copies some into status (operator/scrape.py), the dashboard and alerts query them.
METRIC_STEP = "dreambooth_step"
METRIC_MAX_STEPS = "dreambooth_max_steps"
METRIC_LOSS = "dreambooth_loss"
METRIC_INSTANCE_LOSS = "dreambooth_instance_loss"
METRIC_PRIOR_LOSS = "dreambooth_prior_loss"
METRIC_LEARNING_RATE = "dreambooth_learning_rate"
METRIC_SAMPLES_TOTAL = "dreambooth_samples_total"
METRIC_SAMPLES_PER_SECOND = "dreambooth_samples_per_second"
METRIC_ETA_SECONDS = "dreambooth_eta_seconds"
METRIC_STEP_SECONDS = "dreambooth_step_seconds"
METRIC_CHECKPOINT_SECONDS = "dreambooth_checkpoint_seconds"
METRIC_CHECKPOINT_STEP = "dreambooth_checkpoint_step"
METRIC_PHASE = "dreambooth_phase"
METRIC_CLASS_IMAGES_GENERATED = "dreambooth_class_images_generated"
METRIC_GPU_MEMORY_BYTES = "dreambooth_gpu_memory_bytes"
METRIC_LOSS_SCALE = "dreambooth_loss_scale"
METRIC_SKIPPED_STEPS_TOTAL = "dreambooth_skipped_steps_total"

# Every series name above, as Prometheus shows it (histograms add _bucket/_sum/_count).
METRIC_NAMES = (
    METRIC_STEP,
    METRIC_MAX_STEPS,
    METRIC_LOSS,
    METRIC_INSTANCE_LOSS,
    METRIC_PRIOR_LOSS,
    METRIC_LEARNING_RATE,
    METRIC_SAMPLES_TOTAL,
    METRIC_SAMPLES_PER_SECOND,
    METRIC_ETA_SECONDS,
    METRIC_STEP_SECONDS,
    METRIC_CHECKPOINT_SECONDS,
    METRIC_CHECKPOINT_STEP,
    METRIC_PHASE,
    METRIC_CLASS_IMAGES_GENERATED,
    METRIC_GPU_MEMORY_BYTES,
    METRIC_LOSS_SCALE,
    METRIC_SKIPPED_STEPS_TOTAL,
)
