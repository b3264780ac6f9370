"""spec.workers: the worker pods' Kubernetes fields (image, resources, scheduling,
labels, volumes), checked here so that a typo fails the job with the field named instead
of every pod creation failing with the API server's 422."""

from __future__ import annotations

import posixpath
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .constants import (
    CONFIG_VOLUME,
    CREDENTIALS_VOLUME_PREFIX,
    GROUP,
    INSTANCE_IMAGES_VOLUME,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    OPERATOR_MOUNT_DIRS,
    SHM_VOLUME,
    STORAGE_VOLUME,
)
from .spec_base import SpecModel, field_error

# Kubernetes' syntax for label and annotation keys ([DNS subdomain/]name), label values
# and volume names (DNS labels). Checked here so that a typo fails the job with the
# field named, instead of every pod creation failing with the API server's 422.
_NAME_PART = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_QUALIFIED_NAME = re.compile(rf"([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME_PART}")
_LABEL_VALUE = re.compile(rf"({_NAME_PART})?")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_OPERATOR_VOLUMES = (CONFIG_VOLUME, STORAGE_VOLUME, SHM_VOLUME, INSTANCE_IMAGES_VOLUME)


class LocalObjectReference(SpecModel):
    name: str = Field(min_length=1)


class WorkersSpec(SpecModel):
    nodes: int = Field(1, ge=1)
    # Elastic gang: the fewest nodes a gang may shrink to when the others cannot be scheduled.
    min_nodes: int | None = Field(None, ge=1)
    gpus_per_node: int = Field(1, ge=0)
    image: str = Field(min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    resources: dict[str, Any] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)
    env: list[dict[str, Any]] = Field(default_factory=list)
    service_account_name: str | None = None
    priority_class_name: str | None = None
    termination_grace_period_seconds: int = Field(120, ge=1)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    scheduler_name: str | None = Field(None, min_length=1)
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list)
    volumes: list[dict[str, Any]] = Field(default_factory=list)
    volume_mounts: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("labels", "annotations")
    @classmethod
    def _own_keys(cls, value: dict[str, str], info: Any) -> dict[str, str]:
        for key, item in value.items():
            if not _QUALIFIED_NAME.fullmatch(key):
                raise ValueError(f"{key!r} is not a valid key: [prefix/]name, the name at most 63 letters, digits, "
                                 "'-', '_' or '.', starting and ending with a letter or digit")
            if key.startswith(f"{GROUP}/") or key in (LABEL_NAME, LABEL_MANAGED_BY):
                raise ValueError(f"{key!r} is set by the operator, which finds its pods by it; choose another key")
            if info.field_name == "labels" and not _LABEL_VALUE.fullmatch(item):
                raise ValueError(f"the value {item!r} of {key!r} is not a valid label value: at most 63 letters, "
                                 "digits, '-', '_' or '.', starting and ending with a letter or digit")
        return value

    @model_validator(mode="after")
    def _resources_are_quantities(self) -> "WorkersSpec":
        # The API server would refuse the pod too, but the PodGroup's minResources sums
        # them first: a typo there must fail the job, not every reconcile pass.
        from kubernetes.utils import parse_quantity

        for section, amounts in self.resources.items():
            if section == "claims":
                continue
            if section not in ("limits", "requests"):
                raise field_error(f"resources.{section}", amounts, "unknown section; resources has limits, requests "
                                                                   "and claims")
            if not isinstance(amounts, dict):
                raise field_error(f"resources.{section}", amounts, "give a mapping of resource to quantity, e.g. "
                                                                   "{memory: 64Gi, cpu: 8}")
            for resource, quantity in amounts.items():
                try:
                    parse_quantity(quantity)
                except (ValueError, TypeError):
                    raise field_error(f"resources.{section}.{resource}", quantity,
                                      "not a Kubernetes quantity; write e.g. 64Gi (not 64GB), 500m or 8") from None
        return self

    @model_validator(mode="after")
    def _min_nodes_at_most_nodes(self) -> "WorkersSpec":
        if self.min_nodes is not None and self.min_nodes > self.nodes:
            raise field_error("minNodes", self.min_nodes, f"more than workers.nodes = {self.nodes}; set at most "
                                                          f"{self.nodes}, or remove it for a gang that never shrinks")
        return self

    @model_validator(mode="after")
    def _own_volumes(self) -> "WorkersSpec":
        names: list[str] = []
        for index, volume in enumerate(self.volumes):
            field, name = f"volumes[{index}].name", volume.get("name")
            if not isinstance(name, str) or not _DNS_LABEL.fullmatch(name):
                raise field_error(field, name, "a volume needs a name of at most 63 lower-case letters, digits or '-'")
            if name in _OPERATOR_VOLUMES or name.startswith(CREDENTIALS_VOLUME_PREFIX) or name in names:
                raise field_error(field, name, f"that name is taken (the operator's volumes are "
                                               f"{', '.join(_OPERATOR_VOLUMES)} and {CREDENTIALS_VOLUME_PREFIX}N); "
                                               "choose another")
            names.append(name)
        for index, mount in enumerate(self.volume_mounts):
            if mount.get("name") not in names:
                raise field_error(f"volumeMounts[{index}].name", mount.get("name"),
                                  f"not one of workers.volumes ({', '.join(names) or 'none'}); add the volume or fix the name")
            field, path = f"volumeMounts[{index}].mountPath", mount.get("mountPath")
            if not isinstance(path, str) or not path.startswith("/"):
                raise field_error(field, path, "give an absolute path, e.g. /mnt/data")
            taken = next((own for own in OPERATOR_MOUNT_DIRS
                          if posixpath.commonpath([posixpath.normpath(path), own]) == own), None)
            if taken is not None:
                raise field_error(field, path, f"the operator mounts {taken} there; mount elsewhere, e.g. /mnt/data")
        return self

    @property
    def fewest_nodes(self) -> int:
        return self.nodes if self.min_nodes is None else self.min_nodes

    @property
    def procs_per_node(self) -> int:
        # gpusPerNode 0 is a CPU job: one process per node.
        return max(self.gpus_per_node, 1)
