"""`--namespace` limits the operator to the namespaces it is given."""

from __future__ import annotations

import time
from typing import Iterator

import pytest
from dbj_examples import MINIMAL_SPEC
from emulated_cluster import EmulatedCluster
from operator_harness import Cluster, OperatorProcess, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    emulated = EmulatedCluster(tmp_path_factory.mktemp("ns-cluster")).start()
    emulated.install_crd()
    operator = OperatorProcess(emulated, tmp_path_factory.mktemp("ns-operator"),
                               extra_args=["--namespace", "team-a"]).start()
    yield Cluster(emulated)
    operator.stop()
    emulated.stop()


def test_jobs_outside_the_watched_namespace_are_left_alone(cluster: Cluster) -> None:
    cluster.create_job("other", MINIMAL_SPEC, namespace="team-b")
    cluster.create_job("mine", MINIMAL_SPEC, namespace="team-a")
    wait_for(lambda: len(cluster.pods("mine", "team-a")) == 1, what="the watched job's pod")
    assert cluster.status("mine", "team-a")["phase"] == "Pending"
    # The other job was created first: had the operator seen it, it would be done by now.
    time.sleep(1.0)
    assert cluster.pods("other", "team-b") == []
    assert cluster.status("other", "team-b") == {}
