"""A job's life after its workers exist, by the real operator against the emulated API
(the test plays the kubelet): gangs restarted after a failure or a preemption, the
backoff limit, suspension, the deadline, workers that cannot be scheduled or started,
progress scraped from rank 0, and the operator's own metrics and restart. One cluster
and one operator serve the module; the restart test restarts that operator."""

from __future__ import annotations

import pytest
from dbj_examples import minimal_spec
from emulated_cluster import EmulatedCluster
from operator_harness import (Cluster, OperatorProcess, condition, evicted, gang_of, phase_is, pods_created, terminated,
                              wait_for)

from trainer.metrics import TrainerMetrics

pytestmark = pytest.mark.timeout(120)


def test_worker_failure_restarts_the_whole_gang(cluster: Cluster) -> None:
    cluster.create_job("flaky", minimal_spec(workers={"nodes": 2}, runPolicy={"backoffLimit": 2}))
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


def test_a_restart_whose_pod_deletes_rbac_forbids_is_reported_and_counted_once_done(
        emulated: EmulatedCluster, operator: OperatorProcess, cluster: Cluster) -> None:
    """An operator upgraded without its chart's RBAC (here: no `delete` on pods) cannot
    replace a failed gang. It says so on the job and in a counter an alert watches, not
    only in its log, and the restart is counted once however many passes it took."""
    forbidden = 'reconcile_errors_total{reason="forbidden"}'
    before = operator.metric(f"dreambooth_operator_{forbidden}")
    cluster.create_job("undeletable", minimal_spec(runPolicy={"backoffLimit": 3}))
    wait_for(lambda: len(cluster.pods("undeletable")) == 1, what="a worker pod")
    emulated.deny("delete", "pods")
    try:
        cluster.set_pod_status("undeletable-worker-0", terminated(1, "Error"))
        event = wait_for(lambda: next((e for e in cluster.events("undeletable") if e["reason"] == "Forbidden"), None),
                         what="a Forbidden Event")
        assert event["type"] == "Warning"
        assert event["message"] == (
            'the operator cannot act on this job: pods "undeletable-worker-0" is forbidden: User '
            '"system:serviceaccount:dreambooth:dreambooth-operator" cannot delete resource "pods" in API group "" in '
            'the namespace "default". The operator\'s RBAC (the chart of its version, or manifests/install.yaml) or an '
            'admission policy forbids it; it tries again every 2 s')
        # Passes go on failing, one Event counting them, and so does the counter.
        wait_for(lambda: next(e for e in cluster.events("undeletable") if e["reason"] == "Forbidden")["count"] >= 3,
                 what="the Event counted again")
        assert operator.metric(f"dreambooth_operator_{forbidden}") >= before + 3
        assert [gang_of(pod) for pod in cluster.pods("undeletable")] == ["0"]
    finally:
        emulated.deny("delete", "pods", denied=False)
    wait_for(lambda: [gang_of(pod) for pod in cluster.pods("undeletable")] == ["1"], what="the gang replaced")
    assert cluster.status("undeletable")["restarts"] == 1


def test_backoff_limit_exceeded_fails_the_job_with_the_reason(cluster: Cluster) -> None:
    cluster.create_job("doomed", minimal_spec(runPolicy={"backoffLimit": 1}))
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
    cluster.create_job(name, minimal_spec(workers={"nodes": 2}, runPolicy={"backoffLimit": 0}))
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


def test_suspend_deletes_workers_and_resume_recreates_them(cluster: Cluster) -> None:
    cluster.create_job("pausable", minimal_spec(workers={"nodes": 2}))
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
    cluster.create_job("slow", minimal_spec(runPolicy={"activeDeadlineSeconds": 3}))
    wait_for(lambda: len(cluster.pods("slow")) == 1, what="pod")
    cluster.run_pods("slow")
    wait_for(phase_is(cluster, "slow", "Failed"), what="Failed after the deadline")
    assert condition(cluster.status("slow"), "Failed")["reason"] == "DeadlineExceeded"
    wait_for(lambda: cluster.pods("slow") == [], what="workers stopped")


def test_unschedulable_pods_get_a_condition_with_the_scheduler_message(cluster: Cluster) -> None:
    cluster.create_job("huge", minimal_spec(workers={"gpusPerNode": 64}))
    wait_for(lambda: len(cluster.pods("huge")) == 1, what="pod")
    message = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    cluster.set_pod_status("huge-worker-0", {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]})
    unschedulable = wait_for(lambda: condition(cluster.status("huge"), "Unschedulable"), what="Unschedulable")
    assert unschedulable["status"] == "True" and message in unschedulable["message"]


def test_a_worker_whose_image_cannot_be_pulled_is_named_then_fails_the_job_and_frees_its_node(cluster: Cluster) -> None:
    cluster.create_job("typo", minimal_spec(workers={"image": "registry.example/dreambooth-trainer:0.1.0x"}))
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
        cluster.create_job("scraped", minimal_spec(metrics={"port": rank0.serving_port}))
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


def test_operator_metrics_and_health(cluster: Cluster, operator: OperatorProcess) -> None:
    cluster.create_job("counted", minimal_spec(workers={"nodes": 2}))
    wait_for(lambda: len(cluster.pods("counted")) == 2, what="pods")
    text = wait_for(lambda: (t := operator.metrics()) and 'dreambooth_operator_jobs{phase="Pending"}' in t and t,
                    what="metrics")
    for name in ("dreambooth_operator_reconcile_seconds_bucket", "dreambooth_operator_pods_created_total",
                 "dreambooth_operator_restarts_total"):
        assert name in text
    wait_for(lambda: pods_created(operator) >= 2, what="pods_created_total >= 2")
    assert operator.healthy()


def test_restarted_operator_adopts_pods_instead_of_duplicating(cluster: Cluster, operator: OperatorProcess) -> None:
    cluster.create_job("survivor", minimal_spec(workers={"nodes": 3}))
    before = wait_for(lambda: len(p := cluster.pods("survivor")) == 3 and p, what="3 pods")
    operator.stop()
    operator.start()
    # The new operator resumes the job: give it time to (wrongly) act, then check.
    cluster.run_pods("survivor")
    wait_for(phase_is(cluster, "survivor", "Running"), what="Running, seen by the new operator")
    after = cluster.pods("survivor")
    assert [p["metadata"]["uid"] for p in after] == [p["metadata"]["uid"] for p in before]
    assert pods_created(operator) == 0
