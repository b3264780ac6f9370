"""A kubelet for the end-to-end tests: runs the emulated cluster's pods as local processes.

Test code, not a product feature (DESIGN.md "Testing without a cluster"). It does what
a node does for the pods it is given, through the same API a real kubelet uses:
- binds each new pod to its node (spec.nodeName) and gives it its own loopback address,
  127.<job>.<gang>.<index + 2>: known before the pod starts, and a restarted gang never
  collides with a dying one; a pod whose container ports another process (not one of
  its pods) listens on waits for them: all pods share the host's network namespace;
- runs the container's command (a leading `python` is this interpreter) in a private
  mount and UTS namespace (`unshare`): the pod's hostname, a hosts file that resolves the
  headless Service names of its peers, and its volumes bind-mounted at their mountPaths
  (a claim is one folder shared by every pod, like ReadWriteMany; a ConfigMap or a
  Secret is materialised as a kubelet does it, with its defaultMode; an emptyDir is a
  fresh folder), so the trainer's config needs no path rewriting;
- sets env from values, the downward API (status.podIP, metadata.*), Secrets and
  ConfigMaps (env and envFrom); a missing one keeps the container waiting
  (CreateContainerConfigError) until it exists;
- reports status.phase, podIP and the container's terminated state (exit code, reason,
  and with FallbackToLogsOnError the last lines of the output as message);
- on a graceful delete (the API sets deletionTimestamp) sends SIGTERM to the container's
  main process, SIGKILL to all its processes after the grace period, reports the exit
  and deletes the pod with grace 0.

The security context is not applied: the processes run as the test's user.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes

from pod_sandbox import (
    container_command,
    exit_code,
    hosts_line,
    materialise_volume,
    now_text,
    output_tail,
    ports_held_by_others,
    running_status,
    sandbox_script,
    signal_process_tree,
    terminated_status,
    unschedulable_condition,
    volume_files,
    waiting_status,
)

REPO = Path(__file__).resolve().parents[2]
NODE_NAME = "e2e-node"
POLL_SECONDS = 0.2
# The workers ask for one CPU each: one thread per process, as a CPU limit would suggest.
CONTAINER_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class PodSetupError(Exception):
    """What keeps a pod's container from being created (reported, retried next pass)."""

    def __init__(self, message: str, reason: str = "CreateContainerConfigError") -> None:
        super().__init__(message)
        self.reason = reason


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

    kubeconfig: Path
    root: Path
    # Prometheus file_sd targets: each running pod's port named `metrics`.
    scrape_targets: Path | None = None
    # Exit code of every pod that ended here, by pod uid.
    exit_codes: dict[str, int] = field(default_factory=dict)
    # The node's pod capacity, as the scheduler sees it (None: unlimited): a pod beyond
    # the ones still running here stays Pending, refused as the scheduler refuses it.
    max_pods: int | None = None
    _pods: dict[str, RunningPod] = field(default_factory=dict)
    _job_numbers: dict[tuple[str, str], int] = field(default_factory=dict)
    # Addresses 127.<first_job + n>.<gang>.<index + 2>: a random start keeps two test
    # runs on one machine (each with its own kubelet) off each other's addresses.
    _first_job: int = field(default_factory=lambda: random.randrange(1, 128))
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    error: BaseException | None = None

    def __post_init__(self) -> None:
        client = kubernetes.config.new_client_from_config(str(self.kubeconfig))
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
                    self._maybe_start(pod)
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
        job = self._job_numbers.setdefault(key, self._first_job + len(self._job_numbers))
        gang = int(labels.get("dreambooth.io/gang", 0))
        index = int(labels.get("dreambooth.io/worker-index", 0))
        return f"127.{job}.{gang % 256}.{index + 2}"

    def _maybe_start(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        if self.max_pods is not None and sum(not p.finished for p in self._pods.values()) >= self.max_pods:
            if not (pod.get("status") or {}).get("conditions"):  # said once
                self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": {
                    "phase": "Pending", "conditions": [unschedulable_condition("0/1 nodes are available: 1 Too many pods.")]}})
            return
        try:
            self._start(pod)
        except PodSetupError as error:
            [container] = pod["spec"]["containers"]
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {
                "status": waiting_status(container, error.reason, str(error))})

    def _start(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        namespace, name = meta["namespace"], meta["name"]
        [container] = spec["containers"]
        address = self.address(pod)
        busy = ports_held_by_others(address, [port["containerPort"] for port in container.get("ports") or []],
                                    self._own_pids())
        if busy:  # a pod of its own network namespace would not care; here it waits its turn
            raise PodSetupError(f"port(s) {busy} in use on this host by another process", "ContainerCreating")
        if spec.get("nodeName") != NODE_NAME:
            # The scheduler's part: bind the pod to this node (its graceful delete needs a node).
            self.core.patch_namespaced_pod(name, namespace, {"spec": {"nodeName": NODE_NAME}})
        folder = self.root / "pods" / f"{namespace}_{name}_{meta['uid'][:8]}"
        shutil.rmtree(folder, ignore_errors=True)  # a start retried after a setup error
        folder.mkdir(parents=True)
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
        self.core.patch_namespaced_pod_status(name, namespace, {"status": running_status(container, address, started)})

    def _own_pids(self) -> set[int]:
        import psutil

        pids = set()
        for running in self._pods.values():
            try:
                root = psutil.Process(running.process.pid)
                pids |= {root.pid, *(child.pid for child in root.children(recursive=True))}
            except psutil.NoSuchProcess:
                pass
        return pids

    def _sandbox_script(self, pod: dict[str, Any], container: dict[str, Any], folder: Path, address: str) -> str:
        hosts = folder / "hosts"
        hosts.write_text(self._hosts_file(pod, address))
        volumes = {volume["name"]: self._volume_folder(pod, volume, folder) for volume in pod["spec"].get("volumes") or []}
        mounts = [(volumes[mount["name"]] / mount.get("subPath", ""), mount["mountPath"], bool(mount.get("readOnly")))
                  for mount in container.get("volumeMounts") or []]
        hostname = pod["spec"].get("hostname") or pod["metadata"]["name"]
        return sandbox_script(hostname, hosts, mounts, container_command(container))

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
            lines.append(hosts_line(peer_address, peer["spec"].get("hostname") or peer["metadata"]["name"],
                                    subdomain, namespace))
        return "\n".join(lines) + "\n"

    def _volume_folder(self, pod: dict[str, Any], volume: dict[str, Any], folder: Path) -> Path:
        namespace = pod["metadata"]["namespace"]
        if "persistentVolumeClaim" in volume:
            path = self.root / "claims" / namespace / volume["persistentVolumeClaim"]["claimName"]
            path.mkdir(parents=True, exist_ok=True)
            return path
        path = folder / "volumes" / volume["name"]
        path.mkdir(parents=True)
        if "configMap" in volume or "secret" in volume:
            kind, source = ("Secret", volume["secret"]) if "secret" in volume else ("ConfigMap", volume["configMap"])
            if "items" in source:
                raise ValueError(f"e2e kubelet: volume {volume['name']!r} selects {kind} keys (items), "
                                 "which it cannot provide; add it to Kubelet._volume_folder")
            # A missing one holds the pod in ContainerCreating (FailedMount), not in a config error.
            data = self._read(kind, source.get("secretName") or source["name"], namespace, "ContainerCreating")
            materialise_volume(volume_files(data, secret=kind == "Secret"), path, source.get("defaultMode", 0o644))
        elif "emptyDir" not in volume:
            raise ValueError(f"e2e kubelet: volume {volume['name']!r} of pod {pod['metadata']['name']} is of a "
                             f"kind it cannot provide ({sorted(volume)}); add it to Kubelet._volume_folder")
        return path

    def _read(self, kind: str, name: str, namespace: str,
              reason: str = "CreateContainerConfigError") -> dict[str, Any]:
        """A Secret or ConfigMap the pod refers to; a missing one stops the pod's start
        the way a kubelet does (`reason`: CreateContainerConfigError for env,
        ContainerCreating for a volume), until it appears."""
        method = self.core.read_namespaced_secret if kind == "Secret" else self.core.read_namespaced_config_map
        try:
            return json.loads(method(name, namespace, _preload_content=False).data)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                raise PodSetupError(f'{kind.lower()} "{name}" not found', reason) from None
            raise

    def _container_env(self, pod: dict[str, Any], container: dict[str, Any], address: str) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        fields = {"status.podIP": address, "metadata.name": pod["metadata"]["name"],
                  "metadata.namespace": namespace, "spec.nodeName": NODE_NAME}
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            if "secretRef" in source:
                secret = self._read("Secret", source["secretRef"]["name"], namespace)
                env.update({k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()})
            elif "configMapRef" in source:
                env.update(self._read("ConfigMap", source["configMapRef"]["name"], namespace).get("data") or {})
        for var in container.get("env") or []:
            source = var.get("valueFrom")
            if source is None:
                env[var["name"]] = var.get("value", "")
            elif "fieldRef" in source:
                env[var["name"]] = fields[source["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                data = self._read("Secret", ref["name"], namespace).get("data") or {}
                if ref["key"] not in data:
                    raise PodSetupError(f'couldn\'t find key {ref["key"]} in Secret {namespace}/{ref["name"]}')
                env[var["name"]] = base64.b64decode(data[ref["key"]]).decode()
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                data = self._read("ConfigMap", ref["name"], namespace).get("data") or {}
                if ref["key"] not in data:
                    raise PodSetupError(f'couldn\'t find key {ref["key"]} in ConfigMap {namespace}/{ref["name"]}')
                env[var["name"]] = data[ref["key"]]
            else:
                raise ValueError(f"e2e kubelet: env {var['name']} has an unsupported source {source}")
        return env

    # --- ending a pod --------------------------------------------------------------------

    def _report_exit(self, pod: dict[str, Any], running: RunningPod, code: int) -> None:
        [container] = pod["spec"]["containers"]
        status = terminated_status(container, code, running.started, output_tail(running.log))
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
        """`group`: every process of the container, as a runtime ends them all with its
        PID namespace (torchrun's workers each run in a session of their own)."""
        if group:
            signal_process_tree(running.process.pid, sig)
            return
        try:
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


def main() -> None:
    """Run the pods of an emulated API by hand (see tests/operator/emulated_cluster.py):

        .venv/bin/python tests/e2e/kubelet.py /tmp/emulated/kubeconfig.yaml /tmp/emulated/node
    """
    import sys

    kubelet = Kubelet(Path(sys.argv[1]), Path(sys.argv[2])).start()
    print(f"e2e kubelet running the pods of {sys.argv[1]}; folders under {sys.argv[2]}", flush=True)
    try:
        while kubelet.error is None:
            time.sleep(1)
        raise SystemExit(f"kubelet stopped: {kubelet.error!r}")
    except KeyboardInterrupt:
        kubelet.stop()


if __name__ == "__main__":
    main()
