"""What the trainer and the operator agree on besides the config file and the metric
names (DESIGN.md "Contracts"): the trainer's exit codes, the name of a checkpoint's
step folder, and the environment variables the operator sets on every worker.

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
EXIT_DIVERGED = 4  # the loss stayed NaN or infinite (training.max_nonfinite_steps)
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
