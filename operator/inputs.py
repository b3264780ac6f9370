"""Checks of a job's inputs that need the API, made before its pods are created.

A ConfigMap of photos is read once per gang start: missing, too big or without an
image key, the job fails with a reason that names it and says what to do, instead of
pods waiting in ContainerCreating or a trainer failing on an empty folder. The job is
looked at again every resync, so it starts by itself once the ConfigMap is fixed.
A URL is checked by the trainer itself (it has the credentials and the protocol
packages) and fails the job through its exit code 2.

The claims every worker mounts are read too: with several workers, a ReadWriteOncePod
claim cannot work (problem), and a ReadWriteOnce one only while all workers share a
node (warning: most clouds' default storage classes are ReadWriteOnce block disks, and
the second worker would wait in ContainerCreating on a Multi-Attach error). A claim
that does not exist yet is a warning, not a failure: `kubectl apply -f` of a folder may
create the job before its claim, and the workers simply wait in Pending for it.
"""

from __future__ import annotations

import base64
import posixpath
from dataclasses import dataclass, field
from typing import Any

from trainer.config import DataConfig

from .constants import CONFIG_MAP_MAX_BYTES, REASON_CLAIM_NOT_FOUND, REASON_VOLUME_NOT_SHARED
from .kube import KubeApi
from .spec import Job

RWX, ROX, RWO, RWOP = "ReadWriteMany", "ReadOnlyMany", "ReadWriteOnce", "ReadWriteOncePod"
_SHARED_STORAGE = "NFS, CephFS, EFS, Filestore, Azure Files"

_KEY = "spec.data.instanceImages.configMapName"
_ALTERNATIVES = ("put larger photo sets on a volume (data.instanceImages.claimName) or behind a URL "
                 "(data.instanceImages.url)")


def config_map_size(config_map: dict[str, Any]) -> int:
    """Bytes the API server counts against its 1 MiB limit: keys plus (decoded) values."""
    text = config_map.get("data") or {}
    binary = config_map.get("binaryData") or {}
    return (sum(len(key) + len(value.encode()) for key, value in text.items())
            + sum(len(key) + len(base64.b64decode(value)) for key, value in binary.items()))


def image_keys(config_map: dict[str, Any]) -> list[str]:
    keys = [*(config_map.get("data") or {}), *(config_map.get("binaryData") or {})]
    return sorted(key for key in keys if posixpath.splitext(key)[1].lower() in DataConfig.IMAGE_SUFFIXES)


def config_map_problem(config_map: dict[str, Any] | None, name: str, namespace: str) -> str | None:
    """Why this ConfigMap cannot be the job's photos, or None when it can."""
    where = f"{_KEY} = {name!r}"
    if config_map is None:
        return (f"{where}: no ConfigMap {name!r} in namespace {namespace!r}; create it from the photo folder "
                f"(kubectl create configmap {name} -n {namespace} --from-file=photos/); the job starts by itself "
                "once it exists")
    size = config_map_size(config_map)
    if size > CONFIG_MAP_MAX_BYTES:
        return (f"{where}: holds {size} bytes, over the {CONFIG_MAP_MAX_BYTES}-byte (1 MiB) ConfigMap limit; "
                f"use fewer or smaller photos, or {_ALTERNATIVES}")
    if not image_keys(config_map):
        found = ", ".join(sorted([*(config_map.get("data") or {}), *(config_map.get("binaryData") or {})]))
        return (f"{where}: no image among its keys ({found or 'it is empty'}); keys must be file names ending in "
                f"{', '.join(sorted(DataConfig.IMAGE_SUFFIXES))} (kubectl create configmap {name} --from-file=photos/)")
    return None


def claim_access_modes(claim: dict[str, Any]) -> list[str]:
    """What a claim allows: its bound volume's modes, else the modes it asks for."""
    return list((claim.get("status") or {}).get("accessModes") or (claim.get("spec") or {}).get("accessModes") or [])


def sharing_check(key: str, name: str, modes: list[str], nodes: int, *, read_only: bool) -> tuple[str, str] | None:
    """("problem" | "warning", message) when `nodes` workers, each on its own node,
    cannot all mount a claim with these access modes; None when they can (or for one)."""
    shared = {RWX, ROX} if read_only else {RWX}
    if nodes <= 1 or shared & set(modes) or not modes:
        return None
    where = f"{key} = {name!r}: the claim is {', '.join(modes)}"
    fix = f"use a {' or '.join(sorted(shared))} claim ({_SHARED_STORAGE})"
    if modes == [RWOP]:
        return "problem", (f"{where}, which only one pod may use, and each of the workers.nodes = {nodes} workers "
                           f"mounts it; {fix} or workers.nodes: 1")
    if RWO in modes:
        return "warning", (f"{where}, and each of the workers.nodes = {nodes} workers mounts it: unless they all "
                           f"land on one node, all but the first wait in ContainerCreating (Multi-Attach error); {fix}")
    return "warning", f"{where}, and the workers write checkpoints and the model to it; {fix}"


def missing_claim_warning(key: str, name: str, namespace: str) -> str:
    return (f"{key} = {name!r}: no PersistentVolumeClaim {name!r} in namespace {namespace!r} yet; the workers wait "
            f"in Pending until it exists (create it, or set spec.storage.size for the operator to make one)")


@dataclass
class InputCheck:
    problem: str | None = None  # fails the job (InvalidSpec) until fixed
    # (reason, message) of Warning Events; the gang starts anyway
    warnings: list[tuple[str, str]] = field(default_factory=list)


async def check_inputs(api: KubeApi, job: Job) -> InputCheck:
    """The job's photos and claims, before a gang starts (the trainer checks the rest)."""
    spec, nodes = job.spec, job.spec.workers.nodes
    check = InputCheck()
    config_map = spec.data.instance_images.config_map_name
    if config_map is not None:
        check.problem = config_map_problem(await api.get("ConfigMap", job.namespace, config_map), config_map,
                                           job.namespace)
    # (field, its value, the claim's access modes, mounted read-only)
    claims = []
    for key, name, read_only in (("spec.data.instanceImages.claimName", spec.data.instance_images.claim_name, True),
                                 ("spec.storage.claimName", spec.storage.claim_name, False)):
        if name is None:
            continue
        claim = await api.get("PersistentVolumeClaim", job.namespace, name)
        if claim is None:
            check.warnings.append((REASON_CLAIM_NOT_FOUND, missing_claim_warning(key, name, job.namespace)))
        else:
            claims.append((key, name, claim_access_modes(claim), read_only))
    if spec.storage.creates_claim:  # made by the operator: the spec's mode
        claims.append(("spec.storage.accessMode", spec.storage.access_mode, [spec.storage.access_mode], False))
    for key, name, modes, read_only in claims:
        found = sharing_check(key, name, modes, nodes, read_only=read_only)
        if found is not None and found[0] == "problem":
            check.problem = check.problem or found[1]
        elif found is not None:
            check.warnings.append((REASON_VOLUME_NOT_SHARED, found[1]))
    return check
