"""What the API server streams to the operator: only worker pods, selected server-side.

The real operator process against the emulated API, which records every object its
lists and watches served (emulated_cluster.Served). On a cluster of thousands of pods,
a pod watch without a labelSelector would stream every one of them to the operator.
"""

from __future__ import annotations

from typing import Iterator

import pytest
from dbj_examples import MINIMAL_SPEC
from emulated_cluster import EmulatedCluster
from operator_harness import Cluster, OperatorProcess, wait_for

from dreambooth_operator.constants import LABEL_JOB

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedCluster]:
    cluster = EmulatedCluster(tmp_path_factory.mktemp("cluster"), record_served=True).start()
    cluster.install_crd()
    yield cluster
    cluster.stop()


BYSTANDER = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bystander", "labels": {"app": "web"}},
             "spec": {"containers": [{"name": "web", "image": "nginx"}]}}


@pytest.fixture(scope="module")
def cluster(emulated: EmulatedCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(emulated)
    # Someone else's pod, there before the operator starts: kopf's first list would show it.
    cluster.core.create_namespaced_pod("default", BYSTANDER)
    process = OperatorProcess(emulated, tmp_path_factory.mktemp("operator")).start()
    yield cluster
    process.stop()


def test_only_pods_with_the_job_label_reach_the_operators_pod_watch(emulated: EmulatedCluster,
                                                                    cluster: Cluster) -> None:
    # The bystander changes first; the worker's events come after it on the same
    # resource's stream, so once the operator was shown the worker, it would have been
    # shown the bystander before.
    cluster.core.patch_namespaced_pod("bystander", "default", {"metadata": {"annotations": {"seen": "no"}}})
    cluster.create_job("watched", MINIMAL_SPEC)
    wait_for(lambda: cluster.pods("watched"), what="the worker pod")
    cluster.run_pods("watched")

    def pod_watch_events() -> list[tuple[str | None, str | None, str]]:
        return [(s.label_selector, s.event, s.name) for s in emulated.served()
                if s.plural == "pods" and s.action == "watch"]

    wait_for(lambda: any(event == "MODIFIED" and name == "watched-worker-0" for _, event, name in pod_watch_events()),
             what="the running worker streamed to the operator's pod watch")
    watched = pod_watch_events()
    assert {selector for selector, _, _ in watched} == {LABEL_JOB}, "a pod watch without the job label selector"
    assert {name for _, _, name in watched} == {"watched-worker-0"}, "the bystander was streamed to the operator"
    # Nor did a list show it: kopf's before its watch, the operator's own (by job and role).
    pod_lists = [s for s in emulated.served() if s.plural == "pods" and s.action == "list"]
    assert pod_lists and all(s.label_selector for s in pod_lists)
    assert "bystander" not in {s.name for s in pod_lists}
