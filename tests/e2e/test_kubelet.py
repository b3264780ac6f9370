"""The e2e kubelet itself, on small hand-written pods (seconds, no training): what a
pod sees inside (hostname, Service names, volumes, env), what the API sees of it
(status, exit code, termination message) and a graceful delete (SIGTERM, then gone)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from emulated_cluster import EmulatedCluster
from operator_harness import Cluster, wait_for

from kubelet import Kubelet

pytestmark = pytest.mark.timeout(120)

# Reports what the pod sees onto its claim, then waits for SIGTERM and exits 143 like the trainer.
PROBE = """
import json, os, signal, socket, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
report = {
    "hostname": socket.gethostname(),
    "service_name": socket.gethostbyname("probe-0.probe"),
    "pod_ip": os.environ["POD_IP"],
    "token": os.environ["TOKEN"],
    "greeting": Path("/etc/probe/greeting").read_text(),
    "config_files": sorted(os.listdir("/etc/probe")),
    "key_file": Path("/etc/probe-secret/key.json").read_text(),
    "key_file_mode": oct(os.stat("/etc/probe-secret/key.json").st_mode & 0o777),
    "scratch": os.listdir("/scratch"),
}
Path("/mnt/probe-data/report.json").write_text(json.dumps(report))
time.sleep(120)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Kubelet]]:
    emulated = EmulatedCluster(tmp_path_factory.mktemp("kubelet-cluster")).start()
    kubelet = Kubelet(emulated.kubeconfig, tmp_path_factory.mktemp("kubelet-node")).start()
    yield Cluster(emulated), kubelet
    kubelet.stop()
    emulated.stop()


def pod(name: str, command: list[str], volumes: tuple[dict[str, Any], ...] = (), **container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "probe"}},
        "spec": {
            "hostname": name, "subdomain": "probe", "restartPolicy": "Never", "terminationGracePeriodSeconds": 30,
            "containers": [{"name": "main", "image": "probe", "command": command,
                            "terminationMessagePolicy": "FallbackToLogsOnError", **container}],
            "volumes": list(volumes),
        },
    }


def raw_pod(cluster: Cluster, name: str) -> dict[str, Any]:
    return json.loads(cluster.core.read_namespaced_pod(name, "default", _preload_content=False).data)


def test_a_pod_sees_its_name_volumes_and_env_and_stops_gracefully(setup: tuple[Cluster, Kubelet]) -> None:
    cluster, kubelet = setup
    cluster.core.create_namespaced_config_map("default", {"metadata": {"name": "probe-config"},
                                                          "data": {"greeting": "hello"}})
    cluster.core.create_namespaced_secret("default", {"metadata": {"name": "probe-secret"},
                                                      "data": {"token": base64.b64encode(b"s3cret").decode(),
                                                               "key.json": base64.b64encode(b'{"k": 1}').decode()}})
    cluster.core.create_namespaced_pod("default", pod(
        "probe-0", ["python", "-c", PROBE],
        volumes=({"name": "config", "configMap": {"name": "probe-config"}},
                 {"name": "key", "secret": {"secretName": "probe-secret", "defaultMode": 0o440}},
                 {"name": "data", "persistentVolumeClaim": {"claimName": "probe-data"}},
                 {"name": "scratch", "emptyDir": {}}),
        env=[{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
             {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "probe-secret", "key": "token"}}}],
        volumeMounts=[{"name": "config", "mountPath": "/etc/probe", "readOnly": True},
                      {"name": "key", "mountPath": "/etc/probe-secret", "readOnly": True},
                      {"name": "data", "mountPath": "/mnt/probe-data"},
                      {"name": "scratch", "mountPath": "/scratch"}]))

    report_file = kubelet.claim_folder("probe-data") / "report.json"
    wait_for(report_file.exists, timeout=30, what="the probe's report on its claim")
    report = json.loads(report_file.read_text())
    status = raw_pod(cluster, "probe-0")["status"]
    assert status["phase"] == "Running"
    assert report["pod_ip"] == report["service_name"] == status["podIP"]
    assert status["podIP"].startswith("127.") and status["podIP"] != "127.0.0.1"
    assert report["hostname"] == "probe-0"
    assert (report["token"], report["greeting"], report["scratch"]) == ("s3cret", "hello", [])
    assert "..data" in report["config_files"]  # a kubelet's ConfigMap layout
    assert (report["key_file"], report["key_file_mode"]) == ('{"k": 1}', "0o440")  # a Secret's, with its mode
    assert not Path("/mnt/probe-data/report.json").exists()  # the mount stayed inside the pod

    uid = raw_pod(cluster, "probe-0")["metadata"]["uid"]
    cluster.core.delete_namespaced_pod("probe-0", "default")
    # A running pod is only marked; the kubelet stops it, reports, then removes it.
    assert raw_pod(cluster, "probe-0")["metadata"]["deletionTimestamp"]
    wait_for(lambda: not any(p["metadata"]["name"] == "probe-0" for p in cluster.all_pods()),
             timeout=30, what="probe-0 deleted by its kubelet")
    assert kubelet.exit_codes[uid] == 143


def test_a_failed_container_reports_exit_code_and_last_output(setup: tuple[Cluster, Kubelet]) -> None:
    cluster, kubelet = setup
    cluster.core.create_namespaced_pod("default", pod(
        "probe-fails", ["python", "-c", "import sys; print('first'); print('bad input: x = 1'); sys.exit(3)"]))
    status = wait_for(lambda: (s := raw_pod(cluster, "probe-fails")["status"]).get("phase") == "Failed" and s,
                      timeout=30, what="probe-fails Failed")
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (3, "Error")
    assert terminated["message"].splitlines()[-1] == "bad input: x = 1"
    # A finished pod is deleted at once, as by a real API server.
    cluster.core.delete_namespaced_pod("probe-fails", "default")
    assert not any(p["metadata"]["name"] == "probe-fails" for p in cluster.all_pods())


@pytest.mark.parametrize("refers", ["env", "volume"])
def test_a_missing_secret_keeps_the_container_waiting(setup: tuple[Cluster, Kubelet], refers: str) -> None:
    cluster, _ = setup
    name = f"probe-waits-{refers}"
    if refers == "env":
        manifest = pod(name, ["python", "-c", "pass"], envFrom=[{"secretRef": {"name": "not-there"}}])
    else:
        manifest = pod(name, ["python", "-c", "pass"], volumes=({"name": "key", "secret": {"secretName": "not-there"}},),
                       volumeMounts=[{"name": "key", "mountPath": "/etc/key"}])
    cluster.core.create_namespaced_pod("default", manifest)
    state = wait_for(lambda: raw_pod(cluster, name)["status"]["containerStatuses"][0]["state"],
                     timeout=30, what="a container state")
    expected = {"env": "CreateContainerConfigError", "volume": "ContainerCreating"}[refers]
    assert state["waiting"]["reason"] == expected
    assert "not-there" in state["waiting"]["message"]
    assert raw_pod(cluster, name)["status"]["phase"] == "Pending"
