"""The chart's RBAC, enforced. The emulated API authorizes the operator's service account
by exactly the Roles, ClusterRoles and bindings the chart renders (tests/operator/rbac.py:
RBAC's rule matching, and the owner-reference check of hardened clusters), and the real
operator, run with the chart Deployment's arguments, takes a job through its whole life:
elected leader, every child created, a spec edit, a failed gang replaced, success, and
deletion after its TTL. A call the chart does not grant fails here with the API server's
403, where test_chart.py only compares the chart with the operator's API tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kubernetes
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))  # its siblings import by plain name
from dbj_examples import photo_config_map, robot_photos  # noqa: E402
from emulated_cluster import EmulatedCluster  # noqa: E402
from operator_harness import Cluster, gang_of, project_kubectl, terminated, wait_for  # noqa: E402
from rbac import Grant, RequestAttributes, allows, grants_of, request_attributes, service_account  # noqa: E402

from dreambooth_operator.leader import LEASE_NAME  # noqa: E402
from tests.ship.chart import CHART, NAMESPACE, NAMESPACED, NETWORK_POLICY_OFF, render  # noqa: E402
from tests.ship.chart_operator import POD_NAME, chart_operator  # noqa: E402
from tests.ship.workloads import CPU_EXAMPLE  # noqa: E402

pytestmark = pytest.mark.timeout(240)

CRD = yaml.safe_load((CHART / "crds" / "crd.yaml").read_text())
# mode -> (chart values, the namespace the job runs in)
MODES = {"cluster-wide": ({}, "default"), "watched-namespaces": (NAMESPACED, "team-b"),
         "no-network-policy": (NETWORK_POLICY_OFF, "team-a")}
# Kubernetes' default user-facing roles as the API server bootstraps them: filled by the
# aggregation of the ClusterRoles that carry these labels (their own rules, on the
# built-in kinds, play no part here).
DEFAULT_USER_ROLES = [
    {"kind": "ClusterRole", "metadata": {"name": role}, "aggregationRule": {"clusterRoleSelectors": [
        {"matchLabels": {f"rbac.authorization.k8s.io/aggregate-to-{role}": "true"}}]}}
    for role in ("admin", "edit", "view")]


@pytest.mark.parametrize(("method", "path", "query", "expected"), [
    ("GET", "/api/v1/namespaces/team-a/pods", {"watch": "true"}, ("watch", "", "pods", "team-a", None)),
    ("GET", "/api/v1/pods", {}, ("list", "", "pods", None, None)),
    ("PATCH", "/apis/dreambooth.io/v1alpha1/namespaces/a/dreamboothjobs/j/status", {},
     ("patch", "dreambooth.io", "dreamboothjobs/status", "a", "j")),
    ("POST", "/apis/coordination.k8s.io/v1/namespaces/ops/leases", {}, ("create", "coordination.k8s.io", "leases",
                                                                        "ops", None)),
    ("PUT", "/apis/coordination.k8s.io/v1/namespaces/ops/leases/l", {}, ("update", "coordination.k8s.io", "leases",
                                                                         "ops", "l")),
    ("GET", "/api/v1/namespaces/team-a", {}, ("get", "", "namespaces", "team-a", "team-a")),
    ("GET", "/api/v1/namespaces", {}, ("list", "", "namespaces", None, None)),
    ("DELETE", "/api/v1/namespaces/a/pods", {}, ("deletecollection", "", "pods", "a", None)),
    ("GET", "/apis/dreambooth.io/v1alpha1", {}, None),  # discovery: not a resource
    ("GET", "/api", {}, None),
    ("GET", "/version", {}, None),
])
def test_a_request_is_read_as_the_api_servers_authorizer_reads_it(method, path, query, expected) -> None:
    assert request_attributes(method, path, query) == (RequestAttributes(*expected) if expected else None)


def test_rbac_rules_match_as_a_real_api_servers_do() -> None:
    lease_rules = [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
                   {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "update"],
                    "resourceNames": ["the-lease"]}]
    role = [Grant("ops", rule) for rule in lease_rules]
    lease = RequestAttributes("update", "coordination.k8s.io", "leases", "ops", "the-lease")
    assert allows(role, lease)
    assert not allows(role, lease._replace(name="another-lease"))  # resourceNames limit get and update
    assert not allows(role, lease._replace(verb="delete"))
    assert not allows(role, lease._replace(namespace="team-a"))  # a Role holds in its own namespace only
    assert allows(role, lease._replace(verb="create", name=None))
    assert not allows(role, lease._replace(verb="list", name=None))  # a named rule never matches a list
    pods = [Grant(None, {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]})]
    patch_pod = RequestAttributes("patch", "", "pods", "team-a", "p")
    assert allows(pods, patch_pod)  # a ClusterRole bound cluster-wide holds in every namespace
    assert not allows(pods, patch_pod._replace(resource="pods/status"))  # a subresource is its own resource
    assert not allows(pods, patch_pod._replace(group="apps"))


def test_the_grants_are_the_charts_bindings_of_its_service_account() -> None:
    objects = render(NAMESPACED)
    grants = grants_of(objects, service_account(NAMESPACE, "dreambooth-operator"))
    pod_create = RequestAttributes("create", "", "pods", "team-a", None)
    assert allows(grants, pod_create) and allows(grants, pod_create._replace(namespace="team-b"))
    assert not allows(grants, pod_create._replace(namespace="default"))  # not watched: no Role there
    assert not allows(grants_of(objects, service_account(NAMESPACE, "someone-else")), pod_create)
    # Another namespace's account of the name, and a user of the name, are someone else.
    assert not allows(grants_of(objects, service_account("default", "dreambooth-operator")), pod_create)
    assert not allows(grants_of(objects, {"kind": "User", "name": "dreambooth-operator"}), pod_create)


@pytest.mark.parametrize("mode", MODES)
def test_the_charts_rbac_lets_its_operator_take_a_job_through_its_whole_life(mode: str, tmp_path: Path) -> None:
    values, namespace = MODES[mode]
    emulated = EmulatedCluster(tmp_path).start()
    operator, user = chart_operator(emulated, tmp_path, values)
    try:
        admin = Cluster(emulated)
        emulated.install_crd(CRD)
        admin.core.create_namespaced_config_map(namespace, photo_config_map("robot-photos", robot_photos(), namespace))
        operator.start()
        wait_for(lambda: operator.metric("dreambooth_operator_leader") == 1, what="the operator leading")
        assert admin.lease(LEASE_NAME, NAMESPACE)["spec"]["holderIdentity"].startswith(POD_NAME)
        assert operator.metric("dreambooth_operator_crd_missing_fields") == 0  # it could read the CRD

        run_a_job_through_its_life(admin, namespace, network_policy="--network-policy" in operator.extra_args)

        assert emulated.refused() == [], operator.log()
        # The authorizer does refuse what the chart does not grant: the operator may not read Secrets.
        core = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(str(operator.kubeconfig)))
        with pytest.raises(kubernetes.client.ApiException) as refused:
            core.list_namespaced_secret(namespace)
        assert refused.value.status == 403
        assert f'User "{user}" cannot list resource "secrets"' in json.loads(refused.value.body)["message"]
    finally:
        operator.stop()
        emulated.stop()


def test_the_charts_rbac_lets_a_standby_replica_take_the_lease_over(tmp_path: Path) -> None:
    """The chart's two replicas: the second stands by on reads of the Lease, and takes it
    over when the leader releases it, with only the leader-election Role's rights."""
    emulated = EmulatedCluster(tmp_path).start()
    (tmp_path / "standby").mkdir()
    leader, _ = chart_operator(emulated, tmp_path)
    standby, _ = chart_operator(emulated, tmp_path / "standby")
    try:
        leader.start()
        wait_for(lambda: leader.metric("dreambooth_operator_leader") == 1, what="the first replica leading")
        standby.start()
        wait_for(lambda: "waits for Lease" in standby.log_path.read_text(), what="the second replica standing by")
        assert standby.metric("dreambooth_operator_leader") == 0
        leader.stop()  # SIGTERM: the Lease is released
        wait_for(lambda: standby.metric("dreambooth_operator_leader") == 1, what="the standby taking over")
        assert emulated.refused() == [], standby.log()
    finally:
        standby.stop()
        leader.stop()
        emulated.stop()


