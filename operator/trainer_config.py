"""Spec -> trainer config: the YAML file every worker reads (DESIGN.md "Trainer command").

The trainer's own models (`trainer.config`, read through `trainer.config_file`) validate
the result, so the operator and the trainer agree on one contract; only those two are
imported (pydantic and PyYAML, no torch).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from trainer.config import ConfigError, TrainerConfig
from trainer.config_file import apply_overrides, validate_config

from .constants import (CLASS_IMAGES_CACHE_DIR, DEFAULT_SCRAPE_INTERVAL_SECONDS, INSTANCE_IMAGES_MOUNT_DIR, MODEL_CACHE_DIR,
                        STORAGE_MOUNT_DIR)
from .spec import InvalidSpecError, JobSpec

# The trainer checkpoints after SIGTERM; leave the kubelet this much of the grace
# period to spare (process teardown, filesystem flush) before it sends SIGKILL.
SIGTERM_MARGIN_SECONDS = 15


def job_storage_dir(job_name: str) -> str:
    """Each job keeps its files under its own folder, so jobs can share one claim."""
    return f"{STORAGE_MOUNT_DIR}/{job_name}"


def job_output_dir(job_name: str) -> str:
    """Where the trainer writes the exported pipeline (output.dir), in the workers' mount."""
    return f"{job_storage_dir(job_name)}/output"


def job_checkpoint_dir(job_name: str) -> str:
    """The trainer's checkpoint.dir, in the workers' mount."""
    return f"{job_storage_dir(job_name)}/checkpoints"


def checkpoint_grace_seconds(termination_grace_period_seconds: int) -> float:
    return float(max(termination_grace_period_seconds - SIGTERM_MARGIN_SECONDS,
                     termination_grace_period_seconds / 2))


def launcher_shutdown_seconds(termination_grace_period_seconds: int) -> int:
    """How long torchrun waits for its workers after SIGTERM before it kills them (its
    --shutdown-timeout; 30 s by default, which would cut short a checkpoint of a large
    model): past the trainer's own checkpoint.grace_seconds, before the kubelet's SIGKILL."""
    return int((checkpoint_grace_seconds(termination_grace_period_seconds) + termination_grace_period_seconds) / 2)


def final_scrape_linger_seconds(scrape_interval_seconds: float) -> float:
    """How long rank 0 keeps serving its metrics after the last step: one and a half
    scrape intervals plus a second (a scrape comes late by a reconcile's latency), so
    that the operator's last scrape is of the finished run and a succeeded job shows
    the run's final loss and throughput."""
    return round(1.5 * scrape_interval_seconds + 1.0, 3)


def render_trainer_config(job_name: str, spec: JobSpec, *,
                          scrape_interval_seconds: float = DEFAULT_SCRAPE_INTERVAL_SECONDS) -> dict[str, Any]:
    """The trainer config dict for a job, validated by the trainer's own models.
    `scrape_interval_seconds` is the operator's: rank 0 lingers for one more scrape."""
    root = job_storage_dir(job_name)
    data: dict[str, Any] = {
        "instance_dir": INSTANCE_IMAGES_MOUNT_DIR,
        "instance_prompt": spec.data.instance_prompt,
        "caption_files": spec.data.caption_files,
        "num_class_images": spec.data.num_class_images,
        "resolution": spec.data.resolution,
    }
    if spec.data.instance_images.url is not None:
        # Copied once onto the job's volume by the first worker, then read like a mount.
        data["instance_url"] = spec.data.instance_images.url
        data["instance_dir"] = f"{root}/instance-images"
    if spec.data.class_prompt is not None:
        data["class_prompt"] = spec.data.class_prompt
        data["class_dir"] = f"{root}/class-images"
    # Every job on the claim shares one copy of each base model.
    model = {"source": spec.model.source, "cache_dir": MODEL_CACHE_DIR, **_set_only(revision=spec.model.revision)}
    training = spec.training
    config = {
        "model": model,
        "data": data,
        "training": {
            "max_steps": training.max_steps,
            **_set_only(learning_rate=training.learning_rate,
                        text_encoder_learning_rate=training.text_encoder_learning_rate),
            "batch_size": training.batch_size,
            "gradient_accumulation": training.gradient_accumulation,
            "scale_lr": training.scale_lr,
            "prior_loss_weight": training.prior_loss_weight,
            "train_text_encoder": training.train_text_encoder,
            "precision": training.precision,
            "seed": training.seed,
            "lr_scheduler": training.lr_scheduler,
            "lr_warmup_steps": training.lr_warmup_steps,
            **_set_only(lr_num_cycles=training.lr_num_cycles, lr_power=training.lr_power),
            "gradient_checkpointing": training.gradient_checkpointing,
            **_set_only(snr_gamma=training.snr_gamma),
            "noise_offset": training.noise_offset,
            "max_nonfinite_steps": training.max_nonfinite_steps,
        },
        "lora": {"rank": spec.lora.rank, "dropout": spec.lora.dropout, "use_dora": spec.lora.use_dora,
                 **_set_only(alpha=spec.lora.alpha)},
        "deepspeed": {"zero_stage": spec.deepspeed.zero_stage, "offload_optimizer": spec.deepspeed.offload_optimizer},
        "checkpoint": {
            "dir": job_checkpoint_dir(job_name),
            "every_steps": spec.checkpoint.every_steps,
            "keep_last": spec.checkpoint.keep_last,
            # After any restart the gang resumes from the newest complete checkpoint.
            "resume": "auto",
            "grace_seconds": checkpoint_grace_seconds(spec.workers.termination_grace_period_seconds),
        },
        "output": {"dir": job_output_dir(job_name), "dtype": spec.output.dtype,
                   **({"uri": spec.output.uri} if spec.output.uri else {})},
        # metrics.host is left out: the trainer binds $POD_IP, which the pod sets.
        "metrics": {"port": spec.metrics.port,
                    "linger_seconds": final_scrape_linger_seconds(scrape_interval_seconds)},
        # One JSON object per line is what log collectors in a cluster want.
        "logging": {"format": "json"},
        # Sample grids go to <job>/samples/ on the claim (the trainer's default beside checkpoints).
        "validation": {"every_steps": spec.validation.every_steps, "prompts": list(spec.validation.prompts),
                       "num_inference_steps": spec.validation.num_inference_steps,
                       "images_per_prompt": spec.validation.images_per_prompt, "seed": spec.validation.seed,
                       # Unset: the trainer's (the pipeline's own guidance and sampler, no negative prompt).
                       **_set_only(guidance_scale=spec.validation.guidance_scale,
                                   negative_prompt=spec.validation.negative_prompt,
                                   scheduler=spec.validation.scheduler)},
    }
    apply_trainer_overrides(config, spec.trainer_overrides)
    try:
        validated = validate_config(config, source=f"rendered from DreamboothJob {job_name}")
    except ConfigError as error:
        # One line (it goes into a condition), naming spec fields where the trainer's
        # key has one: training.lr_warmup_steps -> spec.training.lrWarmupSteps.
        detail = " ".join(line.strip() for line in str(error).splitlines()[1:-1])
        detail = _TRAINER_KEY.sub(_spec_field, detail)
        raise InvalidSpecError(f"the trainer rejects the config rendered from this spec: {detail}") from None
    if spec.data.share_class_images and validated.data.with_prior_preservation:
        config["data"]["class_dir"] = shared_class_images_dir(validated)
    return config


