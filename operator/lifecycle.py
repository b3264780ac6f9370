"""Pod states -> job phase, conditions and the next actions: one pure function.

`decide` looks at a job's spec, its current status and its worker pods, and returns a
`Plan`: the status to write, the pods to create and delete, the Events to post and
when to look again. The reconciler (reconciler.py) only carries plans out, so every
rule of the job's life is tested here as data (tests/operator/test_lifecycle.py).

Gangs: all workers of one start carry the label `dreambooth.io/gang: N`, with
N = status.restarts + status.preemptions. Counting a failure or a preemption bumps N,
which makes every existing pod stale; stale pods are deleted, and only when all are
gone (and the backoff has passed) is the next gang created. A missed step is therefore
redone on the next pass instead of being counted twice.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from . import constants as c
from .podstates import (
    CONFIG_PROBLEMS,
    HOPELESS_START_PROBLEMS,
    POD_FAILED,
    POD_RUNNING,
    POD_SUCCEEDED,
    Failure,
    describe_failure,
    is_deleting,
    is_preemption,
    is_scheduled,
    pod_gang,
    pod_gang_nodes,
    pod_index,
    pod_name,
    pod_phase,
    scheduling_problem,
    start_problem,
)
from .spec import JobSpec

# Conditions that mirror the current phase: at most one of them is True.
_PHASE_CONDITIONS = {
    c.PHASE_RUNNING: c.CONDITION_RUNNING,
    c.PHASE_RESTARTING: c.CONDITION_RESTARTING,
    c.PHASE_SUSPENDED: c.CONDITION_SUSPENDED,
    c.PHASE_SUCCEEDED: c.CONDITION_SUCCEEDED,
    c.PHASE_FAILED: c.CONDITION_FAILED,
}


@dataclass(frozen=True)
class Timing:
    """Operator settings that shape a job's life (set from the command line)."""

    backoff_base_seconds: float = 10.0
    backoff_max_seconds: float = 300.0
    pending_timeout_seconds: float = 300.0
    # How long a scheduled worker's container may be unable to start (image pull, missing
    # Secret) before the job fails: its pods hold their nodes' GPUs all that time.
    start_timeout_seconds: float = 600.0
    # How often a job with nothing to wait for is looked at again anyway.
    resync_seconds: float = 30.0
    # The same for a finished job: only a spec edit (which wakes it) can change it.
    finished_resync_seconds: float = 600.0

    def backoff(self, restarts: int) -> float:
        """Delay before the gang's restart number `restarts` (1, 2, ...): doubles each time."""
        return min(self.backoff_base_seconds * 2 ** max(restarts - 1, 0), self.backoff_max_seconds)


@dataclass
class Plan:
    status: dict[str, Any]
    create: list[int] = field(default_factory=list)
    gang: int = 0
    delete: list[str] = field(default_factory=list)
    # (type, reason, message) of Kubernetes Events to post on the job.
    events: list[tuple[str, str, str]] = field(default_factory=list)
    requeue_after: float | None = None
    counted_restart: bool = False
    # runPolicy.ttlSecondsAfterFinished has passed: the job itself is to be deleted.
    delete_job: bool = False


def timestamp(now: dt.datetime) -> str:
    return now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def set_condition(conditions: list[dict[str, Any]], kind: str, status: bool, reason: str,
                  message: str, now: dt.datetime) -> list[dict[str, Any]]:
    """A new conditions list with `kind` set; its lastTransitionTime moves only when
    its status flips."""
    value = "True" if status else "False"
    result = []
    found = False
    for condition in conditions:
        if condition.get("type") == kind:
            found = True
            since = condition.get("lastTransitionTime") if condition.get("status") == value else None
            condition = {"type": kind, "status": value, "reason": reason, "message": message,
                         "lastTransitionTime": since or timestamp(now)}
        result.append(condition)
    if not found:
        result.append({"type": kind, "status": value, "reason": reason, "message": message,
                       "lastTransitionTime": timestamp(now)})
    return result


def enter_phase(status: dict[str, Any], phase: str, reason: str, message: str, now: dt.datetime) -> None:
    """Set status.phase and make the phase's condition the only True phase condition."""
    status["phase"] = phase
    conditions = list(status.get("conditions") or [])
    for other_phase, kind in _PHASE_CONDITIONS.items():
        if other_phase == phase:
            conditions = set_condition(conditions, kind, True, reason, message, now)
        elif any(cond.get("type") == kind and cond.get("status") == "True" for cond in conditions):
            conditions = set_condition(conditions, kind, False, reason, message, now)
    status["conditions"] = conditions


def invalid_spec_status(status: dict[str, Any], message: str, now: dt.datetime) -> dict[str, Any]:
    new = dict(status)
    enter_phase(new, c.PHASE_FAILED, c.REASON_INVALID_SPEC, message, now)
    new.setdefault("completionTime", timestamp(now))
    return new


def failed_create_status(status: dict[str, Any], message: str, now: dt.datetime) -> dict[str, Any]:
    """Workers the API server forbids for now (a quota, a policy): said in condition
    Created, phase unchanged; the next passes try again."""
    new = dict(status)
    new["conditions"] = set_condition(status.get("conditions") or [], c.CONDITION_CREATED, False,
                                      c.REASON_FAILED_CREATE, message, now)
    return new


def created_status(status: dict[str, Any], nodes: int, now: dt.datetime) -> dict[str, Any]:
    """Condition Created back to True once every worker of the gang exists."""
    if any(cond.get("type") == c.CONDITION_CREATED and cond.get("status") == "True"
           for cond in status.get("conditions") or []):
        return status
    new = dict(status)
    new["conditions"] = set_condition(status.get("conditions") or [], c.CONDITION_CREATED, True,
                                      c.REASON_WORKERS_CREATED, f"{nodes} worker pods created", now)
    return new


def gang_of(status: dict[str, Any]) -> int:
    return int(status.get("restarts") or 0) + int(status.get("preemptions") or 0)


def _alive(pods: list[dict[str, Any]]) -> list[str]:
    """Pods still running or waiting that are not already being deleted."""
    return [pod_name(p) for p in pods if pod_phase(p) not in (POD_SUCCEEDED, POD_FAILED) and not is_deleting(p)]


def decide(spec: JobSpec, status: dict[str, Any], pods: list[dict[str, Any]], now: dt.datetime,
           timing: Timing = Timing()) -> Plan:
    plan = _decide_phase(spec, status, pods, now, timing)
    if plan.status["phase"] in c.TERMINAL_PHASES:
        _expire_after_ttl(plan, spec, now)
    return plan


def _expire_after_ttl(plan: Plan, spec: JobSpec, now: dt.datetime) -> None:
    """A finished job is deleted runPolicy.ttlSecondsAfterFinished after its
    completionTime, as Kubernetes' TTL controller does for Jobs; until then the next
    look is due when that time comes."""
    ttl = spec.run_policy.ttl_seconds_after_finished
    if ttl is None:
        return
    # Recorded when missing, so that the TTL counts from one instant and does expire.
    finished = parse_timestamp(plan.status.setdefault("completionTime", timestamp(now)))
    left = ttl - (now - finished).total_seconds()
    if left <= 0:
        plan.delete_job = True
    else:
        _requeue(plan, left)


