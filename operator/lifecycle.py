"""Pod states -> job phase, conditions and the next actions: one pure function.

`decide` looks at a job's spec, its current status and its worker pods, and returns a
`Plan`: the status to write, the pods to create and delete, the Events to post and
when to look again. The reconciler (reconciler.py) only carries plans out, so every
rule of the job's life is tested here as data (tests/operator/test_operator_lifecycle.py).
The plan and its status primitives are plan.py's; the problems of waiting workers,
troubles.py's.

Gangs: all workers of one start carry the label `dreambooth.io/gang: N`, with
N = status.restarts + status.preemptions. Counting a failure or a preemption bumps N,
which makes every existing pod stale; stale pods are deleted, and only when all are
gone (and the backoff has passed) is the next gang created. A missed step is therefore
redone on the next pass instead of being counted twice.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from trainer.contract import EXIT_CONFIG_ERROR, EXIT_DIVERGED

from . import constants as c
from .clock import parse_timestamp, timestamp
from .plan import Plan, alive_pods, enter_phase, fail, requeue, set_condition
from .podstates import (
    POD_FAILED,
    POD_PENDING,
    POD_RUNNING,
    POD_SUCCEEDED,
    describe_failure,
    is_deleting,
    is_preemption,
    is_scheduled,
    is_standby,
    pod_condition,
    node_refusal,
    pod_gang,
    pod_gang_nodes,
    pod_index,
    pod_name,
    pod_phase,
)
from .settings import Timing
from .spec import JobSpec
from .troubles import check_start_problems, mark_unschedulable, report_stuck_terminating, stuck_terminating


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


def gang_nodes(spec: JobSpec, status: dict[str, Any]) -> int:
    """Workers of the current gang: workers.nodes, or fewer once it shrank (status.gangNodes,
    which holds for that gang only: every other restart asks for workers.nodes again)."""
    shrunk = status.get("gangNodes")
    return spec.workers.nodes if shrunk is None else min(int(shrunk), spec.workers.nodes)


def decide(spec: JobSpec, status: dict[str, Any], pods: list[dict[str, Any]], now: dt.datetime,
           timing: Timing = Timing()) -> Plan:
    """`pods`: the job's, workers and standby pods alike."""
    workers = [p for p in pods if not is_standby(p)]
    plan = _decide_phase(spec, status, workers, now, timing)
    _keep_standby(plan, spec, workers, [p for p in pods if is_standby(p)], now, timing)
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
        requeue(plan, left)