def shared_class_images_dir(config: TrainerConfig) -> str:
    """The folder of class images that every job on the claim asking for the same ones
    shares: named by the class prompt, and by a hash of everything that draws them (the
    base model, the prompt, each image's seed, the denoising steps)."""
    data = config.data
    drawn_by = [config.model.source, config.model.revision, data.class_prompt, config.training.seed,
                data.class_generation_steps]
    digest = hashlib.sha256(json.dumps(drawn_by).encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "-", (data.class_prompt or "").lower()).strip("-")[:40].rstrip("-")
    return f"{CLASS_IMAGES_CACHE_DIR}/{slug}-{digest}"


def _set_only(**values: Any) -> dict[str, Any]:
    """The keys the spec sets; an unset one is left out, so the trainer's default applies
    (which may depend on other keys, as the learning rate on lora.rank)."""
    return {key: value for key, value in values.items() if value is not None}


# Trainer keys that are the operator's to set, whatever the spec says: the claim's
# layout, the mounts, the metrics the operator scrapes and the log format it parses.
_OPERATOR_SECTIONS = ("model", "checkpoint", "output", "metrics")
_OPERATOR_KEYS = ("data.instance_dir", "data.instance_url", "data.class_dir", "logging.format")


def apply_trainer_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> None:
    """spec.trainerOverrides (`section.key: value`, as the trainer's --set) into the
    rendered config, for trainer keys the spec has no field for. A key the spec renders
    or the operator owns is refused, naming where it is set; the trainer's own
    validation then names an unknown key or a bad value."""
    for key, value in overrides.items():
        section, _, rest = key.partition(".")
        field = f"spec.trainerOverrides[{key!r}]"
        if not rest:
            raise InvalidSpecError(f"{field}: expected section.key, e.g. training.max_grad_norm")
        top = rest.split(".")[0]
        where = spec_field_for(section, top)
        if where is not None:
            raise InvalidSpecError(f"{field}: {key} comes from {where}; set it there")
        if section in _OPERATOR_SECTIONS or f"{section}.{top}" in _OPERATOR_KEYS or top in (config.get(section) or {}):
            raise InvalidSpecError(f"{field}: {key} is set by the operator (the claim's layout, its mounts and "
                                   "the metrics it scrapes); remove it")
        try:
            apply_overrides(config, [f"{key}={json.dumps(value)}"])
        except ConfigError as error:
            raise InvalidSpecError(f"{field}: {error}") from None


_TRAINER_KEY = re.compile(r"\b([a-z]+)\.([a-z_]+)\b")


def spec_field_for(section: str, key: str) -> str | None:
    """The spec field a trainer key is rendered from (training.lr_warmup_steps ->
    spec.training.lrWarmupSteps), or None where the spec has no field of that name."""
    spec_section = JobSpec.model_fields.get(section)
    model = getattr(spec_section, "annotation", None) if spec_section is not None else None
    if isinstance(model, type) and issubclass(model, BaseModel) and key in model.model_fields:
        return f"spec.{section}.{to_camel(key)}"
    return None


def _spec_field(match: re.Match[str]) -> str:
    return spec_field_for(*match.groups()) or match.group(0)


def config_yaml(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
