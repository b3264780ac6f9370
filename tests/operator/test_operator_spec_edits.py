"""A spec edit reaches every child the next gang depends on, by the real operator against
the emulated API: the ConfigMap holds the trainer config rendered from it; the Service
and the NetworkPolicy name the metrics port the new gang listens on from the moment its
workers exist, while a running gang keeps the children it was started with and is
scraped where it listens; a gang start without an edit rewrites nothing (the emulated
API fills a Service with defaults, as a real one does, that the operator must not
fight)."""

from __future__ import annotations

import copy
from typing import Any, Iterator

import kubernetes_validate
import pytest
import yaml
from dbj_examples import KUBERNETES_VERSION, MINIMAL_SPEC, job_body, minimal_spec
from emulated_cluster import EmulatedCluster, free_port
from operator_harness import Cluster, OperatorProcess, condition, gang_of, terminated, wait_for
from server_defaults import default_service

from dreambooth_operator.children import build_network_policy, build_service, differs_where_built
from dreambooth_operator.spec import Job
from trainer.metrics import TrainerMetrics

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster(emulated: EmulatedCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    process = OperatorProcess(emulated, tmp_path_factory.mktemp("operator")).start()
    yield Cluster(emulated)
    process.stop()


def with_metrics_port(port: int) -> dict[str, Any]:
    return {**copy.deepcopy(MINIMAL_SPEC), "metrics": {"port": port}}


def service_metrics_ports(cluster: Cluster, job: str) -> list[int]:
    [service] = cluster.services(job)
    return [p["port"] for p in service["spec"]["ports"] if p["name"] == "metrics"]


def policy_ports(cluster: Cluster, job: str) -> list[int]:
    [policy] = cluster.network_policies(job)
    return [p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports") or []]


def pod_metrics_ports(pod: dict[str, Any]) -> list[int]:
    return [p["containerPort"] for p in pod["spec"]["containers"][0]["ports"] if p["name"] == "metrics"]


def versions(cluster: Cluster, job: str) -> dict[str, str]:
    """resourceVersion of the Service and the NetworkPolicy: every write changes it."""
    [service], [policy] = cluster.services(job), cluster.network_policies(job)
    return {kind: obj["metadata"]["resourceVersion"] for kind, obj in (("Service", service), ("NetworkPolicy", policy))}


def next_gang(cluster: Cluster, job: str, gang: str) -> list[dict[str, Any]]:
    """Fail the running gang's worker-0 and return the next gang's workers as soon as they exist."""
    cluster.set_pod_status(f"{job}-worker-0", terminated(1, "Error"))
    return wait_for(lambda: (p := cluster.pods(job)) and all(x["metadata"]["labels"]["dreambooth.io/gang"] == gang
                                                              for x in p) and p, what=f"gang {gang}'s workers")


@pytest.mark.parametrize("build", [build_service, build_network_policy])
def test_only_what_the_builder_sets_counts_as_a_difference(build: Any) -> None:
    def built(port: int) -> dict[str, Any]:
        return build(Job.from_body(job_body("sks-dog", with_metrics_port(port))))["spec"]

    stored = copy.deepcopy(built(9100))
    if build is build_service:
        default_service({"spec": stored})
        stored["ports"][0]["appProtocol"] = "tcp"  # a key someone added beside the builder's
        assert stored != built(9100)
    assert not differs_where_built(built(9100), stored)
    assert differs_where_built(built(9200), stored)  # the port changed
    assert differs_where_built(built(0), stored)  # the metrics port is gone: a list got shorter
    assert differs_where_built(built(9100), {})


def test_an_edited_metrics_port_is_in_the_service_and_policy_when_the_next_gang_starts(cluster: Cluster) -> None:
    cluster.create_job("porty", with_metrics_port(9100))
    [pod] = wait_for(lambda: cluster.pods("porty"), what="the worker")
    cluster.run_pods("porty")
    wait_for(lambda: cluster.status("porty").get("phase") == "Running", what="Running")

    # The running gang keeps the port it listens on: it is not restarted for the edit, and
    # its Service and policy stay as they were through the passes that read the new spec.
    cluster.patch_spec("porty", {"metrics": {"port": 9200}})
    wait_for(lambda: cluster.status("porty").get("observedGeneration") == 2, what="a pass over the edit")
    assert [p["metadata"]["uid"] for p in cluster.pods("porty")] == [pod["metadata"]["uid"]]
    assert service_metrics_ports(cluster, "porty") == [9100]
    assert policy_ports(cluster, "porty") == [9100]

    # Read the moment the new worker exists: the children were brought up to date before it.
    [pod] = next_gang(cluster, "porty", "1")
    assert pod_metrics_ports(pod) == [9200]
    assert service_metrics_ports(cluster, "porty") == [9200]
    assert policy_ports(cluster, "porty") == [9200]
    [service] = cluster.services("porty")
    assert service["spec"]["clusterIP"] == "None"  # still headless; what the server filled in is kept
    assert service["spec"]["clusterIPs"] == ["None"] and service["spec"]["ipFamilies"] == ["IPv4"]
    kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)
    kubernetes_validate.validate(cluster.network_policies("porty")[0], KUBERNETES_VERSION, strict=True)

    # Turning the endpoint off takes the port out of both, too.
    cluster.patch_spec("porty", {"metrics": {"port": 0}})
    wait_for(lambda: cluster.status("porty").get("observedGeneration") == 3, what="a pass over the edit")
    [pod] = next_gang(cluster, "porty", "2")
    assert pod_metrics_ports(pod) == []
    assert service_metrics_ports(cluster, "porty") == []
    assert policy_ports(cluster, "porty") == []


def test_a_patch_rbac_forbids_is_reported_on_the_job_and_the_gang_starts_once_it_is_allowed(
        emulated: EmulatedCluster, cluster: Cluster) -> None:
    """An operator upgraded without its chart's RBAC (no `patch` on services) cannot bring
    the Service up to an edited spec: the job says so, instead of only the operator's log."""
    cluster.create_job("unpatched", with_metrics_port(9100))
    wait_for(lambda: cluster.pods("unpatched"), what="the worker")
    cluster.run_pods("unpatched")
    cluster.patch_spec("unpatched", {"metrics": {"port": 9200}})
    wait_for(lambda: cluster.status("unpatched").get("observedGeneration") == 2, what="a pass over the edit")
    emulated.deny("patch", "services")
    try:
        cluster.set_pod_status("unpatched-worker-0", terminated(1, "Error"))
        created = wait_for(lambda: (cond := condition(cluster.status("unpatched"), "Created"))
                           and cond["status"] == "False" and cond, what="condition Created False")
        assert created["reason"] == "FailedCreate"
        assert created["message"] == ('services "unpatched" is forbidden: User "system:serviceaccount:dreambooth:'
                                      'dreambooth-operator" cannot patch resource "services" in API group "" in the '
                                      'namespace "default"')
        assert [e["type"] for e in cluster.events("unpatched") if e["reason"] == "FailedCreate"] == ["Warning"]
        assert cluster.pods("unpatched") == [] and service_metrics_ports(cluster, "unpatched") == [9100]
    finally:
        emulated.deny("patch", "services", denied=False)
    [pod] = wait_for(lambda: cluster.pods("unpatched"), what="the next gang once patch is allowed")
    assert pod_metrics_ports(pod) == service_metrics_ports(cluster, "unpatched") == [9200]


def claim_size(cluster: Cluster, job: str) -> str:
    [claim] = cluster.claims(job)
    return claim["spec"]["resources"]["requests"]["storage"]


def storage_warnings(cluster: Cluster, job: str) -> list[str]:
    return [e["message"] for e in cluster.events(job) if e["reason"] == "StorageNotResized"]


def test_an_edited_storage_size_grows_the_claim_at_the_next_gang_and_never_shrinks_it(
        emulated: EmulatedCluster, cluster: Cluster) -> None:
    """Out of room for checkpoints: a larger spec.storage.size reaches the claim the job
    made when its next gang starts. A smaller one cannot (a claim never shrinks), nor can
    a growth the server refuses (a StorageClass without volume expansion): a Warning says
    why, and the gang starts on the claim as it is."""
    cluster.create_job("roomy", minimal_spec(storage={"claimName": None, "size": "1Gi", "retain": False}))
    wait_for(lambda: cluster.pods("roomy"), what="the worker")
    cluster.run_pods("roomy")
    cluster.patch_spec("roomy", {"storage": {"size": "2Gi"}})
    wait_for(lambda: cluster.status("roomy").get("observedGeneration") == 2, what="a pass over the edit")
    assert claim_size(cluster, "roomy") == "1Gi"  # the running gang is not touched
    next_gang(cluster, "roomy", "1")
    assert claim_size(cluster, "roomy") == "2Gi"  # before the new workers existed

    cluster.run_pods("roomy")
    cluster.patch_spec("roomy", {"storage": {"size": "1536Mi"}})
    next_gang(cluster, "roomy", "2")
    [warning] = wait_for(lambda: storage_warnings(cluster, "roomy"), what="the StorageNotResized Event")
    assert warning == ("spec.storage.size = '1536Mi' is below the 2Gi the claim roomy-storage holds; a "
                       "PersistentVolumeClaim cannot shrink, so it keeps 2Gi: set spec.storage.size back to 2Gi or more")
    assert claim_size(cluster, "roomy") == "2Gi"

    cluster.run_pods("roomy")
    cluster.patch_spec("roomy", {"storage": {"size": "3Gi"}})
    emulated.deny("patch", "persistentvolumeclaims")
    try:
        next_gang(cluster, "roomy", "3")  # the gang starts all the same
        refused = wait_for(lambda: [m for m in storage_warnings(cluster, "roomy") if "3Gi" in m],
                           what="the refused growth's Event")
        assert refused[0].startswith("the claim roomy-storage was not grown to spec.storage.size = '3Gi': "
                                     'persistentvolumeclaims "roomy-storage" is forbidden')
        assert claim_size(cluster, "roomy") == "2Gi"
    finally:
        emulated.deny("patch", "persistentvolumeclaims", denied=False)


def test_a_gang_start_without_an_edit_writes_neither_service_nor_policy(cluster: Cluster) -> None:
    cluster.create_job("steady", with_metrics_port(9100))
    wait_for(lambda: cluster.pods("steady"), what="the worker")
    cluster.run_pods("steady")
    wait_for(lambda: cluster.status("steady").get("phase") == "Running", what="Running")
    before = versions(cluster, "steady")
    [service] = cluster.services("steady")
    assert service["spec"]["sessionAffinity"] == "None"  # the server's defaults are there to ignore

    next_gang(cluster, "steady", "1")
    cluster.run_pods("steady")
    wait_for(lambda: cluster.status("steady").get("phase") == "Running", what="Running again")
    assert versions(cluster, "steady") == before


@pytest.mark.parametrize("new_port", ["another", "none"])
def test_a_running_gang_is_still_scraped_on_its_own_port_after_an_edit(cluster: Cluster, new_port: str) -> None:
    # Rank 0's endpoint is the trainer's own metrics module, served on loopback.
    rank0 = TrainerMetrics(max_steps=100, labels={"job": "watched", "namespace": "default"})
    rank0.serve("127.0.0.1", 0)
    rank0.record_position(step=42, samples=84)
    try:
        name = f"watched-{new_port}"
        cluster.create_job(name, with_metrics_port(rank0.serving_port))
        wait_for(lambda: cluster.pods(name), what="the worker")
        cluster.run_pods(name, pod_ip="127.0.0.1")
        wait_for(lambda: cluster.status(name).get("step") == 42, what="step 42")
        # The gang goes on serving where it was started (the edit reaches the next gang):
        # its progress must go on reaching status, not be asked of a port nobody listens on.
        # (0: the next gang serves no endpoint; this one still does.)
        cluster.patch_spec(name, {"metrics": {"port": free_port() if new_port == "another" else 0}})
        wait_for(lambda: cluster.status(name).get("observedGeneration") == 2, what="a pass over the edit")
        rank0.record_position(step=50, samples=100)
        wait_for(lambda: cluster.status(name).get("step") == 50, what="step 50 from the running gang")
    finally:
        rank0.close()


def test_a_spec_edit_reaches_the_next_gang(cluster: Cluster) -> None:
    cluster.create_job("edited", minimal_spec(runPolicy={"backoffLimit": 3}))
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
