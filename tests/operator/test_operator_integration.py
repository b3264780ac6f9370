"""The real operator (a `python -m dreambooth_operator` process) against an emulated
Kubernetes API over HTTP. The test plays the kubelet by setting pod statuses.

One cluster and one operator serve the whole module (each test uses its own job
names); the restart test restarts that operator.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dbj_examples import FULL_SPEC, KUBERNETES_VERSION, MINIMAL_SPEC
from operator_harness import Cluster, OperatorProcess, condition, evicted, terminated, wait_for

from trainer.metrics import TrainerMetrics

pytestmark = pytest.mark.timeout(120)


def spec(**changes: Any) -> dict[str, Any]:
    """MINIMAL_SPEC with `section={...}` merged in."""
    result = copy.deepcopy(MINIMAL_SPEC)
    for section, values in changes.items():
        result.setdefault(section, {}).update(values)
    return result


def phase_is(cluster: Cluster, job: str, phase: str) -> Any:
    return lambda: cluster.status(job).get("phase") == phase


def pod_names(cluster: Cluster, job: str) -> list[str]:
    return [p["metadata"]["name"] for p in cluster.pods(job)]


def pods_created(operator: OperatorProcess) -> float:
    return operator.metric("dreambooth_operator_pods_created_total")


def gang_of(pod: dict[str, Any]) -> str:
    return pod["metadata"]["labels"]["dreambooth.io/gang"]


def test_create_makes_valid_children_then_follows_pods_to_success(cluster: Cluster) -> None:
    cluster.create_job("three", spec(workers={"nodes": 3}))
    pods = wait_for(lambda: len(cluster.pods("three")) == 3 and cluster.pods("three"), what="3 worker pods")
    assert [p["metadata"]["name"] for p in pods] == ["three-worker-0", "three-worker-1", "three-worker-2"]
    [service] = cluster.services("three")
    [config_map] = cluster.config_maps("three")
    assert service["spec"]["clusterIP"] == "None"
    assert "config.yaml" in config_map["data"]
    owner_uid = cluster.job("three")["metadata"]["uid"]
    for obj in [*pods, service, config_map]:
        assert obj["metadata"]["ownerReferences"][0]["uid"] == owner_uid
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    command = pods[2]["spec"]["containers"][0]["command"]
    assert command[command.index("--node_rank") + 1] == "2"
    assert command[command.index("--master_addr") + 1] == "three-worker-0.three"

    status = cluster.status("three")
    assert condition(status, "Created")["status"] == "True"
    cluster.run_pods("three")
    wait_for(phase_is(cluster, "three", "Running"), what="phase Running")
    assert condition(cluster.status("three"), "Running")["status"] == "True"

    for name in pod_names(cluster, "three"):
        cluster.set_pod_status(name, terminated(0, "Completed", phase="Succeeded"))
    wait_for(phase_is(cluster, "three", "Succeeded"), what="phase Succeeded")
    status = cluster.status("three")
    assert condition(status, "Succeeded")["status"] == "True"
    assert condition(status, "Running")["status"] == "False"
    assert status["completionTime"]
    assert status["output"] == {"claimName": "dreambooth-ckpt", "path": "three/output"}  # where the model is


def test_worker_failure_restarts_the_whole_gang(cluster: Cluster) -> None:
    cluster.create_job("flaky", spec(workers={"nodes": 2}, runPolicy={"backoffLimit": 2}))
    wait_for(lambda: len(cluster.pods("flaky")) == 2, what="2 worker pods")
    cluster.run_pods("flaky")
    wait_for(phase_is(cluster, "flaky", "Running"), what="Running")
    first_uids = {p["metadata"]["uid"] for p in cluster.pods("flaky")}

    cluster.set_pod_status("flaky-worker-1", terminated(1, "Error"))
    status = wait_for(lambda: cluster.status("flaky").get("restarts") == 1 and cluster.status("flaky"),
                      what="restarts: 1")
    assert status["lastFailure"]["pod"] == "flaky-worker-1"
    assert status["lastFailure"]["exitCode"] == 1
    assert status["lastFailure"]["reason"] == "Error"
    # The whole gang is replaced: new pods (new uids) of gang 1, both workers.
    pods = wait_for(lambda: (p := cluster.pods("flaky")) and len(p) == 2 and all(gang_of(x) == "1" for x in p) and p,
                    what="a new gang of 2 pods")
    assert not first_uids & {p["metadata"]["uid"] for p in pods}
    # The Event is posted right after the status: wait for it rather than race it.
    wait_for(lambda: any(e["reason"] == "WorkerFailed" and e["type"] == "Warning" for e in cluster.events("flaky")),
             what="a WorkerFailed Event")
    cluster.run_pods("flaky")
    wait_for(phase_is(cluster, "flaky", "Running"), what="Running again")
    assert cluster.status("flaky")["restarts"] == 1


def test_backoff_limit_exceeded_fails_the_job_with_the_reason(cluster: Cluster) -> None:
    cluster.create_job("doomed", spec(runPolicy={"backoffLimit": 1}))
    for attempt in range(2):
        wait_for(lambda attempt=attempt: (p := cluster.pods("doomed")) and gang_of(p[0]) == str(attempt)
                 and p[0]["status"]["phase"] == "Pending", what=f"gang {attempt}")
        cluster.set_pod_status("doomed-worker-0", terminated(137, "OOMKilled"))
    wait_for(phase_is(cluster, "doomed", "Failed"), what="phase Failed")
    status = cluster.status("doomed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "OOMKilled" in failed["message"] and "backoffLimit = 1" in failed["message"]
    assert status["restarts"] == 1
    assert status["lastFailure"] == {**status["lastFailure"], "reason": "OOMKilled", "exitCode": 137}
    wait_for(lambda: any(e["reason"] == "BackoffLimitExceeded" for e in cluster.events("doomed")),
             what="a BackoffLimitExceeded Event")


@pytest.mark.parametrize("how", ["exit143", "evicted", "disruption"])
def test_preemption_restarts_without_counting(cluster: Cluster, how: str) -> None:
    name = f"preempt-{how}"
    cluster.create_job(name, spec(workers={"nodes": 2}, runPolicy={"backoffLimit": 0}))
    wait_for(lambda: len(cluster.pods(name)) == 2, what="2 pods")
    cluster.run_pods(name)
    wait_for(phase_is(cluster, name, "Running"), what="Running")
    if how == "exit143":
        cluster.set_pod_status(f"{name}-worker-0", terminated(143, "Error"))
    elif how == "evicted":
        cluster.set_pod_status(f"{name}-worker-1", evicted())
    else:
        status = terminated(1, "Error")
        status["conditions"] = [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]
        cluster.set_pod_status(f"{name}-worker-1", status)
    wait_for(lambda: cluster.status(name).get("preemptions") == 1, what="preemptions: 1")
    wait_for(lambda: (p := cluster.pods(name)) and len(p) == 2 and all(gang_of(x) == "1" for x in p),
             what="a new gang")
    status = cluster.status(name)
    # backoffLimit 0 would have failed the job on any counted failure.
    assert status["restarts"] == 0
    assert status["phase"] != "Failed"
    if how == "evicted":  # evicted again before a new checkpoint: the restart backs off
        cluster.run_pods(name)
        wait_for(phase_is(cluster, name, "Running"), what="Running again")
        cluster.set_pod_status(f"{name}-worker-0", evicted())
        wait_for(lambda: cluster.status(name).get("preemptions") == 2, what="preemptions: 2")
        assert cluster.status(name)["consecutivePreemptions"] == 2
        wait_for(lambda: any("2 times in a row with no new checkpoint" in e["message"]
                             for e in cluster.events(name) if e["reason"] == "Preempted"), what="the Event")
        wait_for(lambda: (p := cluster.pods(name)) and len(p) == 2 and all(gang_of(x) == "2" for x in p),
                 what="the gang after the backoff")


def test_invalid_spec_fails_that_job_only(cluster: Cluster) -> None:
    cluster.create_job("broken", spec(workers={"nodes": 0}))
    cluster.create_job("healthy", spec())
    wait_for(phase_is(cluster, "broken", "Failed"), what="broken job Failed")
    assert cluster.status("broken")["observedGeneration"] == 1
    failed = condition(cluster.status("broken"), "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.workers.nodes = 0" in failed["message"]
    events = wait_for(lambda: [e for e in cluster.events("broken") if e["reason"] == "InvalidSpec"], what="Event")
    assert events[0]["type"] == "Warning" and "spec.workers.nodes" in events[0]["message"]
    assert cluster.pods("broken") == []
    wait_for(lambda: len(cluster.pods("healthy")) == 1, what="the other job's pod")

    # Fixing the spec starts the job afresh; the status says it was decided from the edit.
    cluster.patch_spec("broken", {"workers": {"nodes": 1}})
    wait_for(lambda: len(cluster.pods("broken")) == 1, what="pod after the fix")
    assert cluster.status("broken")["phase"] == "Pending"
    wait_for(lambda: cluster.status("broken").get("observedGeneration") == 2, what="observedGeneration 2")


def test_a_service_of_the_jobs_name_that_is_not_the_jobs_is_neither_taken_over_nor_deleted(cluster: Cluster) -> None:
    theirs = {"metadata": {"name": "clash"}, "spec": {"ports": [{"port": 80}], "selector": {"app": "web"}}}
    cluster.core.create_namespaced_service("default", theirs)
    # A ConfigMap an earlier job of the same name left behind (its garbage collection lagging): replaced.
    stale = {"metadata": {"name": "clash-config", "ownerReferences": [
        {"apiVersion": "dreambooth.io/v1alpha1", "kind": "DreamboothJob", "name": "clash", "uid": "an-earlier-job"}]},
        "data": {"config.yaml": "old"}}
    cluster.core.create_namespaced_config_map("default", stale)
    cluster.create_job("clash", spec())
    wait_for(phase_is(cluster, "clash", "Failed"), what="clash Failed")
    failed = condition(cluster.status("clash"), "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith(
        "a Service named 'clash' already exists in namespace default and is not this job's; the job needs that name "
        "for its workers' DNS names")
    assert cluster.pods("clash") == []

    # Deleting the job leaves their Service alone.
    cluster.delete_job("clash")
    wait_for(lambda: not cluster.job_exists("clash"), what="job gone")
    assert cluster.core.read_namespaced_service("clash", "default").spec.selector == {"app": "web"}

    # Once it is gone, a job of that name starts, the stale ConfigMap replaced by its own.
    cluster.core.delete_namespaced_service("clash", "default")
    assert cluster.core.read_namespaced_config_map("clash-config", "default").data == {"config.yaml": "old"}
    cluster.create_job("clash", spec())
    wait_for(lambda: len(cluster.pods("clash")) == 1, what="the worker")
    owner = cluster.core.read_namespaced_config_map("clash-config", "default").metadata.owner_references[0]
    assert owner.uid == cluster.job("clash")["metadata"]["uid"]


NFS_WITHOUT_PATH = {"volumes": [{"name": "datasets", "nfs": {"server": "nfs.internal"}}]}
ENV_WITH_VALUE_AND_SOURCE = {"env": [{"name": "TOKEN", "value": "x",
                                      "valueFrom": {"secretKeyRef": {"name": "t", "key": "token"}}}]}


@pytest.mark.parametrize("name,workers,expected", [
    # The Pod schema (checked by the client before it sends anything) ...
    ("bad-volume", NFS_WITHOUT_PATH, "spec.volumes[4].nfs.path: Field required"),
    # ... and a rule of the API server's own validation code (422).
    ("bad-env", ENV_WITH_VALUE_AND_SOURCE, 'Pod "bad-env-worker-0" is invalid: spec.containers[0].env[4].valueFrom: '
                                           'Invalid value: "": may not be specified when `value` is not empty'),
])
def test_a_spec_whose_pods_cannot_be_created_fails_with_the_reason(cluster: Cluster, name: str,
                                                                   workers: dict[str, Any], expected: str) -> None:
    # Valid for the CRD and the spec model (volumes and env pass through as in a Pod),
    # but not a valid Pod: no pod is created, not even once, and the job says why.
    cluster.create_job(name, spec(workers=workers))
    cluster.create_job(f"{name}-neighbour", spec())
    message = wait_for(lambda: (s := cluster.status(name)).get("phase") == "Failed"
                       and condition(s, "Failed")["message"], what=f"{name} Failed")
    assert condition(cluster.status(name), "Failed")["reason"] == "InvalidSpec"
    assert message.startswith(f"the API server refuses the Pod '{name}-worker-0' made from this spec: ")
    assert expected in message
    wait_for(lambda: len(cluster.pods(f"{name}-neighbour")) == 1, what="the other job's pod")
    assert cluster.pods(name) == []
    events = wait_for(lambda: [e for e in cluster.events(name) if e["reason"] == "InvalidSpec"], what="Event")
    assert len(events) == 1  # the next passes find the same refusal and say nothing new

    cluster.patch_spec(name, {"workers": {"volumes": [], "env": []}})
    wait_for(lambda: cluster.pods(name), what="pod after the fix")


def test_a_gang_over_the_namespace_quota_says_so_and_starts_once_it_fits(cluster: Cluster) -> None:
    namespace = "team-b"  # a quota of its own, away from the other tests' pods
    cluster.core.create_namespaced_resource_quota(namespace, {"metadata": {"name": "gpu-pods"},
                                                              "spec": {"hard": {"pods": "1"}}})
    cluster.create_job("crowded", spec(workers={"nodes": 2}), namespace=namespace)

    created = wait_for(lambda: (cond := condition(cluster.status("crowded", namespace), "Created"))
                       and cond["status"] == "False" and cond, what="condition Created False")
    assert created["reason"] == "FailedCreate"
    assert created["message"] == ('pods "crowded-worker-1" is forbidden: exceeded quota: gpu-pods, '
                                  "requested: pods=1, used: pods=1, limited: pods=1")
    assert [p["metadata"]["name"] for p in cluster.pods("crowded", namespace)] == ["crowded-worker-0"]
    assert cluster.status("crowded", namespace)["phase"] == "Pending"  # not failed: a quota can grow
    time.sleep(3)  # more passes (resync 2 s) find the same refusal and say nothing new
    events = [e for e in cluster.events("crowded", namespace) if e["reason"] == "FailedCreate"]
    assert len(events) == 1 and events[0]["type"] == "Warning" and "exceeded quota" in events[0]["message"]

    cluster.core.patch_namespaced_resource_quota("gpu-pods", namespace, {"spec": {"hard": {"pods": "4"}}})
    wait_for(lambda: len(cluster.pods("crowded", namespace)) == 2, what="the second worker once the quota fits")
    created = wait_for(lambda: (cond := condition(cluster.status("crowded", namespace), "Created"))
                       and cond["status"] == "True" and cond, what="condition Created True")
    assert created["reason"] == "WorkersCreated"


def test_suspend_deletes_workers_and_resume_recreates_them(cluster: Cluster) -> None:
    cluster.create_job("pausable", spec(workers={"nodes": 2}))
    wait_for(lambda: len(cluster.pods("pausable")) == 2, what="2 pods")
    cluster.run_pods("pausable")
    wait_for(phase_is(cluster, "pausable", "Running"), what="Running")

    cluster.patch_spec("pausable", {"runPolicy": {"suspend": True}})
    wait_for(phase_is(cluster, "pausable", "Suspended"), what="Suspended")
    wait_for(lambda: cluster.pods("pausable") == [], what="workers deleted")
    assert condition(cluster.status("pausable"), "Suspended")["status"] == "True"

    cluster.patch_spec("pausable", {"runPolicy": {"suspend": False}})
    wait_for(lambda: len(cluster.pods("pausable")) == 2, what="workers recreated")
    status = cluster.status("pausable")
    assert status["phase"] == "Pending"
    assert condition(status, "Suspended")["status"] == "False"
    assert status["restarts"] == 0


def test_active_deadline_fails_the_job(cluster: Cluster) -> None:
    # startTime has whole seconds (RFC 3339, as Kubernetes writes it), so a deadline of N
    # seconds may end up to 1 s early: 3 s leaves the pod alive long enough to be seen.
    cluster.create_job("slow", spec(runPolicy={"activeDeadlineSeconds": 3}))
    wait_for(lambda: len(cluster.pods("slow")) == 1, what="pod")
    cluster.run_pods("slow")
    wait_for(phase_is(cluster, "slow", "Failed"), what="Failed after the deadline")
    assert condition(cluster.status("slow"), "Failed")["reason"] == "DeadlineExceeded"
    wait_for(lambda: cluster.pods("slow") == [], what="workers stopped")


def test_unschedulable_pods_get_a_condition_with_the_scheduler_message(cluster: Cluster) -> None:
    cluster.create_job("huge", spec(workers={"gpusPerNode": 64}))
    wait_for(lambda: len(cluster.pods("huge")) == 1, what="pod")
    message = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    cluster.set_pod_status("huge-worker-0", {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]})
    unschedulable = wait_for(lambda: condition(cluster.status("huge"), "Unschedulable"), what="Unschedulable")
    assert unschedulable["status"] == "True" and message in unschedulable["message"]


def test_a_worker_whose_image_cannot_be_pulled_is_named_then_fails_the_job_and_frees_its_node(cluster: Cluster) -> None:
    cluster.create_job("typo", spec(workers={"image": "registry.example/dreambooth-trainer:0.1.0x"}))
    wait_for(lambda: len(cluster.pods("typo")) == 1, what="pod")
    pull = 'Back-off pulling image "registry.example/dreambooth-trainer:0.1.0x"'
    cluster.set_pod_status("typo-worker-0", {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
                                             "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0,
                                                                    "image": "x", "imageID": "",
                                                                    "state": {"waiting": {"reason": "ImagePullBackOff",
                                                                                          "message": pull}}}]})
    cannot_start = wait_for(lambda: condition(cluster.status("typo"), "CannotStart"), what="CannotStart")
    assert cannot_start["status"] == "True" and cannot_start["message"] == f"typo-worker-0: ImagePullBackOff: {pull}"
    assert cluster.status("typo")["phase"] == "Initializing"
    # --start-timeout is 3 s here (600 by default).
    wait_for(phase_is(cluster, "typo", "Failed"), what="Failed at the start timeout")
    failed = condition(cluster.status("typo"), "Failed")
    assert failed["reason"] == "ImagePullBackOff" and "fix spec.workers.image" in failed["message"]
    wait_for(lambda: cluster.pods("typo") == [], what="the worker deleted")
    warnings = [e for e in cluster.events("typo") if e["type"] == "Warning" and e["reason"] == "ImagePullBackOff"]
    assert len(warnings) == 2  # the problem once when seen, the failure once


def test_progress_is_scraped_from_rank_0_into_status(cluster: Cluster) -> None:
    # Rank 0's endpoint is the trainer's own metrics module, served on loopback.
    rank0 = TrainerMetrics(max_steps=100, labels={"job": "scraped", "namespace": "default"})
    rank0.serve("127.0.0.1", 0)
    rank0.record_position(step=42, samples=84)
    rank0.record_values({"loss": 0.125, "instance_loss": 0.1, "prior_loss": 0.025, "learning_rate": 2e-6,
                         "samples_per_second": 12.5, "eta_seconds": 8.0})
    rank0.record_checkpoint(step=40, seconds=1.0)
    try:
        cluster.create_job("scraped", spec(metrics={"port": rank0.serving_port}))
        wait_for(lambda: len(cluster.pods("scraped")) == 1, what="pod")
        cluster.run_pods("scraped", pod_ip="127.0.0.1")
        status = wait_for(lambda: (s := cluster.status("scraped")).get("step") == 42 and s, what="step 42")
        rank0.record_position(step=50, samples=100)
        wait_for(lambda: cluster.status("scraped").get("step") == 50, what="step 50 at the next scrape")
    finally:
        rank0.close()
    assert status["maxSteps"] == 100
    assert status["progress"] == "42%"
    assert status["loss"] == 0.125
    assert status["samplesPerSecond"] == 12.5
    assert status["etaSeconds"] == 8.0
    assert status["latestCheckpoint"]["step"] == 40
    assert status["latestCheckpoint"]["path"].endswith("/scraped/checkpoints/step-00000040")


def test_delete_removes_every_child(cluster: Cluster) -> None:
    cluster.create_job("doomed-by-user", spec(workers={"nodes": 2}, storage={"claimName": None, "size": "1Gi",
                                                                            "retain": False}))
    wait_for(lambda: len(cluster.pods("doomed-by-user")) == 2, what="2 pods")
    assert len(cluster.claims("doomed-by-user")) == 1
    cluster.delete_job("doomed-by-user")
    wait_for(lambda: not cluster.job_exists("doomed-by-user"), what="job gone (finalizer released)")
    assert cluster.pods("doomed-by-user") == []
    assert cluster.services("doomed-by-user") == []
    assert cluster.config_maps("doomed-by-user") == []
    assert cluster.claims("doomed-by-user") == []


def test_delete_keeps_a_retained_claim(cluster: Cluster) -> None:
    cluster.create_job("keeper", spec(storage={"claimName": None, "size": "1Gi"}))
    wait_for(lambda: len(cluster.pods("keeper")) == 1, what="pod")
    cluster.delete_job("keeper")
    wait_for(lambda: not cluster.job_exists("keeper"), what="job gone")
    assert cluster.pods("keeper") == []
    assert [c["metadata"]["name"] for c in cluster.claims("keeper")] == ["keeper-storage"]


def test_a_claim_kept_from_an_earlier_job_is_resumed_from_and_not_deleted_by_the_next(cluster: Cluster) -> None:
    cluster.create_job("again", spec(storage={"claimName": None, "size": "1Gi"}))  # retained (the default)
    wait_for(lambda: len(cluster.pods("again")) == 1, what="pod")
    cluster.delete_job("again")
    wait_for(lambda: not cluster.job_exists("again"), what="job gone")
    # The same job again, now not retaining its claim: it resumes from the kept one, and
    # that claim, which it did not make, outlives it.
    cluster.create_job("again", spec(storage={"claimName": None, "size": "1Gi", "retain": False}))
    wait_for(lambda: len(cluster.pods("again")) == 1, what="pod of the second job")
    cluster.delete_job("again")
    wait_for(lambda: not cluster.job_exists("again"), what="second job gone")
    assert [c["metadata"]["name"] for c in cluster.claims("again")] == ["again-storage"]


def test_someone_elses_claim_of_the_name_the_job_would_make_is_refused(cluster: Cluster) -> None:
    theirs = {"metadata": {"name": "taken-storage"},
              "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
    cluster.core.create_namespaced_persistent_volume_claim("default", theirs)
    cluster.create_job("taken", spec(storage={"claimName": None, "size": "1Gi", "retain": False}))
    wait_for(phase_is(cluster, "taken", "Failed"), what="taken Failed")
    failed = condition(cluster.status("taken"), "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith("a PersistentVolumeClaim named 'taken-storage' already exists in namespace "
                                        "default and is not this job's")
    cluster.delete_job("taken")
    wait_for(lambda: not cluster.job_exists("taken"), what="job gone")
    assert cluster.core.read_namespaced_persistent_volume_claim("taken-storage", "default").metadata.name


def test_a_finished_job_is_deleted_after_its_ttl_and_its_claim_kept(cluster: Cluster) -> None:
    cluster.create_job("short-lived", spec(storage={"claimName": None, "size": "1Gi"},
                                           runPolicy={"ttlSecondsAfterFinished": 2}))
    wait_for(lambda: len(cluster.pods("short-lived")) == 1, what="pod")
    cluster.run_pods("short-lived")
    cluster.set_pod_status("short-lived-worker-0", terminated(0, "Completed", phase="Succeeded"))
    status = wait_for(lambda: (s := cluster.status("short-lived")).get("phase") == "Succeeded" and s, what="Succeeded")
    succeeded_at = time.monotonic()
    assert cluster.job_exists("short-lived")  # kept for the TTL, so its status can be read
    wait_for(lambda: not cluster.job_exists("short-lived"), what="job deleted after its TTL")
    # completionTime has whole seconds: up to 1 s of the TTL may have passed before it was seen.
    assert time.monotonic() - succeeded_at >= 0.9
    assert status["output"]["claimName"] == "short-lived-storage"
    assert cluster.pods("short-lived") == [] and cluster.services("short-lived") == []
    assert cluster.config_maps("short-lived") == []
    assert [c["metadata"]["name"] for c in cluster.claims("short-lived")] == ["short-lived-storage"]  # the model


VOLCANO = ("scheduling.volcano.sh", "v1beta1", "default", "podgroups")


def test_gang_scheduling_puts_every_worker_in_one_pod_group_that_follows_the_gang(cluster: Cluster) -> None:
    cluster.create_job("gang", spec(workers={"nodes": 2},
                                    runPolicy={"gangScheduling": {"podGroup": "volcano", "queue": "vision"}}))
    pods = wait_for(lambda: len(cluster.pods("gang")) == 2 and cluster.pods("gang"), what="2 workers")
    group = cluster.custom.get_namespaced_custom_object(*VOLCANO, "gang")
    assert group["spec"] == {"minMember": 2, "queue": "vision"}
    assert group["metadata"]["ownerReferences"][0]["uid"] == cluster.job("gang")["metadata"]["uid"]
    for pod in pods:
        assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "gang"
        assert pod["spec"]["schedulerName"] == "volcano"

    # A third worker before the gang ran: the whole gang is recreated for three nodes (two
    # workers waiting for 2 and one for 3 would never meet), and the group waits for three.
    cluster.patch_spec("gang", {"workers": {"nodes": 3}})
    pods = wait_for(lambda: (found := cluster.pods("gang")) and len(found) == 3
                    and all(pod["metadata"]["annotations"]["dreambooth.io/nodes"] == "3" for pod in found) and found,
                    what="a gang of three")
    assert {pod["metadata"]["labels"]["dreambooth.io/gang"] for pod in pods} == {"1"}
    wait_for(lambda: cluster.custom.get_namespaced_custom_object(*VOLCANO, "gang")["spec"]["minMember"] == 3,
             what="minMember 3")

    cluster.delete_job("gang")
    wait_for(lambda: not cluster.job_exists("gang"), what="job gone")
    assert [g["metadata"]["name"] for g in cluster.custom.list_namespaced_custom_object(*VOLCANO)["items"]] == []


def test_gang_scheduling_by_a_scheduler_the_cluster_lacks_fails_with_the_reason(cluster: Cluster) -> None:
    # The emulated cluster has Volcano's PodGroup API only, not the coscheduling plugin's.
    cluster.create_job("no-plugin", spec(runPolicy={"gangScheduling": {"podGroup": "coscheduling"}}))
    failed = wait_for(lambda: condition(cluster.status("no-plugin"), "Failed"), what="Failed condition")
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"] == (
        "the API server refuses the PodGroup 'no-plugin' made from this spec: the cluster serves no "
        "podgroups.scheduling.x-k8s.io/v1alpha1: its CRD is not installed; install that scheduler, or remove "
        "spec.runPolicy.gangScheduling")
    assert cluster.pods("no-plugin") == []


def test_operator_metrics_and_health(cluster: Cluster, operator: OperatorProcess) -> None:
    cluster.create_job("counted", spec(workers={"nodes": 2}))
    wait_for(lambda: len(cluster.pods("counted")) == 2, what="pods")
    text = wait_for(lambda: (t := operator.metrics()) and 'dreambooth_operator_jobs{phase="Pending"}' in t and t,
                    what="metrics")
    for name in ("dreambooth_operator_reconcile_seconds_bucket", "dreambooth_operator_pods_created_total",
                 "dreambooth_operator_restarts_total"):
        assert name in text
    wait_for(lambda: pods_created(operator) >= 2, what="pods_created_total >= 2")
    assert operator.healthy()


def test_restarted_operator_adopts_pods_instead_of_duplicating(cluster: Cluster, operator: OperatorProcess) -> None:
    cluster.create_job("survivor", spec(workers={"nodes": 3}))
    before = wait_for(lambda: len(p := cluster.pods("survivor")) == 3 and p, what="3 pods")
    operator.stop()
    operator.start()
    # The new operator resumes the job: give it time to (wrongly) act, then check.
    cluster.run_pods("survivor")
    wait_for(phase_is(cluster, "survivor", "Running"), what="Running, seen by the new operator")
    after = cluster.pods("survivor")
    assert [p["metadata"]["uid"] for p in after] == [p["metadata"]["uid"] for p in before]
    assert pods_created(operator) == 0


def test_a_job_using_every_spec_field_gets_valid_children(cluster: Cluster) -> None:
    full = copy.deepcopy(FULL_SPEC)
    cluster.create_job("everything", full)
    pods = wait_for(lambda: len(p := cluster.pods("everything")) == 2 and p, what="2 worker pods")
    [claim] = cluster.claims("everything")
    for obj in [*pods, claim, *cluster.services("everything"), *cluster.config_maps("everything")]:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    spec = pods[0]["spec"]
    assert spec["tolerations"] == full["workers"]["tolerations"]
    assert spec["affinity"] == full["workers"]["affinity"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"


def test_a_spec_edit_reaches_the_next_gang(cluster: Cluster) -> None:
    cluster.create_job("edited", spec(runPolicy={"backoffLimit": 3}))
    wait_for(lambda: len(cluster.pods("edited")) == 1, what="pod")
    old_hash = cluster.pods("edited")[0]["metadata"]["annotations"]["dreambooth.io/config-hash"]
    cluster.patch_spec("edited", {"training": {"maxSteps": 50}})
    cluster.set_pod_status("edited-worker-0", terminated(1, "Error"))
    pod = wait_for(lambda: (p := cluster.pods("edited")) and gang_of(p[0]) == "1" and p[0], what="the next gang")
    [config_map] = cluster.config_maps("edited")
    assert yaml.safe_load(config_map["data"]["config.yaml"])["training"]["max_steps"] == 50
    new_hash = config_map["metadata"]["annotations"]["dreambooth.io/config-hash"]
    assert new_hash != old_hash
    assert pod["metadata"]["annotations"]["dreambooth.io/config-hash"] == new_hash
