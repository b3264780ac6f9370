"""The DreamboothJob `spec`, as typed models validated once before anything reads it.

Field names are the CRD's camelCase ones (manifests/crd.yaml carries the same fields,
defaults and descriptions; tests/operator/test_crd.py keeps the two in step). A real
API server already enforces the CRD schema, but the operator validates again: the
schema cannot check everything (the trainer's own rules), and a test API may not check
anything.
"""

from __future__ import annotations

import posixpath
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from trainer.config import VALIDATION_SCHEDULERS

from .constants import CLASS_IMAGES_CACHE_DIR, MODEL_CACHE_DIR, RENDEZVOUS_PORT, VOLCANO_SCHEDULER
from .spec_base import FIELD_ERROR, InvalidSpecError, SpecModel, field_error
from .workers_spec import WorkersSpec

__all__ = ["InvalidSpecError", "Job", "JobSpec", "WorkersSpec", "check_job_name", "format_spec_error", "parse_spec"]

URL_WITH_CREDENTIALS = "url_with_credentials"
# Folders on a storage claim shared by every job on it (by their name under the claim's mount).
SHARED_STORAGE_FOLDERS = {posixpath.basename(MODEL_CACHE_DIR): "the downloaded models",
                          posixpath.basename(CLASS_IMAGES_CACHE_DIR): "the shared class images (data.shareClassImages)"}


def _no_credentials(url: str | None) -> str | None:
    # A URL is written into the job's ConfigMap, its status and the logs: a password in
    # it would be readable by everyone who can read those.
    if url is not None and "://" in url:
        try:
            # A user name alone is no secret (and abfs://container@account.dfs... needs one).
            has_password = urlsplit(url).password is not None
        except ValueError:
            return url  # not parsed here: the trainer's own check names the problem
        if has_password:
            raise PydanticCustomError(URL_WITH_CREDENTIALS, "holds a password (user:password@)")
    return url


# An fsspec URL (s3://, gs://, az://, https://, ...) without credentials in it.
Url = Annotated[str, Field(pattern=r"^[a-z][a-z0-9+.-]*://"), AfterValidator(_no_credentials)]


class SecretKeyRef(SpecModel):
    name: str = Field(min_length=1)
    key: str = Field("token", min_length=1)


class ModelSpec(SpecModel):
    source: Annotated[str, AfterValidator(_no_credentials)] = Field("tiny", min_length=1)
    revision: str | None = None
    hf_token_secret: SecretKeyRef | None = None


class InstanceImages(SpecModel):
    claim_name: str | None = Field(None, min_length=1)
    config_map_name: str | None = Field(None, min_length=1)
    url: Url | None = None
    path: str = "/"
    # A Secret whose keys become the workers' environment (AWS_ACCESS_KEY_ID, ...) for `url`.
    credentials_secret: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> "InstanceImages":
        if sum(source is not None for source in (self.claim_name, self.config_map_name, self.url)) != 1:
            raise ValueError(
                "set exactly one of data.instanceImages.claimName (a PVC with the photos), "
                "data.instanceImages.configMapName (e.g. kubectl create configmap NAME --from-file=DIR) or "
                "data.instanceImages.url (an fsspec URL such as s3://bucket/photos/ or https://...)"
            )
        return self


class DataSpec(SpecModel):
    instance_images: InstanceImages
    instance_prompt: str = Field(min_length=1)
    caption_files: bool = False
    class_prompt: str | None = None
    share_class_images: bool = False
    num_class_images: int = Field(100, ge=1)
    resolution: int = Field(512, ge=8, multiple_of=8)


class TrainingSpec(SpecModel):
    max_steps: int = Field(800, ge=1)
    # Unset: the trainer's default, 2e-6 for all weights or 1e-4 for LoRA adapters.
    learning_rate: float | None = Field(None, gt=0)
    text_encoder_learning_rate: float | None = Field(None, gt=0)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    scale_lr: bool = False
    prior_loss_weight: float = Field(1.0, ge=0)
    train_text_encoder: bool = False
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    seed: int = 0
    lr_scheduler: Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    # Unset: the trainer's, which refuses either beside a schedule that has no use for it.
    lr_num_cycles: int | None = Field(None, ge=1)
    lr_power: float | None = Field(None, gt=0)
    gradient_checkpointing: bool = False
    snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float = Field(0.0, ge=0)
    max_nonfinite_steps: int = Field(10, ge=0)


