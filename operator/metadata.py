"""Labels, names and owner references of a job's children, built in one place."""

from __future__ import annotations

from typing import Any

from .constants import (
    API_VERSION,
    APP_NAME,
    KIND,
    LABEL_GANG,
    LABEL_JOB,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_ROLE,
    LABEL_WORKER_INDEX,
    MANAGER,
    ROLE_WORKER,
)
from .spec import Job


def worker_name(job_name: str, index: int) -> str:
    return f"{job_name}-worker-{index}"


def standby_name(job_name: str, index: int) -> str:
    return f"{job_name}-standby-{index}"


def service_name(job_name: str) -> str:
    # The headless Service is named after the job, so worker-0's DNS name is
    # `<job>-worker-0.<job>`: the rendezvous address of DESIGN.md.
    return job_name


def config_map_name(job_name: str) -> str:
    return f"{job_name}-config"


def created_claim_name(job_name: str) -> str:
    """The claim the operator creates when spec.storage asks for a size."""
    return f"{job_name}-storage"


def storage_claim_name(job: Job) -> str:
    """The claim the job's workers keep their files on: spec.storage.claimName, else the created one."""
    storage = job.spec.storage
    return storage.claim_name if storage.claim_name is not None else created_claim_name(job.name)


def pod_group_name(job_name: str) -> str:
    return job_name


def network_policy_name(job_name: str) -> str:
    return job_name


def named_children(job_name: str, *, network_policy: bool) -> list[tuple[str, str, str]]:
    """(kind, name, what the job needs it for) of the children named after the job that
    it owns and deletes, never someone else's of that name."""
    children = [("Service", service_name(job_name), "its workers' DNS names <job>-worker-N.<job>"),
                ("ConfigMap", config_map_name(job_name), "the trainer config it mounts")]
    if network_policy:
        children.append(("NetworkPolicy", network_policy_name(job_name),
                         "the policy that keeps other pods off its workers' rendezvous"))
    return children


def rendezvous_address(job_name: str) -> str:
    return f"{worker_name(job_name, 0)}.{service_name(job_name)}"


def job_labels(job_name: str) -> dict[str, str]:
    return {LABEL_NAME: APP_NAME, LABEL_MANAGED_BY: MANAGER, LABEL_JOB: job_name}


def job_selector(job_name: str) -> str:
    """Label selector of everything the operator made for one job."""
    return f"{LABEL_JOB}={job_name}"


def worker_match_labels(job_name: str) -> dict[str, str]:
    """The labels that pick out one job's worker pods (of every gang)."""
    return {LABEL_JOB: job_name, LABEL_ROLE: ROLE_WORKER}


def worker_selector(job_name: str) -> str:
    return ",".join(f"{key}={value}" for key, value in worker_match_labels(job_name).items())


def worker_labels(job_name: str, index: int, gang: int) -> dict[str, str]:
    return {
        **job_labels(job_name),
        **worker_match_labels(job_name),
        LABEL_WORKER_INDEX: str(index),
        LABEL_GANG: str(gang),
    }


def owner_reference(job: Job) -> dict[str, Any]:
    """Makes the job the controller of a child, so a cluster's garbage collector
    removes the child with the job (the operator also deletes them explicitly)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owner_uids(obj: dict[str, Any], kind: str = KIND) -> set[str]:
    """The uids of the `kind` objects (DreamboothJobs) that own `obj`."""
    return {ref.get("uid") for ref in obj["metadata"].get("ownerReferences") or [] if ref.get("kind") == kind}


def child_metadata(
    job: Job,
    name: str,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    owned: bool = True,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": job.namespace,
        "labels": labels or job_labels(job.name),
    }
    if annotations:
        metadata["annotations"] = annotations
    if owned:
        metadata["ownerReferences"] = [owner_reference(job)]
    return metadata
