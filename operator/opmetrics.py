"""The operator's own Prometheus metrics (DESIGN.md "Metrics", operator part)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .constants import PHASES, RESIZE_GROW, RESIZE_SHRINK, TERMINAL_PHASES

METRIC_JOBS = "dreambooth_operator_jobs"
METRIC_RECONCILE_SECONDS = "dreambooth_operator_reconcile_seconds"
METRIC_RESTARTS = "dreambooth_operator_restarts_total"
METRIC_PODS_CREATED = "dreambooth_operator_pods_created_total"
METRIC_LEADER = "dreambooth_operator_leader"
METRIC_CRD_MISSING_FIELDS = "dreambooth_operator_crd_missing_fields"
METRIC_RECONCILE_ERRORS = "dreambooth_operator_reconcile_errors_total"
METRIC_SHRUNK_JOBS = "dreambooth_operator_shrunk_jobs"

RESTART_FAILURE = "failure"
RESTART_PREEMPTION = "preemption"

# Why a reconcile pass failed: the API server forbade a call (403: RBAC, a policy), or
# anything else (the API unreachable, a bug; the log has the traceback).
ERROR_FORBIDDEN = "forbidden"
ERROR_OTHER = "error"


class OperatorMetrics:
    """One registry per operator (not the global one), so tests read exactly ours."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge(METRIC_JOBS, "DreamboothJobs by phase", ["phase"], registry=self.registry)
        self.reconcile_seconds = Histogram(
            METRIC_RECONCILE_SECONDS, "Time of one reconcile pass of one job", registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        # prometheus_client adds the `_total` suffix to counters itself.
        self.restarts = Counter(METRIC_RESTARTS.removesuffix("_total"), "Gang restarts by cause",
                                ["reason"], registry=self.registry)
        # Every series from the start: increase() cannot count the first failure of a series
        # that appears with it (DreamboothWorkersFailingRepeatedly would need a fourth).
        # An elastic gang's resizes count under their own reasons (lifecycle's Plan.resize).
        for reason in (RESTART_FAILURE, RESTART_PREEMPTION, RESIZE_SHRINK, RESIZE_GROW):
            self.restarts.labels(reason=reason)
        # Both series from the start, for increase() (as restarts above).
        self.reconcile_errors = Counter(METRIC_RECONCILE_ERRORS.removesuffix("_total"),
                                        "Reconcile passes that failed, by cause", ["reason"], registry=self.registry)
        for reason in (ERROR_FORBIDDEN, ERROR_OTHER):
            self.reconcile_errors.labels(reason=reason)
        self.pods_created = Counter(METRIC_PODS_CREATED.removesuffix("_total"), "Worker pods created",
                                    registry=self.registry)
        # 1 on the replica that holds the leader-election Lease (or runs without election),
        # 0 on a standby: which replica acts, and a sum that must never exceed 1.
        self.leader = Gauge(METRIC_LEADER, "1 when this operator process leads and acts on jobs, 0 on a standby",
                            registry=self.registry)
        # Spec and status fields the installed CRD lacks (crd_skew.py): above 0, the API
        # server drops them from every job. -1: the CRD could not be read to check.
        self.crd_missing_fields = Gauge(METRIC_CRD_MISSING_FIELDS, "Spec fields this operator reads and status "
                                        "fields it writes that the installed CRD lacks (its API server drops them); "
                                        "-1: not checked",
                                        registry=self.registry)
        # Elastic gangs (workers.minNodes) that train on fewer nodes than they ask for.
        self.shrunk_jobs = Gauge(METRIC_SHRUNK_JOBS, "DreamboothJobs not finished whose elastic gang runs on fewer "
                                 "nodes than workers.nodes", registry=self.registry)
        self._shrunk: set[tuple[str, str]] = set()
        self._phases: dict[tuple[str, str], str] = {}
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(0)

    def set_phase(self, namespace: str, name: str, phase: str | None, shrunk: bool = False) -> None:
        """Record a job's phase (None: the job is gone) and whether its gang is shrunk, and
        recount the gauges."""
        key = (namespace, name)
        if phase is None:
            self._phases.pop(key, None)
        else:
            self._phases[key] = phase
        if shrunk and phase not in (None, *TERMINAL_PHASES):
            self._shrunk.add(key)
        else:
            self._shrunk.discard(key)
        self.shrunk_jobs.set(len(self._shrunk))
        counts = {p: 0 for p in PHASES}
        for value in self._phases.values():
            counts[value] = counts.get(value, 0) + 1
        for value, count in counts.items():
            self.jobs.labels(phase=value).set(count)