def run_a_job_through_its_life(admin: Cluster, namespace: str, network_policy: bool) -> None:
    """Every kind of call the operator makes: its children (a claim it makes, a Volcano
    PodGroup, the NetworkPolicy), the dry runs, pod creates and deletes, status patches,
    Events, children patched (the claim grown) after a spec edit, and the job's deletion
    after its TTL."""
    job = yaml.safe_load(CPU_EXAMPLE.read_text())
    name, spec = job["metadata"]["name"], job["spec"]
    spec["runPolicy"].update(gangScheduling={"podGroup": "volcano"}, ttlSecondsAfterFinished=1)
    admin.create_job(name, spec, namespace)
    wait_for(lambda: len(admin.pods(name, namespace)) == 2, what="2 workers")
    assert len(admin.network_policies(name, namespace)) == network_policy and len(admin.claims(name, namespace)) == 1
    assert len(pod_groups(admin, namespace)) == 1
    admin.run_pods(name, namespace)
    wait_for(lambda: admin.status(name, namespace).get("phase") == "Running", what="Running")

    admin.patch_spec(name, {"metrics": {"port": 9091}, "storage": {"size": "2Gi"}}, namespace)
    admin.set_pod_status(f"{name}-worker-1", terminated(1), namespace)
    wait_for(lambda: [gang_of(pod) for pod in admin.pods(name, namespace)] == ["1", "1"], what="a new gang")
    [service] = admin.services(name, namespace)
    assert [port["port"] for port in service["spec"]["ports"] if port["name"] == "metrics"] == [9091]
    [claim] = admin.claims(name, namespace)
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert any(event["reason"] == "WorkerFailed" for event in admin.events(name, namespace))

    admin.run_pods(name, namespace)
    for pod in admin.pods(name, namespace):
        admin.set_pod_status(pod["metadata"]["name"], terminated(0, "Completed", phase="Succeeded"), namespace)
    wait_for(lambda: not admin.job_exists(name, namespace), timeout=60, what="the job deleted after its TTL")
    for children in (admin.pods, admin.services, admin.config_maps, admin.claims, admin.network_policies):
        assert children(name, namespace) == [], children.__name__
    assert pod_groups(admin, namespace) == []


