"""The pure builders of a job's worker pods and its PodGroup, tested as data: torchrun's
command, env, volumes (claims, photos, credentials), scheduling, security, and gang
scheduling. Every pod must pass kubernetes-validate --strict for the Kubernetes version
the project targets."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
from dbj_examples import FULL_SPEC, KUBERNETES_VERSION, MINIMAL_SPEC, job, minimal_spec_with

from dreambooth_operator import constants as c
from dreambooth_operator.children import build_claim
from dreambooth_operator.metadata import owner_reference
from dreambooth_operator.pods import build_pod_group, build_worker_pod, build_worker_pods
from dreambooth_operator.spec import InvalidSpecError
from dreambooth_operator.trainer_config import render_trainer_config
from trainer.contract import GPUS_PER_NODE_ENV


@pytest.mark.parametrize("nodes,gpus,expected_procs", [(1, 0, "1"), (2, 8, "8"), (3, 1, "1"), (4, 4, "4")])
def test_worker_pods_run_torchrun_with_static_rendezvous(nodes: int, gpus: int, expected_procs: str) -> None:
    spec = copy.deepcopy(MINIMAL_SPEC)
    spec["workers"].update(nodes=nodes, gpusPerNode=gpus)
    pods = build_worker_pods(job(spec), gang=0, config_hash="h")
    assert [p["metadata"]["name"] for p in pods] == [f"sks-dog-worker-{i}" for i in range(nodes)]
    for index, pod in enumerate(pods):
        container = pod["spec"]["containers"][0]
        assert container["command"] == [
            "python", "-m", "trainer.launch", "--nnodes", str(nodes), "--node_rank", str(index), "--nproc_per_node", expected_procs,
            "--shutdown-timeout", "112", "--master_addr", "sks-dog-worker-0.sks-dog", "--master_port", "29500",
            "--rdzv_conf", "timeout=1800", "trainer/main.py", "--config", "/etc/dreambooth/config.yaml",
        ]
        assert pod["spec"]["hostname"] == f"sks-dog-worker-{index}"
        assert pod["spec"]["subdomain"] == "sks-dog"
        assert pod["spec"]["restartPolicy"] == "Never"
        assert pod["metadata"]["labels"][c.LABEL_WORKER_INDEX] == str(index)
        limits = container["resources"].get("limits", {})
        assert limits.get(c.GPU_RESOURCE) == (str(gpus) if gpus else None)
        # The GPUs the trainer must see, or fail at once; a CPU job sets none and trains on CPU.
        gpus_env = [e for e in container["env"] if e["name"] == GPUS_PER_NODE_ENV]
        assert gpus_env == ([{"name": GPUS_PER_NODE_ENV, "value": str(gpus)}] if gpus else [])


@pytest.mark.parametrize("grace", [10, 30, 120, 600])
def test_torchrun_waits_for_the_sigterm_checkpoint_and_exits_before_the_kubelet_kills(grace: int) -> None:
    """Kubelet SIGTERM -> torchrun -> workers checkpoint within checkpoint.grace_seconds and
    exit 143; torchrun must not kill them sooner (its default: 30 s), and must itself be
    done before the kubelet's SIGKILL at terminationGracePeriodSeconds."""
    spec = copy.deepcopy(MINIMAL_SPEC)
    spec["workers"]["terminationGracePeriodSeconds"] = grace
    the_job = job(spec)
    command = build_worker_pod(the_job, index=0, gang=0, config_hash="h")["spec"]["containers"][0]["command"]
    shutdown = int(command[command.index("--shutdown-timeout") + 1])
    trainer_grace = render_trainer_config(the_job.name, the_job.spec)["checkpoint"]["grace_seconds"]
    assert trainer_grace < shutdown < grace


