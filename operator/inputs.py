"""Checks of a job's inputs that need the API, made before its pods are created.

A ConfigMap of photos is read once per gang start: missing, too big or without an
image key, the job fails with a reason that names it and says what to do, instead of
pods waiting in ContainerCreating or a trainer failing on an empty folder. The job is
looked at again every resync, so it starts by itself once the ConfigMap is fixed.
A URL is checked by the trainer itself (it has the credentials and the protocol
packages) and fails the job through its exit code 2.
"""

from __future__ import annotations

import base64
import posixpath
from typing import Any

from trainer.config import DataConfig

from .constants import CONFIG_MAP_MAX_BYTES
from .kube import KubeApi
from .spec import Job

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


async def input_problem(api: KubeApi, job: Job) -> str | None:
    """Why the job's photos cannot be mounted, or None (also for inputs the trainer checks)."""
    name = job.spec.data.instance_images.config_map_name
    if name is None:
        return None
    return config_map_problem(await api.get_config_map(job.namespace, name), name, job.namespace)