def _decide_phase(spec: JobSpec, status: dict[str, Any], pods: list[dict[str, Any]], now: dt.datetime,
                  timing: Timing) -> Plan:
    status = dict(status or {})
    status.setdefault("restarts", 0)
    status.setdefault("preemptions", 0)
    status.setdefault("maxSteps", spec.training.max_steps)
    phase = status.get("phase") or c.PHASE_PENDING
    status["phase"] = phase
    plan = Plan(status=status, gang=gang_of(status))

    # Failed and Succeeded are final: stop whatever still runs, keep finished pods for their logs.
    if phase in c.TERMINAL_PHASES:
        if phase == c.PHASE_FAILED:
            plan.delete = _alive(pods)
        plan.requeue_after = timing.finished_resync_seconds
        return plan

    if spec.run_policy.suspend:
        # Deleting the pods sends SIGTERM: the trainer checkpoints and exits 143.
        plan.delete = [pod_name(p) for p in pods if not is_deleting(p)]
        if phase != c.PHASE_SUSPENDED:
            enter_phase(status, c.PHASE_SUSPENDED, c.REASON_SUSPENDED, "runPolicy.suspend is true; workers stopped", now)
            status.pop("nextRestartTime", None)
            plan.events.append(("Normal", c.REASON_SUSPENDED, "Job suspended; workers deleted"))
        return plan
    if phase == c.PHASE_SUSPENDED:
        enter_phase(status, c.PHASE_PENDING, c.REASON_RESUMED, "runPolicy.suspend is false; recreating workers", now)
        plan.events.append(("Normal", c.REASON_RESUMED, "Job resumed; recreating workers"))
        phase = c.PHASE_PENDING
        # As a Kubernetes Job's: activeDeadlineSeconds counts from the resume, not across the suspension.
        status.pop("startTime", None)

    deadline = spec.run_policy.active_deadline_seconds
    started = parse_timestamp(status.get("startTime"))
    if deadline is not None and started is not None:
        left = deadline - (now - started).total_seconds()
        if left <= 0:
            message = f"ran longer than runPolicy.activeDeadlineSeconds = {deadline}"
            return _fail(plan, pods, c.REASON_DEADLINE_EXCEEDED, message, now)
        plan.requeue_after = left

    gang = plan.gang
    stale = [p for p in pods if pod_gang(p) != gang]
    current = [p for p in pods if pod_gang(p) == gang]

    # A restart first removes the old gang completely: a new worker-0 cannot be
    # created while the old one is still terminating (same name).
    if stale:
        plan.delete = [pod_name(p) for p in stale if not is_deleting(p)]
        _report_stuck_terminating(plan, stale, now)
        _requeue(plan, 1.0)
        return plan
    if phase == c.PHASE_RESTARTING:
        restart_at = parse_timestamp(status.get("nextRestartTime"))
        if restart_at is not None and restart_at > now:
            _requeue(plan, (restart_at - now).total_seconds())
            return plan

    leaving = [p for p in current if is_deleting(p)]
    if phase == c.PHASE_PENDING and leaving:
        # Workers still stopping (a suspension just lifted, or one deleted by hand before
        # the gang ran): a worker cannot be recreated under its name until it is gone, and
        # one that exits 143 meanwhile is not a preemption of the gang to come. One stuck
        # on a lost node ends the gang instead, so that the wait for it is reported.
        if not any(_stuck_terminating(p, now) for p in leaving):
            _requeue(plan, 1.0)
            return plan
        return _restart(plan, spec, [], current, now, timing)

    failed = [p for p in current if pod_phase(p) == POD_FAILED]
    # The gang no longer matches: a worker vanished (node lost, deleted by hand) or
    # workers.nodes was edited. Restarted like a preemption: not the job's fault.
    vanished = phase in (c.PHASE_INITIALIZING, c.PHASE_RUNNING) and (
        len(current) < spec.workers.nodes or any(is_deleting(p) for p in current))
    # Edited up or down while the gang exists, even before it ran: its workers' torchrun
    # waits for the old number of nodes, and a new worker would wait for the new one.
    resized = any((pod_index(p) or 0) >= spec.workers.nodes or pod_gang_nodes(p) not in (None, spec.workers.nodes)
                  for p in current)
    if failed or vanished or resized:
        return _restart(plan, spec, failed, current, now, timing)

    if len(current) == spec.workers.nodes and all(pod_phase(p) == POD_SUCCEEDED for p in current):
        enter_phase(status, c.PHASE_SUCCEEDED, c.REASON_ALL_WORKERS_SUCCEEDED, "every worker exited 0", now)
        # A trainer exits 0 only after its last step; the last scrape may be a whole
        # scrape interval older than that, so the final progress is not left to it.
        max_steps = int(status.get("maxSteps") or spec.training.max_steps)
        status.update(step=max_steps, progress="100%", etaSeconds=0.0)
        status["completionTime"] = timestamp(now)
        status.pop("nextRestartTime", None)
        plan.events.append(("Normal", c.REASON_ALL_WORKERS_SUCCEEDED, "Training finished"))
        return plan

    present = {pod_index(p) for p in current}
    plan.create = [i for i in range(spec.workers.nodes) if i not in present]
    if plan.create:
        if len(plan.create) == spec.workers.nodes:  # a new gang: it reads the current spec's config
            status["maxSteps"] = spec.training.max_steps
        status.setdefault("startTime", timestamp(now))
        status.pop("nextRestartTime", None)
        if not any(cond.get("type") == c.CONDITION_CREATED for cond in status.get("conditions") or []):
            status["conditions"] = set_condition(status.get("conditions") or [], c.CONDITION_CREATED, True,
                                                 c.REASON_WORKERS_CREATED, f"{spec.workers.nodes} worker pods created", now)
        if phase != c.PHASE_PENDING:
            enter_phase(status, c.PHASE_PENDING, c.REASON_WORKERS_CREATED, "creating worker pods", now)
        return plan

    _update_running_phase(plan, spec, current, now, timing)
    return plan


