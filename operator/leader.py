"""Leader election on a coordination.k8s.io/v1 Lease, so that of several operators (the
replicas of one Deployment, a rolling update's overlap, a second install in the same
namespace) exactly one acts on jobs at a time; the others stand by.

The rules are client-go's (controller-runtime's): the leader renews the Lease every
retry period; a candidate takes it once it is free (released) or its holder has not
renewed it for leaseDurationSeconds; writes are replaces carrying the resourceVersion
that was read, so of two candidates racing for one expired Lease the API server lets
exactly one win (the other gets 409). A leader that cannot renew within the renew
deadline, or that sees another holder, must stop acting at once: running.py exits the
process, and the pod restarts as a standby.

Why not the `kubernetes` client's own `kubernetes.leaderelection`: it runs the election in
a blocking loop with the leader's work in a thread (kopf needs the event loop), builds its
Lease client from the global default configuration (not the operator's --kubeconfig),
makes its calls without a timeout (a hung renewal outlasts the renew deadline
unnoticed), cannot release the Lease on shutdown, and takes whole seconds only.

Why not kopf's peering (docs.kopf.dev/en/latest/peering): it is a guard, not an election.
Operators announce themselves in a KopfPeering object and the lower priority pauses; but
replicas of one Deployment share one priority, and then every operator warns and pauses,
so the cluster is left unserved. It also needs its own CRDs and cluster-wide rights.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .kube import KubeApi

logger = logging.getLogger(__name__)

LEASE_NAME = "dreambooth-operator-leader"
# The namespace of an in-cluster process's service account, where the downward API's
# POD_NAMESPACE is not set.
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class ElectionConfig:
    """Where the Lease is, who this process is, and client-go's timing (its defaults)."""

    namespace: str
    identity: str
    name: str = LEASE_NAME
    # A standby takes over a Lease not renewed for this long (whole seconds: the Lease's unit).
    lease_duration_seconds: int = 15
    # The leader stops (exits) when it could not renew for this long; shorter than the lease
    # duration, so it has stopped before any standby can take over.
    renew_deadline_seconds: float = 10.0
    # How often the leader renews and a standby looks.
    retry_period_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not self.retry_period_seconds > 0:
            raise ValueError(f"--leader-election-retry-period {self.retry_period_seconds}: must be above 0")
        if not self.renew_deadline_seconds > self.retry_period_seconds:
            raise ValueError(f"--leader-election-renew-deadline {self.renew_deadline_seconds}: must be longer than "
                             f"the retry period ({self.retry_period_seconds} s), or the leader gets no second try")
        if not self.lease_duration_seconds > self.renew_deadline_seconds:
            raise ValueError(f"--leader-election-lease-duration {self.lease_duration_seconds}: must be longer than "
                             f"the renew deadline ({self.renew_deadline_seconds} s), so that a leader that cannot "
                             "renew stops before a standby takes over")


def default_identity() -> str:
    """The pod's name (downward API POD_NAME, else the hostname, which is the pod's name
    in a pod) and a random suffix: a restarted process must never think it holds the
    Lease its previous life held."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def default_namespace() -> str | None:
    """The pod's own namespace: POD_NAMESPACE (downward API), else the service account's."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
    except OSError:
        return None


# --- the decision, as data ----------------------------------------------------------------

class Action(enum.Enum):
    CREATE = "create"    # there is no Lease yet
    ACQUIRE = "acquire"  # free (released) or expired: take it over
    RENEW = "renew"      # ours: keep it
    WAIT = "wait"        # another holder's, still valid


class Sighting(NamedTuple):
    """The Lease's record as this process last saw it, and when (its monotonic clock) that
    record first appeared. Expiry is judged on this process's own clock, from when the
    record last changed, not from the renewTime the holder wrote: the two pods' clocks
    may disagree by more than a lease duration (client-go does the same)."""

    record: tuple[Any, ...]
    since: float


class Decision(NamedTuple):
    action: Action
    seen: Sighting | None


def lease_record(lease: dict[str, Any]) -> tuple[Any, ...]:
    spec = lease.get("spec") or {}
    return (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("acquireTime"),
            spec.get("leaseDurationSeconds"), spec.get("leaseTransitions"))


def holder_of(lease: dict[str, Any] | None) -> str | None:
    return ((lease or {}).get("spec") or {}).get("holderIdentity") or None


def decide(lease: dict[str, Any] | None, me: str, now: float, seen: Sighting | None) -> Decision:
    """What candidate `me` does with `lease` (None: there is none) at monotonic time
    `now`, given what it saw before; the returned sighting is what to pass next time."""
    if lease is None:
        return Decision(Action.CREATE, None)
    record = lease_record(lease)
    if seen is None or seen.record != record:
        seen = Sighting(record, now)
    holder = holder_of(lease)
    if holder == me:
        return Decision(Action.RENEW, seen)
    if holder is None:
        return Decision(Action.ACQUIRE, seen)
    duration = (lease.get("spec") or {}).get("leaseDurationSeconds") or 0
    if now - seen.since >= duration:
        return Decision(Action.ACQUIRE, seen)
    return Decision(Action.WAIT, seen)


def micro_time(now: dt.datetime) -> str:
    """A Lease's MicroTime: RFC 3339 in UTC with microseconds."""
    return now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def written_lease(config: ElectionConfig, lease: dict[str, Any] | None, action: Action,
                  now: dt.datetime) -> dict[str, Any]:
    """The Lease `action` writes: a new one (CREATE), or `lease` with this process as the
    holder, keeping its metadata (its resourceVersion makes the replace conditional)."""
    spec = dict((lease or {}).get("spec") or {})
    stamp = micro_time(now)
    if action is not Action.RENEW:
        spec["acquireTime"] = stamp
        # client-go counts every change of holder, a release's empty one included.
        changed = lease is not None and holder_of(lease) != config.identity
        spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if changed else 0)
    spec.update(holderIdentity=config.identity, leaseDurationSeconds=config.lease_duration_seconds,
                renewTime=stamp)
    metadata = dict(lease["metadata"]) if lease else {"name": config.name, "namespace": config.namespace}
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}


