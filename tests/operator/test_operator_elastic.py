"""Elastic gangs (spec.workers.minNodes): workers the scheduler cannot place do not hold
the others back; the gang restarts on the nodes it has, and keeps a standby pod for each
worker it lacks, growing back once they are all placed. As tables of lifecycle.decide,
then with the real operator against the emulated API."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from dbj_examples import FULL_SPEC, job, minimal_spec, validate_for_supported_kubernetes
from operator_harness import Cluster, OperatorProcess, gang_of, running, wait_for
from pod_statuses import NOW, RUNNING, TIMING, condition, job_spec, pod, scheduled, unscheduled

from dreambooth_operator import constants as c
from dreambooth_operator.lifecycle import decide
from dreambooth_operator.metadata import worker_match_labels
from dreambooth_operator.podstates import is_standby
from dreambooth_operator.pods import build_pod_group, build_standby_pod, build_worker_pod

LONG_AGO = NOW - dt.timedelta(seconds=TIMING.pending_timeout_seconds + 1)
SHRINK_RESTART = 'dreambooth_operator_restarts_total{reason="shrink"}'
GROW_RESTART = 'dreambooth_operator_restarts_total{reason="grow"}'
SHRUNK_JOBS = "dreambooth_operator_shrunk_jobs"


def gang_is(cluster: Cluster, job_name: str, gangs: list[str]) -> list[dict[str, Any]] | None:
    """The job's workers once they are exactly these, by their gang labels."""
    pods = [p for p in cluster.pods(job_name) if not is_standby(p)]
    return pods if [gang_of(p) for p in pods] == gangs else None


def shrunk_status(nodes: int) -> dict[str, Any]:
    """Where a gang of 3 that shrank to `nodes` stands once its old pods are gone."""
    return {**RUNNING, "phase": c.PHASE_RESTARTING, "preemptions": 1, "gangNodes": nodes,
            "nextRestartTime": "2026-06-01T12:00:00Z"}


def test_workers_unschedulable_past_the_timeout_shrink_the_gang_to_those_scheduled() -> None:
    gang = [pod(0), scheduled(1), unscheduled(2, created=LONG_AGO)]
    plan = decide(job_spec(nodes=3, min_nodes=2, backoff_limit=0), RUNNING, gang, NOW, TIMING)
    status = plan.status
    assert status["phase"] == c.PHASE_RESTARTING and status["gangNodes"] == 2
    # Not the job's fault: a preemption, not a restart (backoffLimit 0 holds), and no backoff.
    assert (status["restarts"], status["preemptions"], status.get("consecutivePreemptions")) == (0, 1, None)
    assert status["nextRestartTime"] == "2026-06-01T12:00:00Z"
    assert plan.resize == "shrink" and not plan.counted_restart and (plan.gang, plan.nodes) == (1, 2)
    assert plan.delete == ["j-worker-0", "j-worker-1", "j-worker-2"]
    restarting = condition(status, c.CONDITION_RESTARTING)
    assert restarting["reason"] == c.REASON_GANG_SHRUNK
    [(kind, reason, message)] = plan.events
    assert (kind, reason, message) == ("Warning", c.REASON_GANG_SHRUNK, restarting["message"])
    assert message.startswith("j-worker-2: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    assert "restarting the gang on 2 of workers.nodes = 3 nodes (workers.minNodes = 2)" in message
    # The scheduler's message is also in condition Unschedulable, as for any job.
    assert condition(status, c.CONDITION_UNSCHEDULABLE)["status"] == "True"


@pytest.mark.parametrize("min_nodes,gang,why", [
    (None, [pod(0), pod(1), unscheduled(2, created=LONG_AGO)], "no minNodes: the gang never shrinks"),
    (3, [pod(0), pod(1), unscheduled(2, created=LONG_AGO)], "minNodes = nodes"),
    (2, [pod(0), unscheduled(1, created=LONG_AGO), unscheduled(2, created=LONG_AGO)], "fewer scheduled than minNodes"),
    (2, [pod(0), pod(1), unscheduled(2, created=NOW - dt.timedelta(seconds=10))], "not pending long enough"),
    (2, [pod(0), pod(1), pod(2, "Pending")], "not scheduled yet, but not refused by the scheduler either"),
])
def test_the_gang_waits_for_its_workers_otherwise(min_nodes: int | None, gang: list[dict[str, Any]],
                                                   why: str) -> None:
    plan = decide(job_spec(nodes=3, min_nodes=min_nodes), RUNNING, gang, NOW, TIMING)
    assert plan.status["phase"] == c.PHASE_PENDING, why
    assert (plan.delete, plan.resize, plan.nodes, plan.status.get("gangNodes")) == ([], None, 3, None), why
    assert plan.create_standby == [], why


def test_the_shrunk_gang_is_created_runs_and_succeeds_at_its_size() -> None:
    spec = job_spec(nodes=3, min_nodes=2)
    plan = decide(spec, shrunk_status(2), [], NOW, TIMING)
    assert (plan.create, plan.gang, plan.nodes) == ([0, 1], 1, 2)
    assert condition(plan.status, c.CONDITION_CREATED)["message"] == "2 worker pods created"
    # Its workers run torchrun for 2 nodes, and say so.
    worker = build_worker_pod(job(minimal_spec(workers={"nodes": 3, "minNodes": 2})), 1, plan.gang, "h", plan.nodes)
    command = worker["spec"]["containers"][0]["command"]
    assert command[command.index("--nnodes") + 1] == "2"
    assert worker["metadata"]["annotations"][c.ANNOTATION_GANG_NODES] == "2"

    # Not while its workers wait for nodes: a standby pod would compete with them.
    starting = [scheduled(0, gang=1, nodes=2), unscheduled(1, gang=1, nodes=2)]
    plan = decide(spec, {**shrunk_status(2), "phase": c.PHASE_PENDING}, starting, NOW, TIMING)
    assert (plan.status["phase"], plan.create_standby) == (c.PHASE_PENDING, [])

    # Two workers of two are the whole gang: no resize, no vanished worker, and no
    # shrinking further while a third would be missing.
    gang = [pod(0, gang=1, nodes=2), pod(1, gang=1, nodes=2)]
    plan = decide(spec, {**shrunk_status(2), "phase": c.PHASE_INITIALIZING}, gang, NOW, TIMING)
    assert (plan.status["phase"], plan.delete, plan.create) == (c.PHASE_RUNNING, [], [])
    assert plan.create_standby == [2]  # the stand-in of the worker it lacks
    done = [pod(i, "Succeeded", exit_code=0, gang=1, nodes=2) for i in range(2)]
    finished = decide(spec, plan.status, [*done, standby(2, gang=1)], NOW, TIMING)
    assert finished.status["phase"] == c.PHASE_SUCCEEDED
    assert (finished.delete, finished.create_standby) == (["j-standby-2"], [])  # it would hold a node


def standby(index: int, phase: str = "Pending", gang: int = 1, placed: bool = False, **kwargs: Any) -> dict[str, Any]:
    """A standby pod as the scheduler leaves it: waiting for a node, or `placed` on one."""
    stand_in = (scheduled(index, gang=gang, **kwargs) if placed else unscheduled(index, gang=gang, **kwargs)) \
        if phase == "Pending" else pod(index, phase, gang=gang, **kwargs)
    stand_in["metadata"]["name"] = f"j-standby-{index}"
    stand_in["metadata"]["labels"][c.LABEL_ROLE] = c.ROLE_STANDBY
    return stand_in


RUNNING_SHRUNK = {**RUNNING, "preemptions": 1, "gangNodes": 2}
SHRUNK_GANG = [pod(0, gang=1, nodes=2), pod(1, gang=1, nodes=2)]


@pytest.mark.parametrize("standing,delete,create", [
    ([standby(2)], [], []),  # waiting for a node: the gang waits too
    ([standby(2, "Failed")], ["j-standby-2"], []),  # ended (evicted, say): replaced once it is gone
    ([standby(2, deleting=True)], [], []),
    ([standby(2, gang=0)], ["j-standby-2"], [2]),  # an older gang's
    ([standby(2), standby(3)], ["j-standby-3"], []),  # workers.nodes was lowered to 3
])
def test_a_shrunk_gang_keeps_one_standby_pod_for_each_worker_it_lacks(standing: list[dict[str, Any]],
                                                                      delete: list[str], create: list[int]) -> None:
    plan = decide(job_spec(nodes=3, min_nodes=1), RUNNING_SHRUNK, [*SHRUNK_GANG, *standing], NOW, TIMING)
    assert (plan.status["phase"], plan.resize) == (c.PHASE_RUNNING, None)
    assert (plan.delete, plan.create_standby) == (delete, create)


def test_once_every_standby_pod_is_placed_the_gang_grows_back() -> None:
    spec = job_spec(nodes=4, min_nodes=1, backoff_limit=0)
    half_placed = [*SHRUNK_GANG, standby(2, placed=True, since=NOW - dt.timedelta(seconds=100)), standby(3)]
    waiting = decide(spec, RUNNING_SHRUNK, half_placed, NOW, TIMING)
    assert waiting.resize is None and waiting.requeue_after == TIMING.pending_timeout_seconds - 100
    placed = [*SHRUNK_GANG, standby(2, placed=True), standby(3, "Running")]
    plan = decide(spec, RUNNING_SHRUNK, placed, NOW, TIMING)
    status = plan.status
    assert (plan.resize, plan.gang, plan.nodes, status["phase"]) == ("grow", 2, 4, c.PHASE_RESTARTING)
    assert "gangNodes" not in status and (status["restarts"], status["preemptions"]) == (0, 2)
    assert plan.delete == ["j-worker-0", "j-worker-1", "j-standby-2", "j-standby-3"] and plan.create_standby == []
    [(kind, reason, message)] = plan.events
    assert (kind, reason) == ("Normal", c.REASON_GANG_GROWN)
    assert message.startswith("the scheduler placed j-standby-2, j-standby-3: all workers.nodes = 4 nodes")
    # The next gang is all four workers.
    later = decide(spec, status, [], NOW, TIMING)
    assert (later.create, later.nodes) == ([0, 1, 2, 3], 4)


def test_some_standby_pods_placed_and_the_others_not_within_the_pending_timeout_grow_the_gang_to_what_it_has(
        ) -> None:
    # Rather than hold worker 2's node idle for a node 3 that may never come back.
    spec = job_spec(nodes=4, min_nodes=1)
    half_placed = [*SHRUNK_GANG, standby(2, placed=True, since=LONG_AGO), standby(3)]
    plan = decide(spec, RUNNING_SHRUNK, half_placed, NOW, TIMING)
    assert (plan.resize, plan.nodes, plan.status["gangNodes"], plan.status["preemptions"]) == ("grow", 3, 3, 2)
    assert plan.delete == ["j-worker-0", "j-worker-1", "j-standby-2", "j-standby-3"]
    [(_, _, message)] = plan.events
    assert message.startswith("the scheduler placed j-standby-2: 3 of workers.nodes = 4 nodes can be had (the "
                              "others not placed in 300s); restarting the gang on 3 from the latest checkpoint")
    later = decide(spec, plan.status, [], NOW, TIMING)
    assert (later.create, later.nodes) == ([0, 1, 2], 3)


def test_an_edit_of_workers_nodes_upward_reaches_a_shrunk_gang_through_its_standby_pods() -> None:
    # Shrunk from 3 to 2, then workers.nodes: 4: two stand-ins, and the gang grows to 4 once both are placed.
    plan = decide(job_spec(nodes=4, min_nodes=1), RUNNING_SHRUNK, [*SHRUNK_GANG, standby(2)], NOW, TIMING)
    assert (plan.delete, plan.create_standby) == ([], [3])


@pytest.mark.parametrize("how", ["failure", "preemption", "suspension"])
def test_every_later_gang_asks_for_all_its_nodes_again(how: str) -> None:
    spec = job_spec(nodes=3, min_nodes=2, suspend=how == "suspension")
    status = {**shrunk_status(2), "phase": c.PHASE_RUNNING}
    ending = {"failure": pod(1, "Failed", exit_code=1, gang=1, nodes=2),
              "preemption": pod(1, "Failed", pod_reason="Evicted", gang=1, nodes=2, message="The node was low on "
                                "resource: memory. "),
              "suspension": pod(1, gang=1, nodes=2)}[how]
    plan = decide(spec, status, [pod(0, gang=1, nodes=2), ending], NOW, TIMING)
    assert "gangNodes" not in plan.status and plan.nodes == 3
    later = {**plan.status, "nextRestartTime": "2026-06-01T11:00:00Z"}
    if how == "suspension":
        spec, later = job_spec(nodes=3, min_nodes=2), plan.status
    assert decide(spec, later, [], NOW, TIMING).create == [0, 1, 2]


def test_an_edit_below_the_shrunk_size_restarts_the_gang() -> None:
    lowered = decide(job_spec(nodes=1, min_nodes=1), RUNNING_SHRUNK, SHRUNK_GANG, NOW, TIMING)
    assert lowered.status["phase"] == c.PHASE_RESTARTING and lowered.nodes == 1


def test_a_gang_scheduled_elastic_gang_asks_its_pod_group_for_min_nodes_workers() -> None:
    spec = minimal_spec(workers={"nodes": 4, "minNodes": 2, "resources": {"limits": {"nvidia.com/gpu": 8}}},
                        runPolicy={"gangScheduling": {"podGroup": "volcano"}})
    group = build_pod_group(job(spec))
    assert group["spec"]["minMember"] == 2 and group["spec"]["minResources"] == {"nvidia.com/gpu": "16"}


def test_a_standby_pod_is_scheduled_as_its_worker_would_be_and_runs_nothing() -> None:
    spec = minimal_spec(workers={**FULL_SPEC["workers"], "minNodes": 1, "labels": {"team": "vision"}},
                        runPolicy={"gangScheduling": {"podGroup": "volcano"}})
    worker = build_worker_pod(job(spec), 1, 3, "h")
    stand_in = build_standby_pod(job(spec), 1, 3, "h")
    assert stand_in["metadata"]["name"] == "sks-dog-standby-1"
    assert stand_in["metadata"]["labels"] == {**worker["metadata"]["labels"], c.LABEL_ROLE: c.ROLE_STANDBY}
    assert c.VOLCANO_GROUP_ANNOTATION not in stand_in["metadata"]["annotations"]  # not a member of the gang
    coscheduled = job(minimal_spec(workers={"nodes": 2, "minNodes": 1}, runPolicy={"gangScheduling": {
        "podGroup": "coscheduling"}}))
    assert c.COSCHEDULING_GROUP_LABEL in build_worker_pod(coscheduled, 1, 3, "h")["metadata"]["labels"]
    assert c.COSCHEDULING_GROUP_LABEL not in build_standby_pod(coscheduled, 1, 3, "h")["metadata"]["labels"]
    [container], [worker_container] = stand_in["spec"]["containers"], worker["spec"]["containers"]
    assert container["command"] == list(c.STANDBY_COMMAND) and "ports" not in container
    assert container["resources"] == worker_container["resources"]
    for field in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "schedulerName", "volumes"):
        assert stand_in["spec"].get(field) == worker["spec"].get(field), field
    assert "hostname" not in stand_in["spec"] and "subdomain" not in stand_in["spec"]  # not the worker's DNS name
    # Neither the Service, the NetworkPolicy nor the PodMonitor takes it for a worker.
    assert not selects(worker_match_labels("sks-dog"), stand_in) and selects(worker_match_labels("sks-dog"), worker)
    validate_for_supported_kubernetes(stand_in)


