"""What a worker pod's status says, read by pure functions (no API calls)."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

from trainer.contract import EXIT_TERMINATED

from .clock import parse_timestamp
from .constants import ANNOTATION_GANG_NODES, LABEL_GANG, LABEL_ROLE, LABEL_WORKER_INDEX, ROLE_STANDBY, WORKER_CONTAINER

POD_PENDING = "Pending"
POD_RUNNING = "Running"
POD_SUCCEEDED = "Succeeded"
POD_FAILED = "Failed"


def pod_name(pod: dict[str, Any]) -> str:
    return pod["metadata"]["name"]


def is_standby(pod: dict[str, Any]) -> bool:
    """A shrunk gang's standby pod (pods.build_standby_pod), not a worker."""
    return (pod["metadata"].get("labels") or {}).get(LABEL_ROLE) == ROLE_STANDBY


def pod_phase(pod: dict[str, Any]) -> str:
    return (pod.get("status") or {}).get("phase") or POD_PENDING


def pod_gang(pod: dict[str, Any]) -> int | None:
    try:
        return int(pod["metadata"].get("labels", {})[LABEL_GANG])
    except (KeyError, ValueError):
        return None


def pod_index(pod: dict[str, Any]) -> int | None:
    try:
        return int(pod["metadata"].get("labels", {})[LABEL_WORKER_INDEX])
    except (KeyError, ValueError):
        return None


def pod_gang_nodes(pod: dict[str, Any]) -> int | None:
    """The gang size the worker was started for; None on a pod of an operator before it was recorded."""
    try:
        return int(pod["metadata"].get("annotations", {})[ANNOTATION_GANG_NODES])
    except (KeyError, ValueError):
        return None


def is_deleting(pod: dict[str, Any]) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def pod_condition(pod: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return condition
    return None


def terminated_state(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The trainer container's `terminated` state, if it has ended."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for container in statuses:
        if container.get("name") == WORKER_CONTAINER or len(statuses) == 1:
            state = container.get("state") or {}
            return state.get("terminated") or (container.get("lastState") or {}).get("terminated")
    return None


# The kubelet's eviction messages for a pod over its own limits ("Pod ephemeral local
# storage usage exceeds the total limit of containers 20Gi.", "Container trainer exceeded
# its local ephemeral storage limit \"20Gi\".", "Usage of EmptyDir volume \"dshm\" exceeds
# the limit \"8Gi\"."), as opposed to a node short of a resource.
_OWN_LIMIT_EXCEEDED = re.compile(r"exceeds the (total )?limit|exceeded its local ephemeral storage limit")


# Why a kubelet refuses to admit a pod the scheduler bound to its node (the kubelet's
# pkg/kubelet/lifecycle/predicate.go and pkg/kubelet/cm/admission): the node ran short of a
# resource between scheduling and admission (OutOfcpu, OutOfmemory, OutOfpods,
# OutOfephemeral-storage, OutOf<extended resource> such as OutOfnvidia.com/gpu), a device
# plugin could not allocate or had not registered yet (UnexpectedAdmissionError, e.g.
# "Allocate failed due to requested number of devices unavailable for nvidia.com/gpu", and
# DeviceNotReady: common while the NVIDIA device plugin restarts), the kubelet could not
# read its node (InvalidNodeInfo), or the node's labels or NoExecute taints changed since
# scheduling (NodeAffinity, TaintToleration); plus the node controller's NodeLost. None is
# the job's doing. Left out on purpose, so that they count like crashes: the refusals that
# follow from the pod's own request and would refuse the next gang alike
# (TopologyAffinityError, SMTAlignmentError: alignment the node's policy cannot give).
NODE_REFUSALS = frozenset({"UnexpectedAdmissionError", "DeviceNotReady", "InvalidNodeInfo", "NodeAffinity",
                           "TaintToleration", "NodeLost"})
# "OutOf" and a resource name, as the kubelet joins them: not "OutOfSync" or a container's
# own reason (OOMKilled), since only the pod-level reason is read.
_OUT_OF_RESOURCE = re.compile(
    r"OutOf(cpu|memory|pods|ephemeral-storage|hugepages-[0-9A-Za-z]+|[a-z0-9.-]+/[A-Za-z0-9._-]+)")
# The kubelet's stand-in state for a container it never saw end: not an exit of the trainer.
_NEVER_SEEN_ENDING = "ContainerStatusUnknown"


def node_refusal(pod: dict[str, Any]) -> str | None:
    """The kubelet's (or node controller's) reason when a failed worker was refused by its
    node before its trainer ran, else None."""
    status = pod.get("status") or {}
    reason = status.get("reason") or ""
    if pod_phase(pod) != POD_FAILED or not (reason in NODE_REFUSALS or _OUT_OF_RESOURCE.fullmatch(reason)):
        return None
    # A trainer that ran and exited is judged by its exit code whatever the pod's reason
    # says: a crash must not pass for a refusal, which costs nothing.
    terminated = terminated_state(pod)
    if terminated is not None and terminated.get("reason") != _NEVER_SEEN_ENDING:
        return None
    return reason


def is_preemption(pod: dict[str, Any]) -> bool:
    """A failure that is not the job's fault: it restarts the gang without counting
    against runPolicy.backoffLimit (the trainer checkpoints on SIGTERM and exits 143;
    a worker its node refused never ran)."""
    status = pod.get("status") or {}
    if node_refusal(pod) is not None:
        return True
    if status.get("reason") == "Evicted" and _OWN_LIMIT_EXCEEDED.search(status.get("message") or ""):
        # The kubelet evicts a pod that outgrew its own ephemeral-storage (or emptyDir)
        # limit: the next gang would outgrow it again, so it counts like a crash.
        return False
    if status.get("reason") in ("Evicted", "Preempting", "Terminated", "Shutdown", "NodeShutdown"):
        return True
    disruption = pod_condition(pod, "DisruptionTarget")
    if disruption is not None and disruption.get("status") == "True":
        return True
    terminated = terminated_state(pod)
    return terminated is not None and terminated.get("exitCode") == EXIT_TERMINATED


@dataclass(frozen=True)
class Failure:
    pod: str
    reason: str
    exit_code: int | None
    message: str

    def as_status(self, time: str) -> dict[str, Any]:
        failure: dict[str, Any] = {"pod": self.pod, "reason": self.reason, "time": time}
        if self.exit_code is not None:
            failure["exitCode"] = self.exit_code
        if self.message:
            failure["message"] = self.message
        return failure


def describe_failure(pod: dict[str, Any]) -> Failure:
    status = pod.get("status") or {}
    terminated = terminated_state(pod) or {}
    if node_refusal(pod) is not None:  # the trainer never ran: the kubelet's words are the whole story
        terminated = {}
    if status.get("reason") == "Evicted":  # the kubelet's reason outranks the killed container's "Error"
        terminated = {"exitCode": terminated.get("exitCode")}
    reason = terminated.get("reason") or status.get("reason") or "Error"
    message = terminated.get("message") or status.get("message") or ""
    return Failure(pod=pod_name(pod), reason=reason, exit_code=terminated.get("exitCode"), message=message)


def scheduling_problem(pod: dict[str, Any]) -> str | None:
    """The scheduler's message for a pod it could not place, else None."""
    if pod_phase(pod) != POD_PENDING:
        return None
    scheduled = pod_condition(pod, "PodScheduled")
    if scheduled is None or scheduled.get("status") != "False":
        return None
    return scheduled.get("message") or scheduled.get("reason") or "pod not scheduled"


# Container waiting reasons that the kubelet's own retries rarely clear: the image cannot
# be pulled or named, or the container's config (a Secret or ConfigMap it names) is
# missing. Plain ContainerCreating (a large image still downloading) is not among them.
IMAGE_PROBLEMS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
CONFIG_PROBLEMS = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})
# These never clear by themselves: nothing to wait for.
HOPELESS_START_PROBLEMS = frozenset({"InvalidImageName"})
# A container still being set up on its node: its volumes attaching and mounting (a
# ReadWriteOnce claim attached to another node, a failing CSI driver, a Secret volume that
# does not exist: the pod's FailedMount and FailedAttachVolume Events say which), its init
# containers running (PodInitializing) or, in some runtimes, its image still downloading.
# Normal for a while: a problem only when it lasts (troubles.check_start_problems).
STILL_CREATING = frozenset({"ContainerCreating", "PodInitializing"})