def _update_running_phase(plan: Plan, spec: JobSpec, current: list[dict[str, Any]], now: dt.datetime,
                          timing: Timing) -> None:
    status = plan.status
    unscheduled = [p for p in current if not is_scheduled(p)]
    if unscheduled:
        new_phase, reason, message = c.PHASE_PENDING, c.REASON_PODS_PENDING, f"{len(unscheduled)} worker(s) not scheduled"
    elif all(pod_phase(p) in (POD_RUNNING, POD_SUCCEEDED) for p in current):
        new_phase, reason, message = c.PHASE_RUNNING, c.REASON_ALL_WORKERS_RUNNING, f"{len(current)} workers running"
    else:
        new_phase, reason, message = c.PHASE_INITIALIZING, c.REASON_WORKERS_CREATED, "workers scheduled, starting"
    if status["phase"] != new_phase:
        enter_phase(status, new_phase, reason, message, now)
    _mark_unschedulable(plan, current, now, timing)
    _check_start_problems(plan, current, now, timing)


def _mark_unschedulable(plan: Plan, current: list[dict[str, Any]], now: dt.datetime, timing: Timing) -> None:
    """Pods the scheduler cannot place for longer than the pending timeout get a
    condition carrying the scheduler's own message (e.g. Insufficient nvidia.com/gpu)."""
    status = plan.status
    stuck = []
    for pod in current:
        problem = scheduling_problem(pod)
        created = parse_timestamp(pod["metadata"].get("creationTimestamp"))
        if problem is None:
            continue
        waited = (now - created).total_seconds() if created is not None else 0.0
        if waited >= timing.pending_timeout_seconds:
            stuck.append(f"{pod_name(pod)}: {problem}")
        else:
            _requeue(plan, timing.pending_timeout_seconds - waited)
    conditions = status.get("conditions") or []
    has = any(cond.get("type") == c.CONDITION_UNSCHEDULABLE for cond in conditions)
    if stuck:
        status["conditions"] = set_condition(conditions, c.CONDITION_UNSCHEDULABLE, True,
                                             c.REASON_PODS_PENDING, "; ".join(stuck), now)
    elif has:
        status["conditions"] = set_condition(conditions, c.CONDITION_UNSCHEDULABLE, False,
                                             c.REASON_PODS_PENDING, "all workers scheduled", now)


