"""What a job's waiting workers are stuck on, said in its status: a worker the scheduler
cannot place, a container that cannot start, an old worker that does not terminate.
Pure functions on a Plan, as lifecycle.decide's."""

from __future__ import annotations

import datetime as dt
from typing import Any

from . import constants as c
from .clock import parse_timestamp, timestamp
from .plan import PHASE_CONDITIONS, Plan, fail, requeue, set_condition
from .podstates import (
    CONFIG_PROBLEMS,
    HOPELESS_START_PROBLEMS,
    STILL_CREATING,
    Failure,
    StartProblem,
    pod_name,
    scheduling_problem,
    start_problem,
    still_creating,
)
from .settings import Timing


def mark_unschedulable(plan: Plan, current: list[dict[str, Any]], now: dt.datetime, timing: Timing) -> list[str]:
    """Pods the scheduler cannot place for longer than the pending timeout get a
    condition carrying the scheduler's own message (e.g. Insufficient nvidia.com/gpu);
    returned too, as `pod: message`."""
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
            requeue(plan, timing.pending_timeout_seconds - waited)
    conditions = status.get("conditions") or []
    has = any(cond.get("type") == c.CONDITION_UNSCHEDULABLE for cond in conditions)
    if stuck:
        status["conditions"] = set_condition(conditions, c.CONDITION_UNSCHEDULABLE, True,
                                             c.REASON_PODS_PENDING, "; ".join(stuck), now)
    elif has:
        status["conditions"] = set_condition(conditions, c.CONDITION_UNSCHEDULABLE, False,
                                             c.REASON_PODS_PENDING, "all workers scheduled", now)
    return stuck


def check_start_problems(plan: Plan, current: list[dict[str, Any]], now: dt.datetime, timing: Timing) -> None:
    """Scheduled workers whose container cannot start get condition CannotStart (and one
    Warning Event) carrying the kubelet's reason and message; so do workers still being
    created (a volume that cannot mount) a start timeout after they were scheduled. The
    job fails when the problem cannot clear (InvalidImageName) or has lasted past the start
    timeout, counted from the condition's lastTransitionTime: the pods are deleted, their
    nodes' GPUs freed. A restart would not help: the next gang would wait for the same
    image, Secret or volume."""
    status = plan.status
    conditions = status.get("conditions") or []
    known = next((cond for cond in conditions if cond.get("type") == c.CONDITION_CANNOT_START), None)
    stuck_since = parse_timestamp(known.get("lastTransitionTime")) if known and known.get("status") == "True" else None
    limit = timing.start_timeout_seconds
    problems = _start_problems(plan, current, now, limit)
    if not problems:
        if stuck_since is not None:
            status["conditions"] = set_condition(conditions, c.CONDITION_CANNOT_START, False,
                                                 c.REASON_CONTAINERS_STARTED, "every worker's container started", now)
        return
    first = problems[0]
    message = "; ".join(map(str, problems))
    notice = f" (the job fails if this lasts {limit:g}s)"
    if any(problem.reason in STILL_CREATING for problem in problems):
        # Said in the condition too: a slow download looks the same, and may still end in time.
        fails_at = (stuck_since or now) + dt.timedelta(seconds=limit)
        message, notice = f"{message}; the job fails at {timestamp(fails_at)} if a worker is still creating then", ""
    status["conditions"] = set_condition(conditions, c.CONDITION_CANNOT_START, True, first.reason, message, now)
    if stuck_since is None:
        plan.events.append(("Warning", first.reason, message + notice))
    waited = (now - (stuck_since or now)).total_seconds()
    hopeless = first.reason in HOPELESS_START_PROBLEMS
    if not hopeless and waited < limit:
        requeue(plan, limit - waited)
        return
    _fail_to_start(plan, current, first, None if hopeless else waited, now)


