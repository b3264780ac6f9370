"""Each job's NetworkPolicy, made by the real operator against the emulated API: created
with the job's other children, owned by the job, deleted with it; none with
`--no-network-policy`. Two operators share one cluster, each watching its own namespace:
team-a's with the default (on), team-b's with the setting off."""

from __future__ import annotations

from typing import Iterator

import kubernetes_validate
import pytest
from dbj_examples import KUBERNETES_VERSION, MINIMAL_SPEC
from emulated_cluster import EmulatedCluster
from operator_harness import Cluster, OperatorProcess, condition, wait_for

pytestmark = pytest.mark.timeout(120)

ON, OFF = "team-a", "team-b"


@pytest.fixture(scope="module")
def operators(emulated: EmulatedCluster,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, OperatorProcess]]:
    processes = {
        ON: OperatorProcess(emulated, tmp_path_factory.mktemp("netpol-on"), extra_args=["--namespace", ON]),
        OFF: OperatorProcess(emulated, tmp_path_factory.mktemp("netpol-off"),
                             extra_args=["--namespace", OFF, "--no-network-policy"]),
    }
    for process in processes.values():
        process.start()
    yield processes
    for process in processes.values():
        process.stop()


@pytest.fixture(scope="module")
def cluster(emulated: EmulatedCluster, operators: dict[str, OperatorProcess]) -> Cluster:
    return Cluster(emulated)


def selects(policy: dict, pod: dict) -> bool:
    return policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_each_job_gets_a_policy_it_owns_over_its_workers_and_deleted_with_it(cluster: Cluster) -> None:
    cluster.create_job("guarded", {**MINIMAL_SPEC, "workers": {**MINIMAL_SPEC["workers"], "nodes": 2}}, ON)
    pods = wait_for(lambda: len(p := cluster.pods("guarded", ON)) == 2 and p, what="2 worker pods")
    [policy] = cluster.network_policies("guarded", ON)
    kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)
    assert policy["metadata"]["ownerReferences"][0]["uid"] == cluster.job("guarded", ON)["metadata"]["uid"]
    assert all(selects(policy, pod) for pod in pods)
    assert policy["spec"]["policyTypes"] == ["Ingress"]

    cluster.delete_job("guarded", ON)
    wait_for(lambda: not cluster.job_exists("guarded", ON), what="job gone (finalizer released)")
    assert cluster.network_policies("guarded", ON) == []


def test_someone_elses_policy_of_the_jobs_name_is_refused_and_left_alone(cluster: Cluster) -> None:
    theirs = {"metadata": {"name": "clash", "labels": {"team": "web"}},
              "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}}
    cluster.networking.create_namespaced_network_policy(ON, theirs)
    cluster.create_job("clash", MINIMAL_SPEC, ON)
    failed = wait_for(lambda: condition(cluster.status("clash", ON), "Failed"), what="Failed condition")
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith(
        f"a NetworkPolicy named 'clash' already exists in namespace {ON} and is not this job's")
    assert cluster.pods("clash", ON) == []

    cluster.delete_job("clash", ON)
    wait_for(lambda: not cluster.job_exists("clash", ON), what="job gone")
    kept = cluster.networking.read_namespaced_network_policy("clash", ON)
    assert kept.spec.pod_selector.match_labels == {"app": "web"}


def test_none_is_made_when_off_and_a_running_gang_gets_one_once_turned_on(
        cluster: Cluster, operators: dict[str, OperatorProcess]) -> None:
    cluster.create_job("open", MINIMAL_SPEC, OFF)
    before = wait_for(lambda: cluster.pods("open", OFF), what="the worker")
    cluster.run_pods("open", OFF)
    wait_for(lambda: cluster.status("open", OFF).get("phase") == "Running", what="Running")
    # The policy would be there before the workers: the operator creates it first.
    assert cluster.network_policies("open", OFF) == []

    # An operator upgraded to one with the setting on covers the gang that runs, untouched.
    operator = operators[OFF]
    operator.stop()
    operator.extra_args = ["--namespace", OFF]
    operator.start()
    [policy] = wait_for(lambda: cluster.network_policies("open", OFF), what="the running gang's policy")
    assert selects(policy, before[0])
    assert [p["metadata"]["uid"] for p in cluster.pods("open", OFF)] == [before[0]["metadata"]["uid"]]

    cluster.delete_job("open", OFF)
    wait_for(lambda: not cluster.job_exists("open", OFF), what="job gone")
    assert cluster.network_policies("open", OFF) == []
