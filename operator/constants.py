"""Names shared by the operator, its manifests and its tests.

Everything another component (kubectl, the trainer image, a dashboard, a test) may
look for by name lives here, so a rename happens in one place.
"""

from __future__ import annotations

# The custom resource (manifests/crd.yaml declares the same).
GROUP = "dreambooth.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DreamboothJob"
PLURAL = "dreamboothjobs"
SHORT_NAME = "dbj"
# The status fields the operator writes and decides from (restarts and preemptions
# counted, the backoff's next start, the steps), a nested one by its dotted path (a
# list's by the fields of its entries): an installed CRD lacking one has the API server
# drop it from every write (crd_skew.py), and the operator forgets it.
STATUS_FIELDS = (
    "phase", "observedGeneration", "startTime", "completionTime", "restarts", "preemptions",
    "consecutivePreemptions", "gangNodes", "nextRestartTime", "maxSteps", "step", "progress", "loss",
    "samplesPerSecond", "etaSeconds",
    "conditions.type", "conditions.status", "conditions.reason", "conditions.message", "conditions.lastTransitionTime",
    "lastFailure.pod", "lastFailure.exitCode", "lastFailure.reason", "lastFailure.message", "lastFailure.time",
    "latestCheckpoint.step", "latestCheckpoint.path", "latestCheckpoint.time",
    "output.claimName", "output.path", "output.loraWeights", "output.uri",
)

# Labels on every child; selectors use LABEL_JOB (+ LABEL_ROLE for workers).
LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB = f"{GROUP}/job"
LABEL_ROLE = f"{GROUP}/role"
LABEL_WORKER_INDEX = f"{GROUP}/worker-index"
# Which gang start a worker pod belongs to (restarts + preemptions when it was made);
# pods of an older gang are stale and get deleted.
LABEL_GANG = f"{GROUP}/gang"
# Gang scheduling (spec.runPolicy.gangScheduling): each scheduler's PodGroup API, and
# how a pod names the group it belongs to.
POD_GROUP_KIND = "PodGroup"
POD_GROUP_PLURAL = "podgroups"
POD_GROUP_APIS = {
    "volcano": ("scheduling.volcano.sh", "v1beta1"),
    "coscheduling": ("scheduling.x-k8s.io", "v1alpha1"),  # kubernetes-sigs/scheduler-plugins
}
VOLCANO_SCHEDULER = "volcano"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
COSCHEDULING_GROUP_LABEL = "scheduling.x-k8s.io/pod-group"
APP_NAME = "dreambooth"
MANAGER = "dreambooth-operator"
ROLE_WORKER = "worker"
# A shrunk elastic gang's placeholder for each worker it lacks (pods.build_standby_pod):
# once the scheduler can place them all, the gang grows back.
ROLE_STANDBY = "standby"
# How an elastic gang's size changes (lifecycle's Plan.resize; a restarts_total reason).
RESIZE_SHRINK = "shrink"
RESIZE_GROW = "grow"
# What a standby pod runs: nothing, until it is deleted. As a container's PID 1 it must
# handle SIGTERM itself (the kernel ignores signals PID 1 has no handler for).
STANDBY_COMMAND = ("python", "-c", "import signal, sys; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
                   "signal.pause()")

# How often the operator reads rank 0's metrics into a job's status (--scrape-interval).
DEFAULT_SCRAPE_INTERVAL_SECONDS = 15.0

# Hash of the rendered trainer config, on the ConfigMap and the pods that mount it.
ANNOTATION_CONFIG_HASH = f"{GROUP}/config-hash"
# The gang size a worker was started for (its torchrun --nnodes).
ANNOTATION_GANG_NODES = f"{GROUP}/nodes"