@dataclass(frozen=True)
class StartProblem:
    pod: str
    reason: str  # the kubelet's waiting reason, e.g. ImagePullBackOff
    message: str
    since: dt.datetime | None = None  # when a worker still creating its containers was scheduled

    def __str__(self) -> str:
        return f"{self.pod}: {self.reason}" + (f": {self.message}" if self.message else "")


def start_problem(pod: dict[str, Any]) -> StartProblem | None:
    """Why a scheduled worker's trainer container cannot start, else None."""
    if pod_phase(pod) != POD_PENDING:
        return None
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in IMAGE_PROBLEMS | CONFIG_PROBLEMS:
            return StartProblem(pod=pod_name(pod), reason=waiting["reason"], message=waiting.get("message") or "")
    return None


def still_creating(pod: dict[str, Any]) -> tuple[str, dt.datetime] | None:
    """(waiting reason, when it was scheduled) for a scheduled worker whose containers are
    still being created, else None."""
    scheduled = pod_condition(pod, "PodScheduled")
    if pod_phase(pod) != POD_PENDING or scheduled is None or scheduled.get("status") != "True":
        return None
    # The scheduler stamps the condition when it binds the pod; a pod written without one
    # (by hand, an old API server) counts from its creation, the earlier instant.
    since = parse_timestamp(scheduled.get("lastTransitionTime") or pod["metadata"].get("creationTimestamp"))
    status = pod.get("status") or {}
    for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        reason = ((container.get("state") or {}).get("waiting") or {}).get("reason")
        if reason in STILL_CREATING and since is not None:
            return reason, since
    return None


def is_scheduled(pod: dict[str, Any]) -> bool:
    scheduled = pod_condition(pod, "PodScheduled")
    return pod_phase(pod) != POD_PENDING or (scheduled is not None and scheduled.get("status") == "True")
