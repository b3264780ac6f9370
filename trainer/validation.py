"""Validation samples: every `validation.every_steps`, `images_per_prompt` images per
prompt, each from a fixed seed, saved by rank 0 as one PNG grid per step
(`step-NNNNNNNN.png`).

Under ZeRO-3 every rank holds only a shard of each weight, so a forward pass on rank 0
alone would wait forever for the others. Instead all ranks gather the fp32 master
weights collectively, in the same order (as the export does), rank 0 rebuilds the
pipeline from them and generates, and the other ranks wait for it (on the long-wait
group of distributed.py: as long as the samples asked for take). One code path
for every ZeRO stage, and the samples show the same weights the export would write.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from trainer import atomic
from trainer.config import TrainerConfig
from trainer.contract import STEP_PREFIX
from trainer.distributed import Runtime, wait_for_main_rank
from trainer.export import build_pipeline, gather_fp32_state_dict, trained_modules
from trainer.generation import generate_images

SAMPLE_PREFIX = STEP_PREFIX  # a step's grid is named like its checkpoint folder
GRID_COLUMNS = 4


def samples_dir(config: TrainerConfig) -> Path:
    """`validation.dir`, else `samples/` beside checkpoint.dir (on the same volume,
    outside output.dir, which the export replaces whole)."""
    return config.validation.dir or config.checkpoint.dir.parent / "samples"


def sample_path(folder: Path, step: int) -> Path:
    return folder / f"{SAMPLE_PREFIX}{step:08d}.png"


def validation_prompts(config: TrainerConfig) -> list[str]:
    return list(config.validation.prompts) or [config.data.instance_prompt]


def is_validation_step(config: TrainerConfig, step: int) -> bool:
    every = config.validation.every_steps
    return every > 0 and (step % every == 0 or step == config.training.max_steps)


def image_grid(images: list, columns: int = GRID_COLUMNS):
    """Images of one size in rows of `columns` (fewer when there are fewer images)."""
    from PIL import Image

    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


def generate_samples(engine, components, config: TrainerConfig, runtime: Runtime):
    """Collective (every rank calls it at the same step). Returns the grid on rank 0,
    None elsewhere."""
    state = gather_fp32_state_dict(engine, keep=runtime.is_main)
    grid = None
    if runtime.is_main:
        grid = _generate_on_main(state, components, config, runtime)
    del state
    # validation.prompts x images_per_prompt images, each many denoising steps: as many as a user asks for.
    wait_for_main_rank("the validation samples")
    return grid


def _generate_on_main(state, components, config: TrainerConfig, runtime: Runtime):
    validation, device = config.validation, runtime.device
    modules = trained_modules(state, components)
    # The shared scheduler object is left untouched: sampling sets its timesteps.
    scheduler = sampler_class(validation.scheduler, components).from_config(components.inference_scheduler.config)
    if device.type == "cuda":
        # Half precision beside the training state: the sampling copy costs half the fp32 size.
        modules["unet"] = modules["unet"].to(device, torch.float16)
    # The frozen parts are on the device already (build_denoiser); this moves the trained copies.
    pipeline = build_pipeline(components, **modules).to(device)
    pipeline.scheduler = scheduler
    pipeline.set_progress_bar_config(disable=True)
    per_prompt = validation.images_per_prompt
    images = []
    # One prompt's images at a time: all prompts' at once could need the memory of a whole
    # grid of decodes beside the training state. Image k has seed validation.seed + k.
    for index, prompt in enumerate(validation_prompts(config)):
        seeds = range(validation.seed + index * per_prompt, validation.seed + (index + 1) * per_prompt)
        images += generate_images(pipeline, [prompt] * per_prompt, num_inference_steps=validation.num_inference_steps,
                                  resolution=config.data.resolution, device=device,
                                  generators=[torch.Generator().manual_seed(seed) for seed in seeds],
                                  guidance_scale=validation.guidance_scale, negative_prompt=validation.negative_prompt)
    del pipeline, modules
    return image_grid(images, columns=per_prompt if per_prompt > 1 else GRID_COLUMNS)


def sampler_class(name: str | None, components) -> type:
    """validation.scheduler's class, or the model's own scheduler's when it is unset."""
    if name is None:
        return type(components.inference_scheduler)
    import diffusers

    return getattr(diffusers, name)


def save_grid(grid, folder: Path, step: int) -> Path:
    """Written under a temporary name and renamed: a reader never sees half a PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    path = sample_path(folder, step)
    atomic.save_image(grid, path)
    return path