def _decide_phase(spec: JobSpec, status: dict[str, Any], pods: list[dict[str, Any]], now: dt.datetime,
                  timing: Timing) -> Plan:
    status = dict(status or {})
    status.setdefault("restarts", 0)
    status.setdefault("preemptions", 0)
    status.setdefault("maxSteps", spec.training.max_steps)
    phase = status.get("phase") or c.PHASE_PENDING
    status["phase"] = phase
    plan = Plan(status=status, gang=gang_of(status), nodes=gang_nodes(spec, status))

    # Failed and Succeeded are final: stop whatever still runs, keep finished pods for their logs.
    if phase in c.TERMINAL_PHASES:
        if phase == c.PHASE_FAILED:
            plan.delete = alive_pods(pods)
        plan.requeue_after = timing.finished_resync_seconds
        return plan

    if spec.run_policy.suspend:
        # Deleting the pods sends SIGTERM: the trainer checkpoints and exits 143.
        plan.delete = [pod_name(p) for p in pods if not is_deleting(p)]
        if phase != c.PHASE_SUSPENDED:
            enter_phase(status, c.PHASE_SUSPENDED, c.REASON_SUSPENDED, "runPolicy.suspend is true; workers stopped", now)
            status.pop("nextRestartTime", None)
            status.pop("gangNodes", None)  # the resumed gang asks for workers.nodes
            plan.nodes = spec.workers.nodes
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
            return fail(plan, pods, c.REASON_DEADLINE_EXCEEDED, message, now)
        plan.requeue_after = left

    gang = plan.gang
    stale = [p for p in pods if pod_gang(p) != gang]
    current = [p for p in pods if pod_gang(p) == gang]

    # A restart first removes the old gang completely: a new worker-0 cannot be
    # created while the old one is still terminating (same name).
    if stale:
        plan.delete = [pod_name(p) for p in stale if not is_deleting(p)]
        report_stuck_terminating(plan, stale, now)
        requeue(plan, 1.0)
        return plan
    if phase == c.PHASE_RESTARTING:
        restart_at = parse_timestamp(status.get("nextRestartTime"))
        if restart_at is not None and restart_at > now:
            requeue(plan, (restart_at - now).total_seconds())
            return plan

    leaving = [p for p in current if is_deleting(p)]
    if phase == c.PHASE_PENDING and leaving:
        # Workers still stopping (a suspension just lifted, or one deleted by hand before
        # the gang ran): a worker cannot be recreated under its name until it is gone, and
        # one that exits 143 meanwhile is not a preemption of the gang to come. One stuck
        # on a lost node ends the gang instead, so that the wait for it is reported.
        if not any(stuck_terminating(p, now) for p in leaving):
            requeue(plan, 1.0)
            return plan
        return _restart(plan, spec, [], current, now, timing)

    failed = [p for p in current if pod_phase(p) == POD_FAILED]
    nodes = plan.nodes
    # The gang no longer matches: a worker vanished (node lost, deleted by hand) or
    # workers.nodes was edited. Restarted like a preemption: not the job's fault.
    started_for = max((pod_gang_nodes(p) or nodes for p in current), default=nodes)
    vanished = phase in (c.PHASE_INITIALIZING, c.PHASE_RUNNING) and (
        len(current) < started_for or any(is_deleting(p) for p in current))
    # Edited up or down while the gang exists, even before it ran: its workers' torchrun
    # waits for the old number of nodes, and a new worker would wait for the new one.
    # (An edit up reaches a shrunk gang through its standby pods, see _keep_standby.)
    resized = any((pod_index(p) or 0) >= nodes or pod_gang_nodes(p) not in (None, nodes) for p in current)
    if failed or vanished or resized:
        # An edit alone is not a disruption: it does not lengthen a run of preemptions.
        disrupted = bool(failed) or vanished
        return _restart(plan, spec, failed, current, now, timing, disrupted=disrupted)

    if len(current) == nodes and all(pod_phase(p) == POD_SUCCEEDED for p in current):
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
    plan.create = [i for i in range(nodes) if i not in present]
    if plan.create:
        if len(plan.create) == nodes:  # a new gang: it reads the current spec's config
            status["maxSteps"] = spec.training.max_steps
        status.setdefault("startTime", timestamp(now))
        status.pop("nextRestartTime", None)
        # Said here at the first gang start only: a Created False from a forbidden create
        # stays False until a create succeeds (the reconciler then calls created_status).
        if not any(cond.get("type") == c.CONDITION_CREATED for cond in status.get("conditions") or []):
            status["conditions"] = created_status(status, nodes, now)["conditions"]
        if phase != c.PHASE_PENDING:
            enter_phase(status, c.PHASE_PENDING, c.REASON_WORKERS_CREATED, "creating worker pods", now)
        return plan

    unscheduled = [p for p in current if not is_scheduled(p)]
    stuck = mark_unschedulable(plan, current, now, timing)
    scheduled = len(current) - len(unscheduled)
    if stuck and scheduled >= spec.workers.fewest_nodes:
        return _shrink(plan, spec, current, stuck, scheduled, now, timing)
    _update_running_phase(plan, current, unscheduled, now)
    check_start_problems(plan, current, now, timing)
    return plan


def _update_running_phase(plan: Plan, current: list[dict[str, Any]], unscheduled: list[dict[str, Any]],
                          now: dt.datetime) -> None:
    status = plan.status
    if unscheduled:
        new_phase, reason, message = c.PHASE_PENDING, c.REASON_PODS_PENDING, f"{len(unscheduled)} worker(s) not scheduled"
    elif all(pod_phase(p) in (POD_RUNNING, POD_SUCCEEDED) for p in current):
        new_phase, reason, message = c.PHASE_RUNNING, c.REASON_ALL_WORKERS_RUNNING, f"{len(current)} workers running"
    else:
        new_phase, reason, message = c.PHASE_INITIALIZING, c.REASON_WORKERS_CREATED, "workers scheduled, starting"
    if status["phase"] != new_phase:
        enter_phase(status, new_phase, reason, message, now)


def _shrink(plan: Plan, spec: JobSpec, current: list[dict[str, Any]], stuck: list[str], nodes: int,
            now: dt.datetime, timing: Timing) -> Plan:
    """Elastic gang (workers.minNodes): workers the scheduler cannot place past the pending
    timeout do not hold the others back; the gang restarts on the nodes it has, and
    resumes the latest checkpoint there. Not the job's fault: counted as a preemption."""
    plan.status["gangNodes"] = nodes
    message = (f"{'; '.join(stuck)} (not scheduled for {timing.pending_timeout_seconds:g}s); restarting the gang on "
               f"{nodes} of workers.nodes = {spec.workers.nodes} nodes (workers.minNodes = {spec.workers.min_nodes}) "
               "from the latest checkpoint, not counted against backoffLimit; standby pods wait for the other nodes")
    return _resize(plan, spec, current, c.RESIZE_SHRINK, ("Warning", c.REASON_GANG_SHRUNK, message), now)


