"""spec -> trainer config, tested as data, and the specs refused on the way: every
refusal names the field, the value and the fix."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from dbj_examples import DELETE, FULL_SPEC, MINIMAL_SPEC, job, minimal_spec, minimal_spec_with

from dreambooth_operator import constants as c
from dreambooth_operator.children import build_config_map
from dreambooth_operator.spec import InvalidSpecError, parse_spec
from dreambooth_operator.trainer_config import render_trainer_config
from trainer.config_file import validate_config
from trainer.validation import samples_dir


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
                                    "num_inference_steps": 30, "images_per_prompt": 4, "seed": 0,
                                    "guidance_scale": 6.0, "negative_prompt": "blurry",
                                    "scheduler": "DPMSolverMultistepScheduler"}
    # Unset, they are left to the trainer (the pipeline's own guidance, no negative prompt).
    assert "guidance_scale" not in render_trainer_config("sks-dog", parse_spec(MINIMAL_SPEC))["validation"]
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


@pytest.mark.parametrize("path,value,expected", [
    ("workers.nodes", 0, "spec.workers.nodes = 0"),
    ("workers.image", DELETE, "spec.workers.image: required field is missing"),
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
        the_job = job(minimal_spec_with(path, value))
        render_trainer_config(the_job.name, the_job.spec)
    assert expected in str(error.value)
    assert "hunter2" not in str(error.value) and "wJalr" not in str(error.value)


def test_a_user_name_alone_in_a_url_is_no_secret() -> None:
    # abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/ is Azure Data Lake's own form.
    url = "abfs://photos@account.dfs.core.windows.net/dog/"
    assert job(minimal_spec_with("data.instanceImages", {"url": url})).spec.data.instance_images.url == url


@pytest.mark.parametrize("name,nodes,longest", [("1st-dog", 2, 54), ("sks.dog", 2, 54), ("d" * 55, 2, 54),
                                                 ("d" * 54, 10, 54), ("d" * 54, 11, 53)])
def test_a_job_name_that_cannot_name_its_service_and_hostnames_is_an_invalid_spec(name: str, nodes: int,
                                                                                   longest: int) -> None:
    spec = minimal_spec_with("workers.nodes", nodes)
    if len(name) <= longest and name[0].isalpha() and "." not in name:
        assert job(spec, name=name).name == name
        return
    with pytest.raises(InvalidSpecError) as error:
        job(spec, name=name)
    assert f"metadata.name = {name!r}" in str(error.value)
    assert f"at most {longest} lower-case letters, digits or '-' (with spec.workers.nodes = {nodes})" in str(error.value)


@pytest.mark.parametrize("name,shared", [("models", "the downloaded models"),
                                         ("class-images", "the shared class images")])
def test_a_job_may_not_be_named_after_a_folder_every_job_on_its_claim_shares(name: str, shared: str) -> None:
    with pytest.raises(InvalidSpecError) as error:
        job(MINIMAL_SPEC, name=name)
    assert f"metadata.name = {name!r}: the job's folder on the storage claim would be <claim>/{name}/, which holds " \
           f"{shared}" in str(error.value)
    assert build_config_map(job(MINIMAL_SPEC, name="models-2"))  # a name that only starts so is the job's own


def test_spec_the_trainer_rejects_is_an_invalid_spec() -> None:
    # Valid for the CRD, invalid for the trainer's own cross-field rule.
    spec = minimal_spec_with("training", {"maxSteps": 10, "lrWarmupSteps": 50})
    with pytest.raises(InvalidSpecError) as error:
        build_config_map(job(spec))
    assert "spec.training.lrWarmupSteps = 50 exceeds spec.training.maxSteps = 10" in str(error.value)


def test_a_schedule_s_own_setting_is_rendered_with_it_and_refused_without_it() -> None:
    spec = parse_spec(minimal_spec_with("training", {"lrScheduler": "cosine_with_restarts", "lrNumCycles": 3}))
    training = render_trainer_config("sks-dog", spec)["training"]
    assert (training["lr_scheduler"], training["lr_num_cycles"]) == ("cosine_with_restarts", 3)
    assert "lr_power" not in training  # unset: the trainer's default
    with pytest.raises(InvalidSpecError) as error:
        build_config_map(job(minimal_spec_with("training", {"lrPower": 2.0})))
    assert ("spec.training.lrPower = 2.0 has no effect with spec.training.lrScheduler = constant; set "
            "spec.training.lrScheduler: polynomial") in str(error.value)


def test_jobs_asking_for_the_same_class_images_share_one_folder_on_the_claim() -> None:
    """spec.data.shareClassImages: the class images go where every job on the claim asking
    for the same ones (prompt, base model, seeds, steps) finds them; off, the job's own."""
    def class_dir(name: str = "rex", data: dict[str, Any] | None = None, **sections: Any) -> str:
        asked = {"classPrompt": "a photo of dog", "shareClassImages": True, **(data or {})}
        return render_trainer_config(name, parse_spec(minimal_spec(data=asked, **sections)))["data"]["class_dir"]

    shared = class_dir()
    assert shared.startswith(f"{c.STORAGE_MOUNT_DIR}/class-images/a-photo-of-dog-") and class_dir("fido") == shared
    assert class_dir(data={"numClassImages": 300}) == shared  # a job trains on the first numClassImages
    assert class_dir(data={"shareClassImages": False}) == f"{c.STORAGE_MOUNT_DIR}/rex/class-images"
    drawn_otherwise = [class_dir(data={"classPrompt": "a photo of a dog"}), class_dir(training={"seed": 7}),
                       class_dir(model={"source": "tiny-sdxl"}),
                       class_dir(trainerOverrides={"data.class_generation_steps": 50})]
    assert shared not in drawn_otherwise and len(set(drawn_otherwise)) == 4
