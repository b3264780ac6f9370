"""Carries out plans: read a job and its pods, `decide`, then write what was decided.

One reconcile loop runs per job (a kopf daemon), so a job's steps never race each
other; pod events only wake it up early. The rules of a job's life are pure and live
in lifecycle.py (`decide`), plan.py and troubles.py. Checked here are only the rules
that need answers from the API server: inputs.py's checks of the photos and claims, a
dry run of the children (`_refused_children`) and children's names that are someone
else's (`_names_taken`). What they refuse fails the job as an invalid spec (`_reject`),
as a spec the models refuse does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from . import constants as c
from .children import (build_claim, build_config_map, build_network_policy, build_service, differs_where_built,
                       output_status)
from .clock import timestamp, utc_now
from .inputs import InputCheck, check_inputs
from .kube import CreateForbidden, KubeApi
from .lifecycle import created_status, decide, failed_create_status, gang_of, invalid_spec_status
from .metadata import created_claim_name, job_selector, named_children, owner_uids, worker_name, worker_selector
from .opmetrics import RESTART_FAILURE, RESTART_PREEMPTION, OperatorMetrics
from .pods import build_pod_group, build_worker_pod
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
                except Exception:  # one bad pass must not end the job's loop
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

        pods = await self.api.list("Pod", namespace, worker_selector(name))
        if pods and self.settings.network_policy and (namespace, name) not in self._policy_checked:
            await self._protect_existing_gang(job)
        plan = decide(job.spec, status, pods, utc_now(), self.settings.timing)
        inputs = InputCheck()
        if plan.create:
            inputs = await check_inputs(self.api, job)
            inputs.problem = inputs.problem or await self._refused_children(job, plan.create[0])
        if inputs.problem is not None:
            await self._reject(body, dict(body.get("status") or {}), inputs.problem)
            return self.settings.timing.resync_seconds
        if plan.status.get("phase") == c.PHASE_SUCCEEDED:
            plan.status["output"] = output_status(job)
        _observe_generation(plan.status, body)
        await self._write_status(namespace, name, body.get("status") or {}, plan.status)
        self.metrics.set_phase(namespace, name, plan.status.get("phase"))
        for type_, reason, message in plan.events:
            await self.api.post_event(body, type_, reason, message)
        if not pods:
            # Once per gang start, not again at each retry of a creation the API refused.
            for reason, message in inputs.warnings:
                await self.api.post_event(body, "Warning", reason, message)
        if plan.counted_restart:
            self.metrics.restarts.labels(reason=RESTART_FAILURE).inc()
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
            await self._create_gang(body, job, config_map, plan.create, plan.gang, plan.status)

        delay = plan.requeue_after or self.settings.timing.resync_seconds
        if plan.status.get("phase") == c.PHASE_RUNNING and job.spec.metrics.port:
            delay = min(delay, await self._maybe_scrape(job, plan.status, pods))
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
        for pod in await self.api.list("Pod", meta["namespace"], worker_selector(meta["name"])):
            await self.api.delete("Pod", meta["namespace"], pod_name(pod))

    async def _create_gang(self, body: dict[str, Any], job: Job, config_map: dict[str, Any], indices: list[int],
                           gang: int, status: dict[str, Any]) -> None:
        """Create the children and the missing workers; a 403 (a quota, a policy) is
        reported in condition Created and a Warning Event, and tried again next pass."""
        config = config_map["metadata"]["annotations"][c.ANNOTATION_CONFIG_HASH]
        try:
            await self._create_children(job, config_map)
            for index in indices:
                if await self.api.create(build_worker_pod(job, index, gang, config)):
                    self.metrics.pods_created.inc()
        except CreateForbidden as error:
            message = str(error)
            before = next((cond for cond in status.get("conditions") or []
                           if cond.get("type") == c.CONDITION_CREATED), {})
            if (before.get("reason"), before.get("message")) != (c.REASON_FAILED_CREATE, message):
                await self.api.post_event(body, "Warning", c.REASON_FAILED_CREATE, message)
            await self._write_status(job.namespace, job.name, status, failed_create_status(status, message, utc_now()))
            return
        await self._write_status(job.namespace, job.name, status,
                                 created_status(status, job.spec.workers.nodes, utc_now()))

    async def _refused_children(self, job: Job, index: int) -> str | None:
        """What the API server says against the children this pass would create (Service,
        NetworkPolicy, claim, PodGroup, a worker pod), asked in a dry run before anything
        is written: spec.workers passes
        volumes, tolerations, env and resources through as they are, and a malformed one
        must fail the job with the server's words, not fail every pass in the log."""
        taken = await self._names_taken(job)
        if taken is not None:
            return taken
        fixes = {"Pod": "fix the spec field it comes from (a pod's spec.* from spec.workers)",
                 "PersistentVolumeClaim": "fix spec.storage",
                 "PodGroup": "install that scheduler, or remove spec.runPolicy.gangScheduling",
                 "Service": "fix spec.metrics.port", "NetworkPolicy": "fix spec.metrics.port"}
        children = [build_service(job), build_network_policy(job) if self.settings.network_policy else None,
                    build_claim(job), build_pod_group(job), build_worker_pod(job, index, 0, "dry-run")]
        for child in filter(None, children):
            message = await self.api.refusal(child)
            if message is not None:
                return (f"the API server refuses the {child['kind']} {child['metadata']['name']!r} made from this "
                        f"spec: {message}; {fixes[child['kind']]}")
        return None

    async def _names_taken(self, job: Job) -> str | None:
        """A Service, ConfigMap or NetworkPolicy under a name the job's children need that
        is not this job's: someone else's is refused (taking it over would also delete it
        with the job); one an earlier job of the same name left behind (its garbage
        collection may lag) is deleted now, or the new workers would lose it when it is
        collected."""
        for kind, name, use in named_children(job.name, network_policy=self.settings.network_policy):
            existing = await self.api.get(kind, job.namespace, name)
            if existing is None or job.uid in owner_uids(existing):
                continue
            if owner_uids(existing):
                await self.api.delete(kind, job.namespace, name)
                continue
            return _not_the_jobs(kind, name, job.namespace, use)
        if job.spec.storage.creates_claim:
            # A claim of the name an earlier job of this name made (kept by storage.retain)
            # is the job's to resume from; anyone else's would get its checkpoints.
            name = created_claim_name(job.name)
            existing = await self.api.get("PersistentVolumeClaim", job.namespace, name)
            if existing is not None and (existing["metadata"].get("labels") or {}).get(c.LABEL_JOB) != job.name:
                return _not_the_jobs("PersistentVolumeClaim", name, job.namespace, "its checkpoints and output")
        return None

    async def _protect_existing_gang(self, job: Job) -> None:
        """A gang already there when this loop started (an operator upgraded or restarted
        with the setting on) gets the NetworkPolicy it may lack, once per loop; new gangs
        get it with their other children."""
        self._policy_checked.add((job.namespace, job.name))
        try:
            await self.api.create(build_network_policy(job))
        except CreateForbidden as error:  # the gang runs anyway; the next gang start reports it
            log.warning("DreamboothJob %s/%s: cannot create its NetworkPolicy: %s", job.namespace, job.name, error)

    async def _write_status(self, namespace: str, name: str, old: dict[str, Any], new: dict[str, Any]) -> None:
        patch = merge_patch(old, new)
        if patch:
            await self.api.patch_job_status(namespace, name, patch)

    async def _create_children(self, job: Job, config_map: dict[str, Any]) -> None:
        """Everything the workers need, created if absent; the config, Service, NetworkPolicy
        and PodGroup are brought up to the job's current spec, so a new gang runs it."""
        if not await self.api.create(config_map):
            await self.api.replace_config_map(config_map)
        await self._create_or_update(job, build_service(job))
        if self.settings.network_policy:  # before the workers, which listen from their start
            await self._create_or_update(job, build_network_policy(job))
        claim = build_claim(job)
        if claim is not None:
            await self.api.create(claim)
        pod_group = build_pod_group(job)
        if pod_group is not None and not await self.api.create(pod_group):
            await self.api.replace_spec(pod_group)  # minMember follows workers.nodes

    async def _create_or_update(self, job: Job, child: dict[str, Any]) -> None:
        """Create `child`; the job's own one of its name gets the spec built now where that
        differs (the Service and NetworkPolicy name the metrics port the new gang listens
        on). Someone else's is never touched: `_names_taken` has refused the job for it."""
        if await self.api.create(child):
            return
        live = await self.api.get(child["kind"], job.namespace, child["metadata"]["name"])
        if live is not None and job.uid in owner_uids(live) and differs_where_built(child["spec"], live.get("spec")):
            await self.api.replace_spec(child)

    async def _maybe_scrape(self, job: Job, status: dict[str, Any], pods: list[dict[str, Any]]) -> float:
        key = (job.namespace, job.name)
        interval = self.settings.scrape_interval_seconds
        waited = time.monotonic() - self._last_scrape.get(key, 0.0)
        if waited < interval:
            return interval - waited
        self._last_scrape[key] = time.monotonic()
        worker0 = next((p for p in pods if pod_name(p) == worker_name(job.name, 0)), None)
        if self._http is None:
            self._http = scrape_session()
        url = metrics_url(worker0)
        values = await scrape(self._http, url) if url is not None else None
        if values:
            fields = progress_status(values, status, job_checkpoint_dir(job.name), timestamp(utc_now()))
            if fields:
                await self.api.patch_job_status(job.namespace, job.name, fields)
        return interval

    async def cleanup(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        """Delete everything made for a job. A cluster's garbage collector would do it
        through ownerReferences too; doing it here also works where none runs."""
        selector = job_selector(name)
        for pod in await self.api.list("Pod", namespace, selector):
            await self.api.delete("Pod", namespace, pod_name(pod))
        uid = body["metadata"].get("uid")
        for kind, child, _ in named_children(name, network_policy=self.settings.network_policy):
            existing = await self.api.get(kind, namespace, child)
            if existing is not None and uid in owner_uids(existing):  # never someone else's of that name
                await self.api.delete(kind, namespace, child)
        pod_group = _pod_group_of(body)
        if pod_group is not None:
            await self.api.delete_custom(pod_group)
        storage = ((body.get("spec") or {}).get("storage") or {})
        if "size" in storage and storage.get("retain") is False:
            # Only a claim this job made (and owns): one of that name that was there
            # before it (an earlier job's retained checkpoints) is not its to delete.
            claim = await self.api.get("PersistentVolumeClaim", namespace, created_claim_name(name))
            if claim is not None and uid in owner_uids(claim):
                await self.api.delete("PersistentVolumeClaim", namespace, created_claim_name(name))
        self.metrics.set_phase(namespace, name, None)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()


def _not_the_jobs(kind: str, name: str, namespace: str, use: str) -> str:
    return (f"a {kind} named {name!r} already exists in namespace {namespace} and is not this job's; "
            f"the job needs that name for {use}: delete that {kind}, or recreate the job under another name")


def _observe_generation(status: dict[str, Any], body: dict[str, Any]) -> None:
    """Say which spec the status was decided from (Kubernetes' convention, which
    `kubectl wait`, Argo CD and Flux read to tell a status from before an edit)."""
    generation = body["metadata"].get("generation")
    if generation is not None:
        status["observedGeneration"] = int(generation)


def _pod_group_of(body: dict[str, Any]) -> dict[str, Any] | None:
    """The PodGroup a job's spec asks for, if it is still readable; a spec no longer is
    leaves its PodGroup to the garbage collector (it has an ownerReference)."""
    try:
        return build_pod_group(Job.from_body(body))
    except InvalidSpecError:
        return None
