"""Carries out plans: read a job and its pods, `decide`, then write what was decided.

One reconcile loop runs per job (a kopf daemon), so a job's steps never race each
other; pod events only wake it up early. The rules of a job's life are pure and live
in lifecycle.py (`decide`), plan.py and troubles.py. Checked here, before a gang is
created, are only the rules that need answers from the API server: inputs.py's checks
of the photos and claims, and job_children.py's dry run of the children and its check
of children's names that are someone else's. What they refuse fails the job as an
invalid spec (`_reject`), as a spec the models refuse does. job_children.py also
creates the children a gang needs and deletes them with the job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from . import constants as c
from .children import build_config_map, output_status
from .clock import timestamp, utc_now
from .crd_skew import check_installed_crd, kept_by_the_crd, outdated_crd_message
from .inputs import InputCheck, check_inputs
from .job_children import JobChildren
from .kube import Forbidden, KubeApi
from .lifecycle import created_status, decide, failed_create_status, gang_of, invalid_spec_status
from .metadata import job_selector, worker_name
from .opmetrics import ERROR_FORBIDDEN, ERROR_OTHER, RESTART_FAILURE, RESTART_PREEMPTION, OperatorMetrics
from .plan import Plan
from .pods import build_standby_pod, build_worker_pod
from .podstates import pod_name
from .scrape import metrics_url, progress_status, scrape, scrape_session
from .settings import ReconcilerSettings
from .spec import InvalidSpecError, Job
from .trainer_config import job_checkpoint_dir

log = logging.getLogger(__name__)

# A pass makes a few API calls, each cut at kube.REQUEST_TIMEOUT, and one scrape.
STUCK_PASS_SECONDS = 600.0


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning `old` into `new` (null removes a key)."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            nested = merge_patch(before, value)
            if nested:
                patch[key] = nested
        elif before != value:
            patch[key] = value
    return patch


def _failed_for_invalid_spec(status: dict[str, Any]) -> bool:
    return any(cond.get("type") == c.CONDITION_FAILED and cond.get("status") == "True"
               and cond.get("reason") == c.REASON_INVALID_SPEC for cond in status.get("conditions") or [])


class Wakeups:
    """One asyncio.Event per job: pod and job events set it to cut a wait short."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], asyncio.Event] = {}
        self._markers: dict[tuple[str, str], Any] = {}

    def get(self, namespace: str, name: str) -> asyncio.Event:
        """The job's Event; only its loop makes one (and forgets it when it ends)."""
        return self._events.setdefault((namespace, name), asyncio.Event())

    def poke(self, namespace: str, name: str) -> None:
        # A job without a loop has nothing to wake: its pods' and its own deletion
        # events arrive after the loop ended, and would otherwise keep an entry forever.
        event = self._events.get((namespace, name))
        if event is not None:
            event.set()

    def poke_if_changed(self, namespace: str, name: str, marker: Any) -> None:
        """Poke only when `marker` differs from the last one seen for this job (or is
        unknown: an API without generations pokes every time)."""
        key = (namespace, name)
        if key not in self._events:  # no loop (yet, or any more); a new loop reconciles at once anyway
            return
        if marker is None or marker[0] is None or self._markers.get(key) != marker:
            self._markers[key] = marker
            self.poke(namespace, name)

    def __len__(self) -> int:
        return len(self._events) + len(self._markers)

    def forget(self, namespace: str, name: str) -> None:
        self._events.pop((namespace, name), None)
        self._markers.pop((namespace, name), None)