def test_worker_pod_carries_env_volumes_and_scheduling_fields() -> None:
    pod = build_worker_pod(job(FULL_SPEC), index=1, gang=2, config_hash="abc")
    spec = pod["spec"]
    container = spec["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["JOB_NAME"]["value"] == "sks-dog"
    assert env["JOB_NAMESPACE"]["value"] == "default"
    assert env[c.HF_TOKEN_ENV]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["NCCL_DEBUG"]["value"] == "WARN"
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "8", "memory": "400Gi"}, "requests": {"cpu": "32"}}
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert spec["nodeSelector"] == FULL_SPEC["workers"]["nodeSelector"]
    assert spec["tolerations"] == FULL_SPEC["workers"]["tolerations"]
    assert spec["affinity"] == FULL_SPEC["workers"]["affinity"]
    assert spec["terminationGracePeriodSeconds"] == 300
    assert spec["serviceAccountName"] == "trainer"
    assert spec["priorityClassName"] == "training"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "sks-dog-config"
    assert volumes["storage"]["persistentVolumeClaim"]["claimName"] == "sks-dog-storage"
    assert volumes["instance-images"]["persistentVolumeClaim"] == {"claimName": "dog-photos", "readOnly": True}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["instance-images"]["subPath"] == "dogs"
    assert mounts["config"]["mountPath"] == c.CONFIG_MOUNT_DIR
    assert pod["metadata"]["labels"][c.LABEL_GANG] == "2"
    assert pod["metadata"]["annotations"][c.ANNOTATION_CONFIG_HASH] == "abc"


def test_worker_pod_takes_the_users_labels_volumes_registry_and_scheduler() -> None:
    pod = build_worker_pod(job(FULL_SPEC), index=0, gang=0, config_hash="abc")
    spec, [container] = pod["spec"], pod["spec"]["containers"]
    # Beside the operator's own labels and annotations, which still select the pod.
    assert pod["metadata"]["labels"]["team"] == "vision" and pod["metadata"]["labels"][c.LABEL_JOB] == "sks-dog"
    assert pod["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false", c.ANNOTATION_CONFIG_HASH: "abc",
                                              c.ANNOTATION_GANG_NODES: str(FULL_SPEC["workers"]["nodes"]),
                                              c.VOLCANO_GROUP_ANNOTATION: "sks-dog"}  # runPolicy.gangScheduling
    assert spec["schedulerName"] == "volcano"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    # After the operator's volumes, which keep their names and folders.
    assert spec["volumes"][-1] == FULL_SPEC["workers"]["volumes"][0]
    assert container["volumeMounts"][-1] == {"name": "datasets", "mountPath": "/mnt/datasets", "readOnly": True}
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {c.CONFIG_MOUNT_DIR, c.STORAGE_MOUNT_DIR}
    plain = build_worker_pod(job(MINIMAL_SPEC), index=0, gang=0, config_hash="abc")["spec"]
    assert "schedulerName" not in plain and "imagePullSecrets" not in plain


def test_gang_scheduling_makes_a_pod_group_that_holds_every_worker() -> None:
    volcano = job(FULL_SPEC)
    group = build_pod_group(volcano)
    assert group == {"apiVersion": "scheduling.volcano.sh/v1beta1", "kind": "PodGroup",
                     "metadata": {"name": "sks-dog", "namespace": "default", "labels": group["metadata"]["labels"],
                                  "ownerReferences": [owner_reference(volcano)]},
                     "spec": {"minMember": 2, "queue": "vision", "priorityClassName": "training",
                              # Two workers' requests (a limit where no request is set): 8 GPUs, 32
                              # CPUs and 400Gi each.
                              "minResources": {"nvidia.com/gpu": "16", "cpu": "64", "memory": str(800 * 2**30)}}}
    for pod in build_worker_pods(volcano, gang=0, config_hash="abc"):
        assert pod["metadata"]["annotations"][c.VOLCANO_GROUP_ANNOTATION] == "sks-dog"
        assert pod["spec"]["schedulerName"] == "volcano"

    spec = minimal_spec_with("runPolicy.gangScheduling", {"podGroup": "coscheduling", "scheduleTimeoutSeconds": 600})
    spec["workers"] |= {"nodes": 3, "resources": {"requests": {"cpu": "500m"}}}
    plugin = job(spec)
    group = build_pod_group(plugin)
    assert group["apiVersion"] == "scheduling.x-k8s.io/v1alpha1"
    assert group["spec"] == {"minMember": 3, "scheduleTimeoutSeconds": 600, "minResources": {"cpu": "1500m"}}
    pod = build_worker_pod(plugin, index=2, gang=0, config_hash="abc")
    assert pod["metadata"]["labels"][c.COSCHEDULING_GROUP_LABEL] == "sks-dog"
    assert "schedulerName" not in pod["spec"]  # the plugin may run in the default scheduler
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)

    assert build_pod_group(job(MINIMAL_SPEC)) is None
    other_scheduler = copy.deepcopy(FULL_SPEC)
    other_scheduler["workers"]["schedulerName"] = "default-scheduler"
    with pytest.raises(InvalidSpecError, match=r"spec\.workers\.schedulerName = 'default-scheduler': a Volcano "
                                               r"PodGroup is honoured by the 'volcano' scheduler only"):
        job(other_scheduler)


