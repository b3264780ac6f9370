"""Pure builders of the worker pods (one per node, torchrun with a static rendezvous)
and, with gang scheduling, of the PodGroup that has them placed all together."""

from __future__ import annotations

import copy
from typing import Any

from kubernetes.utils import parse_quantity

from trainer.contract import GPUS_PER_NODE_ENV, JOB_NAME_ENV, JOB_NAMESPACE_ENV, POD_IP_ENV

from .constants import (
    ANNOTATION_CONFIG_HASH,
    ANNOTATION_GANG_NODES,
    CONFIG_MOUNT_DIR,
    CONFIG_PATH,
    CONFIG_VOLUME,
    COSCHEDULING_GROUP_LABEL,
    CREDENTIALS_MOUNT_DIR,
    CREDENTIALS_VOLUME_PREFIX,
    GPU_RESOURCE,
    HF_TOKEN_ENV,
    INSTANCE_IMAGES_MOUNT_DIR,
    INSTANCE_IMAGES_VOLUME,
    LABEL_ROLE,
    LAUNCHER,
    METRICS_PORT_NAME,
    POD_GROUP_APIS,
    POD_GROUP_KIND,
    RENDEZVOUS_PORT,
    RENDEZVOUS_TIMEOUT_SECONDS,
    ROLE_STANDBY,
    SHM_MOUNT_DIR,
    SHM_VOLUME,
    STANDBY_COMMAND,
    STORAGE_MOUNT_DIR,
    STORAGE_VOLUME,
    TRAINER_ENTRY,
    VOLCANO_GROUP_ANNOTATION,
    VOLCANO_SCHEDULER,
    WORKER_CONTAINER,
    WORKER_GID,
    WORKER_UID,
)
from .metadata import (
    child_metadata,
    config_map_name,
    pod_group_name,
    rendezvous_address,
    service_name,
    standby_name,
    storage_claim_name,
    worker_labels,
    worker_name,
)
from .spec import Job
from .trainer_config import launcher_shutdown_seconds


def torchrun_command(job: Job, index: int, nodes: int) -> list[str]:
    """Static rendezvous: `--node_rank` puts global rank 0 on worker-0, whose metrics
    endpoint the operator scrapes (with c10d, rank 0 could land on any pod)."""
    workers = job.spec.workers
    return [
        *LAUNCHER,
        "--nnodes", str(nodes),
        "--node_rank", str(index),
        "--nproc_per_node", str(workers.procs_per_node),
        "--shutdown-timeout", str(launcher_shutdown_seconds(workers.termination_grace_period_seconds)),
        "--master_addr", rendezvous_address(job.name),
        "--master_port", str(RENDEZVOUS_PORT),
        "--rdzv_conf", f"timeout={RENDEZVOUS_TIMEOUT_SECONDS}",
        TRAINER_ENTRY,
        "--config", CONFIG_PATH,
    ]