@dataclass
class Reconciler:
    api: KubeApi
    metrics: OperatorMetrics
    settings: ReconcilerSettings = ReconcilerSettings()
    wakeups: Wakeups = field(default_factory=Wakeups)
    _last_scrape: dict[tuple[str, str], float] = field(default_factory=dict)
    _http: aiohttp.ClientSession | None = None
    # When each job's pass in progress began (time.monotonic()).
    _passes: dict[tuple[str, str], float] = field(default_factory=dict)
    # Jobs whose loop has seen to the NetworkPolicy of a gang that was there before it.
    _policy_checked: set[tuple[str, str]] = field(default_factory=set)
    # The fields the installed CRD lacks (crd_skew.py); each job's loop says so once, on
    # the job, where `kubectl describe` shows it.
    crd_lacks: list[str] = field(default_factory=list)
    _crd_warned: set[tuple[str, str]] = field(default_factory=set)
    _crd_checked_at: float | None = None  # time.monotonic()
    _crd_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _children: JobChildren = field(init=False)

    def __post_init__(self) -> None:
        self._children = JobChildren(self.api, network_policy=self.settings.network_policy)

    async def run(self, namespace: str, name: str, stopped: Any) -> None:
        """The job's loop: reconcile, then sleep until woken or the plan's next check."""
        wake = self.wakeups.get(namespace, name)
        try:
            while not stopped:
                wake.clear()
                try:
                    delay = await self.reconcile(namespace, name)
                except asyncio.CancelledError:
                    raise
                except Forbidden as error:  # fixed by a person (RBAC, a policy), not by retrying at once
                    self.metrics.reconcile_errors.labels(reason=ERROR_FORBIDDEN).inc()
                    await self._report_forbidden_pass(namespace, name, str(error))
                    delay = self.settings.timing.resync_seconds
                except Exception:  # one bad pass must not end the job's loop
                    self.metrics.reconcile_errors.labels(reason=ERROR_OTHER).inc()
                    log.exception("reconcile of %s/%s failed; retrying", namespace, name)
                    delay = 2.0
                if delay is None:
                    return
                try:
                    await asyncio.wait_for(wake.wait(), timeout=delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            self.wakeups.forget(namespace, name)
            self._last_scrape.pop((namespace, name), None)
            self._policy_checked.discard((namespace, name))
            self._crd_warned.discard((namespace, name))

    async def check_crd(self) -> None:
        """Compare the installed CRD with the spec model (crd_skew.py); a verdict that
        changed (the CRD applied, or an older one) is told to every job again."""
        missing = await check_installed_crd(self.api, self.metrics)
        self._crd_checked_at = time.monotonic()
        if missing != self.crd_lacks:
            self._crd_warned.clear()
            if not missing:
                log.info("the installed CustomResourceDefinition now has every field this operator uses")
        self.crd_lacks = missing

    async def _recheck_crd_if_due(self) -> None:
        if self._crd_lock.locked():  # another job's loop is checking: this pass need not wait for it
            return
        async with self._crd_lock:  # once for all the job loops that find it due
            checked = self._crd_checked_at
            if checked is None or time.monotonic() - checked >= self.settings.crd_recheck_seconds:
                await self.check_crd()

    async def reconcile(self, namespace: str, name: str) -> float | None:
        """One pass; returns seconds until the next one, None when the job is gone."""
        started = time.perf_counter()
        self._passes[namespace, name] = time.monotonic()
        try:
            return await self._reconcile(namespace, name)
        finally:
            self._passes.pop((namespace, name), None)
            self.metrics.reconcile_seconds.observe(time.perf_counter() - started)

    def stuck_jobs(self) -> list[str]:
        """Jobs whose pass has run for longer than any pass of timed calls can."""
        now = time.monotonic()
        return [f"{namespace}/{name}" for (namespace, name), started in list(self._passes.items())
                if now - started > STUCK_PASS_SECONDS]

    async def _reconcile(self, namespace: str, name: str) -> float | None:
        body = await self.api.get_job(namespace, name)
        if body is None:
            self.metrics.set_phase(namespace, name, None)
            return None
        if body["metadata"].get("deletionTimestamp"):
            # The delete handler cleans up too; doing it here as well catches a pod this
            # loop created while that handler was already deleting.
            await self.cleanup(namespace, name, body)
            return None
        await self._recheck_crd_if_due()
        if self.crd_lacks and (namespace, name) not in self._crd_warned:
            self._crd_warned.add((namespace, name))
            await self.api.post_event(body, "Warning", c.REASON_OUTDATED_CRD, outdated_crd_message(self.crd_lacks))
        status = dict(body.get("status") or {})
        try:
            job = Job.from_body(body)
            config_map = build_config_map(job, scrape_interval_seconds=self.settings.scrape_interval_seconds)
        except InvalidSpecError as error:
            await self._reject(body, status, str(error))
            return self.settings.timing.resync_seconds
        if _failed_for_invalid_spec(status):
            # The spec was fixed: start over as a new job.
            status = {}

        pods = await self.api.list("Pod", namespace, job_selector(name))  # workers and standby pods
        if pods and self.settings.network_policy and (namespace, name) not in self._policy_checked:
            self._policy_checked.add((namespace, name))  # once per loop
            await self._children.protect_existing_gang(job)
        plan = decide(job.spec, status, pods, utc_now(), self.settings.timing)
        inputs = InputCheck()
        if plan.create:
            try:
                inputs = await check_inputs(self.api, job)
                inputs.problem = inputs.problem or await self._children.refused(job, plan.create[0])
            except Forbidden as error:  # a read the operator's RBAC lacks: as a forbidden create
                # The plan is not written: the next pass makes it again, with its Events.
                written = body.get("status") or {}
                await self._report_forbidden(body, written, written, str(error))
                return self.settings.timing.resync_seconds
        if inputs.problem is not None:
            await self._reject(body, dict(body.get("status") or {}), inputs.problem)
            return self.settings.timing.resync_seconds
        if plan.status.get("phase") == c.PHASE_SUCCEEDED:
            plan.status["output"] = output_status(job)
        _observe_generation(plan.status, body)
        await self._write_status(namespace, name, body.get("status") or {}, plan.status)
        self.metrics.set_phase(namespace, name, plan.status.get("phase"), shrunk="gangNodes" in plan.status)
        for type_, reason, message in plan.events:
            await self.api.post_event(body, type_, reason, message)
        if not pods:
            # Once per gang start, not again at each retry of a creation the API refused.
            for reason, message in inputs.warnings:
                await self.api.post_event(body, "Warning", reason, message)
        if plan.counted_restart:
            self.metrics.restarts.labels(reason=RESTART_FAILURE).inc()
        elif plan.resize is not None:
            self.metrics.restarts.labels(reason=plan.resize).inc()
        elif plan.gang != gang_of(status):
            self.metrics.restarts.labels(reason=RESTART_PREEMPTION).inc()
        for pod in plan.delete:
            await self.api.delete("Pod", namespace, pod)
        if plan.delete_job:
            log.info("DreamboothJob %s/%s finished more than runPolicy.ttlSecondsAfterFinished = %s s ago; deleting it",
                     namespace, name, job.spec.run_policy.ttl_seconds_after_finished)
            await self.api.delete_job(namespace, name)
            return 1.0  # the next pass finds it being deleted, or gone
        if plan.create:
            await self._create_gang(body, job, config_map, plan)
        await self._create_standby(job, config_map, plan)

        delay = plan.requeue_after or self.settings.timing.resync_seconds
        if plan.status.get("phase") == c.PHASE_RUNNING:
            # Whether and where is worker-0's, as it was made: an edit of metrics.port
            # (to another port, or 0) reaches the next gang, not the running one.
            worker0 = next((p for p in pods if pod_name(p) == worker_name(job.name, 0)), None)
            url = metrics_url(worker0)
            if url is not None:
                delay = min(delay, await self._maybe_scrape(job, plan.status, url))
        return delay

    async def _reject(self, body: dict[str, Any], status: dict[str, Any], message: str) -> None:
        meta = body["metadata"]
        if _failed_for_invalid_spec(status) and status.get("observedGeneration") == meta.get("generation") and any(
                cond.get("message") == message for cond in status.get("conditions") or []):
            return  # already reported, for this spec
        log.warning("DreamboothJob %s/%s has an invalid spec: %s", meta["namespace"], meta["name"], message)
        new = invalid_spec_status(status, message, utc_now())
        _observe_generation(new, body)
        await self._write_status(meta["namespace"], meta["name"], status, new)
        self.metrics.set_phase(meta["namespace"], meta["name"], c.PHASE_FAILED)
        await self.api.post_event(body, "Warning", c.REASON_INVALID_SPEC, message)
        # Workers of an earlier, valid spec must not go on with a spec nobody can read.
        for pod in await self.api.list("Pod", meta["namespace"], job_selector(meta["name"])):
            await self.api.delete("Pod", meta["namespace"], pod_name(pod))

    async def _create_gang(self, body: dict[str, Any], job: Job, config_map: dict[str, Any], plan: Plan) -> None:
        """Create the children and the missing workers; a 403 (a quota, a policy, RBAC) is
        reported in condition Created and a Warning Event, and tried again next pass."""
        config, status = config_map_hash(config_map), plan.status
        try:
            warnings = await self._children.create(job, config_map)
            for index in plan.create:
                if await self.api.create(build_worker_pod(job, index, plan.gang, config, plan.nodes)):
                    self.metrics.pods_created.inc()
        except Forbidden as error:
            await self._report_forbidden(body, status, status, str(error))
            return
        for reason, message in warnings:
            await self.api.post_event(body, "Warning", reason, message)
        await self._write_status(job.namespace, job.name, status,
                                 created_status(status, plan.nodes, utc_now()))

    async def _create_standby(self, job: Job, config_map: dict[str, Any], plan: Plan) -> None:
        """The standby pods of a shrunk gang (lifecycle._keep_standby). One a quota forbids
        would forbid its worker too: the gang stays as it is, and the next pass tries again."""
        for index in plan.create_standby:
            try:
                await self.api.create(build_standby_pod(job, index, plan.gang, config_map_hash(config_map)))
            except Forbidden as error:
                log.info("DreamboothJob %s/%s: standby pod %d forbidden: %s", job.namespace, job.name, index, error)

    async def _report_forbidden(self, body: dict[str, Any], written: dict[str, Any], status: dict[str, Any],
                                message: str) -> None:
        """`status` (the job's `written` one brought up to date) with condition Created False,
        reason FailedCreate, and a Warning Event per new message; the next pass tries again
        (a quota can grow, RBAC be fixed)."""
        before = next((cond for cond in written.get("conditions") or [] if cond.get("type") == c.CONDITION_CREATED), {})
        if (before.get("reason"), before.get("message")) != (c.REASON_FAILED_CREATE, message):
            await self.api.post_event(body, "Warning", c.REASON_FAILED_CREATE, message)
        meta = body["metadata"]
        await self._write_status(meta["namespace"], meta["name"], written, failed_create_status(status, message, utc_now()))

    async def _report_forbidden_pass(self, namespace: str, name: str, message: str) -> None:
        """A pass the API server stopped with a 403 where no condition is about it (the
        pods' list, a delete, the job's status): logged, and a Warning Event on the job,
        one per message (a repeat is counted), where `kubectl describe dbj` shows it."""
        retry = self.settings.timing.resync_seconds
        log.warning("reconcile of %s/%s: a call is forbidden: %s; retrying every %s s", namespace, name, message, retry)
        try:
            body = await self.api.get_job(namespace, name)
            if body is not None:
                await self.api.post_event(body, "Warning", c.REASON_FORBIDDEN, (
                    f"the operator cannot act on this job: {message}. The operator's RBAC (the chart of its version, "
                    f"or manifests/install.yaml) or an admission policy forbids it; it tries again every {retry:g} s"))
        except Exception as error:  # noqa: BLE001  (its read, or the Event, is forbidden too: the log above says it)
            log.warning("cannot put that on DreamboothJob %s/%s: %s", namespace, name, error)

    async def _write_status(self, namespace: str, name: str, old: dict[str, Any], new: dict[str, Any]) -> None:
        # `old` is as stored: it has none of what the CRD lacks.
        patch = merge_patch(old, kept_by_the_crd(new, self.crd_lacks))
        if patch:
            await self.api.patch_job_status(namespace, name, patch)

    async def _maybe_scrape(self, job: Job, status: dict[str, Any], url: str) -> float:
        key = (job.namespace, job.name)
        interval = self.settings.scrape_interval_seconds
        waited = time.monotonic() - self._last_scrape.get(key, 0.0)
        if waited < interval:
            return interval - waited
        self._last_scrape[key] = time.monotonic()
        if self._http is None:
            self._http = scrape_session()
        values = await scrape(self._http, url)
        if values:
            fields = progress_status(values, status, job_checkpoint_dir(job.name), timestamp(utc_now()))
            if fields:
                await self.api.patch_job_status(job.namespace, job.name, fields)
        return interval

    async def cleanup(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        """Delete everything made for a job (job_children.py)."""
        await self._children.delete(namespace, name, body)
        self.metrics.set_phase(namespace, name, None)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()


def _observe_generation(status: dict[str, Any], body: dict[str, Any]) -> None:
    """Say which spec the status was decided from (Kubernetes' convention, which
    `kubectl wait`, Argo CD and Flux read to tell a status from before an edit)."""
    generation = body["metadata"].get("generation")
    if generation is not None:
        status["observedGeneration"] = int(generation)


def config_map_hash(config_map: dict[str, Any]) -> str:
    """The rendered config's hash, which the pods that mount it carry."""
    return config_map["metadata"]["annotations"][c.ANNOTATION_CONFIG_HASH]