def _keep_standby(plan: Plan, spec: JobSpec, workers: list[dict[str, Any]], standby: list[dict[str, Any]],
                  now: dt.datetime, timing: Timing) -> None:
    """A shrunk gang, once it runs, keeps a standby pod for each worker it lacks
    (pods.build_standby_pod). Once the scheduler has placed every one of them, the nodes
    are there again and the gang restarts on all of them. Some placed, the others not
    within the pending timeout: it restarts on those it has, rather than hold the placed
    ones' nodes idle for a node that may never come. Not before it runs: a standby pod
    would compete with the gang's own workers for the nodes, and win some. Standby pods
    that ended are replaced; any other standby pod (an older gang's, a finished job's) is
    deleted."""
    running = plan.status["phase"] == c.PHASE_RUNNING and not plan.delete and not plan.create
    lacking = range(plan.nodes, spec.workers.nodes) if running else range(0)
    ours = [p for p in standby if pod_gang(p) == plan.gang and pod_index(p) in lacking]
    standing = [p for p in ours if pod_phase(p) in (POD_PENDING, POD_RUNNING) and not is_deleting(p)]
    strays = [pod_name(p) for p in standby if p not in standing and not is_deleting(p)]
    placed = [p for p in standing if is_scheduled(p)]
    waited = max((_placed_for(p, now) for p in placed), default=0.0)
    if placed and (len(placed) == len(lacking) or waited >= timing.pending_timeout_seconds):
        _grow(plan, spec, [p for p in workers if pod_gang(p) == plan.gang] + standing, placed, now, timing)
    else:  # one that ended is replaced once it is gone
        plan.create_standby = [i for i in lacking if i not in {pod_index(p) for p in ours}]
        if placed:
            requeue(plan, timing.pending_timeout_seconds - waited)
    plan.delete += strays


def _placed_for(pod: dict[str, Any], now: dt.datetime) -> float:
    """Seconds since the scheduler placed the pod (its PodScheduled condition's transition,
    else its start)."""
    placed = parse_timestamp((pod_condition(pod, "PodScheduled") or {}).get("lastTransitionTime")
                             or (pod.get("status") or {}).get("startTime"))
    return 0.0 if placed is None else (now - placed).total_seconds()


def _grow(plan: Plan, spec: JobSpec, pods: list[dict[str, Any]], placed: list[dict[str, Any]], now: dt.datetime,
          timing: Timing) -> None:
    """The gang (its workers and standby pods, `pods`) restarts on its own nodes and those
    the `placed` standby pods found."""
    nodes = plan.nodes + len(placed)
    if nodes == spec.workers.nodes:
        plan.status.pop("gangNodes", None)
        found = f"all workers.nodes = {nodes} nodes can be had again; restarting the gang on all of them"
    else:
        plan.status["gangNodes"] = nodes
        found = (f"{nodes} of workers.nodes = {spec.workers.nodes} nodes can be had (the others not placed in "
                 f"{timing.pending_timeout_seconds:g}s); restarting the gang on {nodes}")
    names = ", ".join(pod_name(p) for p in placed)
    message = f"the scheduler placed {names}: {found} from the latest checkpoint, not counted against backoffLimit"
    _resize(plan, spec, pods, c.RESIZE_GROW, ("Normal", c.REASON_GANG_GROWN, message), now)


def _resize(plan: Plan, spec: JobSpec, pods: list[dict[str, Any]], resize: str, event: tuple[str, str, str],
            now: dt.datetime) -> Plan:
    """An elastic gang restarts at its new size (status.gangNodes) at once: not the job's
    fault, so counted as a preemption, and not backed off."""
    status = plan.status
    status["preemptions"] = int(status["preemptions"]) + 1
    _, reason, message = event
    enter_phase(status, c.PHASE_RESTARTING, reason, message, now)
    status["nextRestartTime"] = timestamp(now)
    plan.events.append(event)
    plan.resize = resize
    return _replace_gang(plan, spec, pods)


def _replace_gang(plan: Plan, spec: JobSpec, current: list[dict[str, Any]]) -> Plan:
    """The restart counted in status: the gang's number moves on, its pods go."""
    plan.gang = gang_of(plan.status)
    plan.nodes = gang_nodes(spec, plan.status)
    plan.delete = [pod_name(p) for p in current if not is_deleting(p)]
    requeue(plan, 0.5)
    return plan


