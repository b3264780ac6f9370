"""Every workload the project ships runs as non-root without privilege escalation, and
takes secrets only through secretKeyRef: the chart's Deployment (all options on, both
RBAC modes) and the worker pods the operator builds for the shipped examples."""

from __future__ import annotations

from typing import Any

import pytest

from dreambooth_operator.constants import HF_TOKEN_ENV, WORKER_UID
from tests.ship.chart import ALL_OPTIONS_ON, NAMESPACED, render
from tests.ship.workloads import CPU_EXAMPLE, GPU_EXAMPLE, example_job, pod_specs, worker_pods

# Env var names that would hold a credential if set literally.
SECRET_WORDS = ("TOKEN", "PASSWORD", "SECRET", "KEY", "CREDENTIAL")


def chart_workloads() -> list[tuple[str, dict[str, Any]]]:
    workloads = []
    for values in (ALL_OPTIONS_ON, NAMESPACED):
        workloads += pod_specs(render(values))
    return workloads


def operator_workloads() -> list[tuple[str, dict[str, Any]]]:
    jobs = {path.name: example_job(path) for path in (GPU_EXAMPLE, CPU_EXAMPLE)}
    jobs["photos and model on s3"] = example_job(GPU_EXAMPLE, spec_changes={
        "data": {"instanceImages": {"url": "s3://bucket/photos/", "credentialsSecret": "s3"}},
        "output": {"uri": "s3://bucket/models/sks-dog/", "credentialsSecret": "s3"}})
    return [(f"{name}:{pod['metadata']['name']}", pod["spec"]) for name, job in jobs.items() for pod in worker_pods(job)]


def effective(pod_spec: dict[str, Any], container: dict[str, Any], field: str) -> Any:
    """A container's security setting, falling back to the pod's (as the kubelet does)."""
    own = (container.get("securityContext") or {}).get(field)
    return own if own is not None else (pod_spec.get("securityContext") or {}).get(field)


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def assert_hardened(name: str, pod_spec: dict[str, Any]) -> None:
    assert not pod_spec.get("hostNetwork") and not pod_spec.get("hostPID") and not pod_spec.get("hostIPC"), name
    for container in containers(pod_spec):
        where = f"{name} container {container['name']}"
        context = container.get("securityContext") or {}
        assert effective(pod_spec, container, "runAsNonRoot") is True, f"{where}: runAsNonRoot is not true"
        assert effective(pod_spec, container, "runAsUser") not in (0, None), f"{where}: no non-zero runAsUser"
        assert context.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation is not false"
        assert not context.get("privileged"), f"{where}: privileged"
        assert "ALL" in (context.get("capabilities") or {}).get("drop", []), f"{where}: capabilities not dropped"
        assert not (context.get("capabilities") or {}).get("add"), f"{where}: adds capabilities"
        assert effective(pod_spec, container, "seccompProfile") == {"type": "RuntimeDefault"}, where
        for variable in container.get("env", []):
            if any(word in variable["name"].upper() for word in SECRET_WORDS):
                assert "value" not in variable, f"{where}: {variable['name']} is a literal; use secretKeyRef"
            source = variable.get("valueFrom") or {}
            assert not source or set(source) <= {"secretKeyRef", "fieldRef", "configMapKeyRef", "resourceFieldRef"}
        for source in container.get("envFrom", []):
            # Storage credentials (spec.*.credentialsSecret) come as a whole Secret: still a
            # reference, never a value in the pod spec.
            assert set(source) == {"secretRef"}, f"{where}: envFrom {source} is not a Secret reference"


@pytest.mark.parametrize("name, pod_spec", chart_workloads(), ids=lambda v: v if isinstance(v, str) else "")
def test_chart_workloads_are_hardened(name: str, pod_spec: dict[str, Any]) -> None:
    assert_hardened(name, pod_spec)
    for container in containers(pod_spec):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, f"{name}: writable root filesystem"
    assert pod_spec.get("automountServiceAccountToken") is not False, "the operator needs its token"
    assert pod_spec["serviceAccountName"] == "dreambooth-operator", "its own account, bound to its RBAC"


def test_chart_renders_one_operator_workload_per_mode() -> None:
    assert [name for name, _ in chart_workloads()] == ["Deployment/dreambooth-operator"] * 2


@pytest.mark.parametrize("name, pod_spec", operator_workloads(), ids=lambda v: v if isinstance(v, str) else "")
def test_worker_pods_are_hardened(name: str, pod_spec: dict[str, Any]) -> None:
    assert_hardened(name, pod_spec)
    [trainer] = pod_spec["containers"]
    assert effective(pod_spec, trainer, "runAsUser") == WORKER_UID, "the trainer image's user (Dockerfile)"


def test_credentials_come_from_secrets() -> None:
    specs = dict(operator_workloads())
    [s3_worker, *_] = [spec for name, spec in specs.items() if name.startswith("photos and model on s3")]
    assert s3_worker["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3"}}]


def test_hugging_face_token_only_through_secret_key_ref() -> None:
    job = example_job(GPU_EXAMPLE)
    for pod in worker_pods(job):
        [token] = [v for v in pod["spec"]["containers"][0]["env"] if v["name"] == HF_TOKEN_ENV]
        assert token == {"name": HF_TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
