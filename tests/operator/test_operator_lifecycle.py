"""Pod states -> phase, conditions and actions (lifecycle.decide), as tables."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from pod_statuses import NOW, RUNNING, TIMING, condition, job_spec, pod, scheduled, unscheduled

from dreambooth_operator import constants as c
from dreambooth_operator.clock import timestamp
from dreambooth_operator.lifecycle import created_status, decide, failed_create_status
from dreambooth_operator.podstates import describe_failure, is_preemption
from trainer.contract import EXIT_CONFIG_ERROR, EXIT_DIVERGED



@pytest.mark.parametrize("status,pods,phase,create,delete", [
    # nothing yet: create every worker
    ({}, [], c.PHASE_PENDING, [0, 1], []),
    # one was created before a crash: create only the missing one
    ({"phase": c.PHASE_PENDING}, [pod(0, "Pending")], c.PHASE_PENDING, [1], []),
    # all exist, one not scheduled yet
    ({"phase": c.PHASE_PENDING}, [unscheduled(0), scheduled(1)], c.PHASE_PENDING, [], []),
    # all scheduled, containers starting
    ({"phase": c.PHASE_PENDING}, [scheduled(0), pod(1)], c.PHASE_INITIALIZING, [], []),
    # all running
    ({"phase": c.PHASE_INITIALIZING}, [pod(0), pod(1)], c.PHASE_RUNNING, [], []),
    # one finished early, the other still running
    (RUNNING, [pod(0, "Succeeded", exit_code=0), pod(1)], c.PHASE_RUNNING, [], []),
    # every worker exited 0
    (RUNNING, [pod(0, "Succeeded", exit_code=0), pod(1, "Succeeded", exit_code=0)], c.PHASE_SUCCEEDED, [], []),
    # a worker failed: restart the gang (delete the rest, including the running one)
    (RUNNING, [pod(0), pod(1, "Failed", exit_code=1)], c.PHASE_RESTARTING, [], ["j-worker-0", "j-worker-1"]),
    # a worker vanished from a running gang (node lost): a preemption
    (RUNNING, [pod(0)], c.PHASE_RESTARTING, [], ["j-worker-0"]),
    # workers.nodes lowered from 3 to 2 while running: a new gang of the new size
    (RUNNING, [pod(0), pod(1), pod(2)], c.PHASE_RESTARTING, [], ["j-worker-0", "j-worker-1", "j-worker-2"]),
    # workers.nodes raised from 1 to 2 before the gang ran: worker-0 waits for 1 node, a new one would wait
    # for 2: a new gang of the new size
    ({"phase": c.PHASE_PENDING}, [pod(0, "Pending", nodes=1)], c.PHASE_RESTARTING, [], ["j-worker-0"]),
    # workers of the same size as the spec's are kept
    ({"phase": c.PHASE_PENDING}, [pod(0, "Pending", nodes=2)], c.PHASE_PENDING, [1], []),
    # workers still stopping before the gang ran (a suspension just lifted): wait for them, count nothing
    ({"phase": c.PHASE_PENDING}, [pod(0, "Failed", exit_code=143, deleting=True), pod(1, deleting=True)],
     c.PHASE_PENDING, [], []),
    # stale pods of an older gang are deleted before anything else
    ({**RUNNING, "restarts": 1, "phase": c.PHASE_RESTARTING}, [pod(0, gang=0), pod(1, gang=0, deleting=True)],
     c.PHASE_RESTARTING, [], ["j-worker-0"]),
    # backoff not over yet: wait
    ({**RUNNING, "restarts": 1, "phase": c.PHASE_RESTARTING,
      "nextRestartTime": timestamp(NOW + dt.timedelta(seconds=5))}, [], c.PHASE_RESTARTING, [], []),
    # backoff over: create the next gang
    ({**RUNNING, "restarts": 1, "phase": c.PHASE_RESTARTING,
      "nextRestartTime": timestamp(NOW - dt.timedelta(seconds=1))}, [], c.PHASE_PENDING, [0, 1], []),
    # terminal phases create nothing; a failed job stops what still runs
    ({"phase": c.PHASE_SUCCEEDED}, [pod(0, "Succeeded", exit_code=0)], c.PHASE_SUCCEEDED, [], []),
    ({"phase": c.PHASE_FAILED}, [pod(0), pod(1, "Failed", exit_code=1)], c.PHASE_FAILED, [], ["j-worker-0"]),
])
def test_phase_and_actions(status: dict[str, Any], pods: list[dict[str, Any]], phase: str, create: list[int],
                           delete: list[str]) -> None:
    plan = decide(job_spec(), status, pods, NOW, TIMING)
    assert plan.status["phase"] == phase
    assert plan.create == create
    assert plan.delete == delete


def test_a_new_gang_reports_the_max_steps_of_the_spec_it_runs() -> None:
    # spec.training.maxSteps edited (the example spec's is 30): the next gang's config has the new one.
    restart_due = {**RUNNING, "restarts": 1, "phase": c.PHASE_RESTARTING, "maxSteps": 800}
    plan = decide(job_spec(), restart_due, [], NOW, TIMING)
    assert plan.create == [0, 1] and plan.status["maxSteps"] == job_spec().training.max_steps
    # A worker replaced in a gang that already runs keeps the gang's.
    pending = {"phase": c.PHASE_PENDING, "maxSteps": 800}
    assert decide(job_spec(), pending, [pod(0, "Pending")], NOW, TIMING).status["maxSteps"] == 800


def test_success_reports_the_last_step_even_when_the_last_scrape_was_earlier() -> None:
    # Scraped every 15 s, a short run can finish between two scrapes: status said step 12.
    scraped = {**RUNNING, "step": 12, "maxSteps": 30, "progress": "40%", "etaSeconds": 9.5}
    plan = decide(job_spec(), scraped, [pod(0, "Succeeded", exit_code=0), pod(1, "Succeeded", exit_code=0)],
                  NOW, TIMING)
    assert plan.status["phase"] == c.PHASE_SUCCEEDED
    assert (plan.status["step"], plan.status["progress"], plan.status["etaSeconds"]) == (30, "100%", 0.0)


@pytest.mark.parametrize("failed_pod,preempted", [
    (pod(1, "Failed", exit_code=1), False),
    (pod(1, "Failed", exit_code=137, reason="OOMKilled"), False),
    (pod(1, "Failed", exit_code=143), True),
    (pod(1, "Failed", pod_reason="Evicted"), True),
    # evicted for outgrowing its own limits: the next gang would be too
    (pod(1, "Failed", pod_reason="Evicted",
         message="Pod ephemeral local storage usage exceeds the total limit of containers 20Gi."), False),
    (pod(1, "Failed", exit_code=137, pod_reason="Evicted", conditions=[{"type": "DisruptionTarget", "status": "True"}],
         message='Container trainer exceeded its local ephemeral storage limit "20Gi". '), False),
    (pod(1, "Failed", pod_reason="Evicted", message="The node was low on resource: ephemeral-storage. "), True),
    (pod(1, "Failed", exit_code=1, conditions=[{"type": "DisruptionTarget", "status": "True"}]), True),
    (pod(1, "Failed", exit_code=1, conditions=[{"type": "DisruptionTarget", "status": "False"}]), False),
])
def test_preemptions_restart_without_counting(failed_pod: dict[str, Any], preempted: bool) -> None:
    assert is_preemption(failed_pod) is preempted
    plan = decide(job_spec(backoff_limit=0), RUNNING, [pod(0), failed_pod], NOW, TIMING)
    if preempted:
        assert plan.status["phase"] == c.PHASE_RESTARTING
        assert (plan.status["restarts"], plan.status["preemptions"]) == (0, 1)
        assert plan.gang == 1 and not plan.counted_restart
        assert condition(plan.status, c.CONDITION_RESTARTING)["reason"] == c.REASON_PREEMPTED
        assert plan.status["lastFailure"]["pod"] == "j-worker-1"
    else:  # backoffLimit 0: the first counted failure fails the job
        assert plan.status["phase"] == c.PHASE_FAILED
        assert condition(plan.status, c.CONDITION_FAILED)["reason"] == c.REASON_BACKOFF_LIMIT_EXCEEDED


@pytest.mark.parametrize("restarts,delay", [(0, 10), (1, 20), (2, 40), (3, 60), (9, 60)])
def test_restart_backoff_doubles_up_to_the_cap(restarts: int, delay: float) -> None:
    status = {**RUNNING, "restarts": restarts}
    gang = [pod(0, gang=restarts), pod(1, "Failed", exit_code=1, gang=restarts)]
    plan = decide(job_spec(backoff_limit=10), status, gang, NOW, TIMING)
    assert plan.status["restarts"] == restarts + 1
    assert plan.status["nextRestartTime"] == timestamp(NOW + dt.timedelta(seconds=delay))
    assert plan.counted_restart and plan.gang == restarts + 1
    assert plan.events[0][:2] == ("Warning", c.REASON_WORKER_FAILED)


@pytest.mark.parametrize("in_a_row,delay", [(0, 0), (1, 10), (2, 20), (3, 40), (9, 60)])
def test_preemptions_in_a_row_with_no_new_checkpoint_back_off(in_a_row: int, delay: float) -> None:
    # A gang evicted again and again (pressing its own node, a spot pool reclaimed in a
    # loop) would otherwise restart at full speed, never counted against backoffLimit.
    status = {**RUNNING, "consecutivePreemptions": in_a_row}
    evicted = pod(1, "Failed", pod_reason="Evicted", message="The node was low on resource: memory. ")
    plan = decide(job_spec(backoff_limit=0), status, [pod(0), evicted], NOW, TIMING)
    assert plan.status["phase"] == c.PHASE_RESTARTING and plan.status["restarts"] == 0
    assert plan.status["consecutivePreemptions"] == in_a_row + 1
    assert plan.status["nextRestartTime"] == timestamp(NOW + dt.timedelta(seconds=delay))
    message = condition(plan.status, c.CONDITION_RESTARTING)["message"]
    assert (f"{in_a_row + 1} times in a row with no new checkpoint" in message) == (delay > 0)
    assert (f"in {delay:g}s" in message) == (delay > 0)
    # the new gang is created once the delay has passed, not before
    waiting = decide(job_spec(), plan.status, [], NOW + dt.timedelta(seconds=delay / 2), TIMING)
    assert waiting.create == ([] if delay else [0, 1])
    later = decide(job_spec(), plan.status, [], NOW + dt.timedelta(seconds=delay), TIMING)
    assert later.create == [0, 1]


def test_an_edit_of_workers_nodes_does_not_lengthen_a_run_of_preemptions() -> None:
    status = {**RUNNING, "consecutivePreemptions": 1}
    plan = decide(job_spec(nodes=3), status, [pod(0, nodes=2), pod(1, nodes=2)], NOW, TIMING)
    assert plan.status["preemptions"] == 1 and plan.status["consecutivePreemptions"] == 1
    assert plan.status["nextRestartTime"] == timestamp(NOW)
    assert "workers.nodes was edited" in condition(plan.status, c.CONDITION_RESTARTING)["message"]


def test_backoff_limit_reached_fails_with_the_last_failure() -> None:
    status = {**RUNNING, "restarts": 3}
    failed = pod(1, "Failed", exit_code=137, reason="OOMKilled", gang=3)
    plan = decide(job_spec(backoff_limit=3), status, [pod(0, gang=3), failed], NOW, TIMING)
    assert plan.status["phase"] == c.PHASE_FAILED
    assert plan.status["restarts"] == 3
    assert plan.status["lastFailure"] == {"pod": "j-worker-1", "reason": "OOMKilled", "exitCode": 137,
                                          "time": timestamp(NOW)}
    assert "OOMKilled" in condition(plan.status, c.CONDITION_FAILED)["message"]
    assert plan.delete == ["j-worker-0"]
    assert plan.status["completionTime"] == timestamp(NOW)


@pytest.mark.parametrize("exit_code,reason,fix", [
    (EXIT_CONFIG_ERROR, c.REASON_INVALID_TRAINER_INPUT, "fix the spec"),
    # A restart would resume before the divergence and diverge again at the same step.
    (EXIT_DIVERGED, c.REASON_TRAINING_DIVERGED, "lower spec.training.learningRate"),
])
def test_a_failure_a_restart_cannot_cure_fails_the_job_without_retrying(exit_code: int, reason: str, fix: str) -> None:
    failed = pod(0, "Failed", exit_code=exit_code)
    plan = decide(job_spec(backoff_limit=3), dict(RUNNING), [failed, pod(1)], NOW, TIMING)
    assert plan.status["phase"] == c.PHASE_FAILED
    assert plan.status["restarts"] == 0 and plan.delete == ["j-worker-1"]
    assert condition(plan.status, c.CONDITION_FAILED)["reason"] == reason
    assert f"(exit code {exit_code}); not retried: {fix}" in condition(plan.status, c.CONDITION_FAILED)["message"]
    assert plan.status["lastFailure"]["exitCode"] == exit_code


def test_eviction_is_recorded_as_the_last_failure_but_not_counted() -> None:
    plan = decide(job_spec(), RUNNING, [pod(0), pod(1, "Failed", pod_reason="Evicted")], NOW, TIMING)
    assert plan.status["lastFailure"]["reason"] == "Evicted"
    assert plan.status["restarts"] == 0 and plan.status["preemptions"] == 1


def test_failure_description_prefers_the_container_state() -> None:
    failure = describe_failure(pod(0, "Failed", exit_code=137, reason="OOMKilled"))
    assert (failure.pod, failure.reason, failure.exit_code) == ("j-worker-0", "OOMKilled", 137)
    assert describe_failure(pod(0, "Failed", pod_reason="Evicted")).reason == "Evicted"


def test_suspend_deletes_every_worker_and_resume_recreates_them() -> None:
    plan = decide(job_spec(suspend=True), RUNNING, [pod(0), pod(1)], NOW, TIMING)
    assert plan.status["phase"] == c.PHASE_SUSPENDED
    assert plan.delete == ["j-worker-0", "j-worker-1"] and plan.create == []
    assert condition(plan.status, c.CONDITION_SUSPENDED)["status"] == "True"
    assert condition(plan.status, c.CONDITION_RUNNING) is None or \
        condition(plan.status, c.CONDITION_RUNNING)["status"] == "False"

    # Workers that exit 143 while suspended are not failures.
    plan = decide(job_spec(suspend=True), plan.status, [pod(0, "Failed", exit_code=143)], NOW, TIMING)
    assert plan.status["phase"] == c.PHASE_SUSPENDED and plan.status["restarts"] == 0

    plan = decide(job_spec(), plan.status, [], NOW, TIMING)
    assert plan.status["phase"] == c.PHASE_PENDING
    assert plan.create == [0, 1]
    assert condition(plan.status, c.CONDITION_SUSPENDED)["status"] == "False"


def test_an_old_worker_stuck_terminating_on_a_lost_node_is_named_once_and_not_force_deleted() -> None:
    restarting = {**RUNNING, "restarts": 1, "phase": c.PHASE_RESTARTING, "conditions": [
        {"type": c.CONDITION_RESTARTING, "status": "True", "reason": c.REASON_WORKER_FAILED, "message": "restart 1"}]}
    leaving = pod(0, gang=0, deleting=True)
    leaving["spec"] = {"nodeName": "gpu-7"}
    plan = decide(job_spec(), restarting, [leaving], NOW + dt.timedelta(seconds=60), TIMING)
    assert plan.events == [] and condition(plan.status, c.CONDITION_RESTARTING)["message"] == "restart 1"

    plan = decide(job_spec(), restarting, [leaving], NOW + dt.timedelta(seconds=180), TIMING)
    restarting_condition = condition(plan.status, c.CONDITION_RESTARTING)
    assert restarting_condition["reason"] == c.REASON_WORKER_STUCK_TERMINATING
    assert "waiting for worker j-worker-0 on gpu-7 to terminate" in restarting_condition["message"]
    assert "kubectl delete pod j-worker-0 --force --grace-period=0" in restarting_condition["message"]
    assert [event[:2] for event in plan.events] == [("Warning", c.REASON_WORKER_STUCK_TERMINATING)]
    assert plan.delete == [] and plan.create == []  # it is not deleted again, nor forced, nor replaced yet
    again = decide(job_spec(), plan.status, [leaving], NOW + dt.timedelta(seconds=240), TIMING)
    assert again.events == [] and again.status["phase"] == c.PHASE_RESTARTING

    # The same before the gang ran: waited for a while, then the gang ends (a preemption)
    # and the wait for the stuck one is reported as above.
    pending = {"phase": c.PHASE_PENDING, "restarts": 0, "preemptions": 0}
    ours = pod(0, "Pending", deleting=True)
    assert decide(job_spec(), pending, [ours, pod(1)], NOW + dt.timedelta(seconds=60), TIMING).status["phase"] == \
        c.PHASE_PENDING
    plan = decide(job_spec(), pending, [ours, pod(1)], NOW + dt.timedelta(seconds=180), TIMING)
    assert plan.status["phase"] == c.PHASE_RESTARTING and plan.status["preemptions"] == 1
    assert plan.delete == ["j-worker-1"]
    plan = decide(job_spec(), plan.status, [ours], NOW + dt.timedelta(seconds=181), TIMING)
    assert condition(plan.status, c.CONDITION_RESTARTING)["reason"] == c.REASON_WORKER_STUCK_TERMINATING


def test_the_active_deadline_counts_from_the_resume_not_across_the_suspension() -> None:
    suspended = {**RUNNING, "phase": c.PHASE_SUSPENDED, "startTime": timestamp(NOW - dt.timedelta(hours=2))}
    plan = decide(job_spec(activeDeadlineSeconds=3600), suspended, [], NOW, TIMING)
    assert plan.status["phase"] == c.PHASE_PENDING and plan.create == [0, 1]
    assert plan.status["startTime"] == timestamp(NOW)
    assert plan.requeue_after is None or plan.requeue_after > 3000


def test_an_eviction_for_outgrowing_its_own_limit_is_named_in_the_failure() -> None:
    message = "Pod ephemeral local storage usage exceeds the total limit of containers 20Gi."
    evicted = pod(1, "Failed", exit_code=137, reason="Error", pod_reason="Evicted", message=message)
    plan = decide(job_spec(backoff_limit=0), RUNNING, [pod(0), evicted], NOW, TIMING)
    assert plan.status["phase"] == c.PHASE_FAILED
    assert plan.status["lastFailure"]["reason"] == "Evicted" and plan.status["lastFailure"]["message"] == message


def test_active_deadline_fails_the_job_and_stops_workers() -> None:
    started = {**RUNNING, "startTime": timestamp(NOW - dt.timedelta(seconds=100))}
    plan = decide(job_spec(activeDeadlineSeconds=100), started, [pod(0), pod(1)], NOW, TIMING)
    assert plan.status["phase"] == c.PHASE_FAILED
    assert condition(plan.status, c.CONDITION_FAILED)["reason"] == c.REASON_DEADLINE_EXCEEDED
    assert plan.delete == ["j-worker-0", "j-worker-1"]

    plan = decide(job_spec(activeDeadlineSeconds=160), started, [pod(0), pod(1)], NOW, TIMING)
    assert plan.status["phase"] == c.PHASE_RUNNING
    assert plan.requeue_after == pytest.approx(60)


def test_a_finished_job_is_deleted_once_its_ttl_has_passed() -> None:
    done = [pod(0, "Succeeded", exit_code=0), pod(1, "Succeeded", exit_code=0)]
    # Succeeding now: looked at again when the TTL is up, not at the finished-job resync.
    plan = decide(job_spec(ttlSecondsAfterFinished=120), RUNNING, done, NOW, TIMING)
    assert plan.status["phase"] == c.PHASE_SUCCEEDED and not plan.delete_job
    assert plan.requeue_after == pytest.approx(120)

    finished = plan.status
    later = decide(job_spec(ttlSecondsAfterFinished=120), finished, done, NOW + dt.timedelta(seconds=90), TIMING)
    assert not later.delete_job and later.requeue_after == pytest.approx(30)
    expired = decide(job_spec(ttlSecondsAfterFinished=120), finished, done, NOW + dt.timedelta(seconds=120), TIMING)
    assert expired.delete_job

    # Failed jobs too, and 0 deletes at once; without a TTL a finished job stays.
    failed = decide(job_spec(activeDeadlineSeconds=1, ttlSecondsAfterFinished=0), RUNNING, [pod(0), pod(1)],
                    NOW + dt.timedelta(seconds=5), TIMING)
    assert failed.status["phase"] == c.PHASE_FAILED and failed.delete_job
    kept = decide(job_spec(), finished, done, NOW + dt.timedelta(days=30), TIMING)
    assert not kept.delete_job and kept.requeue_after == TIMING.finished_resync_seconds
    # A finished status without completionTime (written by hand, say) gets one, so the TTL ends.
    undated = {key: value for key, value in finished.items() if key != "completionTime"}
    plan = decide(job_spec(ttlSecondsAfterFinished=120), undated, done, NOW, TIMING)
    assert plan.status["completionTime"] == timestamp(NOW) and plan.requeue_after == pytest.approx(120)
    # A running job is never deleted for its TTL.
    assert not decide(job_spec(ttlSecondsAfterFinished=0), RUNNING, [pod(0), pod(1)], NOW, TIMING).delete_job


def test_condition_transition_time_moves_only_when_its_status_flips() -> None:
    first = decide(job_spec(), {"phase": c.PHASE_INITIALIZING}, [pod(0), pod(1)], NOW, TIMING).status
    later = NOW + dt.timedelta(minutes=5)
    again = decide(job_spec(), first, [pod(0), pod(1)], later, TIMING).status
    assert condition(again, c.CONDITION_RUNNING)["lastTransitionTime"] == timestamp(NOW)
    assert again == first  # nothing changed: nothing to patch


def test_a_forbidden_create_is_a_condition_that_stays_put_until_the_gang_exists() -> None:
    status = decide(job_spec(), {}, [], NOW).status
    quota = 'pods "j-worker-1" is forbidden: exceeded quota: q'
    failed = failed_create_status(status, quota, NOW)
    [created] = [cond for cond in failed["conditions"] if cond["type"] == c.CONDITION_CREATED]
    assert (created["status"], created["reason"], created["message"]) == ("False", c.REASON_FAILED_CREATE, quota)
    assert failed["phase"] == c.PHASE_PENDING  # a quota can grow: not a failure of the job
    # The next pass: decide leaves the condition alone, the same refusal changes nothing.
    later = NOW + dt.timedelta(minutes=5)
    again = failed_create_status(decide(job_spec(), failed, [pod(0, "Pending")], later).status, quota, later)
    assert again["conditions"] == failed["conditions"]
    fixed = created_status(again, 2, later)
    [created] = [cond for cond in fixed["conditions"] if cond["type"] == c.CONDITION_CREATED]
    assert (created["status"], created["reason"], created["lastTransitionTime"]) == (
        "True", c.REASON_WORKERS_CREATED, timestamp(later))
    assert created_status(fixed, 2, later + dt.timedelta(minutes=1)) is fixed