def _restart(plan: Plan, spec: JobSpec, failed: list[dict[str, Any]], current: list[dict[str, Any]],
             now: dt.datetime, timing: Timing, disrupted: bool = True) -> Plan:
    status = plan.status
    # One preempted worker takes the others down with it (their collectives fail):
    # a gang with any preemption in it counts as preempted.
    preempted = not failed or any(is_preemption(p) for p in failed)
    if preempted:
        preempted_pods = [p for p in failed if is_preemption(p)]
        if preempted_pods:  # recorded for people; it does not count against backoffLimit
            status["lastFailure"] = describe_failure(preempted_pods[0]).as_status(timestamp(now))
        status["preemptions"] = int(status["preemptions"]) + 1
        # Preemptions are free, but not every one is the cluster's doing: a gang that
        # presses its own node (memory, disk) into evicting it, or a spot pool reclaimed
        # again and again, would loop at full speed. A run of them with no newer
        # checkpoint in between (scraping one resets the run) backs off like failures do.
        # A node whose kubelet refuses every worker (a device plugin that never recovers)
        # joins that run too, and is not capped further: the fix is the node's (the message
        # names it), a new gang may land elsewhere, and activeDeadlineSeconds bounds the job.
        in_a_row = int(status.get("consecutivePreemptions") or 0) + (1 if disrupted else 0)
        status["consecutivePreemptions"] = in_a_row
        delay = timing.backoff(in_a_row - 1) if in_a_row > 1 else 0.0
        kind, reason, what, advice = _disruption(failed, preempted_pods, disrupted)
        message = f"{what}; restarting from the latest checkpoint, not counted against backoffLimit{advice}"
        if delay:
            message = (f"{what}, {in_a_row} times in a row with no new checkpoint in between; "
                       f"restarting from the latest checkpoint in {delay:g}s, not counted against backoffLimit{advice}")
        enter_phase(status, c.PHASE_RESTARTING, reason, message, now)
        status["nextRestartTime"] = timestamp(now + dt.timedelta(seconds=delay))
        plan.events.append((kind, reason, message))
    else:
        failure = describe_failure(failed[0])
        status["lastFailure"] = failure.as_status(timestamp(now))
        code = f" exit code {failure.exit_code}" if failure.exit_code is not None else ""
        if failure.exit_code in _NOT_RETRIED:
            reason, what, fix = _NOT_RETRIED[failure.exit_code]
            message = f"worker {failure.pod} {what} (exit code {failure.exit_code}); not retried: {fix}"
            return fail(plan, current, reason, message, now)
        if int(status["restarts"]) >= spec.run_policy.backoff_limit:
            message = (f"worker {failure.pod} failed ({failure.reason}{code}) after {status['restarts']} restart(s); "
                       f"runPolicy.backoffLimit = {spec.run_policy.backoff_limit} reached")
            return fail(plan, current, c.REASON_BACKOFF_LIMIT_EXCEEDED, message, now)
        status["restarts"] = int(status["restarts"]) + 1
        delay = timing.backoff(status["restarts"])
        status["nextRestartTime"] = timestamp(now + dt.timedelta(seconds=delay))
        message = (f"worker {failure.pod} failed ({failure.reason}{code}); restart {status['restarts']} of "
                   f"{spec.run_policy.backoff_limit} in {delay:g}s from the latest checkpoint")
        enter_phase(status, c.PHASE_RESTARTING, c.REASON_WORKER_FAILED, message, now)
        plan.events.append(("Warning", c.REASON_WORKER_FAILED, message))
        plan.counted_restart = True
    status.pop("gangNodes", None)  # the next gang asks for workers.nodes again
    return _replace_gang(plan, spec, current)


def _disruption(failed: list[dict[str, Any]], preempted: list[dict[str, Any]],
                disrupted: bool) -> tuple[str, str, str, str]:
    """(Event type, reason, what happened, advice) for a gang restarted without counting."""
    refused = next((p for p in preempted if node_refusal(p) is not None), None)
    if refused is None:
        who = ", ".join(pod_name(p) for p in failed) or (
            "a worker vanished or is stuck terminating" if disrupted else "workers.nodes was edited")
        return "Normal", c.REASON_PREEMPTED, f"gang preempted ({who})", ""
    # A Warning: unlike a preemption, it is a node at fault, which someone may have to cordon.
    node = (refused.get("spec") or {}).get("nodeName") or "its node"
    failure = describe_failure(refused)
    said = f"{failure.reason}: {failure.message}" if failure.message else failure.reason
    what = f"worker {failure.pod} refused by the kubelet of {node} ({said})"
    return "Warning", c.REASON_REFUSED_BY_NODE, what, f"; if {node} keeps refusing workers, cordon it"


# Trainer exit codes a restart of the same spec cannot cure: (reason, what happened, the fix).
_NOT_RETRIED = {
    EXIT_CONFIG_ERROR: (c.REASON_INVALID_TRAINER_INPUT, "rejected its config or inputs",
                        "fix the spec (the pod's log names the field) and recreate the job"),
    EXIT_DIVERGED: (c.REASON_TRAINING_DIVERGED, "stopped training: the loss stayed NaN or infinite, or fp16 gradients overflowed at the minimum loss scale",
                    "lower spec.training.learningRate and recreate the job; it resumes from the last "
                    "checkpoint before the divergence (the pod's log names it)"),
}

