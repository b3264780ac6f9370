"""A kubelet for the end-to-end tests: runs the emulated cluster's pods as local processes.

Test code, not a product feature (DESIGN.md "Testing without a cluster"). It does what
a node does for the pods it is given, through the same API a real kubelet uses:
- binds each new pod to its node (spec.nodeName) and gives it its own loopback address,
  127.<job>.<gang>.<index + 2>: known before the pod starts, and a restarted gang never
  collides with a dying one;
- runs the container's command (a leading `python` is this interpreter) in a private
  mount and UTS namespace (`unshare`): the pod's hostname, a hosts file that resolves the
  headless Service names of its peers, and its volumes bind-mounted at their mountPaths
  (a claim is one folder shared by every pod, like ReadWriteMany; a ConfigMap is
  materialised as a kubelet does it; an emptyDir is a fresh folder), so the trainer's
  config needs no path rewriting;
- sets env from values, the downward API (status.podIP, metadata.*) and Secrets/ConfigMaps;
- reports status.phase, podIP and the container's terminated state (exit code, reason,
  and with FallbackToLogsOnError the last lines of the output as message);
- on a graceful delete (the API sets deletionTimestamp) sends SIGTERM to the container's
  main process, SIGKILL to all its processes after the grace period, reports the exit
  and deletes the pod with grace 0.

The security context is not applied: the processes run as the test's user.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes

from emulated_cluster import EmulatedCluster

REPO = Path(__file__).resolve().parents[2]
NODE_NAME = "e2e-node"
POLL_SECONDS = 0.2
# What a real kubelet keeps of the log for FallbackToLogsOnError.
MESSAGE_LINES, MESSAGE_BYTES = 80, 2048
# The workers ask for one CPU each: one thread per process, as a CPU limit would suggest.
CONTAINER_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def now_text() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def exit_code(returncode: int) -> int:
    """A shell-style exit code: 128 + signal for a process killed by a signal."""
    return 128 - returncode if returncode < 0 else returncode


def output_tail(log: Path) -> str:
    if not log.exists():
        return ""
    lines = log.read_bytes()[-64 * 1024:].decode(errors="replace").splitlines()[-MESSAGE_LINES:]
    return "\n".join(lines)[-MESSAGE_BYTES:]


def materialise_config_map(config_map: dict[str, Any], folder: Path) -> None:
    """Like a kubelet's atomic writer: keys are symlinks into `..data`, itself a symlink
    to a timestamped folder holding the files."""
    stamp = folder / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir(parents=True)
    files = dict((config_map.get("data") or {}).items())
    for key, value in (config_map.get("binaryData") or {}).items():
        files[key] = base64.b64decode(value)
    for key, value in files.items():
        (stamp / key).write_bytes(value if isinstance(value, bytes) else value.encode())
    (folder / "..data").symlink_to(stamp.name)
    for key in files:
        (folder / key).symlink_to(f"..data/{key}")


@dataclass
class RunningPod:
    uid: str
    namespace: str
    name: str
    address: str
    process: subprocess.Popen[bytes]
    log: Path
    started: str
    metrics_ports: list[int]
    term_sent_at: float | None = None
    kill_at: float | None = None
    finished: bool = False


@dataclass
class Kubelet:
    """Polls the emulated API for pods and runs them (see the module docstring)."""

    emulated: EmulatedCluster
    root: Path
    # Prometheus file_sd targets: each running pod's port named `metrics`.
    scrape_targets: Path | None = None
    # Exit code of every pod that ended here, by pod uid.
    exit_codes: dict[str, int] = field(default_factory=dict)
    _pods: dict[str, RunningPod] = field(default_factory=dict)
    _job_numbers: dict[tuple[str, str], int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    error: BaseException | None = None

    def __post_init__(self) -> None:
        client = kubernetes.config.new_client_from_config(str(self.emulated.kubeconfig))
        self.core = kubernetes.client.CoreV1Api(client)
        (self.root / "claims").mkdir(parents=True, exist_ok=True)
        (self.root / "pods").mkdir(parents=True, exist_ok=True)
        self._write_targets()

    # --- lifecycle of the kubelet itself -------------------------------------------------

    def start(self) -> "Kubelet":
        check = subprocess.run(["unshare", "--mount", "--uts", "true"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError("the e2e kubelet runs each pod in its own mount namespace and needs "
                               f"`unshare --mount --uts` (root or CAP_SYS_ADMIN); it failed: {check.stderr.strip()}")
        self._thread = threading.Thread(target=self._loop, name="e2e-kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for pod in self._pods.values():
            self._kill(pod)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except BaseException as error:  # surfaced by the tests through `error`
                self.error = error
                raise
            self._stop.wait(POLL_SECONDS)

    # --- one pass ------------------------------------------------------------------------

    def sync(self) -> None:
        pods = json.loads(self.core.list_pod_for_all_namespaces(_preload_content=False).data)["items"]
        seen = set()
        for pod in pods:
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            running = self._pods.get(uid)
            if running is None:
                if (pod.get("status") or {}).get("phase", "Pending") == "Pending" \
                        and not pod["metadata"].get("deletionTimestamp"):
                    self._start(pod)
            else:
                self._follow(pod, running)
        for uid in list(self._pods):
            if uid not in seen:  # deleted at once (grace 0): nothing may survive it
                self._kill(self._pods.pop(uid))
        self._write_targets()

    def _follow(self, pod: dict[str, Any], running: RunningPod) -> None:
        meta = pod["metadata"]
        if running.finished:
            return
        if meta.get("deletionTimestamp") and running.term_sent_at is None:
            # Like a container runtime: SIGTERM to the main process, SIGKILL to all later.
            running.term_sent_at = time.monotonic()
            running.kill_at = running.term_sent_at + int(meta.get("deletionGracePeriodSeconds") or 0)
            self._signal(running, signal.SIGTERM, group=False)
        if running.kill_at is not None and time.monotonic() >= running.kill_at:
            self._signal(running, signal.SIGKILL, group=True)
        returncode = running.process.poll()
        if returncode is None:
            return
        running.finished = True
        self.exit_codes[running.uid] = exit_code(returncode)
        self._kill(running)  # the container's other processes end with it
        self._report_exit(pod, running, exit_code(returncode))
        if meta.get("deletionTimestamp"):
            self._delete_now(running)

    # --- starting a pod ------------------------------------------------------------------

    def address(self, pod: dict[str, Any]) -> str:
        labels = pod["metadata"].get("labels") or {}
        key = (pod["metadata"]["namespace"], labels.get("dreambooth.io/job", pod["metadata"]["name"]))
        job = self._job_numbers.setdefault(key, len(self._job_numbers) + 1)
        gang = int(labels.get("dreambooth.io/gang", 0))
        index = int(labels.get("dreambooth.io/worker-index", 0))
        return f"127.{job}.{gang % 256}.{index + 2}"

    def _start(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        namespace, name = meta["namespace"], meta["name"]
        # The scheduler's part: bind the pod to this node (its graceful delete needs a node).
        self.core.patch_namespaced_pod(name, namespace, {"spec": {"nodeName": NODE_NAME}})
        folder = self.root / "pods" / f"{namespace}_{name}_{meta['uid'][:8]}"
        folder.mkdir(parents=True)
        address = self.address(pod)
        [container] = spec["containers"]
        script = self._sandbox_script(pod, container, folder, address)
        env = {**os.environ, **CONTAINER_ENV, **self._container_env(pod, container, address)}
        log = folder / "output.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(["unshare", "--mount", "--uts", "sh", "-c", script],
                                       stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                       start_new_session=True)
        started = now_text()
        ports = [port["containerPort"] for port in container.get("ports") or [] if port.get("name") == "metrics"]
        self._pods[meta["uid"]] = RunningPod(meta["uid"], namespace, name, address, process, log, started, ports)
        self.core.patch_namespaced_pod_status(name, namespace, {"status": {
            "phase": "Running", "podIP": address, "podIPs": [{"ip": address}], "hostIP": "127.0.0.1",
            "startTime": started,
            "conditions": [{"type": kind, "status": "True", "lastTransitionTime": started}
                           for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
            "containerStatuses": [{"name": container["name"], "image": container.get("image", ""), "imageID": "",
                                   "ready": True, "started": True, "restartCount": 0,
                                   "state": {"running": {"startedAt": started}}}],
        }})

    def _sandbox_script(self, pod: dict[str, Any], container: dict[str, Any], folder: Path, address: str) -> str:
        """Shell run inside the new namespaces: hostname, /etc/hosts, volume mounts, exec."""
        spec = pod["spec"]
        hostname = spec.get("hostname") or pod["metadata"]["name"]
        hosts = folder / "hosts"
        hosts.write_text(self._hosts_file(pod, address))
        lines = ["set -e", f"hostname {shlex.quote(hostname)}", f"mount --bind {hosts} /etc/hosts"]
        volumes = {volume["name"]: self._volume_folder(pod, volume, folder) for volume in spec.get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            source = volumes[mount["name"]] / mount.get("subPath", "")
            target = shlex.quote(mount["mountPath"])
            lines += [f"mkdir -p {target}", f"mount --bind {shlex.quote(str(source))} {target}"]
            if mount.get("readOnly"):
                lines.append(f"mount -o remount,bind,ro {target}")
        command = [*container.get("command", []), *container.get("args", [])]
        if command and command[0] in ("python", "python3"):
            command[0] = sys.executable
        lines.append("exec " + shlex.join(command))
        return "\n".join(lines)

    def _hosts_file(self, pod: dict[str, Any], address: str) -> str:
        """Names a headless Service gives: `<hostname>.<subdomain>[.<ns>.svc.cluster.local]`
        for every pod of the same subdomain (the operator creates worker-0 first)."""
        namespace = pod["metadata"]["namespace"]
        subdomain = pod["spec"].get("subdomain")
        lines = ["127.0.0.1 localhost"]
        peers = json.loads(self.core.list_namespaced_pod(namespace, _preload_content=False).data)["items"]
        for peer in peers:
            if peer["metadata"]["uid"] == pod["metadata"]["uid"]:
                peer, peer_address = pod, address
            elif subdomain and peer["spec"].get("subdomain") == subdomain \
                    and (peer["metadata"].get("labels") or {}).get("dreambooth.io/gang") \
                    == (pod["metadata"].get("labels") or {}).get("dreambooth.io/gang"):
                peer_address = self.address(peer)
            else:
                continue
            host = peer["spec"].get("hostname") or peer["metadata"]["name"]
            names = [host]
            if subdomain:
                names = [f"{host}.{subdomain}.{namespace}.svc.cluster.local", f"{host}.{subdomain}", host]
            lines.append(f"{peer_address} {' '.join(names)}")
        return "\n".join(lines) + "\n"

    def _volume_folder(self, pod: dict[str, Any], volume: dict[str, Any], folder: Path) -> Path:
        namespace = pod["metadata"]["namespace"]
        if "persistentVolumeClaim" in volume:
            path = self.root / "claims" / namespace / volume["persistentVolumeClaim"]["claimName"]
            path.mkdir(parents=True, exist_ok=True)
            return path
        path = folder / "volumes" / volume["name"]
        path.mkdir(parents=True)
        if "configMap" in volume:
            name = volume["configMap"]["name"]
            config_map = json.loads(self.core.read_namespaced_config_map(name, namespace,
                                                                         _preload_content=False).data)
            materialise_config_map(config_map, path)
        elif "emptyDir" not in volume:
            raise ValueError(f"e2e kubelet: volume {volume['name']!r} of pod {pod['metadata']['name']} is of a "
                             f"kind it cannot provide ({sorted(volume)}); add it to Kubelet._volume_folder")
        return path

    def _container_env(self, pod: dict[str, Any], container: dict[str, Any], address: str) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        fields = {"status.podIP": address, "metadata.name": pod["metadata"]["name"],
                  "metadata.namespace": namespace, "spec.nodeName": NODE_NAME}
        env: dict[str, str] = {}
        for var in container.get("env") or []:
            source = var.get("valueFrom")
            if source is None:
                env[var["name"]] = var.get("value", "")
            elif "fieldRef" in source:
                env[var["name"]] = fields[source["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = json.loads(self.core.read_namespaced_secret(ref["name"], namespace,
                                                                     _preload_content=False).data)
                env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                config_map = json.loads(self.core.read_namespaced_config_map(ref["name"], namespace,
                                                                             _preload_content=False).data)
                env[var["name"]] = config_map["data"][ref["key"]]
            else:
                raise ValueError(f"e2e kubelet: env {var['name']} has an unsupported source {source}")
        return env

    # --- ending a pod --------------------------------------------------------------------

    def _report_exit(self, pod: dict[str, Any], running: RunningPod, code: int) -> None:
        [container] = pod["spec"]["containers"]
        terminated: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                      "startedAt": running.started, "finishedAt": now_text()}
        if code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            terminated["message"] = output_tail(running.log)
        status = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": [{"type": kind, "status": "False", "lastTransitionTime": now_text()}
                           for kind in ("ContainersReady", "Ready")] +
                          [{"type": "PodScheduled", "status": "True"}, {"type": "Initialized", "status": "True"}],
            "containerStatuses": [{"name": container["name"], "image": container.get("image", ""), "imageID": "",
                                   "ready": False, "started": False, "restartCount": 0,
                                   "state": {"terminated": terminated}}],
        }
        try:
            self.core.patch_namespaced_pod_status(running.name, running.namespace, {"status": status})
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise

    def _delete_now(self, running: RunningPod) -> None:
        try:
            self.core.delete_namespaced_pod(running.name, running.namespace, grace_period_seconds=0)
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise
        self._pods.pop(running.uid, None)

    def _signal(self, running: RunningPod, sig: signal.Signals, group: bool) -> None:
        try:
            if group:
                os.killpg(running.process.pid, sig)
            else:
                os.kill(running.process.pid, sig)
        except ProcessLookupError:
            pass

    def _kill(self, running: RunningPod) -> None:
        """SIGKILL whatever is left of a pod's processes (its process group)."""
        self._signal(running, signal.SIGKILL, group=True)
        try:
            running.process.wait(10)
        except subprocess.TimeoutExpired:
            pass

    # --- for the tests -------------------------------------------------------------------

    def pod(self, name: str, namespace: str = "default") -> RunningPod | None:
        """The live (not finished) local pod of that name, if any."""
        return next((p for p in self._pods.values()
                     if p.name == name and p.namespace == namespace and not p.finished), None)

    def kill_trainer(self, name: str, namespace: str = "default") -> int:
        """SIGKILL one trainer process (a torchrun worker) of a running pod, as the
        kernel's OOM killer would; returns its pid."""
        import psutil

        pod = self.pod(name, namespace)
        assert pod is not None, f"pod {namespace}/{name} is not running here"
        workers = [child for child in psutil.Process(pod.process.pid).children(recursive=True)
                   if "trainer/main.py" in " ".join(child.cmdline())]
        assert workers, f"pod {name} runs no trainer process yet"
        workers[0].send_signal(signal.SIGKILL)
        return workers[0].pid

    def claim_folder(self, claim: str, namespace: str = "default") -> Path:
        return self.root / "claims" / namespace / claim

    def logs(self) -> str:
        """Every pod's output tail, newest last: printed when a test fails."""
        parts = []
        for folder in sorted((self.root / "pods").iterdir(), key=lambda p: p.stat().st_mtime):
            parts.append(f"--- {folder.name} ---\n{output_tail(folder / 'output.log')}")
        return "\n".join(parts)

    def _write_targets(self) -> None:
        if self.scrape_targets is None:
            return
        targets = []
        for running in self._pods.values():
            if not running.finished:
                targets.append({"targets": [f"{running.address}:{port}" for port in running.metrics_ports],
                                "labels": {"pod": running.name}})
        targets = [t for t in targets if t["targets"]]
        text = json.dumps(targets, sort_keys=True)
        if self.scrape_targets.exists() and self.scrape_targets.read_text() == text:
            return
        temporary = self.scrape_targets.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.rename(self.scrape_targets)