# Worker pods.
WORKER_CONTAINER = "trainer"
RENDEZVOUS_PORT = 29500
# The name of the worker's port (and the Service's) that rank 0's metrics endpoint listens on.
METRICS_PORT_NAME = "metrics"
# How long worker-0's TCPStore waits for the other workers to join (torchrun's static
# rendezvous waits 600 s by default). On a real cluster a gang seldom starts at once: a
# worker may wait for the cluster autoscaler to add a GPU node and then pull a 10-15 GB
# image. At 600 s the ones already running failed (exit 1, a counted restart) and the
# restart deleted the worker that was nearly there.
RENDEZVOUS_TIMEOUT_SECONDS = 1800
CONFIG_MOUNT_DIR = "/etc/dreambooth"
CONFIG_FILE_NAME = "config.yaml"
CONFIG_PATH = f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}"
TRAINER_ENTRY = "trainer/main.py"
# torchrun through the trainer's launcher, which keeps the workers' exit codes
# (plain torchrun turns every failure into 1; trainer/contract.py lists them).
LAUNCHER = ("python", "-m", "trainer.launch")
STORAGE_MOUNT_DIR = "/mnt/storage"
INSTANCE_IMAGES_MOUNT_DIR = "/mnt/instance-images"
# Each credentials Secret is also mounted, read-only, at <dir>/<secret name>/: for the
# clients that want a file (GOOGLE_APPLICATION_CREDENTIALS=<dir>/<name>/key.json).
CREDENTIALS_MOUNT_DIR = "/var/run/secrets/dreambooth"
# Base models fetched from the hub, shared by every job on the same claim: <dir>/<org>--<name>@<revision>.
MODEL_CACHE_DIR = f"{STORAGE_MOUNT_DIR}/models"
# spec.data.shareClassImages: one folder per class prompt and base model for every job on the claim.
CLASS_IMAGES_CACHE_DIR = f"{STORAGE_MOUNT_DIR}/class-images"
# The API server's limit on a ConfigMap's data (etcd's object size limit).
CONFIG_MAP_MAX_BYTES = 1024 * 1024
SHM_MOUNT_DIR = "/dev/shm"
# The volumes the operator gives every worker (credentials ones are numbered) and the
# folders it mounts them at: a user's workers.volumes / volumeMounts may take neither.
CONFIG_VOLUME, STORAGE_VOLUME, SHM_VOLUME, INSTANCE_IMAGES_VOLUME = "config", "storage", "shm", "instance-images"
CREDENTIALS_VOLUME_PREFIX = "credentials-"
OPERATOR_MOUNT_DIRS = (CONFIG_MOUNT_DIR, STORAGE_MOUNT_DIR, INSTANCE_IMAGES_MOUNT_DIR, SHM_MOUNT_DIR,
                       CREDENTIALS_MOUNT_DIR)
HF_TOKEN_ENV = "HF_TOKEN"
GPU_RESOURCE = "nvidia.com/gpu"
# The trainer image's non-root user (Dockerfile). fsGroup makes the volumes writable to it.
WORKER_UID = 1000
WORKER_GID = 1000

# status.phase values.
PHASE_PENDING = "Pending"
PHASE_INITIALIZING = "Initializing"
PHASE_RUNNING = "Running"
PHASE_RESTARTING = "Restarting"
PHASE_SUSPENDED = "Suspended"
PHASE_SUCCEEDED = "Succeeded"
PHASE_FAILED = "Failed"
PHASES = (
    PHASE_PENDING, PHASE_INITIALIZING, PHASE_RUNNING, PHASE_RESTARTING,
    PHASE_SUSPENDED, PHASE_SUCCEEDED, PHASE_FAILED,
)
TERMINAL_PHASES = (PHASE_SUCCEEDED, PHASE_FAILED)

# status.conditions types.
CONDITION_CREATED = "Created"
CONDITION_RUNNING = "Running"
CONDITION_RESTARTING = "Restarting"
CONDITION_SUSPENDED = "Suspended"
CONDITION_SUCCEEDED = "Succeeded"
CONDITION_FAILED = "Failed"
CONDITION_UNSCHEDULABLE = "Unschedulable"
# A scheduled worker's container cannot start (image pull, missing Secret or ConfigMap).
CONDITION_CANNOT_START = "CannotStart"

# Condition and Event reasons.
REASON_INVALID_SPEC = "InvalidSpec"
REASON_BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
REASON_DEADLINE_EXCEEDED = "DeadlineExceeded"
REASON_WORKER_FAILED = "WorkerFailed"
REASON_INVALID_TRAINER_INPUT = "InvalidTrainerInput"
REASON_TRAINING_DIVERGED = "TrainingDiverged"
REASON_PREEMPTED = "Preempted"
REASON_GANG_SHRUNK = "GangShrunk"
REASON_GANG_GROWN = "GangGrown"
# A node's kubelet refused a worker it was bound to (OutOfnvidia.com/gpu, UnexpectedAdmissionError):
# restarted like a preemption.
REASON_REFUSED_BY_NODE = "RefusedByNode"
REASON_ALL_WORKERS_SUCCEEDED = "AllWorkersSucceeded"
REASON_ALL_WORKERS_RUNNING = "AllWorkersRunning"
REASON_WORKERS_CREATED = "WorkersCreated"
# A child the API server forbids for now (a ResourceQuota, a policy): retried every resync.
REASON_FAILED_CREATE = "FailedCreate"
REASON_OUTDATED_CRD = "OutdatedCRD"
REASON_FORBIDDEN = "Forbidden"
REASON_VOLUME_NOT_SHARED = "VolumeNotShared"
REASON_CLAIM_NOT_FOUND = "ClaimNotFound"
REASON_STORAGE_NOT_RESIZED = "StorageNotResized"
REASON_SUSPENDED = "Suspended"
REASON_RESUMED = "Resumed"
REASON_PODS_PENDING = "PodsPending"
REASON_CONTAINERS_STARTED = "ContainersStarted"
REASON_WORKER_STUCK_TERMINATING = "WorkerStuckTerminating"