def _check_start_problems(plan: Plan, current: list[dict[str, Any]], now: dt.datetime, timing: Timing) -> None:
    """Scheduled workers whose container cannot start get condition CannotStart (and one
    Warning Event) carrying the kubelet's reason and message. The job fails when the
    problem cannot clear (InvalidImageName) or has lasted past the start timeout,
    counted from the condition's lastTransitionTime: the pods are deleted, their nodes'
    GPUs freed. A restart would not help: the next gang would wait for the same image."""
    status = plan.status
    problems = [problem for problem in map(start_problem, current) if problem is not None]
    conditions = status.get("conditions") or []
    known = next((cond for cond in conditions if cond.get("type") == c.CONDITION_CANNOT_START), None)
    stuck_since = parse_timestamp(known.get("lastTransitionTime")) if known and known.get("status") == "True" else None
    if not problems:
        if stuck_since is not None:
            status["conditions"] = set_condition(conditions, c.CONDITION_CANNOT_START, False,
                                                 c.REASON_CONTAINERS_STARTED, "every worker's container started", now)
        return
    first = problems[0]
    limit = timing.start_timeout_seconds
    message = "; ".join(map(str, problems))
    status["conditions"] = set_condition(conditions, c.CONDITION_CANNOT_START, True, first.reason, message, now)
    if stuck_since is None:
        plan.events.append(("Warning", first.reason, f"{message} (the job fails if this lasts {limit:g}s)"))
    waited = (now - (stuck_since or now)).total_seconds()
    hopeless = first.reason in HOPELESS_START_PROBLEMS
    if not hopeless and waited < limit:
        _requeue(plan, limit - waited)
        return
    fix = ("the Secret or ConfigMap the message names (e.g. spec.model.hfTokenSecret)" if first.reason in CONFIG_PROBLEMS
           else "spec.workers.image (or spec.workers.imagePullSecrets)")
    how_long = "it cannot start" if hopeless else f"its container could not start for {waited:.0f}s"
    failure = Failure(pod=first.pod, reason=first.reason, exit_code=None, message=first.message)
    status["lastFailure"] = failure.as_status(timestamp(now))
    _fail(plan, current, first.reason, f"worker {first} ({how_long}); fix {fix} and recreate the job", now)


# Past its deletionTimestamp (the end of its grace period) a pod's kubelet has had time to
# stop it; this much later, its node is not answering.
STUCK_TERMINATING_SECONDS = 120.0


def _stuck_terminating(pod: dict[str, Any], now: dt.datetime) -> bool:
    due = parse_timestamp(pod["metadata"].get("deletionTimestamp"))
    return due is not None and (now - due).total_seconds() >= STUCK_TERMINATING_SECONDS


def _report_stuck_terminating(plan: Plan, stale: list[dict[str, Any]], now: dt.datetime) -> None:
    """An old worker that stays Terminating (its node lost or partitioned) holds the next
    gang back: its name cannot be reused until it is gone. Said in the phase's condition
    and one Warning Event. The operator does not force-delete it: on a partitioned node
    that worker may still be running, and writing checkpoints beside a new gang's."""
    stuck = [p for p in stale if _stuck_terminating(p, now)]
    if not stuck:
        return
    pod = stuck[0]
    node = (pod.get("spec") or {}).get("nodeName") or "its node"
    message = (f"waiting for worker {pod_name(pod)} on {node} to terminate (due at "
               f"{pod['metadata']['deletionTimestamp']}): the node is not answering. The next gang starts once it is "
               f"gone: remove the node (kubectl delete node), or, if it is really down, kubectl delete pod "
               f"{pod_name(pod)} --force --grace-period=0")
    status = plan.status
    kind = _PHASE_CONDITIONS.get(status["phase"])
    known = next((cond for cond in status.get("conditions") or [] if cond.get("type") == kind), None)
    if kind is None or (known is not None and known.get("reason") == c.REASON_WORKER_STUCK_TERMINATING):
        return
    status["conditions"] = set_condition(status.get("conditions") or [], kind, True,
                                         c.REASON_WORKER_STUCK_TERMINATING, message, now)
    plan.events.append(("Warning", c.REASON_WORKER_STUCK_TERMINATING, message))