def worker_env(job: Job, index: int) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        # The trainer binds its metrics endpoint to the pod IP (DESIGN.md metrics.host).
        {"name": POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": JOB_NAME_ENV, "value": job.name},
        {"name": JOB_NAMESPACE_ENV, "value": job.namespace},
        {"name": "WORKER_INDEX", "value": str(index)},
    ]
    if job.spec.workers.gpus_per_node > 0:
        # The trainer fails at once (exit 2) when the container sees fewer, instead of training on CPU.
        env.append({"name": GPUS_PER_NODE_ENV, "value": str(job.spec.workers.gpus_per_node)})
    secret = job.spec.model.hf_token_secret
    if secret is not None:
        env.append({"name": HF_TOKEN_ENV,
                    "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}})
    # The user's own variables come last, so they can override ours on purpose.
    env.extend(copy.deepcopy(job.spec.workers.env))
    return env


def worker_resources(job: Job) -> dict[str, Any]:
    """The user's resources, plus `nvidia.com/gpu: gpusPerNode` when they left it out."""
    workers = job.spec.workers
    resources = copy.deepcopy(workers.resources)
    if workers.gpus_per_node > 0:
        limits = resources.setdefault("limits", {})
        limits.setdefault(GPU_RESOURCE, workers.gpus_per_node)
    # Quantities are int-or-string in YAML (`nvidia.com/gpu: 8`); the client wants strings.
    for section in ("limits", "requests"):
        if isinstance(resources.get(section), dict):
            resources[section] = {name: str(value) for name, value in resources[section].items()}
    return resources


def instance_images_volume(job: Job) -> dict[str, Any] | None:
    """The volume the photos are mounted from; None when the trainer copies them from a URL."""
    images = job.spec.data.instance_images
    if images.config_map_name is not None:
        # A few small photos fit a ConfigMap (binaryData): no volume to provision.
        return {"name": INSTANCE_IMAGES_VOLUME, "configMap": {"name": images.config_map_name}}
    if images.claim_name is not None:
        return {"name": INSTANCE_IMAGES_VOLUME,
                "persistentVolumeClaim": {"claimName": images.claim_name, "readOnly": True}}
    return None


def worker_volumes(job: Job) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes = [
        {"name": CONFIG_VOLUME, "configMap": {"name": config_map_name(job.name)}},
        {"name": STORAGE_VOLUME, "persistentVolumeClaim": {"claimName": storage_claim_name(job)}},
        # NCCL and data loader workers share memory through /dev/shm, which is 64 MiB
        # in a container by default: far too small.
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}},
    ]
    mounts = [
        {"name": CONFIG_VOLUME, "mountPath": CONFIG_MOUNT_DIR, "readOnly": True},
        {"name": STORAGE_VOLUME, "mountPath": STORAGE_MOUNT_DIR},
        {"name": SHM_VOLUME, "mountPath": SHM_MOUNT_DIR},
    ]
    images = instance_images_volume(job)
    if images is not None:
        volumes.insert(2, images)
        mounts.insert(2, instance_images_mount(job))
    for index, secret in enumerate(job.spec.credentials_secrets):
        # A Secret name may be longer than a volume name can be: volumes are numbered.
        name = f"{CREDENTIALS_VOLUME_PREFIX}{index}"
        # Readable by the worker's group (fsGroup), by no one else.
        volumes.append({"name": name, "secret": {"secretName": secret, "defaultMode": 0o440}})
        mounts.append({"name": name, "mountPath": f"{CREDENTIALS_MOUNT_DIR}/{secret}", "readOnly": True})
    # The user's own (a dataset on NFS, a CA bundle, a local NVMe cache); the spec keeps
    # their names and folders clear of the ones above.
    volumes.extend(copy.deepcopy(job.spec.workers.volumes))
    mounts.extend(copy.deepcopy(job.spec.workers.volume_mounts))
    return volumes, mounts


