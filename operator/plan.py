"""One reconcile pass's plan for a job (lifecycle.decide makes it) and the status
primitives its rules share: conditions, the phase, failing, looking again."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from . import constants as c
from .clock import timestamp
from .podstates import POD_FAILED, POD_SUCCEEDED, is_deleting, pod_name, pod_phase

# Conditions that mirror the current phase: at most one of them is True.
PHASE_CONDITIONS = {
    c.PHASE_RUNNING: c.CONDITION_RUNNING,
    c.PHASE_RESTARTING: c.CONDITION_RESTARTING,
    c.PHASE_SUSPENDED: c.CONDITION_SUSPENDED,
    c.PHASE_SUCCEEDED: c.CONDITION_SUCCEEDED,
    c.PHASE_FAILED: c.CONDITION_FAILED,
}


@dataclass
class Plan:
    status: dict[str, Any]
    create: list[int] = field(default_factory=list)
    gang: int = 0
    # Workers of that gang: workers.nodes, or fewer once it shrank (workers.minNodes).
    nodes: int = 1
    # Standby pods to create, by the index of the worker a shrunk gang lacks.
    create_standby: list[int] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    # (type, reason, message) of Kubernetes Events to post on the job.
    events: list[tuple[str, str, str]] = field(default_factory=list)
    requeue_after: float | None = None
    counted_restart: bool = False
    # An elastic gang (workers.minNodes) restarts on fewer nodes (RESIZE_SHRINK), or on all
    # of them again (RESIZE_GROW); None otherwise.
    resize: str | None = None
    # runPolicy.ttlSecondsAfterFinished has passed: the job itself is to be deleted.
    delete_job: bool = False


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
    for other_phase, kind in PHASE_CONDITIONS.items():
        if other_phase == phase:
            conditions = set_condition(conditions, kind, True, reason, message, now)
        elif any(cond.get("type") == kind and cond.get("status") == "True" for cond in conditions):
            conditions = set_condition(conditions, kind, False, reason, message, now)
    status["conditions"] = conditions

def alive_pods(pods: list[dict[str, Any]]) -> list[str]:
    """Pods still running or waiting that are not already being deleted."""
    return [pod_name(p) for p in pods if pod_phase(p) not in (POD_SUCCEEDED, POD_FAILED) and not is_deleting(p)]


def fail(plan: Plan, pods: list[dict[str, Any]], reason: str, message: str, now: dt.datetime) -> Plan:
    enter_phase(plan.status, c.PHASE_FAILED, reason, message, now)
    plan.status["completionTime"] = timestamp(now)
    plan.status.pop("nextRestartTime", None)
    plan.delete = alive_pods(pods)
    plan.events.append(("Warning", reason, message))
    return plan


def requeue(plan: Plan, seconds: float) -> None:
    seconds = max(seconds, 0.05)
    plan.requeue_after = seconds if plan.requeue_after is None else min(plan.requeue_after, seconds)