def _restart(plan: Plan, spec: JobSpec, failed: list[dict[str, Any]], current: list[dict[str, Any]],
             now: dt.datetime, timing: Timing) -> Plan:
    status = plan.status
    # One preempted worker takes the others down with it (their collectives fail):
    # a gang with any preemption in it counts as preempted.
    preempted = not failed or any(is_preemption(p) for p in failed)
    if preempted:
        who = ", ".join(pod_name(p) for p in failed) or "the gang changed: a worker vanished or workers.nodes was edited"
        preempted_pods = [p for p in failed if is_preemption(p)]
        if preempted_pods:  # recorded for people; it does not count against backoffLimit
            status["lastFailure"] = describe_failure(preempted_pods[0]).as_status(timestamp(now))
        status["preemptions"] = int(status["preemptions"]) + 1
        message = f"gang preempted ({who}); restarting from the latest checkpoint, not counted against backoffLimit"
        enter_phase(status, c.PHASE_RESTARTING, c.REASON_PREEMPTED, message, now)
        status["nextRestartTime"] = timestamp(now)
        plan.events.append(("Normal", c.REASON_PREEMPTED, message))
    else:
        failure = describe_failure(failed[0])
        status["lastFailure"] = failure.as_status(timestamp(now))
        code = f" exit code {failure.exit_code}" if failure.exit_code is not None else ""
        if failure.exit_code in _NOT_RETRIED:
            reason, what, fix = _NOT_RETRIED[failure.exit_code]
            message = f"worker {failure.pod} {what} (exit code {failure.exit_code}); not retried: {fix}"
            return _fail(plan, current, reason, message, now)
        if int(status["restarts"]) >= spec.run_policy.backoff_limit:
            message = (f"worker {failure.pod} failed ({failure.reason}{code}) after {status['restarts']} restart(s); "
                       f"runPolicy.backoffLimit = {spec.run_policy.backoff_limit} reached")
            return _fail(plan, current, c.REASON_BACKOFF_LIMIT_EXCEEDED, message, now)
        status["restarts"] = int(status["restarts"]) + 1
        delay = timing.backoff(status["restarts"])
        status["nextRestartTime"] = timestamp(now + dt.timedelta(seconds=delay))
        message = (f"worker {failure.pod} failed ({failure.reason}{code}); restart {status['restarts']} of "
                   f"{spec.run_policy.backoff_limit} in {delay:g}s from the latest checkpoint")
        enter_phase(status, c.PHASE_RESTARTING, c.REASON_WORKER_FAILED, message, now)
        plan.events.append(("Warning", c.REASON_WORKER_FAILED, message))
        plan.counted_restart = True
    plan.gang = gang_of(status)
    plan.delete = [pod_name(p) for p in current if not is_deleting(p)]
    _requeue(plan, 0.5)
    return plan


# Trainer exit codes a restart of the same spec cannot cure: (reason, what happened, the fix).
_NOT_RETRIED = {
    c.EXIT_CODE_INVALID_INPUT: (c.REASON_INVALID_TRAINER_INPUT, "rejected its config or inputs",
                                "fix the spec (the pod's log names the field) and recreate the job"),
    c.EXIT_CODE_DIVERGED: (c.REASON_TRAINING_DIVERGED, "stopped training: the loss stayed NaN or infinite",
                           "lower spec.training.learningRate and recreate the job; it resumes from the last "
                           "checkpoint before the divergence (the pod's log names it)"),
}


def _fail(plan: Plan, pods: list[dict[str, Any]], reason: str, message: str, now: dt.datetime) -> Plan:
    enter_phase(plan.status, c.PHASE_FAILED, reason, message, now)
    plan.status["completionTime"] = timestamp(now)
    plan.status.pop("nextRestartTime", None)
    plan.delete = _alive(pods)
    plan.events.append(("Warning", reason, message))
    return plan


def _requeue(plan: Plan, seconds: float) -> None:
    seconds = max(seconds, 0.05)
    plan.requeue_after = seconds if plan.requeue_after is None else min(plan.requeue_after, seconds)
