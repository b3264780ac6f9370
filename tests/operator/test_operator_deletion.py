"""A job's deletion by the real operator against the emulated API: by the user or after
runPolicy.ttlSecondsAfterFinished, every child goes with it but a retained claim, which
the next job of the same name resumes from. One cluster and one operator serve the
module."""

from __future__ import annotations

import time

import pytest
from dbj_examples import minimal_spec
from operator_harness import Cluster, terminated, wait_for

pytestmark = pytest.mark.timeout(120)


def test_delete_removes_every_child(cluster: Cluster) -> None:
    cluster.create_job("doomed-by-user", minimal_spec(workers={"nodes": 2}, storage={"claimName": None, "size": "1Gi",
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
    cluster.create_job("keeper", minimal_spec(storage={"claimName": None, "size": "1Gi"}))
    wait_for(lambda: len(cluster.pods("keeper")) == 1, what="pod")
    cluster.delete_job("keeper")
    wait_for(lambda: not cluster.job_exists("keeper"), what="job gone")
    assert cluster.pods("keeper") == []
    assert [c["metadata"]["name"] for c in cluster.claims("keeper")] == ["keeper-storage"]


def test_a_claim_kept_from_an_earlier_job_is_resumed_from_and_not_deleted_by_the_next(cluster: Cluster) -> None:
    cluster.create_job("again", minimal_spec(storage={"claimName": None, "size": "1Gi"}))  # retained (the default)
    wait_for(lambda: len(cluster.pods("again")) == 1, what="pod")
    cluster.delete_job("again")
    wait_for(lambda: not cluster.job_exists("again"), what="job gone")
    # The same job again, now not retaining its claim: it resumes from the kept one, and
    # that claim, which it did not make, outlives it.
    cluster.create_job("again", minimal_spec(storage={"claimName": None, "size": "1Gi", "retain": False}))
    wait_for(lambda: len(cluster.pods("again")) == 1, what="pod of the second job")
    cluster.delete_job("again")
    wait_for(lambda: not cluster.job_exists("again"), what="second job gone")
    assert [c["metadata"]["name"] for c in cluster.claims("again")] == ["again-storage"]


def test_a_finished_job_is_deleted_after_its_ttl_and_its_claim_kept(cluster: Cluster) -> None:
    cluster.create_job("short-lived", minimal_spec(storage={"claimName": None, "size": "1Gi"},
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
