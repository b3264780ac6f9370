"""Runs the real operator (`python -m dreambooth_operator`) against the emulated API
and plays the kubelet: the test sets pod statuses through the API, as a node would."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import kubernetes

from emulated_cluster import EmulatedCluster, free_port

GROUP, VERSION, PLURAL = "dreambooth.io", "v1alpha1", "dreamboothjobs"
REPO = Path(__file__).resolve().parents[2]


def project_kubectl() -> Path:
    """Only the project's own kubectl v1.35: CI machines may have none on PATH, or another version."""
    binary = REPO / ".tools" / "bin" / "kubectl"
    if not binary.exists():
        subprocess.run(["bash", str(REPO / "scripts" / "install-k8s-tools.sh")], check=True)
    return binary

# Fast timings so every scenario settles in seconds (production defaults are 10 s backoff etc.).
FAST_FLAGS = ["--backoff-seconds", "0.3", "--backoff-max-seconds", "2", "--resync-seconds", "2",
              "--scrape-interval", "0.5", "--pending-timeout", "1", "--start-timeout", "3"]


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy; fail with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (kubernetes.client.ApiException, KeyError, IndexError, TypeError) as error:
            last = error
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


class OperatorProcess:
    def __init__(self, cluster: EmulatedCluster, workdir: Path, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, kubeconfig: Path | None = None) -> None:
        self.cluster = cluster
        # The tester's (allowed everything) unless the test names a user's (EmulatedCluster.kubeconfig_for).
        self.kubeconfig = kubeconfig or cluster.kubeconfig
        self.workdir = workdir
        self.extra_args = extra_args or []
        self.env = env or {}
        self.http_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"operator-{self.starts}.log"

    def start(self) -> "OperatorProcess":
        self.launch()
        return self.wait_healthy()

    def launch(self) -> "OperatorProcess":
        """Start the process without waiting for it (start several, then wait for each)."""
        self.starts += 1
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dreambooth_operator", "--kubeconfig", str(self.kubeconfig),
                 "--http-host", "127.0.0.1", "--http-port", str(self.http_port), *FAST_FLAGS, *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        return self

    def wait_healthy(self) -> "OperatorProcess":
        # Importing kopf and the kubernetes client takes seconds; far more on a loaded machine.
        wait_for(self.healthy, timeout=60, what=f"operator /healthz (log: {self.log_path})")
        return self

    def healthy(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=2) as response:
            return response.read().decode()

    def metric(self, sample: str) -> float:
        """One sample's value, named as /metrics shows it: `name` or `name{label="value"}`."""
        for line in self.metrics().splitlines():
            key, _, value = line.rpartition(" ")
            if key == sample:
                return float(value)
        raise KeyError(f"no sample {sample} in /metrics")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""


class Cluster:
    """Test-side view of the emulated API (the official client, like kubectl would be)."""

    def __init__(self, emulated: EmulatedCluster) -> None:
        client = kubernetes.config.new_client_from_config(str(emulated.kubeconfig))
        self.core = kubernetes.client.CoreV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.networking = kubernetes.client.NetworkingV1Api(client)
        self.coordination = kubernetes.client.CoordinationV1Api(client)
        self._raw = client

    def create_job(self, name: str, spec: dict[str, Any], namespace: str = "default") -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DreamboothJob",
                "metadata": {"name": name, "namespace": namespace}, "spec": spec}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def job(self, name: str, namespace: str = "default") -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def status(self, name: str, namespace: str = "default") -> dict[str, Any]:
        return self.job(name, namespace).get("status") or {}

    def patch_spec(self, name: str, spec_patch: dict[str, Any], namespace: str = "default") -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": spec_patch},
                                                   _content_type="application/merge-patch+json")

    def delete_job(self, name: str, namespace: str = "default") -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def job_exists(self, name: str, namespace: str = "default") -> bool:
        try:
            self.job(name, namespace)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def _raw_list(self, method: Callable[..., Any], namespace: str, selector: str) -> list[dict[str, Any]]:
        import json
        response = method(namespace, label_selector=selector, _preload_content=False)
        return json.loads(response.data)["items"]

    def pods(self, job: str, namespace: str = "default") -> list[dict[str, Any]]:
        pods = self._raw_list(self.core.list_namespaced_pod, namespace, f"dreambooth.io/job={job}")
        return sorted(pods, key=lambda p: p["metadata"]["name"])

    def pod(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        """The pod of that name, None when there is none."""
        return next((p for p in self._raw_list(self.core.list_namespaced_pod, namespace, "")
                     if p["metadata"]["name"] == name), None)

    def all_pods(self) -> list[dict[str, Any]]:
        import json
        return json.loads(self.core.list_pod_for_all_namespaces(_preload_content=False).data)["items"]

    def services(self, job: str, namespace: str = "default") -> list[dict[str, Any]]:
        return self._raw_list(self.core.list_namespaced_service, namespace, f"dreambooth.io/job={job}")

    def config_maps(self, job: str, namespace: str = "default") -> list[dict[str, Any]]:
        return self._raw_list(self.core.list_namespaced_config_map, namespace, f"dreambooth.io/job={job}")

    def claims(self, job: str, namespace: str = "default") -> list[dict[str, Any]]:
        return self._raw_list(self.core.list_namespaced_persistent_volume_claim, namespace, f"dreambooth.io/job={job}")

    def network_policies(self, job: str, namespace: str = "default") -> list[dict[str, Any]]:
        return self._raw_list(self.networking.list_namespaced_network_policy, namespace, f"dreambooth.io/job={job}")

    def lease(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        """A Lease as stored (None: there is none)."""
        import json
        try:
            response = self.coordination.read_namespaced_lease(name, namespace, _preload_content=False)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise
        return json.loads(response.data)

    def events(self, job: str, namespace: str = "default") -> list[dict[str, Any]]:
        import json
        response = self.core.list_namespaced_event(namespace, _preload_content=False)
        return [e for e in json.loads(response.data)["items"] if e["involvedObject"]["name"] == job]

    # --- the kubelet's part ---------------------------------------------------------

    def set_pod_status(self, name: str, status: dict[str, Any], namespace: str = "default") -> None:
        self.core.patch_namespaced_pod_status(name, namespace, {"status": status})

    def run_pods(self, job: str, namespace: str = "default", pod_ip: str | None = None) -> None:
        for pod in self.pods(job, namespace):
            self.set_pod_status(pod["metadata"]["name"], running(pod_ip), namespace)


def running(pod_ip: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
        "containerStatuses": [{"name": "trainer", "ready": True, "restartCount": 0, "image": "x", "imageID": "x",
                               "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}],
    }
    if pod_ip:
        status["podIP"] = pod_ip
    return status


def terminated(exit_code: int, reason: str = "Error", phase: str = "Failed") -> dict[str, Any]:
    return {
        "phase": phase,
        "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0, "image": "x", "imageID": "x",
                               "state": {"terminated": {"exitCode": exit_code, "reason": reason}}}],
    }


def evicted() -> dict[str, Any]:
    return {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}


def condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), None)


def phase_is(cluster: Cluster, job: str, phase: str) -> Callable[[], bool]:
    return lambda: cluster.status(job).get("phase") == phase


def pod_names(cluster: Cluster, job: str) -> list[str]:
    return [p["metadata"]["name"] for p in cluster.pods(job)]


def gang_of(pod: dict[str, Any]) -> str:
    return pod["metadata"]["labels"]["dreambooth.io/gang"]


def pods_created(operator: OperatorProcess) -> float:
    return operator.metric("dreambooth_operator_pods_created_total")
