"""A job's children in the API server: checked before a gang starts, created or brought
up to the spec for it, deleted with the job.

The reconciler (reconciler.py) decides when; this module knows which objects a job
owns and how to ask the API server about them. The checks are the rules that need the
server's answers: a dry run of every child a gang start would create (`refused`), and
children's names that are someone else's (`names_taken`). What they find is a message
for the job's InvalidSpec condition, or None.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kubernetes.client import ApiException

from . import constants as c
from .children import build_claim, build_network_policy, build_service, claim_resize, differs_where_built
from .kube import Forbidden, KubeApi, api_message
from .metadata import created_claim_name, job_selector, named_children, owner_uids
from .pods import build_pod_group, build_worker_pod
from .podstates import pod_name
from .spec import InvalidSpecError, Job

log = logging.getLogger(__name__)

# What to change when the server refuses a child made from the spec, by the child's kind.
_FIXES = {"Pod": "fix the spec field it comes from (a pod's spec.* from spec.workers)",
          "PersistentVolumeClaim": "fix spec.storage",
          "PodGroup": "install that scheduler, or remove spec.runPolicy.gangScheduling",
          "Service": "fix spec.metrics.port", "NetworkPolicy": "fix spec.metrics.port"}


@dataclass(frozen=True)
class JobChildren:
    api: KubeApi
    # The operator's --no-network-policy turns this off: then no NetworkPolicy call at all.
    network_policy: bool = True

    async def refused(self, job: Job, index: int) -> str | None:
        """What the API server says against the children this pass would create (Service,
        NetworkPolicy, claim, PodGroup, a worker pod), asked in a dry run before anything
        is written: spec.workers passes
        volumes, tolerations, env and resources through as they are, and a malformed one
        must fail the job with the server's words, not fail every pass in the log."""
        taken = await self.names_taken(job)
        if taken is not None:
            return taken
        children = [build_service(job), build_network_policy(job) if self.network_policy else None,
                    build_claim(job), build_pod_group(job), build_worker_pod(job, index, 0, "dry-run")]
        for child in filter(None, children):
            message = await self.api.refusal(child)
            if message is not None:
                return (f"the API server refuses the {child['kind']} {child['metadata']['name']!r} made from this "
                        f"spec: {message}; {_FIXES[child['kind']]}")
        return None

    async def names_taken(self, job: Job) -> str | None:
        """A Service, ConfigMap, NetworkPolicy or PodGroup under a name the job's children need that
        is not this job's: someone else's is refused (taking it over would also delete it
        with the job); one an earlier job of the same name left behind (its garbage
        collection may lag) is deleted now, or the new workers would lose it when it is
        collected."""
        for kind, name, use in named_children(job.name, network_policy=self.network_policy):
            existing = await self.api.get(kind, job.namespace, name)
            if _left_by_an_earlier_job(job, existing):
                await self.api.delete(kind, job.namespace, name)
            elif _someone_elses(job, existing):
                return _not_the_jobs(kind, name, job.namespace, use)
        pod_group = build_pod_group(job)
        if pod_group is not None:
            # The scheduler places the workers by it: someone else's would gate them on its
            # minMember, and resizing or deleting it with the job would break their pods.
            existing = await self.api.get_live(pod_group)
            if _left_by_an_earlier_job(job, existing):
                await self.api.delete_custom(pod_group)
            elif _someone_elses(job, existing):
                return _not_the_jobs(pod_group["kind"], pod_group["metadata"]["name"], job.namespace,
                                     "the PodGroup that schedules its workers together")
        if job.spec.storage.creates_claim:
            # A claim of the name an earlier job of this name made (kept by storage.retain)
            # is the job's to resume from; anyone else's would get its checkpoints.
            name = created_claim_name(job.name)
            existing = await self.api.get("PersistentVolumeClaim", job.namespace, name)
            if existing is not None and (existing["metadata"].get("labels") or {}).get(c.LABEL_JOB) != job.name:
                return _not_the_jobs("PersistentVolumeClaim", name, job.namespace, "its checkpoints and output")
        return None

    async def protect_existing_gang(self, job: Job) -> None:
        """A gang already there when the job's loop started (an operator upgraded or
        restarted with the setting on) gets the NetworkPolicy it may lack; new gangs get
        it with their other children."""
        try:
            await self.api.create(build_network_policy(job))
        except Forbidden as error:  # the gang runs anyway; the next gang start reports it
            log.warning("DreamboothJob %s/%s: cannot create its NetworkPolicy: %s", job.namespace, job.name, error)

    async def create(self, job: Job, config_map: dict[str, Any]) -> list[tuple[str, str]]:
        """Everything the workers need, created if absent; the config, Service, NetworkPolicy
        and PodGroup are brought up to the job's current spec, so a new gang runs it, and
        the created claim grows to an edited storage.size. Returns Warnings (reason,
        message) about what could not follow the spec but need not stop the gang."""
        if not await self.api.create(config_map):
            await self.api.replace_config_map(config_map)
        await self._create_or_update(job, build_service(job))
        if self.network_policy:  # before the workers, which listen from their start
            await self._create_or_update(job, build_network_policy(job))
        warnings = []
        claim = build_claim(job)
        if claim is not None and not await self.api.create(claim):
            warnings += await self._resize_claim(job)
        pod_group = build_pod_group(job)
        if pod_group is not None:
            await self._create_or_update(job, pod_group)  # minMember follows workers.nodes (or minNodes)
        return warnings

    async def _resize_claim(self, job: Job) -> list[tuple[str, str]]:
        name = created_claim_name(job.name)
        live = await self.api.get("PersistentVolumeClaim", job.namespace, name)
        grow_to, refused = claim_resize(job, live) if live is not None else (None, None)
        if grow_to is not None:
            try:
                await self.api.resize_claim(job.namespace, name, grow_to)
            except (Forbidden, ApiException) as error:  # a StorageClass without allowVolumeExpansion, a policy
                message = str(error) if isinstance(error, Forbidden) else api_message(error)
                refused = (f"the claim {name} was not grown to spec.storage.size = {grow_to!r}: {message}; the "
                           "gang starts on the claim as it is (its StorageClass must allow volume expansion)")
        return [(c.REASON_STORAGE_NOT_RESIZED, refused)] if refused is not None else []

    async def _create_or_update(self, job: Job, child: dict[str, Any]) -> None:
        """Create `child`; the job's own one of its name gets the spec built now where that
        differs (the Service and NetworkPolicy name the metrics port the new gang listens
        on). Someone else's is never touched: `names_taken` has refused the job for it."""
        if await self.api.create(child):
            return
        live = await self.api.get_live(child)
        if live is not None and job.uid in owner_uids(live) and differs_where_built(child["spec"], live.get("spec")):
            await self.api.replace_spec(child)

    async def delete(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        """Delete everything made for a job. A cluster's garbage collector would do it
        through ownerReferences too; doing it here also works where none runs."""
        selector = job_selector(name)
        for pod in await self.api.list("Pod", namespace, selector):
            await self.api.delete("Pod", namespace, pod_name(pod))
        uid = body["metadata"].get("uid")
        for kind, child, _ in named_children(name, network_policy=self.network_policy):
            existing = await self.api.get(kind, namespace, child)
            if existing is not None and uid in owner_uids(existing):  # never someone else's of that name
                await self.api.delete(kind, namespace, child)
        pod_group = _pod_group_of(body)
        live_group = await self.api.get_live(pod_group) if pod_group is not None else None
        if live_group is not None and uid in owner_uids(live_group):
            await self.api.delete_custom(pod_group)
        storage = ((body.get("spec") or {}).get("storage") or {})
        if "size" in storage and storage.get("retain") is False:
            # Only a claim this job made (and owns): one of that name that was there
            # before it (an earlier job's retained checkpoints) is not its to delete.
            claim = await self.api.get("PersistentVolumeClaim", namespace, created_claim_name(name))
            if claim is not None and uid in owner_uids(claim):
                await self.api.delete("PersistentVolumeClaim", namespace, created_claim_name(name))


def _left_by_an_earlier_job(job: Job, existing: dict[str, Any] | None) -> bool:
    """Owned by another DreamboothJob (an earlier one of this name whose garbage collection
    lags): the new job's workers would lose it when it is collected, so it is replaced."""
    return existing is not None and bool(owner_uids(existing)) and job.uid not in owner_uids(existing)


def _someone_elses(job: Job, existing: dict[str, Any] | None) -> bool:
    """Made by someone else (no DreamboothJob owns it): never taken over, never deleted."""
    return existing is not None and not owner_uids(existing)


def _not_the_jobs(kind: str, name: str, namespace: str, use: str) -> str:
    return (f"a {kind} named {name!r} already exists in namespace {namespace} and is not this job's; "
            f"the job needs that name for {use}: delete that {kind}, or recreate the job under another name")


def _pod_group_of(body: dict[str, Any]) -> dict[str, Any] | None:
    """The PodGroup a job's spec asks for, if it is still readable; a spec no longer is
    leaves its PodGroup to the garbage collector (it has an ownerReference)."""
    try:
        return build_pod_group(Job.from_body(body))
    except InvalidSpecError:
        return None
