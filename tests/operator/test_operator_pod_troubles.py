"""What waiting workers are stuck on (troubles.py) and workers their nodes refused, as
tables of lifecycle.decide; then each through the real operator against the emulated API."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from dbj_examples import MINIMAL_SPEC
from operator_harness import Cluster, wait_for
from pod_statuses import NOW, RUNNING, TIMING, condition, job_spec, pod, unscheduled, waiting

from dreambooth_operator import constants as c
from dreambooth_operator.clock import parse_timestamp, timestamp, utc_now
from dreambooth_operator.lifecycle import decide
from dreambooth_operator.podstates import describe_failure, is_preemption, node_refusal
from dreambooth_operator.settings import Timing


def test_pods_pending_past_the_timeout_get_an_unschedulable_condition() -> None:
    young = decide(job_spec(nodes=1), {"phase": c.PHASE_PENDING}, [unscheduled(0)], NOW, TIMING)
    assert condition(young.status, c.CONDITION_UNSCHEDULABLE) is None
    assert young.requeue_after == pytest.approx(300)

    old = unscheduled(0, created=NOW - dt.timedelta(seconds=301))
    plan = decide(job_spec(nodes=1), {"phase": c.PHASE_PENDING}, [old], NOW, TIMING)
    stuck = condition(plan.status, c.CONDITION_UNSCHEDULABLE)
    assert stuck["status"] == "True" and "Insufficient nvidia.com/gpu" in stuck["message"]

    plan = decide(job_spec(nodes=1), plan.status, [pod(0)], NOW, TIMING)
    assert condition(plan.status, c.CONDITION_UNSCHEDULABLE)["status"] == "False"


PULL_MESSAGE = 'Back-off pulling image "registry.example/dreambooth-trainer:0.1.0x"'


def test_a_container_that_cannot_start_is_named_then_fails_the_job_at_the_start_timeout() -> None:
    timing = Timing(start_timeout_seconds=600)
    initializing = {"phase": c.PHASE_INITIALIZING, "restarts": 0, "preemptions": 0}
    pods = [pod(0), waiting(1, "ImagePullBackOff", PULL_MESSAGE)]
    first = decide(job_spec(), initializing, pods, NOW, timing)
    stuck = condition(first.status, c.CONDITION_CANNOT_START)
    assert (stuck["status"], stuck["reason"]) == ("True", "ImagePullBackOff")
    assert stuck["message"] == f"j-worker-1: ImagePullBackOff: {PULL_MESSAGE}"
    assert first.status["phase"] == c.PHASE_INITIALIZING and not first.delete
    assert first.events == [("Warning", "ImagePullBackOff", f"{stuck['message']} (the job fails if this lasts 600s)")]
    assert first.requeue_after == pytest.approx(600)

    # The kubelet flips between ErrImagePull and ImagePullBackOff: one Event, and the clock keeps running.
    later = decide(job_spec(), first.status, [pod(0), waiting(1, "ErrImagePull", "pull access denied")],
                   NOW + dt.timedelta(seconds=500), timing)
    assert later.events == [] and later.requeue_after == pytest.approx(100)
    assert condition(later.status, c.CONDITION_CANNOT_START)["lastTransitionTime"] == timestamp(NOW)

    failed = decide(job_spec(), later.status, pods, NOW + dt.timedelta(seconds=600), timing)
    assert failed.status["phase"] == c.PHASE_FAILED and sorted(failed.delete) == ["j-worker-0", "j-worker-1"]
    assert condition(failed.status, c.CONDITION_FAILED)["reason"] == "ImagePullBackOff"
    message = condition(failed.status, c.CONDITION_FAILED)["message"]
    assert message == (f"worker j-worker-1: ImagePullBackOff: {PULL_MESSAGE} (its container could not start for 600s); "
                       "fix spec.workers.image (or spec.workers.imagePullSecrets) and recreate the job")
    assert failed.status["lastFailure"] == {"pod": "j-worker-1", "reason": "ImagePullBackOff", "message": PULL_MESSAGE,
                                            "time": timestamp(NOW + dt.timedelta(seconds=600))}


def test_a_container_that_starts_after_all_clears_the_condition() -> None:
    timing = Timing(start_timeout_seconds=600)
    missing = 'secret "hf" not found'
    stuck = decide(job_spec(nodes=1), {"phase": c.PHASE_INITIALIZING}, [waiting(0, "CreateContainerConfigError", missing)],
                   NOW, timing)
    assert condition(stuck.status, c.CONDITION_CANNOT_START)["message"] == f"j-worker-0: CreateContainerConfigError: {missing}"
    # The Secret was created: the container starts.
    started = decide(job_spec(nodes=1), stuck.status, [pod(0)], NOW + dt.timedelta(seconds=30), timing)
    assert started.status["phase"] == c.PHASE_RUNNING
    assert condition(started.status, c.CONDITION_CANNOT_START)["status"] == "False"
    # Had it not, the fix names the Secret, not the image.
    failed = decide(job_spec(nodes=1), stuck.status, [waiting(0, "CreateContainerConfigError", missing)],
                    NOW + dt.timedelta(seconds=601), timing)
    assert "fix the Secret or ConfigMap the message names" in condition(failed.status, c.CONDITION_FAILED)["message"]


@pytest.mark.parametrize("reason,fails_at_once", [
    ("InvalidImageName", True),  # nothing will ever fix a malformed reference
    ("ErrImagePull", False), ("ErrImageNeverPull", False), ("CreateContainerError", False),
    # a big image still downloading, a volume still attaching: no problem before the start timeout
    ("ContainerCreating", None), ("PodInitializing", None),
])
def test_which_waiting_reasons_count(reason: str, fails_at_once: bool | None) -> None:
    plan = decide(job_spec(nodes=1), {"phase": c.PHASE_INITIALIZING}, [waiting(0, reason)], NOW, Timing())
    cannot_start = condition(plan.status, c.CONDITION_CANNOT_START)
    if fails_at_once is None:
        assert cannot_start is None and plan.status["phase"] == c.PHASE_INITIALIZING
    else:
        assert cannot_start["status"] == "True"
        assert (plan.status["phase"] == c.PHASE_FAILED) is fails_at_once


ALLOCATE_FAILED = ("Pod was rejected: Allocate failed due to requested number of devices unavailable for "
                   "nvidia.com/gpu. Requested: 8, Available: 0, which is unexpected")
CONTAINER_STATUS_UNKNOWN = {"name": "trainer", "state": {"terminated": {
    "exitCode": 137, "reason": "ContainerStatusUnknown",
    "message": "The container could not be located when the pod was terminated"}}}


def refused(pod_reason: str, message: str = ALLOCATE_FAILED, **kwargs: Any) -> dict[str, Any]:
    """A worker the kubelet of gpu-3 would not admit: Failed before its trainer ran."""
    return pod(1, "Failed", pod_reason=pod_reason, message=message, node="gpu-3", **kwargs)


def with_statuses(worker: dict[str, Any], *statuses: dict[str, Any]) -> dict[str, Any]:
    worker["status"]["containerStatuses"] = list(statuses)
    return worker


# As pkg/kubelet/lifecycle/predicate.go and pkg/kubelet/cm/admission name them.
@pytest.mark.parametrize("worker,refusal", [
    (refused("UnexpectedAdmissionError"), "UnexpectedAdmissionError"),
    (refused("DeviceNotReady", "cannot allocate unregistered device nvidia.com/gpu"), "DeviceNotReady"),
    (refused("OutOfnvidia.com/gpu", "Pod was rejected: Node didn't have enough resource: nvidia.com/gpu, "
                                    "requested: 8, used: 8, capacity: 8"), "OutOfnvidia.com/gpu"),
    (refused("OutOfcpu"), "OutOfcpu"), (refused("OutOfmemory"), "OutOfmemory"), (refused("OutOfpods"), "OutOfpods"),
    (refused("OutOfephemeral-storage"), "OutOfephemeral-storage"),
    (refused("OutOfhugepages-2Mi"), "OutOfhugepages-2Mi"),
    (refused("NodeAffinity", "Pod was rejected: Predicate NodeAffinity failed"), "NodeAffinity"),
    (refused("TaintToleration"), "TaintToleration"), (refused("NodeLost"), "NodeLost"),
    (refused("InvalidNodeInfo"), "InvalidNodeInfo"),
    # the kubelet's stand-in for a container it never saw end is not an exit of the trainer
    (with_statuses(refused("OutOfcpu"), CONTAINER_STATUS_UNKNOWN), "OutOfcpu"),
    # a trainer that ran and crashed is judged by its exit, whatever the pod's reason says
    (refused("OutOfmemory", exit_code=1), None),
    (refused("UnexpectedAdmissionError", exit_code=137, reason="OOMKilled"), None),
    # refusals that follow from the pod's own request would refuse the next gang too: counted
    (refused("TopologyAffinityError", "Resources cannot be allocated with Topology locality"), None),
    (refused("SMTAlignmentError"), None),
    # "OutOf" alone, or followed by anything but a resource name, is no kubelet's
    (refused("OutOf"), None), (refused("OutOfSync"), None), (refused("OutOfcpuAndMore"), None),
])
def test_a_worker_its_node_refused_restarts_the_gang_without_counting(worker: dict[str, Any],
                                                                      refusal: str | None) -> None:
    assert node_refusal(worker) == refusal
    assert is_preemption(worker) is (refusal is not None)
    plan = decide(job_spec(backoff_limit=0), RUNNING, [pod(0), worker], NOW, TIMING)
    if refusal is None:  # backoffLimit 0: the first counted failure fails the job
        assert condition(plan.status, c.CONDITION_FAILED)["reason"] == c.REASON_BACKOFF_LIMIT_EXCEEDED
        return
    assert plan.status["phase"] == c.PHASE_RESTARTING and plan.gang == 1 and not plan.counted_restart
    assert (plan.status["restarts"], plan.status["preemptions"]) == (0, 1)
    assert sorted(plan.delete) == ["j-worker-0", "j-worker-1"]  # the whole gang makes way for the next
    message = worker["status"]["message"]
    # The kubelet's words, with no exit code: the trainer never ran.
    assert plan.status["lastFailure"] == {"pod": "j-worker-1", "reason": refusal, "message": message,
                                          "time": timestamp(NOW)}
    restarting = condition(plan.status, c.CONDITION_RESTARTING)
    assert restarting["reason"] == c.REASON_REFUSED_BY_NODE
    assert restarting["message"] == (
        f"worker j-worker-1 refused by the kubelet of gpu-3 ({refusal}: {message}); restarting from the latest "
        "checkpoint, not counted against backoffLimit; if gpu-3 keeps refusing workers, cordon it")
    assert plan.events == [("Warning", c.REASON_REFUSED_BY_NODE, restarting["message"])]


def test_a_node_that_refuses_every_gang_is_retried_with_backoff_and_never_fails_the_job() -> None:
    # The fix is the node's, not the spec's: the job waits for it, slower each time, as
    # for preemptions in a row, and the message says which node to cordon.
    status, now = dict(RUNNING), NOW
    for gang in range(12):
        plan = decide(job_spec(backoff_limit=0), status, [refused("UnexpectedAdmissionError", gang=gang)],
                      now, TIMING)
        status = plan.status
        assert status["phase"] == c.PHASE_RESTARTING and status["restarts"] == 0
        restart_at = parse_timestamp(status["nextRestartTime"])
        if restart_at > now:  # no gang before its time, then the next
            assert decide(job_spec(), status, [], restart_at - dt.timedelta(seconds=1), TIMING).create == []
        assert decide(job_spec(), status, [], restart_at, TIMING).create == [0, 1]
        now = restart_at
    assert status["preemptions"] == status["consecutivePreemptions"] == 12
    assert (now - NOW).total_seconds() == 10 + 20 + 40 + 8 * TIMING.backoff_max_seconds
    message = condition(status, c.CONDITION_RESTARTING)["message"]
    assert "12 times in a row with no new checkpoint in between" in message and message.endswith("cordon it")


def test_a_refused_worker_is_described_by_the_kubelet_not_by_its_never_started_container() -> None:
    failure = describe_failure(with_statuses(refused("OutOfnvidia.com/gpu", "Node didn't have enough resource"),
                                             CONTAINER_STATUS_UNKNOWN))
    assert (failure.reason, failure.exit_code, failure.message) == (
        "OutOfnvidia.com/gpu", None, "Node didn't have enough resource")
    assert node_refusal(pod(1, "Pending", pod_reason="OutOfcpu")) is None  # not failed: nothing to restart


SCHEDULED = NOW - dt.timedelta(seconds=600)  # a start timeout ago


@pytest.mark.parametrize("worker", [waiting(1, "ContainerCreating", since=SCHEDULED),
                                    waiting(1, "PodInitializing", since=SCHEDULED, init=True)])
def test_a_worker_still_creating_past_the_start_timeout_is_named_then_fails_the_job_a_timeout_later(
        worker: dict[str, Any]) -> None:
    timing = Timing(start_timeout_seconds=600)
    reason = worker["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
    initializing = {"phase": c.PHASE_INITIALIZING, "restarts": 0, "preemptions": 0}
    # A volume attaching, a large image downloading: normal for a while, looked at again when it is not.
    early = decide(job_spec(), initializing, [pod(0), worker], NOW - dt.timedelta(seconds=1), timing)
    assert condition(early.status, c.CONDITION_CANNOT_START) is None and not early.events
    assert early.requeue_after == pytest.approx(1)

    first = decide(job_spec(), early.status, [pod(0), worker], NOW, timing)
    stuck = condition(first.status, c.CONDITION_CANNOT_START)
    assert (stuck["status"], stuck["reason"]) == ("True", reason)
    assert stuck["message"] == (
        f"j-worker-1: {reason}: still creating its containers, over 600s since it was scheduled at "
        f"{timestamp(SCHEDULED)}; kubectl describe pod j-worker-1 shows why: FailedMount or FailedAttachVolume "
        "Events for a volume that cannot mount (spec.storage, spec.workers.volumes), else a very large image "
        f"still downloading; the job fails at {timestamp(NOW + dt.timedelta(seconds=600))} if a worker is still "
        "creating then")
    assert first.events == [("Warning", reason, stuck["message"])]
    assert first.status["phase"] == c.PHASE_INITIALIZING and not first.delete
    assert first.requeue_after == pytest.approx(600)

    # Unchanged while it lasts: nothing to patch, no second Event.
    later = decide(job_spec(), first.status, [pod(0), worker], NOW + dt.timedelta(seconds=599), timing)
    assert later.status == first.status and not later.events

    failed = decide(job_spec(), later.status, [pod(0), worker], NOW + dt.timedelta(seconds=600), timing)
    assert failed.status["phase"] == c.PHASE_FAILED and sorted(failed.delete) == ["j-worker-0", "j-worker-1"]
    assert condition(failed.status, c.CONDITION_FAILED)["reason"] == reason
    message = condition(failed.status, c.CONDITION_FAILED)["message"]
    assert "(still creating its containers 1200s after it was scheduled); fix the volume the pod's Events name " \
           "(spec.storage, spec.workers.volumes) and recreate the job; an image that takes this long to download " \
           "needs a longer --start-timeout" in message
    assert failed.status["lastFailure"]["reason"] == reason and "kubectl describe pod j-worker-1" in \
        failed.status["lastFailure"]["message"]


def test_a_worker_that_finishes_creating_in_time_clears_the_condition() -> None:
    timing = Timing(start_timeout_seconds=600)
    stuck = decide(job_spec(nodes=1), {"phase": c.PHASE_INITIALIZING},
                   [waiting(0, "ContainerCreating", since=SCHEDULED)], NOW, timing)
    assert condition(stuck.status, c.CONDITION_CANNOT_START)["status"] == "True"
    started = decide(job_spec(nodes=1), stuck.status, [pod(0)], NOW + dt.timedelta(seconds=300), timing)
    assert started.status["phase"] == c.PHASE_RUNNING
    assert condition(started.status, c.CONDITION_CANNOT_START)["status"] == "False"


# --- through the real operator against the emulated API, the test playing the kubelet ---

@pytest.mark.timeout(120)
def test_a_worker_its_kubelet_refuses_is_replaced_by_a_new_gang_without_counting(cluster: Cluster) -> None:
    cluster.create_job("refused", {**MINIMAL_SPEC, "workers": {**MINIMAL_SPEC["workers"], "nodes": 2},
                                   "runPolicy": {"backoffLimit": 0}})
    pods = wait_for(lambda: len(p := cluster.pods("refused")) == 2 and p, what="2 worker pods")
    # Bound to gpu-3, whose NVIDIA device plugin is restarting: its kubelet refuses the pod.
    cluster.core.patch_namespaced_pod("refused-worker-1", "default", {"spec": {"nodeName": "gpu-3"}})
    cluster.set_pod_status("refused-worker-1", {"phase": "Failed", "reason": "UnexpectedAdmissionError",
                                                "message": ALLOCATE_FAILED})
    status = wait_for(lambda: (s := cluster.status("refused")).get("preemptions") == 1 and s, what="preemptions: 1")
    # backoffLimit 0 would have failed the job at any counted failure.
    assert status["restarts"] == 0 and status["phase"] != "Failed"
    assert {key: status["lastFailure"].get(key) for key in ("pod", "reason", "message", "exitCode")} == {
        "pod": "refused-worker-1", "reason": "UnexpectedAdmissionError", "message": ALLOCATE_FAILED, "exitCode": None}
    new = wait_for(lambda: len(p := cluster.pods("refused")) == 2
                   and all(x["metadata"]["labels"][c.LABEL_GANG] == "1" for x in p) and p, what="a new gang")
    assert not {p["metadata"]["uid"] for p in pods} & {p["metadata"]["uid"] for p in new}
    event = wait_for(lambda: [e for e in cluster.events("refused") if e["reason"] == c.REASON_REFUSED_BY_NODE],
                     what="a RefusedByNode Event")[0]
    assert event["type"] == "Warning" and "refused by the kubelet of gpu-3" in event["message"]
    cluster.run_pods("refused")
    wait_for(lambda: cluster.status("refused").get("phase") == "Running", what="Running")
    assert cluster.status("refused")["restarts"] == 0


@pytest.mark.timeout(120)
def test_a_worker_stuck_creating_gets_cannot_start_then_fails_the_job(cluster: Cluster) -> None:
    # --start-timeout is 3 s here: the condition 3 s after scheduling, the failure 3 s later.
    cluster.create_job("mount", MINIMAL_SPEC)
    wait_for(lambda: len(cluster.pods("mount")) == 1, what="the worker")
    scheduled_at = utc_now().replace(microsecond=0)  # as status timestamps are written
    cluster.set_pod_status("mount-worker-0", {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": timestamp(scheduled_at)}],
        "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
                               "state": {"waiting": {"reason": "ContainerCreating"}}}]})
    wait_for(lambda: cluster.status("mount").get("phase") == "Initializing", what="Initializing")
    cannot_start = wait_for(lambda: condition(cluster.status("mount"), c.CONDITION_CANNOT_START), what="CannotStart")
    assert (utc_now() - scheduled_at).total_seconds() >= 3
    assert cannot_start["status"] == "True" and cannot_start["reason"] == "ContainerCreating"
    assert "kubectl describe pod mount-worker-0" in cannot_start["message"]
    assert "the job fails at" in cannot_start["message"]
    wait_for(lambda: cluster.status("mount").get("phase") == "Failed", what="Failed a start timeout later")
    failed = condition(cluster.status("mount"), c.CONDITION_FAILED)
    assert failed["reason"] == "ContainerCreating" and "fix the volume the pod's Events name" in failed["message"]
    wait_for(lambda: cluster.pods("mount") == [], what="the worker deleted, its node freed")
    warnings = [e for e in cluster.events("mount") if e["type"] == "Warning" and e["reason"] == "ContainerCreating"]
    assert len(warnings) == 2  # the problem once when seen, the failure once
