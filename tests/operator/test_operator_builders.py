"""The pure builders, tested as data: spec -> trainer config and child objects.

Every object the operator creates must pass kubernetes-validate --strict for the
Kubernetes version the project targets.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dbj_examples import FULL_SPEC, KUBERNETES_VERSION, MINIMAL_SPEC, job_body

from dreambooth_operator import constants as c
from dreambooth_operator.children import (
    build_claim,
    build_config_map,
    build_network_policy,
    build_service,
    output_status,
)
from dreambooth_operator.kube import KubeApi
from dreambooth_operator.metadata import named_children, owner_reference
from dreambooth_operator.pods import build_pod_group, build_worker_pod, build_worker_pods
from dreambooth_operator.spec import InvalidSpecError, Job, parse_spec
from dreambooth_operator.trainer_config import render_trainer_config
from trainer.contract import GPUS_PER_NODE_ENV
from trainer.config_file import validate_config
from trainer.validation import samples_dir

SPECS = {"minimal": MINIMAL_SPEC, "full": FULL_SPEC}


def job(spec: dict[str, Any] = MINIMAL_SPEC, name: str = "sks-dog") -> Job:
    return Job.from_body(job_body(name, spec))


def all_children(the_job: Job) -> list[dict[str, Any]]:
    config_map = build_config_map(the_job)
    digest = config_map["metadata"]["annotations"][c.ANNOTATION_CONFIG_HASH]
    objects = [config_map, build_service(the_job), build_network_policy(the_job),
               *build_worker_pods(the_job, gang=0, config_hash=digest)]
    claim = build_claim(the_job)
    return objects + ([claim] if claim is not None else [])


@pytest.mark.parametrize("spec_name", SPECS)
def test_every_child_is_a_valid_kubernetes_object(spec_name: str) -> None:
    children = all_children(job(SPECS[spec_name]))
    assert children
    for obj in children:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_event_the_operator_posts_is_valid() -> None:
    captured: list[dict[str, Any]] = []

    class Capture(KubeApi):
        def __init__(self) -> None:  # no client: only the body the real post_event builds is kept
            pass

        async def create(self, obj: dict[str, Any]) -> bool:
            captured.append(obj)
            return True

    import asyncio
    asyncio.run(Capture().post_event(job_body(), "Warning", c.REASON_INVALID_SPEC, "spec.workers.nodes = 0: ..."))
    kubernetes_validate.validate(captured[0], KUBERNETES_VERSION, strict=True)
    assert captured[0]["involvedObject"]["kind"] == c.KIND


def test_rendered_config_is_valid_for_the_trainer_and_maps_every_field() -> None:
    config = render_trainer_config("sks-dog", parse_spec(FULL_SPEC))
    validate_config(copy.deepcopy(config))
    assert config["model"] == {"source": "stable-diffusion-v1-5/stable-diffusion-v1-5", "cache_dir": c.MODEL_CACHE_DIR}
    assert config["data"] == {
        "instance_dir": c.INSTANCE_IMAGES_MOUNT_DIR,
        "instance_prompt": "a photo of sks dog",
        "caption_files": True,
        "class_prompt": "a photo of dog",
        "class_dir": f"{c.STORAGE_MOUNT_DIR}/sks-dog/class-images",
        "num_class_images": 200,
        "resolution": 512,
        "random_flip": True,  # spec.trainerOverrides
    }
    assert config["training"]["max_steps"] == 800
    assert config["training"]["max_grad_norm"] == 0.5
    assert config["deepspeed"]["overrides"] == {"zero_optimization": {"overlap_comm": True}}
    assert config["training"]["train_text_encoder"] is True
    assert config["training"]["learning_rate"] == 2e-6 and config["training"]["text_encoder_learning_rate"] == 1e-6
    assert config["training"]["precision"] == "fp16"
    assert config["training"]["snr_gamma"] == 5.0 and config["training"]["noise_offset"] == 0.05
    assert config["training"]["max_nonfinite_steps"] == 20
    assert config["deepspeed"]["zero_stage"] == 2 and config["deepspeed"]["offload_optimizer"] is True
    assert config["checkpoint"]["dir"] == f"{c.STORAGE_MOUNT_DIR}/sks-dog/checkpoints"
    assert config["checkpoint"]["every_steps"] == 100
    assert config["checkpoint"]["resume"] == "auto"
    # The trainer must finish its SIGTERM checkpoint inside the pod's grace period.
    assert config["checkpoint"]["grace_seconds"] < FULL_SPEC["workers"]["terminationGracePeriodSeconds"]
    assert config["output"]["dir"] == f"{c.STORAGE_MOUNT_DIR}/sks-dog/output"
    assert config["metrics"]["port"] == 9090 and "host" not in config["metrics"]  # the trainer binds $POD_IP
    assert config["validation"] == {"every_steps": 200, "prompts": ["a photo of sks dog on the beach"],
                                    "num_inference_steps": 30, "images_per_prompt": 4, "seed": 0}
    # The trainer puts the samples beside the checkpoints: <job>/samples/ on the claim.
    assert samples_dir(validate_config(copy.deepcopy(config))) == Path(f"{c.STORAGE_MOUNT_DIR}/sks-dog/samples")


def test_a_lora_job_renders_its_adapters_and_leaves_the_learning_rate_to_the_trainer() -> None:
    spec = {**MINIMAL_SPEC, "lora": {"rank": 16, "alpha": 32, "useDora": True},
            "trainerOverrides": {"lora.unet_target_modules": ["to_q", "to_v"]}}
    config = render_trainer_config("sks-dog", parse_spec(spec))
    assert config["lora"] == {"rank": 16, "alpha": 32, "dropout": 0.0, "use_dora": True,
                              "unet_target_modules": ["to_q", "to_v"]}
    assert "learning_rate" not in config["training"]
    trainer = validate_config(copy.deepcopy(config))
    assert trainer.training.learning_rate == 1e-4 and trainer.lora.scaled_alpha == 32
    # Without LoRA, the trainer's default for all weights; a set rate is passed as it is.
    assert validate_config(render_trainer_config("sks-dog", parse_spec(MINIMAL_SPEC))).training.learning_rate == 2e-6
    with_rate = {**spec, "training": {"learningRate": 5e-5}}
    assert render_trainer_config("sks-dog", parse_spec(with_rate))["training"]["learning_rate"] == 5e-5
    with pytest.raises(InvalidSpecError, match=r"spec\.lora\.rank = -1: .*greater than or equal to 0"):
        parse_spec({**MINIMAL_SPEC, "lora": {"rank": -1}})
    # An adapter setting without adapters would be ignored: refused, named as the spec names it.
    with pytest.raises(InvalidSpecError, match=r"spec\.lora\.useDora = True has no effect with spec\.lora\.rank = 0"):
        render_trainer_config("sks-dog", parse_spec({**MINIMAL_SPEC, "lora": {"useDora": True}}))
    with pytest.raises(InvalidSpecError, match=r"lora\.rank comes from spec\.lora\.rank; set it there"):
        render_trainer_config("sks-dog", parse_spec({**MINIMAL_SPEC, "trainerOverrides": {"lora.rank": 8}}))


@pytest.mark.parametrize("scrape_interval", [0.25, c.DEFAULT_SCRAPE_INTERVAL_SECONDS, 60.0])
def test_rank_0_serves_its_final_metrics_for_one_more_scrape(scrape_interval: float) -> None:
    """A run may end between two scrapes: the finished run's loss reaches the job's
    status only if rank 0 still answers at the next one."""
    config_map = build_config_map(job(FULL_SPEC), scrape_interval_seconds=scrape_interval)
    linger = yaml.safe_load(config_map["data"][c.CONFIG_FILE_NAME])["metrics"]["linger_seconds"]
    assert scrape_interval < linger <= 2 * scrape_interval + 2  # one scrape more, not a wait many times over


def test_config_map_holds_the_rendered_yaml() -> None:
    the_job = job(FULL_SPEC)
    config_map = build_config_map(the_job)
    assert config_map["metadata"]["name"] == "sks-dog-config"
    assert yaml.safe_load(config_map["data"][c.CONFIG_FILE_NAME]) == render_trainer_config("sks-dog", the_job.spec)


def test_headless_service_gives_workers_stable_names() -> None:
    service = build_service(job(FULL_SPEC))
    assert service["metadata"]["name"] == "sks-dog"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"][c.LABEL_JOB] == "sks-dog"
    assert {p["port"] for p in service["spec"]["ports"]} == {c.RENDEZVOUS_PORT, 9090}


def test_network_policy_admits_the_jobs_own_workers_and_metrics_scrapes_only() -> None:
    policy = build_network_policy(job(FULL_SPEC))
    workers = {"matchLabels": {"dreambooth.io/job": "sks-dog", "dreambooth.io/role": "worker"}}
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    assert policy["metadata"]["name"] == "sks-dog"
    assert policy["spec"] == {
        "podSelector": workers,
        "policyTypes": ["Ingress"],  # egress open: model downloads, object-store uploads
        "ingress": [
            {"from": [{"podSelector": workers}]},  # peers of its own namespace, any port
            {"ports": [{"port": 9090, "protocol": "TCP"}]},  # no `from`: the operator's and Prometheus' scrapes
        ],
    }


def test_network_policy_without_metrics_admits_only_the_jobs_own_workers() -> None:
    no_metrics = copy.deepcopy(MINIMAL_SPEC)
    no_metrics["metrics"] = {"port": 0}
    policy = build_network_policy(job(no_metrics))
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": policy["spec"]["podSelector"]}]}]


def test_network_policy_selects_every_worker_of_its_job_and_no_other_jobs() -> None:
    selector = build_network_policy(job(FULL_SPEC))["spec"]["podSelector"]["matchLabels"].items()
    for gang in (0, 3):
        for pod in build_worker_pods(job(FULL_SPEC), gang=gang, config_hash="h"):
            assert selector <= pod["metadata"]["labels"].items(), pod["metadata"]["name"]
    for pod in build_worker_pods(job(FULL_SPEC, name="sks-dog-2"), gang=0, config_hash="h"):
        assert not selector <= pod["metadata"]["labels"].items()


def test_the_policy_is_among_the_children_named_after_the_job_only_when_the_operator_makes_it() -> None:
    the_job = job(FULL_SPEC)
    on = {kind: name for kind, name, _ in named_children("sks-dog", network_policy=True)}
    assert on == {"Service": build_service(the_job)["metadata"]["name"],
                  "ConfigMap": build_config_map(the_job)["metadata"]["name"],
                  "NetworkPolicy": build_network_policy(the_job)["metadata"]["name"]}
    assert "NetworkPolicy" not in {kind for kind, _, _ in named_children("sks-dog", network_policy=False)}


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

    spec = _with("runPolicy.gangScheduling", {"podGroup": "coscheduling", "scheduleTimeoutSeconds": 600})
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


def test_status_output_names_the_claim_folder_the_trainer_writes_and_the_upload() -> None:
    created = job(FULL_SPEC)  # storage.size: a claim of the job's own
    rendered = render_trainer_config(created.name, created.spec)
    assert output_status(created) == {"claimName": "sks-dog-storage", "path": "sks-dog/output"}
    assert rendered["output"]["dir"] == f"{c.STORAGE_MOUNT_DIR}/sks-dog/output"
    uploaded = job(_with("output", {"uri": "s3://models/sks-dog"}))
    assert output_status(uploaded) == {"claimName": "dreambooth-ckpt", "path": "sks-dog/output",
                                       "uri": "s3://models/sks-dog"}
    with_adapters = job(_with("lora", {"rank": 8}))
    assert output_status(with_adapters)["loraWeights"] == "sks-dog/output/pytorch_lora_weights.safetensors"


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


def test_children_are_owned_by_the_job_except_a_retained_claim() -> None:
    the_job = job(FULL_SPEC)
    reference = owner_reference(the_job)
    assert reference == {"apiVersion": "dreambooth.io/v1alpha1", "kind": "DreamboothJob", "name": "sks-dog",
                         "uid": "uid-sks-dog", "controller": True, "blockOwnerDeletion": True}
    for obj in all_children(the_job):
        assert obj["metadata"]["ownerReferences"] == [reference]
        assert obj["metadata"]["labels"][c.LABEL_JOB] == "sks-dog"
    retained = copy.deepcopy(FULL_SPEC)
    retained["storage"]["retain"] = True
    assert "ownerReferences" not in build_claim(job(retained))["metadata"]


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


def test_created_claim_asks_for_size_class_and_access_mode() -> None:
    claim = build_claim(job(FULL_SPEC))
    assert claim["metadata"]["name"] == "sks-dog-storage"
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "200Gi"}},
                             "storageClassName": "fast-rwx"}


def _with(path: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(MINIMAL_SPEC)
    node = spec
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if value is _DELETE:
        node.pop(last)
    else:
        node[last] = value
    return spec


_DELETE = object()


@pytest.mark.parametrize("path,value,expected", [
    ("workers.nodes", 0, "spec.workers.nodes = 0"),
    ("workers.image", _DELETE, "spec.workers.image: required field is missing"),
    ("training.maxSteps", -5, "spec.training.maxSteps = -5"),
    ("training.precision", "fp8", "spec.training.precision = 'fp8'"),
    ("deepspeed.zeroStage", 4, "spec.deepspeed.zeroStage = 4"),
    ("deepspeed", {"zeroStage": 0, "offloadOptimizer": True}, "needs ZeRO to partition the optimizer"),
    ("data.resolution", 500, "spec.data.resolution = 500"),
    ("training.maxStep", 10, "spec.training.maxStep: unknown field"),
    ("storage.size", "10Gi", "set exactly one of storage.claimName"),
    ("data.instanceImages", {"claimName": "a", "configMapName": "b"}, "set exactly one of data.instanceImages"),
    ("data.instanceImages", {}, "set exactly one of data.instanceImages"),
    ("data.instanceImages", {"configMapName": "b", "url": "file:///x"}, "or data.instanceImages.url"),
    ("data.instanceImages", {"url": "bucket/photos"}, "spec.data.instanceImages.url = 'bucket/photos'"),
    ("output", {"uri": "models/x"}, "spec.output.uri = 'models/x'"),
    # A password in a URL would show in the ConfigMap, status and logs (and is not repeated here).
    ("output", {"uri": "s3://AKIA:wJalr@bucket/m"}, "spec.output.uri: holds a password (user:password@), which"),
    ("data.instanceImages", {"url": "https://bob:hunter2@photos.example/dog/"},
     "spec.data.instanceImages.url: holds a password"),
    ("model", {"source": "https://bob:hunter2@models.example/sd15/"}, "spec.model.source: holds a password"),
    ("output", {"dtype": "fp8"}, "spec.output.dtype = 'fp8'"),
    ("runPolicy.backoffLimit", -1, "spec.runPolicy.backoffLimit = -1"),
    # A real API server refuses the Service with 29500 twice (kmock would not): caught first.
    ("metrics.port", 29500, "spec.metrics.port = 29500: taken by the workers' rendezvous"),
    ("metrics.port", 80, "spec.metrics.port = 80: the workers run as a non-root user"),
    ("workers.labels", {"dreambooth.io/job": "other"}, "'dreambooth.io/job' is set by the operator"),
    ("workers.labels", {"team": "computer vision"}, "'computer vision' of 'team' is not a valid label value"),
    ("workers.annotations", {"bad key!": "x"}, "'bad key!' is not a valid key"),
    ("workers.volumes", [{"name": "storage", "emptyDir": {}}],
     "spec.workers.volumes[0].name = 'storage': that name is taken"),
    ("workers.volumes", [{"name": "credentials-0", "emptyDir": {}}], "that name is taken"),
    ("workers.volumes", [{"name": "Data", "emptyDir": {}}], "spec.workers.volumes[0].name = 'Data'"),
    ("workers.volumeMounts", [{"name": "data", "mountPath": "/mnt/data"}],
     "spec.workers.volumeMounts[0].name = 'data': not one of workers.volumes (none)"),
    ("workers", {**MINIMAL_SPEC["workers"], "volumes": [{"name": "data", "emptyDir": {}}],
                 "volumeMounts": [{"name": "data", "mountPath": "/mnt/storage/data"}]},
     "spec.workers.volumeMounts[0].mountPath = '/mnt/storage/data': the operator mounts /mnt/storage there"),
    ("workers.imagePullSecrets", ["regcred"], "spec.workers.imagePullSecrets.0 = 'regcred'"),
    # The PodGroup's minResources sums them: a typo must fail the job, not every reconcile pass.
    ("workers.resources", {"limits": {"memory": "16GB"}},
     "spec.workers.resources.limits.memory = '16GB': not a Kubernetes quantity; write e.g. 64Gi (not 64GB)"),
    ("workers.resources", {"limits": None}, "spec.workers.resources.limits = None: give a mapping of resource"),
    ("workers.resources", {"limit": {"cpu": 1}}, "spec.workers.resources.limit = {'cpu': 1}: unknown section"),
    ("runPolicy.gangScheduling", {"podGroup": "kueue"}, "spec.runPolicy.gangScheduling.podGroup = 'kueue'"),
    ("runPolicy.gangScheduling", {"podGroup": "coscheduling", "queue": "a"},
     "spec.runPolicy.gangScheduling.queue = 'a': only Volcano has queues"),
    ("runPolicy.gangScheduling", {"podGroup": "volcano", "scheduleTimeoutSeconds": 60},
     "spec.runPolicy.gangScheduling.scheduleTimeoutSeconds = 60: only the coscheduling plugin takes it"),
    ("trainerOverrides", {"training.max_steps": 5},
     "spec.trainerOverrides['training.max_steps']: training.max_steps comes from spec.training.maxSteps; set it there"),
    ("trainerOverrides", {"checkpoint.dir": "/tmp"}, "checkpoint.dir is set by the operator"),
    ("trainerOverrides", {"data.instance_url": "s3://b/p"}, "data.instance_url is set by the operator"),
    ("trainerOverrides", {"training": {"max_grad_norm": 1}}, "spec.trainerOverrides['training']: expected section.key"),
    ("trainerOverrides", {"training.max_grad_nrm": 1}, "training.max_grad_nrm: unknown key"),
    ("trainerOverrides", {"data.random_flip": "sometimes"}, "data.random_flip = 'sometimes'"),
])
def test_invalid_spec_names_the_field_the_value_and_the_fix(path: str, value: Any, expected: str) -> None:
    with pytest.raises(InvalidSpecError) as error:
        the_job = job(_with(path, value))
        render_trainer_config(the_job.name, the_job.spec)
    assert expected in str(error.value)
    assert "hunter2" not in str(error.value) and "wJalr" not in str(error.value)


def test_a_user_name_alone_in_a_url_is_no_secret() -> None:
    # abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/ is Azure Data Lake's own form.
    url = "abfs://photos@account.dfs.core.windows.net/dog/"
    assert job(_with("data.instanceImages", {"url": url})).spec.data.instance_images.url == url


@pytest.mark.parametrize("name,nodes,longest", [("1st-dog", 2, 54), ("sks.dog", 2, 54), ("d" * 55, 2, 54),
                                                 ("d" * 54, 10, 54), ("d" * 54, 11, 53)])
def test_a_job_name_that_cannot_name_its_service_and_hostnames_is_an_invalid_spec(name: str, nodes: int,
                                                                                   longest: int) -> None:
    spec = _with("workers.nodes", nodes)
    if len(name) <= longest and name[0].isalpha() and "." not in name:
        assert job(spec, name=name).name == name
        return
    with pytest.raises(InvalidSpecError) as error:
        job(spec, name=name)
    assert f"metadata.name = {name!r}" in str(error.value)
    assert f"at most {longest} lower-case letters, digits or '-' (with spec.workers.nodes = {nodes})" in str(error.value)


def test_spec_the_trainer_rejects_is_an_invalid_spec() -> None:
    # Valid for the CRD, invalid for the trainer's own cross-field rule.
    spec = _with("training", {"maxSteps": 10, "lrWarmupSteps": 50})
    with pytest.raises(InvalidSpecError) as error:
        build_config_map(job(spec))
    assert "spec.training.lrWarmupSteps = 50 exceeds spec.training.maxSteps = 10" in str(error.value)
