"""The workloads a platform engineer gets: the chart's Deployment pod templates and the
worker pods the operator builds for the shipped example jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dreambooth_operator.children import build_config_map
from dreambooth_operator.constants import ANNOTATION_CONFIG_HASH
from dreambooth_operator.pods import build_worker_pods
from dreambooth_operator.spec import Job

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"
GPU_EXAMPLE = EXAMPLES / "sd15-gpu-job.yaml"
CPU_EXAMPLE = EXAMPLES / "tiny-cpu-job.yaml"


def example_job(path: Path = GPU_EXAMPLE, namespace: str = "team-a",
                spec_changes: dict[str, dict[str, Any]] | None = None) -> Job:
    """A shipped example as the operator parses it; `spec_changes` replace keys of its sections."""
    body = yaml.safe_load(path.read_text())
    body["metadata"].update(namespace=namespace, uid=f"uid-{body['metadata']['name']}")
    for section, values in (spec_changes or {}).items():
        body["spec"].setdefault(section, {}).update(values)
    return Job.from_body(body)


def worker_pods(job: Job) -> list[dict[str, Any]]:
    """The gang the operator would create for `job` (first start)."""
    config_hash = build_config_map(job)["metadata"]["annotations"][ANNOTATION_CONFIG_HASH]
    return build_worker_pods(job, gang=0, config_hash=config_hash)


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every workload among rendered objects: Pods and the pod
    templates of Deployments, StatefulSets, DaemonSets, Jobs."""
    found = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Pod":
            found.append((name, obj["spec"]))
        elif obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            found.append((name, obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "CronJob":
            found.append((name, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return found
