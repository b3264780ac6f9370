"""A job's creation by the real operator (a `python -m dreambooth_operator` process)
against an emulated Kubernetes API over HTTP: the children and workers it makes, and
what keeps it from making them (an invalid spec, names that are someone else's, objects
the API server refuses, a quota, a PodGroup API the cluster lacks). The test plays the
kubelet by setting pod statuses; one cluster and one operator serve the module (each
test uses its own job names)."""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest
from dbj_examples import FULL_SPEC, minimal_spec, validate_for_supported_kubernetes
from emulated_cluster import EmulatedCluster
from operator_harness import Cluster, condition, phase_is, pod_names, terminated, wait_for

pytestmark = pytest.mark.timeout(120)


def test_create_makes_valid_children_then_follows_pods_to_success(cluster: Cluster) -> None:
    cluster.create_job("three", minimal_spec(workers={"nodes": 3}))
    pods = wait_for(lambda: len(cluster.pods("three")) == 3 and cluster.pods("three"), what="3 worker pods")
    assert [p["metadata"]["name"] for p in pods] == ["three-worker-0", "three-worker-1", "three-worker-2"]
    [service] = cluster.services("three")
    [config_map] = cluster.config_maps("three")
    assert service["spec"]["clusterIP"] == "None"
    assert "config.yaml" in config_map["data"]
    owner_uid = cluster.job("three")["metadata"]["uid"]
    for obj in [*pods, service, config_map]:
        assert obj["metadata"]["ownerReferences"][0]["uid"] == owner_uid
        validate_for_supported_kubernetes(obj)
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