def pod_groups(admin: Cluster, namespace: str) -> list[dict]:
    return admin.custom.list_namespaced_custom_object("scheduling.volcano.sh", "v1beta1", namespace, "podgroups")["items"]


def user(name: str) -> dict[str, str]:
    return {"kind": "User", "name": name}


def bound_in(namespace: str, role: str, name: str) -> dict:
    """A RoleBinding of one of the default ClusterRoles to a user, as a namespace's admin makes it."""
    return {"kind": "RoleBinding", "metadata": {"name": f"{name}-{role}", "namespace": namespace},
            "roleRef": {"kind": "ClusterRole", "name": role}, "subjects": [user(name)]}


def test_namespace_editors_run_jobs_and_viewers_read_them_through_the_default_roles(tmp_path: Path) -> None:
    """With no RBAC of their own: `edit` (and `admin`) in a namespace may apply, change and
    delete DreamboothJobs there with the real kubectl, `view` may read them, nobody but
    the operator may write a status, and without the chart's aggregated roles even an
    editor may not create one."""
    bindings = [bound_in("team-a", "edit", "alice"), bound_in("team-a", "view", "bob"),
                bound_in("team-a", "edit", "carol")]
    with_roles = render() + DEFAULT_USER_ROLES + bindings
    without_roles = render({"rbac": {"aggregateToDefaultRoles": False}}) + DEFAULT_USER_ROLES + bindings
    emulated = EmulatedCluster(tmp_path).start()
    try:
        emulated.install_crd(CRD)
        for name, objects in (("alice", with_roles), ("bob", with_roles), ("carol", without_roles)):
            emulated.kubeconfig_for(name, grants_of(objects, user(name)))
        kubectl = project_kubectl()

        def run(name: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(kubectl), "--kubeconfig", str(emulated.kubeconfig), "--as", name,
                                   "-n", namespace, *args], capture_output=True, text=True, timeout=60)

        # --validate=false: the emulated API serves no OpenAPI documents to validate against.
        apply = ("apply", "--validate=false", "-f", str(CPU_EXAMPLE))
        applied = run("alice", "team-a", *apply)
        assert applied.returncode == 0, applied.stderr
        edited = run("alice", "team-a", "patch", "dbj", "tiny-cpu", "--type=merge", "-p", '{"spec":{"training":{"maxSteps":40}}}')
        assert edited.returncode == 0, edited.stderr
        read = run("bob", "team-a", "get", "dbj", "tiny-cpu", "-o", "jsonpath={.spec.training.maxSteps}")
        assert (read.returncode, read.stdout) == (0, "40"), read.stderr
        for refused, what in [(run("bob", "team-a", "delete", "dbj", "tiny-cpu"), 'cannot delete resource "dreamboothjobs"'),
                              (run("alice", "team-b", *apply), 'cannot get resource "dreamboothjobs"'),
                              (run("alice", "team-a", "patch", "dbj", "tiny-cpu", "--subresource=status", "--type=merge",
                                   "-p", '{"status":{"phase":"Succeeded"}}'), 'cannot patch resource "dreamboothjobs/status"'),
                              (run("carol", "team-a", "create", "--validate=false", "-f", str(CPU_EXAMPLE)),
                               'cannot create resource "dreamboothjobs"')]:
            assert refused.returncode != 0 and "(Forbidden)" in refused.stderr and what in refused.stderr, refused.stderr
        deleted = run("alice", "team-a", "delete", "dbj", "tiny-cpu")
        assert deleted.returncode == 0, deleted.stderr
    finally:
        emulated.stop()