def test_the_standby_command_exits_at_once_on_sigterm_as_a_containers_first_process() -> None:
    process = subprocess.Popen([sys.executable, *c.STANDBY_COMMAND[1:]])
    time.sleep(1.0)  # the handler is installed
    process.send_signal(signal.SIGTERM)
    assert process.wait(5) == 0


def selects(labels: dict[str, str], pod_body: dict[str, Any]) -> bool:
    return labels.items() <= pod_body["metadata"]["labels"].items()


def test_the_operator_shrinks_a_gang_whose_worker_cannot_be_scheduled_and_grows_it_back(
        operator: OperatorProcess, cluster: Cluster) -> None:
    cluster.create_job("elastic", minimal_spec(workers={"nodes": 3, "minNodes": 2}))
    wait_for(lambda: len(cluster.pods("elastic")) == 3, what="3 workers")
    for name in ("elastic-worker-0", "elastic-worker-1"):
        cluster.set_pod_status(name, running())
    cluster.set_pod_status("elastic-worker-2", {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}]})
    # The harness's pending timeout is 1 s.
    pods = wait_for(lambda: gang_is(cluster, "elastic", ["1", "1"]), what="a gang of 2")
    for worker in pods:
        command = worker["spec"]["containers"][0]["command"]
        assert command[command.index("--nnodes") + 1] == "2"
    status = cluster.status("elastic")
    assert (status["gangNodes"], status["restarts"], status["preemptions"]) == (2, 0, 1)
    [event] = [e for e in cluster.events("elastic") if e["reason"] == c.REASON_GANG_SHRUNK]
    assert event["type"] == "Warning" and "elastic-worker-2: 0/2 nodes are available" in event["message"]
    assert operator.metric(SHRINK_RESTART) == 1
    wait_for(lambda: operator.metric(SHRUNK_JOBS) == 1, what="the job counted as shrunk")

    for worker in pods:
        cluster.set_pod_status(worker["metadata"]["name"], running())
    wait_for(lambda: cluster.status("elastic").get("phase") == c.PHASE_RUNNING, what="Running on 2 nodes")
    # The stand-in of worker 2 waits for a node; once one takes it, the gang grows back.
    wait_for(lambda: cluster.pod("elastic-standby-2"), what="the standby pod")
    cluster.set_pod_status("elastic-standby-2", running())
    pods = wait_for(lambda: gang_is(cluster, "elastic", ["2", "2", "2"]), what="a gang of 3 again")
    assert {p["metadata"]["annotations"][c.ANNOTATION_GANG_NODES] for p in pods} == {"3"}
    wait_for(lambda: cluster.pod("elastic-standby-2") is None, what="the standby pod deleted")
    status = cluster.status("elastic")
    assert "gangNodes" not in status and (status["restarts"], status["preemptions"]) == (0, 2)
    [event] = [e for e in cluster.events("elastic") if e["reason"] == c.REASON_GANG_GROWN]
    assert event["message"].startswith("the scheduler placed elastic-standby-2: all workers.nodes = 3 nodes")
    assert operator.metric(GROW_RESTART) == 1
    assert operator.metric(SHRUNK_JOBS) == 0
