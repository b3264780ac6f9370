"""Pure builders of a job's children other than the workers: ConfigMap, headless
Service, NetworkPolicy and (when `storage.size` asks for one) PVC. No API calls here."""

from __future__ import annotations

import posixpath
from typing import Any

from kubernetes.utils import parse_quantity

from trainer.config import LORA_WEIGHTS_FILE

from .constants import (
    ANNOTATION_CONFIG_HASH,
    CONFIG_FILE_NAME,
    DEFAULT_SCRAPE_INTERVAL_SECONDS,
    METRICS_PORT_NAME,
    RENDEZVOUS_PORT,
    STORAGE_MOUNT_DIR,
)
from .metadata import (
    child_metadata,
    config_map_name,
    created_claim_name,
    job_labels,
    network_policy_name,
    service_name,
    storage_claim_name,
    worker_match_labels,
)
from .spec import Job
from .trainer_config import config_hash, config_yaml, job_output_dir, render_trainer_config


def build_config_map(job: Job, *, scrape_interval_seconds: float = DEFAULT_SCRAPE_INTERVAL_SECONDS) -> dict[str, Any]:
    """The rendered trainer config, mounted read-only into every worker."""
    config = render_trainer_config(job.name, job.spec, scrape_interval_seconds=scrape_interval_seconds)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(job, config_map_name(job.name),
                                   annotations={ANNOTATION_CONFIG_HASH: config_hash(config)}),
        "data": {CONFIG_FILE_NAME: config_yaml(config)},
    }


def build_service(job: Job) -> dict[str, Any]:
    """Headless Service that gives each worker a stable DNS name (`<pod>.<job>`)."""
    ports = [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"}]
    if job.spec.metrics.port:
        ports.append({"name": METRICS_PORT_NAME, "port": job.spec.metrics.port,
                      "targetPort": job.spec.metrics.port, "protocol": "TCP"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(job, service_name(job.name)),
        "spec": {
            "clusterIP": "None",
            "selector": job_labels(job.name),
            "ports": ports,
            # Workers must resolve each other before any of them is Ready: torchrun's
            # rendezvous happens before the trainer could ever report readiness.
            "publishNotReadyAddresses": True,
        },
    }


def build_network_policy(job: Job) -> dict[str, Any]:
    """Admits to the job's workers only their own peers (any port: the rendezvous TCPStore,
    gloo and NCCL pick ports of their own) and, from anywhere, scrapes of the metrics port
    (the operator and Prometheus run in other namespaces). Another tenant's pod could
    otherwise join or disturb the job's TCPStore. Egress stays open: workers download
    models and write to object stores."""
    workers = {"matchLabels": worker_match_labels(job.name)}
    # A peer podSelector without a namespaceSelector means pods of the policy's own namespace.
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": workers}]}]
    if job.spec.metrics.port:
        ingress.append({"ports": [{"port": job.spec.metrics.port, "protocol": "TCP"}]})  # no `from`: any source
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": child_metadata(job, network_policy_name(job.name)),
        "spec": {"podSelector": workers, "policyTypes": ["Ingress"], "ingress": ingress},
    }


def build_claim(job: Job) -> dict[str, Any] | None:
    """A PVC for checkpoints and output when `storage.size` asks for one; None when the
    job uses an existing claim. A retained claim has no owner, so no garbage collector
    takes it with the job."""
    storage = job.spec.storage
    if not storage.creates_claim:
        return None
    spec: dict[str, Any] = {
        "accessModes": [storage.access_mode],
        "resources": {"requests": {"storage": storage.size}},
    }
    if storage.storage_class_name is not None:
        spec["storageClassName"] = storage.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": child_metadata(job, created_claim_name(job.name), owned=not storage.retain),
        "spec": spec,
    }


def claim_resize(job: Job, live: dict[str, Any]) -> tuple[str | None, str | None]:
    """(the size to grow the job's created claim `live` to, or None; the Warning when the
    spec asks for less than it holds, or None). An edited storage.size reaches the claim
    at the next gang start; a claim can only grow (where its StorageClass allows)."""
    wanted = job.spec.storage.size
    held = (((live.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")
    if wanted is None or held is None or parse_quantity(wanted) == parse_quantity(held):
        return None, None
    if parse_quantity(wanted) > parse_quantity(held):
        return wanted, None
    return None, (f"spec.storage.size = {wanted!r} is below the {held} the claim {live['metadata']['name']} holds; "
                  f"a PersistentVolumeClaim cannot shrink, so it keeps {held}: set spec.storage.size back to {held} "
                  "or more")


def differs_where_built(built: Any, live: Any) -> bool:
    """Whether a child's `live` spec, as the API server holds it, differs from the `built`
    one in anything the builder sets. What only the live one has is the API server's
    (a Service's clusterIPs, ipFamilies, sessionAffinity, type): counting it would have
    the operator rewrite the child at every gang start."""
    if isinstance(built, dict):
        return not isinstance(live, dict) or any(differs_where_built(value, live.get(key))
                                                 for key, value in built.items())
    if isinstance(built, list):
        return not isinstance(live, list) or len(built) != len(live) or any(map(differs_where_built, built, live))
    return bool(built != live)


def output_status(job: Job) -> dict[str, Any]:
    """status.output of a succeeded job: where its model is, so nobody has to know the
    layout of the claim (and the URI it was uploaded to, if any)."""
    location: dict[str, Any] = {"claimName": storage_claim_name(job),
                                "path": posixpath.relpath(job_output_dir(job.name), STORAGE_MOUNT_DIR)}
    if job.spec.lora.rank:
        location["loraWeights"] = posixpath.join(location["path"], LORA_WEIGHTS_FILE)
    if job.spec.output.uri:
        location["uri"] = job.spec.output.uri
    return location
