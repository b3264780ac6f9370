"""The final model: a diffusers pipeline folder at `output.dir`, with `run.json`.

The weights are DeepSpeed's fp32 master copies (not the fp16/bf16 working copies),
gathered from every rank's shards. The folder is written under a temporary name beside
`output.dir` and renamed into place, so a reader sees the old model or the new one,
never half of one.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from trainer import atomic
from trainer.config import TrainerConfig
from trainer.distributed import Runtime, wait_for_main_rank
from trainer.engine import group_learning_rates
from trainer.model_card import SDXL_PIPELINE
from trainer.objective import compile_report
from trainer.progress import json_safe

RUN_FILE = "run.json"
# The pipeline parts a DreamBoothDenoiser may train, under the same names (its attributes).
TRAINABLE_PARTS = ("unet", "text_encoder", "text_encoder_2")


def fp16_master_weights(optimizer) -> dict[int, torch.Tensor]:
    """{id(fp16 parameter): its fp32 master copy} for DeepSpeed's ZeRO-0 fp16 optimizers,
    whose parameters safe_get_full_fp32_param does not know (they have no hp mapping: it
    returns None, and the fp16-rounded working copy would be exported instead). Empty for
    any other optimizer. Read from DeepSpeed 0.19's attributes: FP16_UnfusedOptimizer
    (torch's Adam, CPU) keeps fp32_groups[g][i] beside fp16_groups[g][i]; FP16_Optimizer
    (fused Adam, CUDA) one flat fp32_groups_flat[g] laid out as _flatten_dense_tensors
    laid out fp16_groups[g]."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from torch._utils import _unflatten_dense_tensors

    if isinstance(optimizer, FP16_UnfusedOptimizer):
        masters = optimizer.fp32_groups
    elif isinstance(optimizer, FP16_Optimizer):
        masters = [_unflatten_dense_tensors(flat, group) for flat, group in zip(optimizer.fp32_groups_flat, optimizer.fp16_groups)]
    else:
        return {}
    return {id(parameter): master for group, master_group in zip(optimizer.fp16_groups, masters)
            for parameter, master in zip(group, master_group, strict=True)}


def gather_fp32_state_dict(engine, *, keep: bool) -> dict[str, torch.Tensor]:
    """The engine's module's weights: collective over all ranks, in the same parameter
    order; the result is filled only where `keep` is true (rank 0), so other ranks hold
    no full copy. Only trained parameters: frozen ones (a LoRA run's base weights) hold a
    cast working copy and are taken from the model source instead."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    fp16_masters = fp16_master_weights(engine.optimizer)
    state: dict[str, torch.Tensor] = {}
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        full = fp16_masters.get(id(parameter))
        if full is None:
            full = safe_get_full_fp32_param(parameter)
        if full is None:
            # No fp32 master copy (ZeRO-0 in fp32): gather the working copy (a no-op outside ZeRO-3).
            with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
                full = parameter.detach().float().clone() if keep else None
        if keep:
            state[name] = full.detach().float().cpu().clone()
    if keep:
        persistent = set(module.state_dict(keep_vars=True))
        for name, buffer in module.named_buffers():
            if name in persistent:
                state[name] = buffer.detach().cpu().clone()
    return state


def describe_run(config: TrainerConfig, runtime: Runtime, precision: str, *, outcome: str, final_step: int,
                 resumed_from: int | None, started: float, trained_samples: int = 0, train_seconds: float = 0.0) -> dict:
    """What run.json holds for every run (DESIGN.md's fields, and what ended it:
    `done`, `stopped` by a signal, or `diverged`); a finished run adds describe_model's."""
    return {
        "outcome": outcome,
        "final_step": final_step,
        "max_steps": config.training.max_steps,
        "resumed_from_step": resumed_from,
        "world_size": runtime.world_size,
        "precision": precision,
        "zero_stage": config.deepspeed.zero_stage,
        "train_text_encoder": config.training.train_text_encoder,
        # The UNet's peak, as trained: scaled by the images of a step with training.scale_lr.
        "learning_rate": group_learning_rates(config, runtime.world_size)[0],
        "lora_rank": config.lora.rank,
        "lora_use_dora": config.lora.use_dora,
        "wall_seconds": time.monotonic() - started,
        "samples_per_second": trained_samples / train_seconds if train_seconds > 0 else 0.0,
    }


def describe_model(config: TrainerConfig, components, module: torch.nn.Module, *, class_images_generated: int,
                   eval_before: float, eval_after: float) -> dict:
    """What run.json adds for a finished run: the model it exports and how it was trained."""
    return {
        "pipeline": SDXL_PIPELINE if components.is_sdxl else "StableDiffusionPipeline",
        "output_dtype": config.output.dtype,
        "trained_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "compile": ({"backend": config.training.compile_backend, "mode": config.training.compile_mode,
                     **compile_report()} if config.training.compile else None),
        "prior_preservation": config.data.with_prior_preservation,
        "class_images_generated": class_images_generated,
        "instance_eval_loss_before": eval_before,
        "instance_eval_loss_after": eval_after,
    }


