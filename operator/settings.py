"""The operator's settings: read from the command line once (__main__.py), then fixed.

`OperatorConfig` is the whole process's, which the startup handler builds from;
`ReconcilerSettings` what every job's reconcile loop reads; `Timing` the delays and
timeouts of a job's life that lifecycle.decide applies.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import DEFAULT_SCRAPE_INTERVAL_SECONDS


@dataclass(frozen=True)
class Timing:
    """Operator settings that shape a job's life (set from the command line)."""

    backoff_base_seconds: float = 10.0
    backoff_max_seconds: float = 300.0
    pending_timeout_seconds: float = 300.0
    # How long a scheduled worker's container may be unable to start (image pull, missing
    # Secret) before the job fails: its pods hold their nodes' GPUs all that time. A worker
    # still creating its containers is reported this long after it was scheduled, and fails
    # the job this long after that (a large image's download looks the same).
    start_timeout_seconds: float = 600.0
    # How often a job with nothing to wait for is looked at again anyway.
    resync_seconds: float = 30.0
    # The same for a finished job: only a spec edit (which wakes it) can change it.
    finished_resync_seconds: float = 600.0

    def backoff(self, restarts: int) -> float:
        """Delay before the gang's restart number `restarts` (1, 2, ...): doubles each time."""
        return min(self.backoff_base_seconds * 2 ** max(restarts - 1, 0), self.backoff_max_seconds)


@dataclass(frozen=True)
class ReconcilerSettings:
    timing: Timing = Timing()
    # Progress is copied into status at most this often per job.
    scrape_interval_seconds: float = DEFAULT_SCRAPE_INTERVAL_SECONDS
    # Each job gets a NetworkPolicy admitting only its own workers (and metrics scrapes).
    # Off (a cluster whose admins manage policies themselves): the operator makes no
    # NetworkPolicy call at all, so it needs no right on them.
    network_policy: bool = True
    # How often the installed CRD is compared with the operator's spec again (crd_skew.py),
    # so a CRD applied after a warning clears it, without an operator restart.
    crd_recheck_seconds: float = 300.0


@dataclass(frozen=True)
class OperatorConfig:
    settings: ReconcilerSettings = ReconcilerSettings()
    http_host: str = "0.0.0.0"
    http_port: int = 8080  # 0: no /healthz and /metrics
    kubeconfig: str | None = None