def instance_images_mount(job: Job) -> dict[str, Any]:
    mount: dict[str, Any] = {"name": INSTANCE_IMAGES_VOLUME, "mountPath": INSTANCE_IMAGES_MOUNT_DIR, "readOnly": True}
    sub_path = job.spec.data.instance_images.path.strip("/")
    if sub_path:
        mount["subPath"] = sub_path
    return mount


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": WORKER_UID,
        "runAsGroup": WORKER_GID,
        # The checkpoint volume must be writable by the non-root user on any storage class.
        "fsGroup": WORKER_GID,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    # Training needs no Linux capabilities: NCCL over sockets or InfiniBand verbs
    # (the device plugin hands in the devices) works without them.
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def build_worker_pod(job: Job, index: int, gang: int, config_hash: str, nodes: int | None = None) -> dict[str, Any]:
    """Worker `index` of gang number `gang`, of `nodes` workers (default workers.nodes;
    fewer when an elastic gang shrank)."""
    nodes = job.spec.workers.nodes if nodes is None else nodes
    workers = job.spec.workers
    volumes, mounts = worker_volumes(job)
    ports = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}]
    if job.spec.metrics.port:
        ports.append({"name": METRICS_PORT_NAME, "containerPort": job.spec.metrics.port, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "image": workers.image,
        "command": torchrun_command(job, index, nodes),
        "env": worker_env(job, index),
        "ports": ports,
        "resources": worker_resources(job),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        # The trainer's last log lines (its one-paragraph error on exit 2) become the
        # termination message, which the operator copies into status.lastFailure.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if job.spec.credentials_secrets:
        # Storage credentials (AWS_*, HF_TOKEN, ...) straight from Secrets, never as literal values.
        container["envFrom"] = [{"secretRef": {"name": name}} for name in job.spec.credentials_secrets]
    if workers.image_pull_policy is not None:
        container["imagePullPolicy"] = workers.image_pull_policy
    spec: dict[str, Any] = {
        # The operator restarts the whole gang after a failure; a kubelet restarting
        # one container would leave it alone in a dead rendezvous.
        "restartPolicy": "Never",
        "hostname": worker_name(job.name, index),
        "subdomain": service_name(job.name),
        "securityContext": pod_security_context(),
        # The trainer never calls the Kubernetes API: no token to steal from a worker.
        "automountServiceAccountToken": False,
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": workers.termination_grace_period_seconds,
    }
    if workers.node_selector:
        spec["nodeSelector"] = dict(workers.node_selector)
    if workers.tolerations:
        spec["tolerations"] = copy.deepcopy(workers.tolerations)
    if workers.affinity:
        spec["affinity"] = copy.deepcopy(workers.affinity)
    if workers.service_account_name is not None:
        spec["serviceAccountName"] = workers.service_account_name
    if workers.priority_class_name is not None:
        spec["priorityClassName"] = workers.priority_class_name
    if workers.scheduler_name is not None:
        spec["schedulerName"] = workers.scheduler_name
    if workers.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": secret.name} for secret in workers.image_pull_secrets]
    # The user's labels and annotations (never the operator's own keys: the spec refuses those).
    labels = {**workers.labels, **worker_labels(job.name, index, gang)}
    annotations = {**workers.annotations, ANNOTATION_CONFIG_HASH: config_hash, ANNOTATION_GANG_NODES: str(nodes)}
    gang_scheduling = job.spec.run_policy.gang_scheduling
    if gang_scheduling is not None and gang_scheduling.pod_group == "volcano":
        annotations[VOLCANO_GROUP_ANNOTATION] = pod_group_name(job.name)
        spec["schedulerName"] = VOLCANO_SCHEDULER
    elif gang_scheduling is not None:
        labels[COSCHEDULING_GROUP_LABEL] = pod_group_name(job.name)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": child_metadata(job, worker_name(job.name, index), labels=labels, annotations=annotations),
        "spec": spec,
    }


def build_standby_pod(job: Job, index: int, gang: int, config_hash: str) -> dict[str, Any]:
    """The stand-in of worker `index`, which a shrunk elastic gang lacks. The scheduler is
    asked for it as for that worker (resources, node selector, tolerations, affinity,
    priority, volumes), so that its being scheduled means the worker can be; it runs
    nothing. Not a member of the gang's PodGroup, whose minMember the gang meets."""
    pod = build_worker_pod(job, index, gang, config_hash)
    metadata, spec = pod["metadata"], pod["spec"]
    metadata["name"] = standby_name(job.name, index)
    # Its worker's labels but the role, which the Service, NetworkPolicy and PodMonitor select.
    metadata["labels"][LABEL_ROLE] = ROLE_STANDBY
    metadata["labels"].pop(COSCHEDULING_GROUP_LABEL, None)
    metadata["annotations"].pop(VOLCANO_GROUP_ANNOTATION, None)
    del spec["hostname"], spec["subdomain"]  # the worker's DNS name is not its
    [container] = spec["containers"]
    container["command"] = list(STANDBY_COMMAND)
    del container["ports"]
    return pod


def gang_resources(job: Job) -> dict[str, str]:
    """What the fewest workers a gang runs on request together (a container's limit where
    it sets no request, as Kubernetes defaults it): a Volcano queue admits the group only
    when that fits."""
    resources = worker_resources(job)
    per_worker = {**resources.get("limits", {}), **resources.get("requests", {})}
    total = {}
    for name, quantity in per_worker.items():
        value = parse_quantity(quantity) * job.spec.workers.fewest_nodes
        total[name] = str(int(value)) if value == int(value) else f"{int(value * 1000)}m"
    return total


def build_pod_group(job: Job) -> dict[str, Any] | None:
    """With spec.runPolicy.gangScheduling, the PodGroup of the chosen scheduler: it binds
    no worker until it can bind every one of them, or workers.minNodes of them for an
    elastic gang (minMember). None without."""
    gang = job.spec.run_policy.gang_scheduling
    if gang is None:
        return None
    group, version = POD_GROUP_APIS[gang.pod_group]
    spec: dict[str, Any] = {"minMember": job.spec.workers.fewest_nodes}
    resources = gang_resources(job)
    if resources:
        spec["minResources"] = resources
    if gang.queue is not None:
        spec["queue"] = gang.queue
    if gang.pod_group == "volcano" and job.spec.workers.priority_class_name is not None:
        spec["priorityClassName"] = job.spec.workers.priority_class_name  # Volcano orders groups by it
    if gang.schedule_timeout_seconds is not None:
        spec["scheduleTimeoutSeconds"] = gang.schedule_timeout_seconds
    return {
        "apiVersion": f"{group}/{version}",
        "kind": POD_GROUP_KIND,
        "metadata": child_metadata(job, pod_group_name(job.name)),
        "spec": spec,
    }


def build_worker_pods(job: Job, gang: int, config_hash: str) -> list[dict[str, Any]]:
    return [build_worker_pod(job, index, gang, config_hash) for index in range(job.spec.workers.nodes)]