def test_invalid_spec_fails_that_job_only(cluster: Cluster) -> None:
    # What the CRD's schema cannot tell (it keeps workers.resources as a Pod's): the API
    # server stores it, and the operator refuses it.
    cluster.create_job("broken", minimal_spec(workers={"resources": {"limits": {"memory": "16GB"}}}))
    cluster.create_job("healthy", minimal_spec())
    wait_for(phase_is(cluster, "broken", "Failed"), what="broken job Failed")
    assert cluster.status("broken")["observedGeneration"] == 1
    failed = condition(cluster.status("broken"), "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.workers.resources.limits.memory = '16GB'" in failed["message"]
    events = wait_for(lambda: [e for e in cluster.events("broken") if e["reason"] == "InvalidSpec"], what="Event")
    assert events[0]["type"] == "Warning" and "spec.workers.resources" in events[0]["message"]
    assert cluster.pods("broken") == []
    wait_for(lambda: len(cluster.pods("healthy")) == 1, what="the other job's pod")

    # Fixing the spec starts the job afresh; the status says it was decided from the edit.
    cluster.patch_spec("broken", {"workers": {"resources": {"limits": {"memory": "16Gi"}}}})
    wait_for(lambda: len(cluster.pods("broken")) == 1, what="pod after the fix")
    assert cluster.status("broken")["phase"] == "Pending"
    wait_for(lambda: cluster.status("broken").get("observedGeneration") == 2, what="observedGeneration 2")


def fails_then_is_deleted(cluster: Cluster, name: str, message_start: str) -> None:
    """Job `name` fails as InvalidSpec with a message starting `message_start`, before any
    worker is made; then it is deleted (the test checks what its deletion left)."""
    wait_for(phase_is(cluster, name, "Failed"), what=f"{name} Failed")
    failed = condition(cluster.status(name), "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith(message_start)
    assert cluster.pods(name) == []
    cluster.delete_job(name)
    wait_for(lambda: not cluster.job_exists(name), what=f"{name} gone")


def test_a_service_of_the_jobs_name_that_is_not_the_jobs_is_neither_taken_over_nor_deleted(cluster: Cluster) -> None:
    theirs = {"metadata": {"name": "clash"}, "spec": {"ports": [{"port": 80}], "selector": {"app": "web"}}}
    cluster.core.create_namespaced_service("default", theirs)
    # A ConfigMap an earlier job of the same name left behind (its garbage collection lagging): replaced.
    stale = {"metadata": {"name": "clash-config", "ownerReferences": [
        {"apiVersion": "dreambooth.io/v1alpha1", "kind": "DreamboothJob", "name": "clash", "uid": "an-earlier-job"}]},
        "data": {"config.yaml": "old"}}
    cluster.core.create_namespaced_config_map("default", stale)
    cluster.create_job("clash", minimal_spec())
    fails_then_is_deleted(cluster, "clash", "a Service named 'clash' already exists in namespace default and is not "
                          "this job's; the job needs that name for its workers' DNS names")
    # Deleting the job left their Service alone.
    assert cluster.core.read_namespaced_service("clash", "default").spec.selector == {"app": "web"}

    # Once it is gone, a job of that name starts, the stale ConfigMap replaced by its own.
    cluster.core.delete_namespaced_service("clash", "default")
    assert cluster.core.read_namespaced_config_map("clash-config", "default").data == {"config.yaml": "old"}
    cluster.create_job("clash", minimal_spec())
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
    cluster.create_job(name, minimal_spec(workers=workers))
    cluster.create_job(f"{name}-neighbour", minimal_spec())
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
    cluster.create_job("crowded", minimal_spec(workers={"nodes": 2}), namespace=namespace)

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


def test_someone_elses_claim_of_the_name_the_job_would_make_is_refused(cluster: Cluster) -> None:
    theirs = {"metadata": {"name": "taken-storage"},
              "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
    cluster.core.create_namespaced_persistent_volume_claim("default", theirs)
    cluster.create_job("taken", minimal_spec(storage={"claimName": None, "size": "1Gi", "retain": False}))
    fails_then_is_deleted(cluster, "taken", "a PersistentVolumeClaim named 'taken-storage' already exists in "
                          "namespace default and is not this job's")
    assert cluster.core.read_namespaced_persistent_volume_claim("taken-storage", "default").metadata.name


VOLCANO = ("scheduling.volcano.sh", "v1beta1", "default", "podgroups")


def test_gang_scheduling_puts_every_worker_in_one_pod_group_that_follows_the_gang(cluster: Cluster) -> None:
    cluster.create_job("gang", minimal_spec(workers={"nodes": 2},
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
    # Only this job's: another test's job may have its own PodGroup in the namespace.
    assert "gang" not in [g["metadata"]["name"] for g in cluster.custom.list_namespaced_custom_object(*VOLCANO)["items"]]


def test_a_pod_group_of_the_jobs_name_that_is_not_the_jobs_is_neither_resized_nor_deleted(cluster: Cluster) -> None:
    gang = {"workers": {"nodes": 2}, "runPolicy": {"gangScheduling": {"podGroup": "volcano"}}}
    theirs = {"apiVersion": "scheduling.volcano.sh/v1beta1", "kind": "PodGroup", "metadata": {"name": "their-gang"},
              "spec": {"minMember": 5}}
    cluster.custom.create_namespaced_custom_object(*VOLCANO, theirs)
    cluster.create_job("their-gang", minimal_spec(**gang))
    fails_then_is_deleted(cluster, "their-gang", "a PodGroup named 'their-gang' already exists in namespace default "
                          "and is not this job's; the job needs that name for the PodGroup that schedules its workers "
                          "together")
    assert cluster.custom.get_namespaced_custom_object(*VOLCANO, "their-gang")["spec"] == {"minMember": 5}

    # One an earlier job of the name left behind (its garbage collection lagging) is replaced.
    cluster.custom.delete_namespaced_custom_object(*VOLCANO, "their-gang")
    earlier = {"apiVersion": "dreambooth.io/v1alpha1", "kind": "DreamboothJob", "name": "their-gang",
               "uid": "an-earlier-job"}
    cluster.custom.create_namespaced_custom_object(*VOLCANO, {**theirs, "metadata": {
        "name": "their-gang", "ownerReferences": [earlier]}})
    cluster.create_job("their-gang", minimal_spec(**gang))
    wait_for(lambda: len(cluster.pods("their-gang")) == 2, what="2 workers")
    group = cluster.custom.get_namespaced_custom_object(*VOLCANO, "their-gang")
    assert group["spec"]["minMember"] == 2
    assert [ref["uid"] for ref in group["metadata"]["ownerReferences"]] == [cluster.job("their-gang")["metadata"]["uid"]]


def test_a_read_rbac_forbids_is_reported_on_the_job_which_starts_once_it_is_allowed(
        emulated: EmulatedCluster, cluster: Cluster) -> None:
    """An operator image upgraded without its chart's RBAC (here: no `get` on PodGroups,
    which tells the job's own from someone else's) says so on the job, not only in its log."""
    emulated.deny("get", "podgroups")
    try:
        cluster.create_job("unread", minimal_spec(runPolicy={"gangScheduling": {"podGroup": "volcano"}}))
        created = wait_for(lambda: condition(cluster.status("unread"), "Created"), what="condition Created")
        assert (created["status"], created["reason"]) == ("False", "FailedCreate")
        assert created["message"] == ('podgroups "unread" is forbidden: User "system:serviceaccount:dreambooth:'
                                      'dreambooth-operator" cannot get resource "podgroups" in API group '
                                      '"scheduling.volcano.sh" in the namespace "default"')
        assert [e["type"] for e in cluster.events("unread") if e["reason"] == "FailedCreate"] == ["Warning"]
        assert cluster.pods("unread") == []
    finally:
        emulated.deny("get", "podgroups", denied=False)
    wait_for(lambda: len(cluster.pods("unread")) == 1, what="the worker once get is allowed")
    created = wait_for(lambda: (cond := condition(cluster.status("unread"), "Created")) and cond["status"] == "True"
                       and cond, what="condition Created True")
    assert created["reason"] == "WorkersCreated"


def test_gang_scheduling_by_a_scheduler_the_cluster_lacks_fails_with_the_reason(cluster: Cluster) -> None:
    # The emulated cluster has Volcano's PodGroup API only, not the coscheduling plugin's.
    cluster.create_job("no-plugin", minimal_spec(runPolicy={"gangScheduling": {"podGroup": "coscheduling"}}))
    failed = wait_for(lambda: condition(cluster.status("no-plugin"), "Failed"), what="Failed condition")
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"] == (
        "the API server refuses the PodGroup 'no-plugin' made from this spec: the cluster serves no "
        "podgroups.scheduling.x-k8s.io/v1alpha1: its CRD is not installed; install that scheduler, or remove "
        "spec.runPolicy.gangScheduling")
    assert cluster.pods("no-plugin") == []


def test_a_job_using_every_spec_field_gets_valid_children(cluster: Cluster) -> None:
    full = copy.deepcopy(FULL_SPEC)
    cluster.create_job("everything", full)
    pods = wait_for(lambda: len(p := cluster.pods("everything")) == 2 and p, what="2 worker pods")
    [claim] = cluster.claims("everything")
    for obj in [*pods, claim, *cluster.services("everything"), *cluster.config_maps("everything")]:
        validate_for_supported_kubernetes(obj)
    spec = pods[0]["spec"]
    assert spec["tolerations"] == full["workers"]["tolerations"]
    assert spec["affinity"] == full["workers"]["affinity"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