def released_lease(lease: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    """The Lease a leader that stops writes (client-go's ReleaseOnCancel): no holder, so
    a standby takes it on its next look instead of after the lease duration."""
    spec = dict(lease.get("spec") or {}, holderIdentity=None, leaseDurationSeconds=1, renewTime=micro_time(now))
    return {**lease, "spec": spec}


# --- the calls -------------------------------------------------------------------------------

class LeadershipLost(Exception):
    """The leader could not renew in time, or another holder took the Lease."""


class LeaderElector:
    def __init__(self, api: KubeApi, config: ElectionConfig) -> None:
        self.api = api
        self.config = config
        self._seen: Sighting | None = None
        self._lease: dict[str, Any] | None = None  # as last read or written

    async def _try(self, *, leading: bool) -> Action | None:
        """One look at the Lease, and the write it calls for; the action decided, None when
        another candidate's write came first (409: the next look tells whose). A leader
        writes only to renew: a Lease no longer its own is lost, not to be taken back."""
        config = self.config
        lease = await self.api.get_lease(config.namespace, config.name)
        action, self._seen = decide(lease, config.identity, time.monotonic(), self._seen)
        self._lease = lease
        if action is Action.WAIT or (leading and action is not Action.RENEW):
            return action
        body = written_lease(config, lease, action, dt.datetime.now(dt.timezone.utc))
        written = await (self.api.create_lease(body) if action is Action.CREATE else self.api.replace_lease(body))
        if written is None:
            return None
        self._lease = written
        return action

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this process holds the Lease: True; False when `stop` came first."""
        config = self.config
        logger.info("Leader election: %s waits for Lease %s/%s", config.identity, config.namespace, config.name)
        announced = None
        while not stop.is_set():
            try:
                action = await asyncio.wait_for(self._try(leading=False), config.renew_deadline_seconds)
                if action not in (Action.WAIT, None):
                    logger.info("Leader election: %s leads (Lease %s/%s)", config.identity, config.namespace,
                                config.name)
                    return True
            except Exception as error:  # noqa: BLE001  (any failure is retried; the API may be down a while)
                logger.warning("Leader election: cannot read or write Lease %s/%s: %s", config.namespace,
                               config.name, error or type(error).__name__)
            holder = holder_of(self._lease)
            if holder != announced:
                logger.info("Leader election: %s leads; standing by", holder)
                announced = holder
            await wait_or_stop(stop, config.retry_period_seconds)
        return False

    async def keep_renewing(self) -> None:
        """Renew every retry period; raise LeadershipLost when the Lease is seen to be not
        ours or no renewal succeeded for the renew deadline. Never returns otherwise."""
        config = self.config
        # Counted from when the last successful renewal was sent, which is before the API
        # server wrote it and so before any standby saw it: the leader stops before a
        # standby's lease duration, counted from its sighting, can run out.
        renewed_at = time.monotonic()
        while True:
            left = renewed_at + config.renew_deadline_seconds - time.monotonic()
            await asyncio.sleep(max(min(config.retry_period_seconds, left), 0))
            sent_at = time.monotonic()
            left = renewed_at + config.renew_deadline_seconds - sent_at
            action = None
            try:
                # Bounded by the deadline: a call the API server never answers is a failed renewal.
                action = await asyncio.wait_for(self._try(leading=True), max(left, 0.001))
            except Exception as error:  # noqa: BLE001  (every failure counts against the deadline)
                reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            else:
                reason = "another write came first (409)"
            if action is Action.RENEW:
                renewed_at = sent_at
                continue
            if action is not None:  # read fine, but no longer ours
                raise LeadershipLost(f"the Lease is held by {holder_of(self._lease) or 'nobody'}")
            if time.monotonic() - renewed_at >= config.renew_deadline_seconds:
                raise LeadershipLost(f"not renewed for {config.renew_deadline_seconds:g} s: {reason}")
            logger.warning("Leader election: renewal failed (%s); retrying until the renew deadline", reason)

    async def release(self) -> None:
        """Give the Lease up (on a clean shutdown), if it is still ours; errors only logged:
        a standby then takes over after the lease duration instead."""
        config = self.config
        try:
            lease = await asyncio.wait_for(self.api.get_lease(config.namespace, config.name),
                                           config.renew_deadline_seconds)
            if lease is None or holder_of(lease) != config.identity:
                return
            body = released_lease(lease, dt.datetime.now(dt.timezone.utc))
            if await asyncio.wait_for(self.api.replace_lease(body), config.renew_deadline_seconds) is not None:
                logger.info("Leader election: %s released Lease %s/%s", config.identity, config.namespace,
                            config.name)
        except Exception as error:  # noqa: BLE001  (shutting down either way)
            logger.warning("Leader election: could not release Lease %s/%s: %s", config.namespace, config.name,
                           error or type(error).__name__)


def elector_for(configuration: Any, election: ElectionConfig) -> LeaderElector:
    """An elector with a client of its own: a renewal must never queue behind the jobs'
    calls in their thread pool; and its calls time out after the renew deadline, not
    kube.py's 30 s, so that a hung one frees its thread soon after the elector gave up on it."""
    seconds = election.renew_deadline_seconds
    return LeaderElector(KubeApi(configuration, request_timeout=(seconds, seconds)), election)


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass

