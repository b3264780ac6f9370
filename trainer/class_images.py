"""Prior preservation: generate the missing class images with the base model.

Every rank generates its own slice of the missing images; each image is written to a
temporary name and renamed, so a killed run leaves only whole images, and the next run
keeps (and counts) them and generates only the rest. Image `class-NNNNN.png` is always
made from the seed `training.seed + NNNNN`, whichever rank makes it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer import atomic
from trainer.config import TrainerConfig
from trainer.data import list_images
from trainer.distributed import Runtime, barrier
from trainer.generation import generate_images


def class_image_path(class_dir: Path, index: int) -> Path:
    return class_dir / f"class-{index:05d}.png"


def plan_missing(class_dir: Path, num_class_images: int) -> list[int]:
    """Indices still to generate: as many as images are missing, skipping the names
    that exist (user-supplied images with other names count as well)."""
    existing = list_images(class_dir, "data.class_dir")
    shortfall = num_class_images - len(existing)
    if shortfall <= 0:
        return []
    taken = {path.name for path in existing}
    free = (index for index in range(num_class_images + len(existing)) if class_image_path(class_dir, index).name not in taken)
    return [next(free) for _ in range(shortfall)]


def share_of_rank(indices: list[int], rank: int, world_size: int) -> list[int]:
    return indices[rank::world_size]


def build_generation_pipeline(components, device: torch.device):
    from trainer.export import build_pipeline

    pipeline = build_pipeline(components)
    pipeline.set_progress_bar_config(disable=True)
    # Only moved, never cast: training starts from the untouched fp32 weights.
    return pipeline.to(device)


def generate_class_images(config: TrainerConfig, components, runtime: Runtime, stop_requested=lambda: False) -> int:
    """Returns how many images this rank generated. Collective: every rank calls it.
    A stop request ends generation after the current batch; finished images stay."""
    data = config.data
    data.class_dir.mkdir(parents=True, exist_ok=True)
    missing = plan_missing(data.class_dir, data.num_class_images)
    # Everyone must plan from the same listing before anyone adds to the folder.
    barrier()
    mine = share_of_rank(missing, runtime.rank, runtime.world_size)
    if mine:
        pipeline = build_generation_pipeline(components, runtime.device)
        for start in range(0, len(mine), data.class_generation_batch_size):
            if stop_requested():
                break
            chunk = mine[start : start + data.class_generation_batch_size]
            generators = [torch.Generator().manual_seed(config.training.seed + index) for index in chunk]
            # At the size the base draws well, as diffusers' script does: a base asked for
            # a smaller size (data.resolution below native, a trial) draws poor priors.
            # The data loader scales them to data.resolution like the photos.
            images = generate_images(pipeline, [data.class_prompt] * len(chunk), generators=generators,
                                     num_inference_steps=data.class_generation_steps,
                                     resolution=components.native_resolution, device=runtime.device)
            for index, image in zip(chunk, images):
                atomic.save_image(image, class_image_path(data.class_dir, index))
        pipeline.to("cpu")
        del pipeline
    if stop_requested():
        return sum(class_image_path(data.class_dir, index).exists() for index in mine)
    barrier()
    return len(mine)
