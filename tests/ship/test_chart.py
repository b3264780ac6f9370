"""The Helm chart: lint, schema-valid objects for the oldest Kubernetes it installs on
and a recent one in every mode, least
privilege that still covers every API call the operator makes, and manifests/install.yaml
identical to the chart's default rendering."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml

from dreambooth_operator.constants import POD_GROUP_APIS, POD_GROUP_PLURAL
from dreambooth_operator.kube import KubeApi
from dreambooth_operator.leader import LEASE_NAME
from tests.ship.chart import (
    ALERTS,
    ALL_OPTIONS_ON,
    CHART,
    CHART_ALERTS,
    CHART_DASHBOARD,
    DASHBOARD,
    INSTALL_MANIFEST,
    NAMESPACE,
    NAMESPACED,
    NETWORK_POLICY_OFF,
    RELEASE,
    REPO,
    by_kind,
    helm,
    render,
    template_text,
)
from tests.ship.install_manifest import render_install_manifest
from tests.ship.workloads import example_job, worker_pods

sys.path.insert(0, str(REPO / "tests" / "operator"))  # its modules import their siblings by plain name
from dbj_examples import minimum_kubernetes_version, validate_for_supported_kubernetes  # noqa: E402

# No registry this project installs from ships the Prometheus Operator's CRD schemas as
# data (PyPI has generated pydantic models only, the Go module has Go types), and tests
# download nothing; these kinds are checked by test_monitors_select_what_exists and
# test_chart_ships_the_alerts_unchanged instead.
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}

OPERATOR_SOURCE = REPO / "operator"
LEADER_ELECTION_ROLE = f"{RELEASE}-leader-election"
MODES = {"defaults": None, "all-options": ALL_OPTIONS_ON, "namespaced": NAMESPACED,
         "network-policy-off": NETWORK_POLICY_OFF}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {mode: render(values) for mode, values in MODES.items()}


def test_helm_lint_strict_is_clean() -> None:
    for values in MODES.values():
        args = ["lint", "--strict", str(CHART)]
        for key, value in (values or {}).items():
            args += ["--set-json", f"{key}={json.dumps(value)}"]
        result = helm(*args)
        assert "0 chart(s) failed" in result.stdout, result.stdout
        assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize("mode", MODES)
def test_every_object_is_valid_for_the_kubernetes_versions_it_installs_on(rendered, mode: str) -> None:
    objects = rendered[mode]
    assert by_kind(objects, "Deployment"), "the chart rendered no operator Deployment"
    for obj in objects:
        if obj["kind"] in PROMETHEUS_OPERATOR_KINDS:
            continue
        validate_for_supported_kubernetes(obj)


def test_the_chart_installs_from_its_minimum_kubernetes_and_not_below() -> None:
    """The minimum (1.30: CRD validation ratcheting, which keeps a job stored before a
    stricter CRD writable and deletable) is what helm enforces, and what the tests check."""
    minimum = minimum_kubernetes_version()
    major, minor, _ = minimum.split(".")
    assert template_text(None, "--kube-version", minimum)
    older = helm("template", RELEASE, str(CHART), "--kube-version", f"{major}.{int(minor) - 1}.0", check=False)
    assert older.returncode != 0 and "chart requires kubeVersion" in older.stderr, older.stderr


def test_optional_features_are_off_by_default_and_render_when_on(rendered) -> None:
    kinds = lambda mode: {obj["kind"] for obj in rendered[mode]}  # noqa: E731
    assert not kinds("defaults") & (PROMETHEUS_OPERATOR_KINDS | {"ConfigMap"})
    assert PROMETHEUS_OPERATOR_KINDS | {"ConfigMap"} <= kinds("all-options")


def test_monitors_select_what_exists(rendered) -> None:
    """The ServiceMonitor finds the operator's metrics Service by its labels and port name;
    the PodMonitor finds rank 0's worker pod by the labels and port the operator gives it."""
    objects = rendered["all-options"]
    [service_monitor] = by_kind(objects, "ServiceMonitor")
    [service] = [s for s in by_kind(objects, "Service") if s["metadata"]["name"].endswith("-metrics")]
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service_monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert service_monitor["metadata"]["labels"]["release"] == "prometheus"

    [pod_monitor] = by_kind(objects, "PodMonitor")
    rank0, other = worker_pods(example_job())
    selector = pod_monitor["spec"]["selector"]["matchLabels"].items()
    assert selector <= rank0["metadata"]["labels"].items()
    assert not selector <= other["metadata"]["labels"].items(), "only rank 0 serves metrics"
    [endpoint] = pod_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in rank0["spec"]["containers"][0]["ports"]}
    assert endpoint["honorLabels"] is False  # the pod's namespace wins: tests/ship/test_podmonitor.py
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    [namespaced] = by_kind(rendered["namespaced"], "PodMonitor")
    assert namespaced["spec"]["namespaceSelector"] == {"matchNames": NAMESPACED["watchNamespaces"]}


