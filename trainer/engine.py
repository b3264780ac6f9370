"""DeepSpeed: the engine config (a pure function of the trainer config), the learning
rate schedule, and engine construction."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from trainer.config import BUILT_IN_MODELS, ConfigError, TrainerConfig

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` means fp16 on CUDA (with dynamic loss scaling) and bf16 on CPU."""
    if requested != "auto":
        if requested == "fp16" and device.type != "cuda":
            raise ConfigError("training.precision = 'fp16' needs a CUDA device; use bf16 or fp32 on CPU (or auto)")
        return requested
    return "fp16" if device.type == "cuda" else "bf16"


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


MIN_BUCKET_SIZE = 10_000_000
MAX_BUCKET_SIZE = 500_000_000  # DeepSpeed's own default
# DeepSpeed asserts that the all-gather bucket is a multiple of its NCCL start alignment
# (2 elements of fp16/bf16): an odd size (the SD 1.5 UNet alone / 8 is 107,440,121) fails
# at engine start. Rounded up to whole MiB of elements, which every alignment divides.
BUCKET_ALIGNMENT = 1 << 20


def bucket_size(num_trainable: int) -> int:
    """Gradient reduce / all-gather bucket (elements): about eight buckets per model, so
    that ZeRO's reduction overlaps the backward pass instead of waiting for one
    500M-element bucket (more than half of the SD 1.5 UNet), and the fp16 bucket
    buffers stay small beside the model."""
    eighth = -(-num_trainable // 8)
    aligned = -(-eighth // BUCKET_ALIGNMENT) * BUCKET_ALIGNMENT
    return max(MIN_BUCKET_SIZE, min(MAX_BUCKET_SIZE, aligned))


def build_deepspeed_config(config: TrainerConfig, *, precision: str, world_size: int, device_type: str = "cuda",
                           num_trainable: int | None = None, load_universal: bool = False) -> dict[str, Any]:
    """`num_trainable` (trained parameter count) sizes the ZeRO buckets when
    deepspeed.bucket_size is not set; without either, DeepSpeed's defaults apply.
    `load_universal`: the checkpoint to resume is a universal one (another world size
    wrote it)."""
    training = config.training
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation,
        "train_batch_size": training.batch_size * training.gradient_accumulation * world_size,
        "gradient_clipping": training.max_grad_norm,
        "steps_per_print": 10**9,  # progress is ours to report
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": group_learning_rates(config, world_size)[0],
                "betas": [training.adam_beta1, training.adam_beta2],
                "eps": training.adam_epsilon,
                "weight_decay": training.adam_weight_decay,
                # On CPU, torch's AdamW: DeepSpeed's CPU FusedAdam differs by an ulp on
                # the first step after a resume, which breaks bit-for-bit resume.
                "torch_adam": device_type != "cuda",
            },
        },
        "zero_optimization": {
            "stage": config.deepspeed.zero_stage,
            "overlap_comm": config.deepspeed.zero_stage > 0,
            "contiguous_gradients": True,
        },
        # Dynamic loss scaling from 2**16: halved after overflows (hysteresis 2: the second in
        # a row), doubled after loss_scale_window clean steps. 1000 (DeepSpeed's default) is
        # longer than most of an ~800-step DreamBooth run: the scale settles in the first
        # steps and then mostly stays, as in diffusers' script (GradScaler, growth_interval
        # 2000). A growth costs an overflow and a skipped step when it overshoots; a shorter
        # window would buy little against underflow, since the fp32 master weights take the
        # unscaled update. At min_loss_scale 1 an overflow ends the run as diverged (loop.py).
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": precision == "bf16"},
    }
    buckets = config.deepspeed.bucket_size or (bucket_size(num_trainable) if num_trainable else None)
    if buckets:
        # Where the reduction happens, not what it computes: each element is still the
        # same sum over ranks (tests compare losses with and without).
        ds["zero_optimization"].update({"reduce_bucket_size": buckets, "allgather_bucket_size": buckets})
    if config.deepspeed.offload_optimizer:
        # Pinned host memory speeds the copies to and from a GPU (there is none to pin for on CPU).
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if config.deepspeed.zero_stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
        if config.model.source in BUILT_IN_MODELS:
            # Every tensor of the built-in tiny models is under DeepSpeed's default threshold
            # (1e5 elements): they would stay whole on every rank and the tests would not
            # partition anything. A real model keeps the default: partitioning its biases
            # and norms too would cost hundreds of tiny all-gathers per step.
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return deep_merge(ds, config.deepspeed.overrides)


