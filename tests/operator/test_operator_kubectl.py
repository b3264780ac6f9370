"""The real kubectl binary (v1.35, from scripts/install-k8s-tools.sh) against the
emulated API with the real operator: `kubectl apply` of the example job turns into
worker pods, a Service and a ConfigMap; `kubectl delete` removes them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from emulated_cluster import EmulatedCluster
from operator_harness import Cluster, OperatorProcess, project_kubectl, wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "manifests" / "examples" / "tiny-cpu-job.yaml"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def kubectl_binary() -> Path:
    return project_kubectl()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmulatedCluster, OperatorProcess]]:
    emulated = EmulatedCluster(tmp_path_factory.mktemp("kubectl-cluster")).start()
    operator = OperatorProcess(emulated, tmp_path_factory.mktemp("kubectl-operator")).start()
    yield emulated, operator
    operator.stop()
    emulated.stop()


def kubectl(binary: Path, emulated: EmulatedCluster, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run([str(binary), "--kubeconfig", str(emulated.kubeconfig), *args], input=stdin,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


def test_kubectl_apply_of_the_example_job_with_three_nodes(
        kubectl_binary: Path, setup: tuple[EmulatedCluster, OperatorProcess]) -> None:
    emulated, _ = setup
    cluster = Cluster(emulated)
    job = yaml.safe_load(EXAMPLE.read_text())
    job["spec"]["workers"]["nodes"] = 3
    # --validate=false: the emulated API serves no OpenAPI documents to validate against.
    out = kubectl(kubectl_binary, emulated, "apply", "--validate=false", "-f", str(REPO / "manifests" / "crd.yaml"))
    assert "customresourcedefinition.apiextensions.k8s.io/dreamboothjobs.dreambooth.io created" in out
    # The example's photos ConfigMap (the operator checks it before creating pods); kubectl
    # sends it as protobuf (the emulator decodes it: protobuf_bodies.py).
    kubectl(kubectl_binary, emulated, "create", "configmap", "robot-photos",
            f"--from-file={REPO / 'examples' / 'instance-images'}/")
    photos = json.loads(kubectl(kubectl_binary, emulated, "get", "configmap", "robot-photos", "-o", "json"))
    assert sorted(photos["binaryData"]) == sorted(p.name for p in (REPO / "examples" / "instance-images").glob("*.png"))
    out = kubectl(kubectl_binary, emulated, "apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(job))
    assert "tiny-cpu" in out and "created" in out

    pods = wait_for(lambda: len(p := cluster.pods("tiny-cpu")) == 3 and p, what="3 worker pods")
    assert [p["metadata"]["name"] for p in pods] == ["tiny-cpu-worker-0", "tiny-cpu-worker-1", "tiny-cpu-worker-2"]
    listed = kubectl(kubectl_binary, emulated, "get", "pods", "-l", "dreambooth.io/job=tiny-cpu", "-o", "name")
    assert listed.split() == [f"pod/tiny-cpu-worker-{i}" for i in range(3)]
    assert kubectl(kubectl_binary, emulated, "get", "service", "tiny-cpu", "-o", "name").strip() == "service/tiny-cpu"
    config = kubectl(kubectl_binary, emulated, "get", "configmap", "tiny-cpu-config", "-o", "jsonpath={.data.config\\.yaml}")
    assert yaml.safe_load(config)["model"]["source"] == "tiny"
    assert kubectl(kubectl_binary, emulated, "get", "pvc", "tiny-cpu-storage", "-o", "name").strip() \
        == "persistentvolumeclaim/tiny-cpu-storage"
    phase = kubectl(kubectl_binary, emulated, "get", "dbj", "tiny-cpu", "-o", "jsonpath={.status.phase}")
    assert phase == "Pending"

    kubectl(kubectl_binary, emulated, "delete", "dbj", "tiny-cpu", "--wait=false")
    wait_for(lambda: not cluster.job_exists("tiny-cpu"), what="job deleted")
    assert cluster.pods("tiny-cpu") == [] and cluster.services("tiny-cpu") == []
    # The example asks for retain: false, so its claim goes with it.
    assert cluster.claims("tiny-cpu") == []


def run_kubectl(binary: Path, emulated: EmulatedCluster, *args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), "--kubeconfig", str(emulated.kubeconfig), *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_kubectl_apply_of_a_job_the_crd_refuses_fails_at_once_naming_the_field(
        kubectl_binary: Path, setup: tuple[EmulatedCluster, OperatorProcess]) -> None:
    """The CRD stored by the test above admits jobs as an API server does (the emulator
    evaluates its schema and CEL rules): no job is stored, and kubectl says why."""
    emulated, _ = setup
    job = yaml.safe_load(EXAMPLE.read_text())
    job["metadata"]["name"] = "two-sources"
    job["spec"]["data"]["instanceImages"]["url"] = "s3://bucket/photos/"  # beside its configMapName
    refused = run_kubectl(kubectl_binary, emulated, "apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(job))
    assert refused.returncode != 0
    assert ('The DreamboothJob "two-sources" is invalid: spec.data.instanceImages: set exactly one of '
            'data.instanceImages.claimName, data.instanceImages.configMapName or data.instanceImages.url') \
        in refused.stderr, refused.stderr
    assert not Cluster(emulated).job_exists("two-sources")
    # Defaults are the API server's: a stored job has them, as kubectl shows it.
    job["metadata"]["name"] = "defaulted"
    del job["spec"]["data"]["instanceImages"]["url"]
    del job["spec"]["runPolicy"]
    kubectl(kubectl_binary, emulated, "apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(job))
    limit = kubectl(kubectl_binary, emulated, "get", "dbj", "defaulted", "-o", "jsonpath={.spec.runPolicy.backoffLimit}")
    assert limit == "3"
    kubectl(kubectl_binary, emulated, "delete", "dbj", "defaulted", "--wait=false")
