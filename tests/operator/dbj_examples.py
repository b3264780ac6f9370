"""Example DreamboothJob specs shared by the operator tests (data, not fixtures), and the
few helpers that vary them or read them as the operator does."""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from dreambooth_operator.spec import Job

REPO = Path(__file__).resolve().parents[2]
PHOTOS = REPO / "examples" / "instance-images"
KUBERNETES_VERSION = "1.35.0"


def minimum_kubernetes_version() -> str:
    """The oldest Kubernetes the chart installs on (its kubeVersion, ">=1.30.0-0")."""
    chart = yaml.safe_load((REPO / "charts" / "dreambooth-operator" / "Chart.yaml").read_text())
    found = re.fullmatch(r">=\s*(\d+\.\d+\.\d+)(-0)?", chart["kubeVersion"])
    assert found, f"Chart.yaml kubeVersion {chart['kubeVersion']!r} is not a plain minimum"
    return found[1]


def validate_for_supported_kubernetes(obj: dict[str, Any]) -> None:
    """`obj` is valid, strictly (no unknown fields), for the oldest Kubernetes the chart
    installs on, the one the tests' kubectl is, and the newest kubernetes-validate knows
    (an API removed there would fail here first)."""
    versions = (minimum_kubernetes_version(), KUBERNETES_VERSION, kubernetes_validate.latest_version())
    for version in dict.fromkeys(versions):
        kubernetes_validate.validate(obj, version, strict=True)

MINIMAL_SPEC: dict[str, Any] = {
    "data": {"instanceImages": {"claimName": "dog-photos"}, "instancePrompt": "a photo of sks dog"},
    "workers": {"image": "dreambooth-trainer:0.1.0", "gpusPerNode": 0},
    "storage": {"claimName": "dreambooth-ckpt"},
}

FULL_SPEC: dict[str, Any] = {
    "model": {"source": "stable-diffusion-v1-5/stable-diffusion-v1-5", "hfTokenSecret": {"name": "hf", "key": "token"}},
    "data": {
        "instanceImages": {"claimName": "dog-photos", "path": "/dogs"},
        "instancePrompt": "a photo of sks dog",
        "captionFiles": True,
        "classPrompt": "a photo of dog",
        "numClassImages": 200,
        "resolution": 512,
    },
    "training": {"maxSteps": 800, "learningRate": 2.0e-6, "textEncoderLearningRate": 1.0e-6, "batchSize": 1,
                 "trainTextEncoder": True, "precision": "fp16", "snrGamma": 5.0, "noiseOffset": 0.05,
                 "maxNonfiniteSteps": 20, "scaleLr": True},
    "deepspeed": {"zeroStage": 2, "offloadOptimizer": True},
    "workers": {
        "nodes": 2,
        "gpusPerNode": 8,
        "image": "dreambooth-trainer:0.1.0",
        "resources": {"limits": {"nvidia.com/gpu": 8, "memory": "400Gi"}, "requests": {"cpu": "32"}},
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}]}}},
        "env": [{"name": "NCCL_DEBUG", "value": "WARN"}],
        "serviceAccountName": "trainer",
        "priorityClassName": "training",
        "terminationGracePeriodSeconds": 300,
        "imagePullPolicy": "IfNotPresent",
        "labels": {"team": "vision"},
        "annotations": {"sidecar.istio.io/inject": "false"},
        "schedulerName": "volcano",
        "imagePullSecrets": [{"name": "regcred"}],
        "volumes": [{"name": "datasets", "nfs": {"server": "nfs.internal", "path": "/datasets", "readOnly": True}}],
        "volumeMounts": [{"name": "datasets", "mountPath": "/mnt/datasets", "readOnly": True}],
    },
    "storage": {"storageClassName": "fast-rwx", "size": "200Gi", "retain": False},
    "checkpoint": {"everySteps": 100, "keepLast": 3},
    "runPolicy": {"backoffLimit": 3, "activeDeadlineSeconds": 86400, "suspend": False, "ttlSecondsAfterFinished": 86400,
                  "gangScheduling": {"podGroup": "volcano", "queue": "vision"}},
    "metrics": {"port": 9090},
    "validation": {"everySteps": 200, "prompts": ["a photo of sks dog on the beach"], "numInferenceSteps": 30,
                   "imagesPerPrompt": 4, "guidanceScale": 6.0, "negativePrompt": "blurry",
                   "scheduler": "DPMSolverMultistepScheduler"},
    "trainerOverrides": {"training.max_grad_norm": 0.5, "data.random_flip": True,
                         "deepspeed.overrides": {"zero_optimization": {"overlap_comm": True}}},
}


def job_body(name: str = "sks-dog", spec: dict[str, Any] | None = None, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "dreambooth.io/v1alpha1",
        "kind": "DreamboothJob",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"},
        "spec": copy.deepcopy(spec if spec is not None else MINIMAL_SPEC),
    }


def minimal_spec(**changes: Any) -> dict[str, Any]:
    """MINIMAL_SPEC with `section={...}` merged in."""
    result = copy.deepcopy(MINIMAL_SPEC)
    for section, values in changes.items():
        result.setdefault(section, {}).update(values)
    return result


def job(spec: dict[str, Any] = MINIMAL_SPEC, name: str = "sks-dog") -> Job:
    """The Job the operator reads from a body of `spec`."""
    return Job.from_body(job_body(name, spec))


DELETE = object()


def minimal_spec_with(path: str, value: Any) -> dict[str, Any]:
    """MINIMAL_SPEC with the field at the dotted `path` set to `value` (removed for DELETE)."""
    spec = copy.deepcopy(MINIMAL_SPEC)
    node = spec
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(last)
    else:
        node[last] = value
    return spec


def photo_config_map(name: str, files: dict[str, bytes], namespace: str = "default") -> dict[str, Any]:
    """What `kubectl create configmap NAME --from-file=DIR` makes of binary files."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace},
            "binaryData": {key: base64.b64encode(value).decode() for key, value in files.items()}}


def robot_photos() -> dict[str, bytes]:
    """The bundled photos of examples/instance-images, by file name."""
    return {path.name: path.read_bytes() for path in sorted(PHOTOS.glob("*.png"))}