def test_worker_pod_runs_as_non_root_without_privilege_escalation() -> None:
    pod = build_worker_pod(job(FULL_SPEC), index=0, gang=1, config_hash="abc")
    pod_context = pod["spec"]["securityContext"]
    assert pod_context["runAsNonRoot"] is True and pod_context["runAsUser"] != 0
    assert pod_context["fsGroup"] == pod_context["runAsGroup"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    for container in pod["spec"]["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert container.get("securityContext", {}).get("privileged") is not True
    # Secrets reach the pod only by reference, never as literal values.
    secret_like = [e for e in pod["spec"]["containers"][0]["env"] if "TOKEN" in e["name"]]
    assert secret_like and all("secretKeyRef" in e["valueFrom"] for e in secret_like)


def test_existing_claim_is_used_and_none_is_created() -> None:
    the_job = job(MINIMAL_SPEC)
    assert build_claim(the_job) is None
    pod = build_worker_pod(the_job, 0, 0, "h")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["storage"]["persistentVolumeClaim"]["claimName"] == "dreambooth-ckpt"


def test_instance_images_can_come_from_a_config_map() -> None:
    spec = copy.deepcopy(MINIMAL_SPEC)
    spec["data"]["instanceImages"] = {"configMapName": "robot-photos"}
    pod = build_worker_pod(job(spec), 0, 0, "h")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["instance-images"] == {"name": "instance-images", "configMap": {"name": "robot-photos"}}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_instance_images_from_a_url_are_copied_to_the_job_volume_with_credentials_from_a_secret() -> None:
    spec = copy.deepcopy(MINIMAL_SPEC)
    spec["data"]["instanceImages"] = {"url": "s3://bucket/dogs/", "credentialsSecret": "s3-creds"}
    spec["output"] = {"uri": "s3://bucket/models/sks-dog", "credentialsSecret": "s3-creds", "dtype": "fp16"}
    the_job = job(spec)
    config = render_trainer_config(the_job.name, the_job.spec)
    assert config["data"]["instance_url"] == "s3://bucket/dogs/"
    assert config["data"]["instance_dir"] == f"{c.STORAGE_MOUNT_DIR}/sks-dog/instance-images"
    assert config["output"] == {"dir": f"{c.STORAGE_MOUNT_DIR}/sks-dog/output", "uri": "s3://bucket/models/sks-dog",
                                "dtype": "fp16"}
    pod = build_worker_pod(the_job, 0, 0, "h")
    assert "instance-images" not in {v["name"] for v in pod["spec"]["volumes"]}
    [container] = pod["spec"]["containers"]
    # One Secret named twice is referenced once; its values never appear in the pod.
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_each_credentials_secret_is_also_a_read_only_folder_for_key_files() -> None:
    """GOOGLE_APPLICATION_CREDENTIALS and the like name a file: the Secret's keys are there
    too, at a path the user can put in the same Secret."""
    spec = copy.deepcopy(MINIMAL_SPEC)
    spec["data"]["instanceImages"] = {"url": "gs://bucket/dogs/", "credentialsSecret": "gcs-key"}
    spec["output"] = {"uri": "s3://bucket/models/sks-dog", "credentialsSecret": "s3-creds." + "x" * 60}
    pod = build_worker_pod(job(spec), 0, 0, "h")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    [container] = pod["spec"]["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["credentials-0"] == {"name": "credentials-0", "secret": {"secretName": "gcs-key", "defaultMode": 0o440}}
    assert mounts["credentials-0"] == {"name": "credentials-0", "mountPath": f"{c.CREDENTIALS_MOUNT_DIR}/gcs-key", "readOnly": True}
    assert volumes["credentials-1"]["secret"]["secretName"] == "s3-creds." + "x" * 60
    assert mounts["credentials-1"]["mountPath"] == f"{c.CREDENTIALS_MOUNT_DIR}/s3-creds.{'x' * 60}"
    assert pod["spec"]["securityContext"]["fsGroup"] == c.WORKER_GID  # the group that may read them
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