def job_rbac(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The Roles or RoleBindings that grant the jobs' rights: all but the leader election's."""
    return [obj for obj in by_kind(objects, kind) if obj["metadata"]["name"] != LEADER_ELECTION_ROLE]


def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def listed_kinds() -> set[str]:
    calls = set()
    for source in OPERATOR_SOURCE.glob("*.py"):
        calls |= set(re.findall(r"\bapi\.list\(\s*\"(\w+)\"", source.read_text()))
    assert calls, "found no api.list(...) call in the operator: update this test"
    return calls


# (API group, resource) of each kind in KubeApi's tables.
RESOURCES = {"Pod": ("", "pods"), "Service": ("", "services"), "ConfigMap": ("", "configmaps"),
             "PersistentVolumeClaim": ("", "persistentvolumeclaims"), "Event": ("", "events"),
             "NetworkPolicy": ("networking.k8s.io", "networkpolicies")}
NETWORK_POLICIES = RESOURCES["NetworkPolicy"]


def required_permissions() -> dict[tuple[str, str], set[str]]:
    """What the operator calls, read from its API layer's own tables, plus kopf's needs."""
    needed: dict[tuple[str, str], set[str]] = {}
    for verb, table in (("create", KubeApi._CREATE), ("delete", KubeApi._DELETE), ("get", KubeApi._READ)):
        for kind in table:
            needed.setdefault(RESOURCES[kind], set()).add(verb)
    # KubeApi can list every child kind; grant `list` only on those the operator lists.
    for kind in listed_kinds():
        needed[RESOURCES[kind]].add("list")
    for kind in KubeApi._PATCH:  # replace_spec
        needed[RESOURCES[kind]].add("patch")
    needed[("", "configmaps")].add("patch")  # replace_config_map
    needed[("", "persistentvolumeclaims")].add("patch")  # resize_claim
    needed[("", "pods")].add("watch")  # kopf's pod event handler
    needed[("dreambooth.io", "dreamboothjobs")] = {"get", "list", "watch", "patch", "delete"}  # delete_job: TTL
    needed[("dreambooth.io", "dreamboothjobs/status")] = {"patch"}
    needed[("dreambooth.io", "dreamboothjobs/finalizers")] = {"update"}  # blockOwnerDeletion
    for group, _ in POD_GROUP_APIS.values():  # get_live, create, replace_spec, delete_custom
        needed[(group, POD_GROUP_PLURAL)] = {"get", "create", "patch", "delete"}
    return needed


def assert_covers(granted: dict[tuple[str, str], set[str]], needed: dict[tuple[str, str], set[str]]) -> None:
    for key, verbs in needed.items():
        missing = verbs - granted.get(key, set())
        assert not missing, f"RBAC lacks {sorted(missing)} on {key}"


def operator_cluster_roles(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ClusterRoles bound to the operator (not the users' aggregated ones)."""
    bound = {binding["roleRef"]["name"] for binding in by_kind(objects, "ClusterRoleBinding")}
    return [role for role in by_kind(objects, "ClusterRole") if role["metadata"]["name"] in bound]


def test_cluster_wide_rbac_covers_every_call_and_grants_nothing_more(rendered) -> None:
    objects = rendered["defaults"]
    roles = {role["metadata"]["name"]: rules_of(role) for role in operator_cluster_roles(objects)}
    granted: dict[tuple[str, str], set[str]] = {}
    for rules in roles.values():
        for key, verbs in rules.items():
            granted.setdefault(key, set()).update(verbs)
    needed = required_permissions()
    assert_covers(granted, needed)
    # Least privilege: no wildcards, no secrets, and nothing beyond the calls above and kopf's discovery.
    discovery = {("apiextensions.k8s.io", "customresourcedefinitions")}  # kopf watches no namespace list here
    assert set(granted) - set(needed) == discovery
    for key, verbs in granted.items():
        assert "*" not in verbs and key[1] != "*" and key[1] != "secrets", key
        assert verbs <= {"get", "list", "watch", "create", "delete", "patch", "update"}, key
    assert [role["metadata"]["name"] for role in by_kind(objects, "Role")] == [LEADER_ELECTION_ROLE]
    [deployment] = by_kind(objects, "Deployment")
    assert "--all-namespaces" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def test_namespaced_mode_grants_per_namespace_and_watches_only_those(rendered) -> None:
    objects = rendered["namespaced"]
    watched = NAMESPACED["watchNamespaces"]
    roles = job_rbac(objects, "Role")
    assert sorted(role["metadata"]["namespace"] for role in roles) == sorted(watched)
    for role in roles:
        assert_covers(rules_of(role), required_permissions())
    bindings = job_rbac(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(watched)
    [cluster_role] = operator_cluster_roles(objects)  # kopf's observation only (test_chart_rbac.py: it needs both)
    assert rules_of(cluster_role) == {("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
                                      ("", "namespaces"): {"list", "watch"}}
    [deployment] = by_kind(objects, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == [f"--namespace={ns}" for ns in watched]
    assert "--all-namespaces" not in args


def operator_settings(objects: list[dict[str, Any]]) -> Any:
    """The operator's settings as its real CLI parses the chart's Deployment args."""
    from dreambooth_operator.__main__ import config_from_args, parse_args
    [deployment] = by_kind(objects, "Deployment")
    return config_from_args(parse_args(deployment["spec"]["template"]["spec"]["containers"][0]["args"])).settings


def test_the_charts_operator_settings_default_to_the_operators_own_and_each_value_reaches_it(rendered) -> None:
    from dreambooth_operator.settings import ReconcilerSettings, Timing
    assert operator_settings(rendered["defaults"]) == ReconcilerSettings()
    values = {"scrapeIntervalSeconds": 5, "resyncSeconds": 7, "backoffSeconds": 3, "backoffMaxSeconds": 60,
              "pendingTimeoutSeconds": 90, "startTimeoutSeconds": 120, "crdRecheckSeconds": 45}
    assert operator_settings(render({"operator": values})) == ReconcilerSettings(
        timing=Timing(backoff_base_seconds=3, backoff_max_seconds=60, pending_timeout_seconds=90,
                      start_timeout_seconds=120, resync_seconds=7), scrape_interval_seconds=5, crd_recheck_seconds=45)


def test_network_policies_are_on_by_default_and_off_takes_their_rbac_away(rendered) -> None:
    policy_verbs = {"get", "create", "delete", "patch"}  # exactly: create, and patch and delete only its own
    assert operator_settings(rendered["defaults"]).network_policy is True
    cluster_wide = [rules_of(role) for role in operator_cluster_roles(rendered["defaults"])]
    assert set().union(*(rules.get(NETWORK_POLICIES, set()) for rules in cluster_wide)) == policy_verbs
    for role in job_rbac(rendered["namespaced"], "Role"):
        assert rules_of(role)[NETWORK_POLICIES] == policy_verbs
    off = rendered["network-policy-off"]
    assert operator_settings(off).network_policy is False
    # An operator that makes no policy gets no right on any: it could open or drop a tenant's.
    granted = [rules_of(role) for role in operator_cluster_roles(off)]
    assert not any(NETWORK_POLICIES in rules for rules in granted)
    needed = required_permissions()
    del needed[NETWORK_POLICIES]
    assert_covers({key: verbs for rules in granted for key, verbs in rules.items()}, needed)


def test_operator_deployment_shape(rendered) -> None:
    [deployment] = by_kind(rendered["defaults"], "Deployment")
    spec = deployment["spec"]
    # Two replicas under leader election, rolled with a standby always there.
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    [spread] = spec["template"]["spec"]["topologySpreadConstraints"]
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    [container] = spec["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # The args are the operator's real CLI: it accepts them.
    from dreambooth_operator.__main__ import parse_args
    parsed = parse_args(container["args"])
    assert parsed.all_namespaces and parsed.http_port == 8080 and parsed.http_host == "0.0.0.0"


def test_a_disruption_budget_keeps_a_replica_to_lead_through_drains_and_none_blocks_a_single_one(rendered) -> None:
    for mode in ("defaults", "namespaced"):
        [deployment] = by_kind(rendered[mode], "Deployment")
        [budget] = by_kind(rendered[mode], "PodDisruptionBudget")
        assert budget["metadata"]["namespace"] == NAMESPACE and budget["spec"]["maxUnavailable"] == 1
        # A crash-looping replica leads nothing: it must not hold every drain of its node.
        assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        # It covers exactly the operator's pods: what the Deployment selects, by the labels they carry.
        assert budget["spec"]["selector"] == deployment["spec"]["selector"]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # One replica: a budget could only block the node's drain.
    assert not by_kind(render({"replicaCount": 1, "leaderElection": {"enabled": False}}), "PodDisruptionBudget")
    assert not by_kind(render({"podDisruptionBudget": {"enabled": False}}), "PodDisruptionBudget")
    # Three replicas: still one at a time, over all three.
    [budget] = by_kind(render({"replicaCount": 3}), "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1


def test_leader_election_is_on_with_a_lease_in_the_release_namespace_only(rendered, monkeypatch) -> None:
    from dreambooth_operator.__main__ import election_from_args, parse_args
    for mode in ("defaults", "namespaced"):
        objects = rendered[mode]
        [deployment] = by_kind(objects, "Deployment")
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        env = {var["name"]: var.get("valueFrom") for var in container["env"]}
        assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        # The real CLI, in the pod the downward API describes, elects on the Lease the Role names.
        monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
        monkeypatch.setenv("POD_NAME", "dreambooth-operator-5d4f-abcde")
        election = election_from_args(parse_args(container["args"]))
        assert (election.namespace, election.name) == (NAMESPACE, LEASE_NAME)
        assert (election.lease_duration_seconds, election.renew_deadline_seconds, election.retry_period_seconds) == (
            15, 10, 2)
        [role] = [r for r in by_kind(objects, "Role") if r["metadata"]["name"] == LEADER_ELECTION_ROLE]
        assert role["metadata"]["namespace"] == NAMESPACE
        # Exactly what leader.py calls (get_lease, create_lease, replace_lease), reading and
        # renewing only its own Lease: create cannot be limited to a name.
        assert sorted((tuple(rule["verbs"]), tuple(rule.get("resourceNames", []))) for rule in role["rules"]) == [
            (("create",), ()), (("get", "update"), (LEASE_NAME,))]
        assert all(rule["apiGroups"] == ["coordination.k8s.io"] and rule["resources"] == ["leases"]
                   for rule in role["rules"])
        [binding] = [b for b in by_kind(objects, "RoleBinding") if b["metadata"]["name"] == LEADER_ELECTION_ROLE]
        assert binding["metadata"]["namespace"] == NAMESPACE and binding["roleRef"]["name"] == LEADER_ELECTION_ROLE
        assert binding["subjects"][0]["name"] == deployment["spec"]["template"]["spec"]["serviceAccountName"]


def test_one_replica_without_leader_election_is_replaced_not_rolled() -> None:
    objects = render({"replicaCount": 1, "leaderElection": {"enabled": False}})
    [deployment] = by_kind(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--no-leader-elect" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "topologySpreadConstraints" not in deployment["spec"]["template"]["spec"]
    assert not by_kind(objects, "Role")
    # Two replicas that would both act on every job: refused, naming both values.
    result = helm("template", str(CHART), "--set", "leaderElection.enabled=false", check=False)
    assert result.returncode != 0, result.stdout
    assert "replicaCount 2 needs leaderElection.enabled=true" in result.stderr, result.stderr


def test_values_schema_rejects_bad_values_naming_the_field() -> None:
    result = helm("template", str(CHART), "--set", "securityContext.readOnlyRootFilesystem=false", check=False)
    assert result.returncode != 0 and "readOnlyRootFilesystem" in result.stderr, result.stderr
    result = helm("template", str(CHART), "--set", "watchNamespaces[0]=Team_A", check=False)
    assert result.returncode != 0 and "watchNamespaces" in result.stderr, result.stderr
    result = helm("template", str(CHART), "--set", "metrics.podMonitor.enabeld=true", check=False)
    assert result.returncode != 0 and "enabeld" in result.stderr, result.stderr
    result = helm("template", str(CHART), "--set", "podDisruptionBudget.enabled=yes please", check=False)
    assert result.returncode != 0 and "podDisruptionBudget" in result.stderr, result.stderr
    # Not creating a ServiceAccount without naming one would grant the operator's RBAC to `default`.
    result = helm("template", str(CHART), "--set", "serviceAccount.create=false", check=False)
    assert result.returncode != 0 and "/serviceAccount/name" in result.stderr, result.stderr
    rendered = helm("template", str(CHART), "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=ops")
    assert "serviceAccountName: ops" in rendered.stdout


def test_notes_tell_what_to_run_next() -> None:
    result = helm("install", "dreambooth-operator", str(CHART), "--dry-run=client", "--namespace", "dreambooth-system")
    notes = result.stdout.split("NOTES:", 1)[1]
    for command in ("kubectl -n default create configmap", "kubectl -n default apply -f", "kubectl -n default get dbj -w",
                    "kubectl auth can-i create dreamboothjobs -n default",
                    "helm uninstall", "kubectl apply -f charts/dreambooth-operator/crds/crd.yaml",
                    f"kubectl -n dreambooth-system get lease {LEASE_NAME}"):
        assert command in notes, notes
    # Watching some namespaces only: the commands go to one of them (elsewhere a job is never picked up).
    result = helm("install", "dreambooth-operator", str(CHART), "--dry-run=client", "--namespace", "dreambooth-system",
                  "--set", "watchNamespaces={team-a,team-b}")
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n team-a apply -f" in notes and "never picked up: team-a, team-b only" in notes, notes


def test_the_charts_readme_holds_its_values() -> None:
    check = subprocess.run([sys.executable, str(REPO / "scripts" / "render_chart_readme.py"), "--check"])
    assert check.returncode == 0, "charts/dreambooth-operator/README.md is stale: run python scripts/render_chart_readme.py"
    assert helm("show", "readme", str(CHART)).stdout.startswith("# dreambooth-operator")  # what Helm shows of it


def test_install_manifest_is_the_default_rendering() -> None:
    assert INSTALL_MANIFEST.read_text() == render_install_manifest(), (
        "manifests/install.yaml differs from the chart's default rendering: "
        "run `python -m tests.ship.install_manifest`")
    assert [obj for obj in yaml.safe_load_all(INSTALL_MANIFEST.read_text()) if obj]


def test_chart_ships_the_dashboard_unchanged(rendered) -> None:
    assert CHART_DASHBOARD.read_text() == DASHBOARD.read_text(), (
        "charts/dreambooth-operator/dashboards/dreambooth.json differs from dashboards/dreambooth.json: copy it")
    [config_map] = by_kind(rendered["all-options"], "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert json.loads(config_map["data"]["dreambooth.json"]) == json.loads(DASHBOARD.read_text())


def test_chart_ships_the_alerts_unchanged(rendered) -> None:
    assert CHART_ALERTS.read_text() == ALERTS.read_text(), (
        "charts/dreambooth-operator/dashboards/alerts.yaml differs from dashboards/alerts.yaml: copy it")
    [rule] = by_kind(rendered["all-options"], "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prometheus"  # what kube-prometheus-stack selects on
    # Prometheus' own {{ $labels }} templates reach it as written, not rendered by Helm.
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())
    assert "{{ $labels.job }}" in rule["spec"]["groups"][0]["rules"][0]["annotations"]["summary"]
