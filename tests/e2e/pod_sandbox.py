"""Pieces of the e2e kubelet (kubelet.py), pure but for the process helpers: the shell
that sets up a pod's private namespaces, its hosts entries, a ConfigMap or Secret
volume's files, and the pod statuses it reports."""

from __future__ import annotations

import base64
import datetime as dt
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

# What a real kubelet keeps of the log for FallbackToLogsOnError.
MESSAGE_LINES, MESSAGE_BYTES = 80, 2048


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


def volume_files(source: dict[str, Any], secret: bool) -> dict[str, bytes]:
    """The files a ConfigMap (`data` as text, `binaryData` as base64) or a Secret (`data`
    as base64) gives a volume: one per key."""
    if secret:
        return {key: base64.b64decode(value) for key, value in (source.get("data") or {}).items()}
    files = {key: value.encode() for key, value in (source.get("data") or {}).items()}
    files.update({key: base64.b64decode(value) for key, value in (source.get("binaryData") or {}).items()})
    return files


def materialise_volume(files: dict[str, bytes], folder: Path, mode: int) -> None:
    """Like a kubelet's atomic writer: keys are symlinks into `..data`, itself a symlink
    to a timestamped folder holding the files, each with the volume's defaultMode."""
    stamp = folder / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir(parents=True)
    for key, content in files.items():
        (stamp / key).write_bytes(content)
        (stamp / key).chmod(mode)
    (folder / "..data").symlink_to(stamp.name)
    for key in files:
        (folder / key).symlink_to(f"..data/{key}")


def hosts_line(address: str, hostname: str, subdomain: str | None, namespace: str) -> str:
    """The names a headless Service gives a pod: `<hostname>.<subdomain>[.<ns>.svc.cluster.local]`."""
    names = [hostname]
    if subdomain:
        names = [f"{hostname}.{subdomain}.{namespace}.svc.cluster.local", f"{hostname}.{subdomain}", hostname]
    return f"{address} {' '.join(names)}"


def ports_held_by_others(address: str, ports: list[int], own_pids: set[int]) -> list[int]:
    """The container ports that a process not of this kubelet's pods listens on, at the
    pod's address or on all addresses. Pods here share the host's network namespace:
    another test run's rendezvous port (29500, bound on all addresses) would otherwise
    take this gang's workers into that run's rendezvous."""
    import psutil

    wanted = set(ports)
    busy = {conn.laddr.port for conn in psutil.net_connections("tcp")
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port in wanted
            and conn.laddr.ip in (address, "0.0.0.0", "::") and conn.pid not in own_pids}
    return sorted(busy)


def signal_process_tree(pid: int, sig: int) -> None:
    """`sig` to a process, its process group and every descendant: torchrun starts each
    worker in a session of its own, which a signal to torchrun's group never reaches."""
    import psutil

    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for process in descendants:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def container_command(container: dict[str, Any]) -> list[str]:
    """The container's command + args; the image's `python` is this interpreter."""
    command = [*container.get("command", []), *container.get("args", [])]
    if command and command[0] in ("python", "python3"):
        command[0] = sys.executable
    return command


def sandbox_script(hostname: str, hosts: Path, mounts: list[tuple[Path, str, bool]], command: list[str]) -> str:
    """Shell for `unshare --mount --uts`: the pod's hostname, its hosts file over
    /etc/hosts, each (source, mountPath, read-only) bind mount, then exec the command."""
    lines = ["set -e", f"hostname {shlex.quote(hostname)}", f"mount --bind {shlex.quote(str(hosts))} /etc/hosts"]
    for source, mount_path, read_only in mounts:
        target = shlex.quote(mount_path)
        lines += [f"mkdir -p {target}", f"mount --bind {shlex.quote(str(source))} {target}"]
        if read_only:
            lines.append(f"mount -o remount,bind,ro {target}")
    lines.append("exec " + shlex.join(command))
    return "\n".join(lines)


def _container_status(container: dict[str, Any], ready: bool, state: dict[str, Any]) -> dict[str, Any]:
    return {"name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": ready,
            "started": ready, "restartCount": 0, "state": state}


def running_status(container: dict[str, Any], address: str, started: str) -> dict[str, Any]:
    return {
        "phase": "Running", "podIP": address, "podIPs": [{"ip": address}], "hostIP": "127.0.0.1",
        "startTime": started,
        "conditions": [{"type": kind, "status": "True", "lastTransitionTime": started}
                       for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
        "containerStatuses": [_container_status(container, True, {"running": {"startedAt": started}})],
    }


def unschedulable_condition(message: str) -> dict[str, Any]:
    """The scheduler's word on a pod no node can take."""
    return {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
            "lastTransitionTime": now_text()}


def waiting_status(container: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    """A container the kubelet cannot create yet (e.g. CreateContainerConfigError)."""
    return {"containerStatuses": [_container_status(container, False,
                                                    {"waiting": {"reason": reason, "message": message}})]}


def terminated_status(container: dict[str, Any], code: int, started: str, output: str) -> dict[str, Any]:
    """Phase and container state after the process ended; with FallbackToLogsOnError a
    failed container's message is the end of its output."""
    terminated: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                  "startedAt": started, "finishedAt": now_text()}
    if code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        terminated["message"] = output
    now = now_text()
    return {
        "phase": "Succeeded" if code == 0 else "Failed",
        "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": started},
                       {"type": "Initialized", "status": "True", "lastTransitionTime": started},
                       {"type": "ContainersReady", "status": "False", "lastTransitionTime": now},
                       {"type": "Ready", "status": "False", "lastTransitionTime": now}],
        "containerStatuses": [_container_status(container, False, {"terminated": terminated})],
    }