class LoraSpec(SpecModel):
    rank: int = Field(0, ge=0)
    alpha: float | None = Field(None, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    use_dora: bool = False


class DeepSpeedSpec(SpecModel):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False


class StorageSpec(SpecModel):
    claim_name: str | None = None
    size: str | None = None
    storage_class_name: str | None = None
    access_mode: Literal["ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"] = "ReadWriteMany"
    retain: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> "StorageSpec":
        if (self.claim_name is None) == (self.size is None):
            raise ValueError(
                "set exactly one of storage.claimName (use an existing PVC) or storage.size "
                "(create one, e.g. size: 200Gi)"
            )
        return self

    @property
    def creates_claim(self) -> bool:
        return self.claim_name is None


class CheckpointSpec(SpecModel):
    every_steps: int = Field(500, ge=1)
    keep_last: int = Field(3, ge=1)


class GangSchedulingSpec(SpecModel):
    # Whose PodGroup holds the workers, so that the scheduler places all of them or none
    # (two half-placed jobs would otherwise each wait for the other's GPUs).
    pod_group: Literal["volcano", "coscheduling"]
    queue: str | None = Field(None, min_length=1)
    schedule_timeout_seconds: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _fields_of_its_scheduler(self) -> "GangSchedulingSpec":
        if self.queue is not None and self.pod_group != "volcano":
            raise field_error("queue", self.queue, "only Volcano has queues; remove it, or use podGroup: volcano")
        if self.schedule_timeout_seconds is not None and self.pod_group != "coscheduling":
            raise field_error("scheduleTimeoutSeconds", self.schedule_timeout_seconds,
                              "only the coscheduling plugin takes it; remove it, or use podGroup: coscheduling")
        return self


class RunPolicySpec(SpecModel):
    backoff_limit: int = Field(3, ge=0)
    active_deadline_seconds: int | None = Field(None, ge=1)
    suspend: bool = False
    ttl_seconds_after_finished: int | None = Field(None, ge=0)
    gang_scheduling: GangSchedulingSpec | None = None


class MetricsSpec(SpecModel):
    port: int = Field(9090, ge=0, le=65535)

    @field_validator("port")
    @classmethod
    def _free_for_the_worker(cls, port: int) -> int:
        # The API server refuses a Service with the rendezvous port twice (and both would
        # bind it); a worker without capabilities cannot bind a port below 1024.
        if port == RENDEZVOUS_PORT:
            raise ValueError("taken by the workers' rendezvous (torchrun's TCPStore); pick another, e.g. 9090")
        if 0 < port < 1024:
            raise ValueError("the workers run as a non-root user without capabilities and cannot bind a port "
                             "below 1024; pick one from 1024 up, e.g. 9090 (0 turns the endpoint off)")
        return port


class ValidationSpec(SpecModel):
    every_steps: int = Field(0, ge=0)
    prompts: list[str] = Field(default_factory=list)
    num_inference_steps: int = Field(25, ge=1)
    images_per_prompt: int = Field(1, ge=1, le=16)
    seed: int = 0
    guidance_scale: float | None = Field(None, ge=0)
    negative_prompt: str | None = Field(None, min_length=1)
    scheduler: Literal[VALIDATION_SCHEDULERS] | None = None  # type: ignore[valid-type]


class OutputSpec(SpecModel):
    # Where the exported pipeline is uploaded: an fsspec URL (s3://, gs://, az://, file://) or hf://ORG/REPO.
    uri: Url | None = None
    # A Secret whose keys become the workers' environment (AWS_*, HF_TOKEN, ...) for the upload.
    credentials_secret: str | None = Field(None, min_length=1)
    # The exported weights' precision (the trainer's output.dtype).
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"


class JobSpec(SpecModel):
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    workers: WorkersSpec
    storage: StorageSpec
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    # Any other trainer key, as `section.key: value` (trainer --set); see trainer_config.py.
    trainer_overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _volcano_schedules_its_gangs(self) -> "JobSpec":
        gang = self.run_policy.gang_scheduling
        scheduler = self.workers.scheduler_name
        if gang is not None and gang.pod_group == "volcano" and scheduler not in (None, VOLCANO_SCHEDULER):
            raise field_error("workers.schedulerName", scheduler,
                              f"a Volcano PodGroup is honoured by the {VOLCANO_SCHEDULER!r} scheduler only; "
                              "remove schedulerName (the operator sets it) or set it to volcano")
        return self

    @property
    def credentials_secrets(self) -> list[str]:
        """The Secrets the workers take their storage credentials from, each once."""
        names = [self.data.instance_images.credentials_secret, self.output.credentials_secret]
        return list(dict.fromkeys(name for name in names if name is not None))


def parse_spec(raw: Any) -> JobSpec:
    """Validate a `spec` mapping; raise InvalidSpecError with one line per problem."""
    if not isinstance(raw, dict):
        raise InvalidSpecError(f"spec: expected a mapping, got {type(raw).__name__}")
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as error:
        raise InvalidSpecError(format_spec_error(error)) from None


def format_spec_error(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(["spec", *(str(part) for part in item["loc"])])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            problems.append(f"{field}: required field is missing; add it")
        elif item["type"] == FIELD_ERROR:
            problems.append(f"{field}.{item['ctx']['field']} = {item['ctx']['value']!r}: {message}")
        elif item["type"] == URL_WITH_CREDENTIALS:  # not repeated: the message goes to status and Events
            problems.append(f"{field}: {message}, which would show in the job's ConfigMap, status and logs; "
                            "remove it and give the credentials through the Secret the URL's section names "
                            "(credentialsSecret: AWS_ACCESS_KEY_ID, ... or hfTokenSecret)")
        elif item["type"] == "extra_forbidden":
            problems.append(f"{field}: unknown field; remove it or fix its spelling (kubectl explain dreamboothjob.spec)")
        else:
            problems.append(f"{field} = {item.get('input')!r}: {message}")
    return "; ".join(problems)


class Job(BaseModel):
    """One DreamboothJob as the builders see it: identity plus a validated spec."""

    model_config = ConfigDict(frozen=True)

    name: str
    namespace: str
    uid: str
    spec: JobSpec

    @classmethod
    def from_body(cls, body: Any) -> "Job":
        meta = body["metadata"]
        spec = parse_spec(body.get("spec"))
        check_job_name(meta["name"], spec.workers.nodes)
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta.get("uid") or "", spec=spec)


_DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def check_job_name(name: str, nodes: int) -> None:
    """The job's name is its headless Service's (a DNS-1035 label) and the first part of
    its workers' hostnames `<name>-worker-<index>` (at most 63 characters): a name the
    API server accepts for the job could still fail every Service or pod creation. It is
    also its folder on the storage claim, beside the folders every job there shares."""
    shared = SHARED_STORAGE_FOLDERS.get(name)
    if shared is not None:
        raise InvalidSpecError(
            f"metadata.name = {name!r}: the job's folder on the storage claim would be <claim>/{name}/, which holds "
            f"{shared} of every job on the claim; recreate the job under another name"
        )
    longest = 63 - len(f"-worker-{nodes - 1}")
    if not _DNS_1035_LABEL.fullmatch(name) or len(name) > longest:
        raise InvalidSpecError(
            f"metadata.name = {name!r}: the job's name is also its Service's and its workers' hostnames' "
            f"(<name>-worker-N), so it must be at most {longest} lower-case letters, digits or '-' "
            f"(with spec.workers.nodes = {nodes}), starting with a letter and ending with a letter or digit; "
            "recreate the job under such a name"
        )
