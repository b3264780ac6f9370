"""The trainer's configuration: one YAML file, validated before anything else runs.

This module's models are the single source of truth for the config contract in
DESIGN.md; config_file.py reads a file (and --set overrides) into them. The operator
imports both to render a `DreamboothJob` into a trainer config, so they must only
depend on pydantic and PyYAML (never torch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from trainer.contract import POD_IP_ENV

Precision = Literal["auto", "fp16", "bf16", "fp32"]


class ConfigError(Exception):
    """A config or input problem the user must fix; main turns it into exit code 2."""


class _Section(BaseModel):
    # Unknown keys are typos until proven otherwise: reject them instead of ignoring them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _a_switch_is_not_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads true/yes/on as a boolean, which pydantic would take as 1 or 1.0: a
        # `noise_offset: true` (diffusers' --offset_noise is a switch) trained with 1.0.
        if isinstance(value, bool) and not _takes_a_switch(cls.model_fields[info.field_name].annotation):
            hint = " (diffusers' --offset_noise switch is 0.1)" if info.field_name == "noise_offset" else ""
            raise PydanticCustomError("switch_not_value", "YAML reads true/yes/on as a switch, and this key takes "
                                      "a value: write the value itself" + hint)
        return value


def _takes_a_switch(annotation: Any) -> bool:
    return annotation is bool or bool in getattr(annotation, "__args__", ())


# Random models built from a config and a seed (trainer/tiny.py, one of its BUILDERS each), for
# tests and demos: no download.
BUILT_IN_MODELS = ("tiny", "tiny-sdxl")


class ModelConfig(_Section):
    source: str = Field(
        "tiny",
        description="A Stable Diffusion 1.x/2.x or SDXL pipeline: a local diffusers folder, a hub id, a folder URL "
        "(file://, s3://, ...; needs cache_dir), or `tiny` / `tiny-sdxl` (built-in random models, no download).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id.")
    cache_dir: Path | None = Field(
        None,
        description="Shared model cache: a hub id or URL is fetched once into `<cache_dir>/<org>--<name>@<revision>` "
        "(lock + atomic rename, safe on a volume many nodes share); default: huggingface_hub's own cache.",
    )


class DataConfig(_Section):
    # The files read as photos, here so that the operator (no torch) checks ConfigMap keys alike.
    IMAGE_SUFFIXES: ClassVar[frozenset[str]] = frozenset(
        {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    )
    CAPTION_SUFFIX: ClassVar[str] = ".txt"

    instance_dir: Path = Field(description="Folder with the 3-5+ photos of the subject.")
    instance_url: str | None = Field(
        None,
        description="fsspec URL of a folder of photos (file://, https://, s3://, gs://, az://, memory://), copied once "
        "into instance_dir before training.",
    )
    instance_prompt: str = Field(min_length=1, description="Prompt with the rare identifier, e.g. `a photo of sks dog`.")
    caption_files: bool = Field(
        False,
        description="Each photo's own prompt from a text file beside it of the same name (dog1.jpg -> dog1.txt), as "
        "kohya's trainers read them; a photo without one gets data.instance_prompt. Captions should hold the identifier.",
    )
    class_prompt: str | None = Field(None, description="Prompt of the subject's class; setting it enables prior preservation.")
    class_dir: Path | None = Field(None, description="Folder of class images; missing ones are generated there.")
    num_class_images: int = Field(100, ge=1, description="How many class images prior preservation uses.")
    resolution: int = Field(512, ge=8, description="Training resolution in pixels (a multiple of 8).")
    center_crop: bool = Field(
        True,
        description="Center crop after resizing (diffusers' --center_crop; its default is a random crop, which "
        "turns off training.cache_latents); false takes a random crop.",
    )
    random_flip: bool = Field(
        False,
        description="Flip instance and class images horizontally at random (deterministic per seed), as diffusers' "
        "--random_flip; off by default, as there: a subject that is not mirror-symmetric (text, a parting, "
        "a logo) would be learnt both ways.",
    )
    class_generation_steps: int = Field(
        25,
        ge=1,
        description="Inference steps per generated class image (diffusers' script uses its pipeline's 50: twice "
        "the time for little gain in a prior). Drawn at the base's native resolution and scaled like the photos.",
    )
    class_generation_batch_size: int = Field(4, ge=1, description="Class images generated per pipeline call.")

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.resolution % 8:
            raise ValueError(f"data.resolution = {self.resolution} must be a multiple of 8 (e.g. {self.resolution // 8 * 8 or 8})")
        if self.class_prompt is not None and self.class_dir is None:
            raise ValueError("data.class_dir is required when data.class_prompt is set (where class images are kept)")
        return self

    @property
    def with_prior_preservation(self) -> bool:
        return self.class_prompt is not None


class TrainingConfig(_Section):
    max_steps: int = Field(800, ge=1, description="Optimizer steps to train.")
    learning_rate: float = Field(2e-6, gt=0, description="Peak learning rate.")
    text_encoder_learning_rate: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate of the text encoder(s) with train_text_encoder, as diffusers' "
        "--text_encoder_lr (LoRA recipes train them slower than the UNet, e.g. 5e-6 beside 1e-4); unset: learning_rate.",
    )
    scale_lr: bool = Field(
        False,
        description="Multiply the learning rates by the instance images of one optimizer step (batch_size x "
        "gradient_accumulation x processes), as diffusers' --scale_lr: 16 GPUs then take steps 16 times one GPU's. "
        "A resume on another number of processes rescales them.",
    )
    batch_size: int = Field(1, ge=1, description="Instance images per rank per micro step (as many class images again).")
    gradient_accumulation: int = Field(1, ge=1, description="Micro steps per optimizer step.")
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the class (prior) loss.")
    train_text_encoder: bool = Field(False, description="Train the CLIP text encoder together with the UNet.")
    precision: Precision = Field("auto", description="`auto`: fp16 on CUDA, bf16 on CPU.")
    seed: int = Field(0, description="Seeds model init, noise, timesteps, data order and flips.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")
    max_nonfinite_steps: int = Field(
        10,
        ge=0,
        description="Steps in a row with a NaN or infinite loss after which the run stops as diverged (exit 4) "
        "instead of training on and exporting broken weights; no checkpoint is written on such a step. 0: never stop.",
    )
    lr_scheduler: Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial"] = Field(
        "constant",
        description="Decay after warmup, as diffusers' --lr_scheduler. Every schedule warms up over lr_warmup_steps, so "
        "`constant` with warmup is diffusers' constant_with_warmup; the ramp's first step takes 1/lr_warmup_steps of "
        "the peak (diffusers' takes 0). `polynomial` decays to 0 (diffusers' to 1e-7).",
    )
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (at most training.max_steps).")
    lr_num_cycles: int = Field(
        1, ge=1, description="Cosine cycles of `cosine_with_restarts`, each back from the peak (diffusers' --lr_num_cycles).")
    lr_power: float = Field(
        1.0, gt=0, description="Exponent of `polynomial`'s decay (diffusers' --lr_power): 1 is linear, 2 falls faster.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW decoupled weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    compile: bool = Field(
        False,
        description="torch.compile the UNet: faster steps once the first one has compiled it (minutes at SD 1.5 "
        "sizes); losses agree to rounding, not bit for bit. DeepSpeed ZeRO 0-2.",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode: `reduce-overhead` also captures CUDA graphs."
    )
    compile_backend: str = Field(
        "inductor", min_length=1, description="torch.compile backend; `aot_eager` generates no code (checks on CPU)."
    )
    snr_gamma: float | None = Field(
        None,
        gt=0,
        description="Min-SNR loss weighting of the instance images with this gamma (5.0 in the paper), as diffusers' "
        "--snr_gamma; unset: the plain mean squared error.",
    )
    noise_offset: float = Field(
        0.0,
        ge=0,
        description="Offset noise (e.g. 0.1, as diffusers' --offset_noise): lets the model learn much darker or "
        "brighter images than average; 0 disables.",
    )
    cache_latents: bool = Field(
        True,
        description="Encode each distinct training image with the VAE once and sample its latents from the kept "
        "distribution every step (identical losses, no VAE pass per step). Ignored with a random crop "
        "(`data.center_crop: false`), where nearly every view is new.",
    )
    prefetch_batches: bool = Field(True, description="Build the next batch on a background thread during the current step.")
    channels_last: bool = Field(
        False,
        description="UNet in channels-last memory format: faster convolutions on tensor-core GPUs, but a different "
        "rounding order, so losses are not bit-identical to the default.",
    )


LORA_LEARNING_RATE = 1e-4  # diffusers' DreamBooth LoRA recipe; adapters start at zero and need a larger step
# The adapters alone, beside the exported pipeline: diffusers' name, which load_lora_weights finds.
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


class LoraConfig(_Section):
    rank: int = Field(
        0,
        ge=0,
        description="Train LoRA adapters of this rank on the attention projections (and the text encoder's, with "
        "training.train_text_encoder) instead of all weights; 0 trains all weights. With LoRA, "
        "training.learning_rate defaults to 1e-4 and the export also writes pytorch_lora_weights.safetensors.",
    )
    alpha: float | None = Field(None, gt=0, description="Adapter scale numerator (scale = alpha / rank); default: rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    use_dora: bool = Field(
        False,
        description="DoRA (weight-decomposed LoRA, as diffusers' --use_dora): each adapted weight also learns the "
        "length of its rows, which brings a low rank closer to a full fine-tune, at slower steps. The LoRA file then "
        "holds the magnitudes too; diffusers' load_lora_weights reads the UNet's, not the text encoders' "
        "(transformers' load_adapter drops them; see README, LoRA).",
    )
    unet_target_modules: list[str] = Field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"],
        min_length=1,
        description="UNet module names that get adapters (peft target_modules).",
    )
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
        min_length=1,
        description="Text encoder module names that get adapters when training.train_text_encoder is set.",
    )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaled_alpha(self) -> float:
        return self.alpha if self.alpha is not None else float(self.rank)


class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage.")
    bucket_size: int | None = Field(
        None,
        ge=2,
        multiple_of=2,  # DeepSpeed's NCCL start alignment
        description="Elements per gradient-reduce and all-gather bucket. Default: an eighth of the trained "
        "parameters, between 10M and 500M, so communication starts early in the backward pass.",
    )
    offload_optimizer: bool = Field(
        False,
        description="ZeRO-Offload: the fp32 master weights and AdamW's moments live in CPU memory and the "
        "optimizer step runs there (DeepSpeed's CPU Adam), about 12 bytes per trained parameter off the GPU "
        "(11 GiB for the SD 1.5 UNet and text encoder, divided among the ranks), for a slower step: what "
        "diffusers' DreamBooth guide uses on 8-16 GB cards. Needs zero_stage 1, 2 or 3; the same losses as "
        "without, and a checkpoint resumes either way.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Merged last into the generated DeepSpeed config (e.g. zero_optimization.reduce_bucket_size).",
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "DeepSpeedConfig":
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer = true needs ZeRO to partition the optimizer: "
                             "set deepspeed.zero_stage to 1, 2 or 3")
        return self


class CheckpointConfig(_Section):
    dir: Path = Field(description="Folder of `step-NNNNNNNN/` checkpoints and the `latest` pointer.")
    every_steps: int = Field(500, ge=1, description="Save every N optimizer steps (and at the end).")
    keep_last: int = Field(3, ge=1, description="How many complete checkpoints to keep.")
    resume: str = Field("auto", description="`auto` (latest complete one), `never`, or a checkpoint folder.")
    grace_seconds: float = Field(25.0, gt=0, description="Time allowed to checkpoint after SIGTERM.")


class OutputConfig(_Section):
    dir: Path = Field(description="Final diffusers pipeline folder (with run.json), written atomically.")
    dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32",
        description="Weights of the exported pipeline: `fp32`, the master weights as trained; `fp16` or `bf16`, half "
        "the size (about 7 GB instead of 14 for SDXL), loaded with dtype=torch.float16 (or bfloat16). The LoRA "
        "file stays fp32.",
    )
    uri: str | None = Field(
        None,
        description="Also upload the exported folder here: an fsspec URL (file://, s3://, gs://, az://, ...) or "
        "`hf://org/repo` (one commit, token from HF_TOKEN). A failed upload keeps the model in dir; exit code 3.",
    )


def _default_metrics_host() -> str:
    return os.environ.get(POD_IP_ENV) or "0.0.0.0"


class MetricsConfig(_Section):
    port: int = Field(0, ge=0, le=65535, description="Prometheus port of rank 0; 0 disables.")
    host: str = Field(default_factory=_default_metrics_host, description="Bind address; default $POD_IP else 0.0.0.0.")
    linger_seconds: float = Field(
        5.0, ge=0, description="After a finished run, keep serving this long so that a last scrape sees the final step."
    )


class LoggingConfig(_Section):
    every_steps: int = Field(1, ge=1, description="Print a progress line every N steps on rank 0.")
    format: Literal["text", "json"] = Field("text", description="`json`: one JSON object per line.")


# Samplers for validation.scheduler: diffusers' schedulers for SD and SDXL pipelines that
# need nothing the trainer image lacks (LMS needs scipy; SDE and EDM samplers are not
# theirs). DPMSolverMultistepScheduler is diffusers' --validation_scheduler default.
VALIDATION_SCHEDULERS = (
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DDIMScheduler", "DDPMScheduler", "PNDMScheduler",
)


class ValidationConfig(_Section):
    every_steps: int = Field(0, ge=0, description="Sample images every N optimizer steps (and at the end); 0 disables.")
    prompts: list[str] = Field(default_factory=list, description="Prompts sampled each time; default: data.instance_prompt.")
    num_inference_steps: int = Field(25, ge=1, description="Denoising steps per sample.")
    images_per_prompt: int = Field(1, ge=1, le=16, description="Samples per prompt (diffusers' --num_validation_images), "
                                   "each from its own seed, drawn together: a row of the grid per prompt.")
    seed: int = Field(0, description="Fixed seed: the samples of different steps differ only by what was learned.")
    guidance_scale: float | None = Field(None, ge=0, description="Classifier-free guidance of the samples: how "
                                         "closely they follow the prompt; unset, the pipeline's own (7.5 for SD, "
                                         "5.0 for SDXL); 1 or less turns guidance off.")
    negative_prompt: str | None = Field(None, min_length=1, description="What the samples should not show, e.g. "
                                        "`blurry, low quality`; unset, none.")
    scheduler: Literal[VALIDATION_SCHEDULERS] | None = Field(  # type: ignore[valid-type]
        None, description="The samples' sampler, a diffusers scheduler class (diffusers' --validation_scheduler), e.g. "
        "DPMSolverMultistepScheduler: sharper samples in 25 steps than SD 1.5's own PNDM; unset, the model's own.")
    dir: Path | None = Field(None, description="Folder of the `step-NNNNNNNN.png` grids; default: `samples/` beside checkpoint.dir.")


class TensorBoardConfig(_Section):
    enabled: bool = Field(False, description="Write TensorBoard scalars (and validation images) on rank 0.")
    dir: Path | None = Field(None, description="Event file folder; default: `tensorboard/` beside checkpoint.dir.")


class TrainerConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig
    output: OutputConfig
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig)

    @model_validator(mode="after")
    def _check(self) -> "TrainerConfig":
        if self.training.lr_warmup_steps > self.training.max_steps:
            raise ValueError(
                f"training.lr_warmup_steps = {self.training.lr_warmup_steps} exceeds training.max_steps = "
                f"{self.training.max_steps}; lower the warmup"
            )
        if self.training.compile and self.deepspeed.zero_stage == 3:
            raise ValueError(
                "training.compile = true does not work with deepspeed.zero_stage = 3 (ZeRO-3 gathers each layer's "
                "weights in hooks that a compiled graph skips); use zero_stage 2, or compile: false"
            )
        for key, schedule in (("lr_num_cycles", "cosine_with_restarts"), ("lr_power", "polynomial")):
            value = getattr(self.training, key)
            if value != TrainingConfig.model_fields[key].default and self.training.lr_scheduler != schedule:
                raise ValueError(f"training.{key} = {value} has no effect with training.lr_scheduler = "
                                 f"{self.training.lr_scheduler}; set training.lr_scheduler: {schedule}, or remove the key")
        if self.training.text_encoder_learning_rate is not None and not self.training.train_text_encoder:
            raise ValueError(
                f"training.text_encoder_learning_rate = {self.training.text_encoder_learning_rate} has no effect without "
                "training.train_text_encoder = true; set that too, or remove the key"
            )
        ignored = [key for key in sorted(self.lora.model_fields_set - {"rank"})
                   if getattr(self.lora, key) != LoraConfig.model_fields[key].get_default(call_default_factory=True)]
        if ignored and not self.lora.enabled:
            raise ValueError(
                f"lora.{ignored[0]} = {getattr(self.lora, ignored[0])!r} has no effect with lora.rank = 0 (all weights "
                "are trained); set lora.rank (e.g. 16) to train adapters, or remove the key"
            )
        if self.lora.enabled and "learning_rate" not in self.training.model_fields_set:
            self.training.learning_rate = LORA_LEARNING_RATE
        return self


# Keys that change what the steps after a resume compute, though the checkpoint loads
# all the same: a resume reports each one that changed (the optimizer's own settings are
# reported by engine.apply_optimizer_settings).
RECIPE_KEYS = (
    "model.source", "model.revision", "data.instance_prompt", "data.caption_files", "data.class_prompt",
    "data.num_class_images",
    "data.resolution", "data.center_crop", "data.random_flip", "training.seed", "training.batch_size",
    "training.gradient_accumulation", "training.max_steps", "training.lr_scheduler", "training.lr_warmup_steps",
    "training.scale_lr", "training.lr_num_cycles", "training.lr_power",
    "training.prior_loss_weight", "training.max_grad_norm", "training.snr_gamma", "training.noise_offset",
)


def recipe(config: TrainerConfig) -> dict[str, Any]:
    """RECIPE_KEYS -> this config's values."""
    values = {}
    for key in RECIPE_KEYS:
        section, name = key.split(".")
        values[key] = getattr(getattr(config, section), name)
    return values