def _start_problems(plan: Plan, current: list[dict[str, Any]], now: dt.datetime, limit: float) -> list[StartProblem]:
    """The kubelet's start problems, and the workers still being created `limit` seconds
    after they were scheduled; the others still creating are looked at again when theirs
    is up. A large image's download shows ContainerCreating too, so a slow creation gets
    the condition only then, and fails the job only another `limit` later."""
    problems = []
    for pod in current:
        problem = start_problem(pod)
        creating = still_creating(pod) if problem is None else None
        if creating is not None:
            reason, scheduled_at = creating
            waited = (now - scheduled_at).total_seconds()
            if waited < limit:
                requeue(plan, limit - waited)
                continue
            problem = StartProblem(pod=pod_name(pod), reason=reason, since=scheduled_at, message=(
                f"still creating its containers, over {limit:g}s since it was scheduled at {timestamp(scheduled_at)}; "
                f"kubectl describe pod {pod_name(pod)} shows why: FailedMount or FailedAttachVolume Events for a "
                "volume that cannot mount (spec.storage, spec.workers.volumes), else a very large image still "
                "downloading"))
        if problem is not None:
            problems.append(problem)
    return problems


def _fail_to_start(plan: Plan, current: list[dict[str, Any]], first: StartProblem, waited: float | None,
                   now: dt.datetime) -> None:
    """Fail the job for `first`, reported `waited` seconds ago (None: it can never clear)."""
    if waited is None:
        how_long = "it cannot start"
    elif first.since is not None:
        how_long = f"still creating its containers {(now - first.since).total_seconds():.0f}s after it was scheduled"
    else:
        how_long = f"its container could not start for {waited:.0f}s"
    if first.reason in CONFIG_PROBLEMS:
        fix = "fix the Secret or ConfigMap the message names (e.g. spec.model.hfTokenSecret) and recreate the job"
    elif first.reason in STILL_CREATING:
        fix = ("fix the volume the pod's Events name (spec.storage, spec.workers.volumes) and recreate the job; "
               "an image that takes this long to download needs a longer --start-timeout")
    else:
        fix = "fix spec.workers.image (or spec.workers.imagePullSecrets) and recreate the job"
    failure = Failure(pod=first.pod, reason=first.reason, exit_code=None, message=first.message)
    plan.status["lastFailure"] = failure.as_status(timestamp(now))
    fail(plan, current, first.reason, f"worker {first} ({how_long}); {fix}", now)


# Past its deletionTimestamp (the end of its grace period) a pod's kubelet has had time to
# stop it; this much later, its node is not answering.
STUCK_TERMINATING_SECONDS = 120.0


def stuck_terminating(pod: dict[str, Any], now: dt.datetime) -> bool:
    due = parse_timestamp(pod["metadata"].get("deletionTimestamp"))
    return due is not None and (now - due).total_seconds() >= STUCK_TERMINATING_SECONDS


def report_stuck_terminating(plan: Plan, stale: list[dict[str, Any]], now: dt.datetime) -> None:
    """An old worker that stays Terminating (its node lost or partitioned) holds the next
    gang back: its name cannot be reused until it is gone. Said in the phase's condition
    and one Warning Event. The operator does not force-delete it: on a partitioned node
    that worker may still be running, and writing checkpoints beside a new gang's."""
    stuck = [p for p in stale if stuck_terminating(p, now)]
    if not stuck:
        return
    pod = stuck[0]
    node = (pod.get("spec") or {}).get("nodeName") or "its node"
    message = (f"waiting for worker {pod_name(pod)} on {node} to terminate (due at "
               f"{pod['metadata']['deletionTimestamp']}): the node is not answering. The next gang starts once it is "
               f"gone: remove the node (kubectl delete node), or, if it is really down, kubectl delete pod "
               f"{pod_name(pod)} --force --grace-period=0")
    status = plan.status
    kind = PHASE_CONDITIONS.get(status["phase"])
    known = next((cond for cond in status.get("conditions") or [] if cond.get("type") == kind), None)
    if kind is None or (known is not None and known.get("reason") == c.REASON_WORKER_STUCK_TERMINATING):
        return
    status["conditions"] = set_condition(status.get("conditions") or [], kind, True,
                                         c.REASON_WORKER_STUCK_TERMINATING, message, now)
    plan.events.append(("Warning", c.REASON_WORKER_STUCK_TERMINATING, message))