def record_unfinished_run(output_dir: Path, run_info: dict[str, Any]) -> Path | None:
    """run.json of a run that ended without an export (stopped, diverged): DESIGN.md
    asks for one at the end of every run. Not where an earlier run's model was
    exported: that folder's run.json describes the model beside it."""
    if (output_dir / "model_index.json").is_file():
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    return write_run_json(output_dir, run_info)


def write_run_json(folder: Path, run_info: dict[str, Any]) -> Path:
    """`folder`/run.json, atomically; a NaN or infinite figure is written as null."""
    path = folder / RUN_FILE
    atomic.write_json(path, json_safe(run_info), indent=2, sort_keys=True)
    return path


def build_pipeline(components, **modules: torch.nn.Module):
    """A StableDiffusionPipeline (or XL) of `components`, with `modules` (unet=...,
    text_encoder=..., text_encoder_2=...) in place of theirs."""
    parts = {name: modules.get(name, getattr(components, name)) for name in TRAINABLE_PARTS}
    if components.is_sdxl:
        from diffusers import StableDiffusionXLPipeline

        # No invisible watermark: the pipeline's optional dependency, and not what a fine-tune's samples need.
        return StableDiffusionXLPipeline(vae=components.vae, tokenizer=components.tokenizer,
                                         tokenizer_2=components.tokenizer_2, scheduler=components.inference_scheduler,
                                         add_watermarker=False, **parts)
    from diffusers import StableDiffusionPipeline

    parts.pop("text_encoder_2")
    return StableDiffusionPipeline(vae=components.vae, tokenizer=components.tokenizer,
                                   scheduler=components.inference_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False, **parts)


def fresh_like(module: torch.nn.Module) -> torch.nn.Module:
    """A new fp32 CPU module of the same class and config (diffusers or transformers)."""
    if hasattr(type(module), "from_config"):
        return type(module).from_config(module.config)
    return type(module)(module.config)


def export_pipeline(engine, components, output_dir: Path, runtime: Runtime, run_info: dict[str, Any],
                    card: str | None = None, samples: Path | None = None) -> Path | None:
    """Collective. Rank 0 writes the folder (with `card` as its README.md, and the
    `samples` grid the card shows); returns its path there, None elsewhere.

    The engine's own modules are cast and (under ZeRO-3) partitioned, so the exported
    ones are fresh modules loaded with the gathered fp32 weights; the frozen parts
    (VAE, an untrained text encoder) were never cast and are saved as they are."""
    state = gather_fp32_state_dict(engine, keep=runtime.is_main)
    if runtime.is_main:
        pipeline = build_pipeline(components, **trained_modules(state, components))
        pipeline.to("cpu")
        publish_folder(output_dir, lambda folder: _write(pipeline, folder, run_info, state, components, card, samples))
    # Several GB written by one process, to a network volume: it may outlast the default group's timeout.
    wait_for_main_rank(f"the export to {output_dir}")
    return output_dir if runtime.is_main else None


def trained_modules(state: dict[str, torch.Tensor], components) -> dict[str, torch.nn.Module]:
    """Fresh fp32 modules (by pipeline part name) of the parts a gathered DreamBoothDenoiser
    state holds: the UNet and the text encoders when they were trained. Trained LoRA
    adapters come fused into the base weights."""
    from trainer import lora

    if lora.has_adapters(components.unet):
        return lora.fused_modules(state, components)
    modules = {}
    for name in trained_parts(state):
        modules[name] = fresh_like(getattr(components, name))
        modules[name].load_state_dict(submodule_state(state, name))
    return modules


def trained_parts(state: dict[str, torch.Tensor]) -> list[str]:
    return [name for name in TRAINABLE_PARTS if any(key.startswith(name + ".") for key in state)]


def submodule_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix + "."): value for key, value in state.items() if key.startswith(prefix + ".")}


def _write(pipeline, folder: Path, run_info: dict[str, Any], state: dict[str, torch.Tensor], components,
           card: str | None, samples: Path | None) -> None:
    from trainer import lora
    from trainer.engine import DTYPES
    from trainer.model_card import CARD_FILE, SAMPLES_FILE

    if run_info["output_dtype"] != "fp32":  # to() at all makes diffusers warn about modules kept in fp32 (none here)
        pipeline.to(dtype=DTYPES[run_info["output_dtype"]])
    pipeline.save_pretrained(folder, safe_serialization=True)
    if lora.has_adapters(components.unet):
        # Beside the fused pipeline: the adapters alone, a few MB, for load_lora_weights on any copy of the base.
        lora.save_adapters(folder, state, components)
    if card is not None:
        (folder / CARD_FILE).write_text(card)
    if samples is not None:
        shutil.copyfile(samples, folder / SAMPLES_FILE)
    write_run_json(folder, run_info)


def publish_folder(target: Path, write) -> None:
    """Write a folder under a temporary name, then swap it in with renames."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.staging-{os.getpid()}")
    retired = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    if target.exists():
        os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