def lr_multiplier(step: int, *, warmup_steps: int, max_steps: int, schedule: str, num_cycles: int = 1,
                  power: float = 1.0) -> float:
    """Factor on the peak learning rate after `step` optimizer steps (the schedules of
    diffusers' get_scheduler, but for the warmup's first step and polynomial's floor)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "polynomial":
        return (1.0 - progress) ** power
    if schedule == "cosine_with_restarts":
        return 0.0 if progress >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler_factory(config: TrainerConfig) -> Callable:
    training = config.training

    def factory(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(
                step, warmup_steps=training.lr_warmup_steps, max_steps=training.max_steps, schedule=training.lr_scheduler,
                num_cycles=training.lr_num_cycles, power=training.lr_power,
            ),
        )

    return factory


# The optimizer's param groups, in order, and the config key of each one's learning rate.
GROUP_RATE_KEYS = ("training.learning_rate", "training.text_encoder_learning_rate")


def group_learning_rates(config: TrainerConfig, world_size: int) -> list[float]:
    """Peak rates in GROUP_RATE_KEYS order: the UNet's, the text encoders' (default: the
    UNet's); with training.scale_lr, times the instance images of one optimizer step."""
    training = config.training
    scale = training.batch_size * training.gradient_accumulation * world_size if training.scale_lr else 1
    return [training.learning_rate * scale, (training.text_encoder_learning_rate or training.learning_rate) * scale]


def parameter_groups(module: torch.nn.Module, config: TrainerConfig, world_size: int) -> list[dict]:
    """The UNet's trained parameters, then (when they are trained) the text encoders', at
    their own learning rate. Two groups whenever the text encoders train, whatever the
    rates, so that a resume may change either rate."""
    unet, text_encoders = [], []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            (text_encoders if name.startswith("text_encoder") else unet).append(parameter)
    unet_rate, text_encoder_rate = group_learning_rates(config, world_size)
    groups = [{"params": unet, "lr": unet_rate}]
    if text_encoders:
        groups.append({"params": text_encoders, "lr": text_encoder_rate})
    return groups


def apply_optimizer_settings(engine, config: TrainerConfig, world_size: int) -> dict[str, tuple[float, float]]:
    """After a resume: this run's learning rates and AdamW settings, not the checkpoint's.
    DeepSpeed restores the optimizer's param groups and the schedule's base rates from the
    checkpoint, so a run resumed with another training.learning_rate (lowered after a
    divergence, say) silently kept the old one. The moments and step counts stay the
    checkpoint's. Returns {config key: (checkpoint's value, this run's)} for what changed."""
    training = config.training
    scheduler = engine.lr_scheduler
    groups = scheduler.optimizer.param_groups
    rates = group_learning_rates(config, world_size)[:len(groups)]
    saved = {**dict(zip(GROUP_RATE_KEYS, scheduler.base_lrs)), "training.adam_beta1": groups[0]["betas"][0],
             "training.adam_beta2": groups[0]["betas"][1], "training.adam_epsilon": groups[0]["eps"],
             "training.adam_weight_decay": groups[0]["weight_decay"]}
    wanted = {**dict(zip(GROUP_RATE_KEYS, rates)), "training.adam_beta1": training.adam_beta1,
              "training.adam_beta2": training.adam_beta2, "training.adam_epsilon": training.adam_epsilon,
              "training.adam_weight_decay": training.adam_weight_decay}
    scheduler.base_lrs = rates
    # The same expression LambdaLR evaluates: an unchanged rate comes back bit for bit.
    multiplier = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group, rate in zip(groups, rates):
        group.update(lr=rate * multiplier, initial_lr=rate, betas=(training.adam_beta1, training.adam_beta2),
                     eps=training.adam_epsilon, weight_decay=training.adam_weight_decay)
    scheduler._last_lr = [group["lr"] for group in groups]
    return {key: (saved[key], value) for key, value in wanted.items() if saved[key] != value}


def build_engine(config: TrainerConfig, module: torch.nn.Module, *, precision: str, world_size: int, device_type: str,
                 load_universal: bool = False):
    import deepspeed

    trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=parameter_groups(module, config, world_size),
        config=build_deepspeed_config(config, precision=precision, world_size=world_size, device_type=device_type,
                                      num_trainable=sum(parameter.numel() for parameter in trainable),
                                      load_universal=load_universal),
        lr_scheduler=lr_scheduler_factory(config),
    )
    return engine
