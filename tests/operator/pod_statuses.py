"""Worker pods as the scheduler and the kubelet leave them, and the job, clock and timing
that the tables of lifecycle.decide read them with."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

from dbj_examples import MINIMAL_SPEC

from dreambooth_operator import constants as c
from dreambooth_operator.clock import timestamp
from dreambooth_operator.settings import Timing
from dreambooth_operator.spec import JobSpec

NOW = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
TIMING = Timing(backoff_base_seconds=10, backoff_max_seconds=60, pending_timeout_seconds=300)


def job_spec(nodes: int = 2, backoff_limit: int = 3, min_nodes: int | None = None, **run_policy: Any) -> JobSpec:
    spec = copy.deepcopy(MINIMAL_SPEC)
    spec["workers"]["nodes"] = nodes
    if min_nodes is not None:
        spec["workers"]["minNodes"] = min_nodes
    spec["runPolicy"] = {"backoffLimit": backoff_limit, **run_policy}
    return JobSpec.model_validate(spec)


def pod(index: int, phase: str = "Running", gang: int = 0, exit_code: int | None = None, reason: str | None = None,
        conditions: list[dict[str, Any]] | None = None, pod_reason: str | None = None,
        created: dt.datetime = NOW, deleting: bool = False, nodes: int | None = None,
        message: str | None = None, node: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if exit_code is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error")}}}]
    if conditions is not None:
        status["conditions"] = conditions
    if pod_reason is not None:
        status["reason"] = pod_reason
    if message is not None:
        status["message"] = message
    metadata: dict[str, Any] = {"name": f"j-worker-{index}", "creationTimestamp": timestamp(created),
                                "labels": {c.LABEL_GANG: str(gang), c.LABEL_WORKER_INDEX: str(index)}}
    if deleting:
        metadata["deletionTimestamp"] = timestamp(NOW)
    if nodes is not None:  # the gang size the worker was started for
        metadata["annotations"] = {c.ANNOTATION_GANG_NODES: str(nodes)}
    worker = {"metadata": metadata, "status": status}
    if node is not None:  # the node the scheduler bound it to
        worker["spec"] = {"nodeName": node}
    return worker


def scheduled(index: int, since: dt.datetime | None = None, **kwargs: Any) -> dict[str, Any]:
    """Bound to a node (at `since`: the condition's lastTransitionTime), containers not started."""
    bound = {"type": "PodScheduled", "status": "True"}
    if since is not None:
        bound["lastTransitionTime"] = timestamp(since)
    return pod(index, "Pending", conditions=[bound], **kwargs)


def unscheduled(index: int, **kwargs: Any) -> dict[str, Any]:
    return pod(index, "Pending", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                              "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}],
               **kwargs)


def condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((x for x in status.get("conditions") or [] if x["type"] == kind), None)


RUNNING = {"phase": c.PHASE_RUNNING, "restarts": 0, "preemptions": 0, "startTime": timestamp(NOW)}


def waiting(index: int, reason: str, message: str = "", since: dt.datetime | None = None,
            init: bool = False) -> dict[str, Any]:
    """A scheduled worker whose trainer container (or, with `init`, an init container a
    platform injected) waits for `reason`."""
    worker = scheduled(index, since=since)
    if init:  # then the trainer waits for the init container
        worker["status"]["initContainerStatuses"] = [{"name": "istio-init", "state": {"waiting": {"reason": reason}}}]
        reason, message = "PodInitializing", ""
    worker["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {"reason": reason,
                                                                                      "message": message}}}]
    return worker
