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
from trainer.distributed import Runtime, any_rank, barrier
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


def generate_class_images(config: TrainerConfig, components, runtime: Runtime,
                          stop_requested=lambda: False) -> int | None:
    """Returns how many images this rank generated, or None on every rank when any rank
    had a stop request: it ends generation after the current batch; finished images stay.
    Collective: every rank calls it."""
    data = config.data
    data.class_dir.mkdir(parents=True, exist_ok=True)
    missing = plan_missing(data.class_dir, data.num_class_images)
    # Everyone must plan from the same listing before anyone adds to the folder.
    barrier()
    mine = share_of_rank(missing, runtime.rank, runtime.world_size)
    pipeline = build_generation_pipeline(components, runtime.device) if mine else None
    # Every rank goes through as many batches as the largest share, and every rank asks
    # at each whether any rank has a stop request: all leave at the same batch. A stop
    # seen by one rank only (its pod's SIGTERM comes first) otherwise left the others
    # generating and then waiting for it in a barrier until the group timed out.
    largest_share = -(-len(missing) // runtime.world_size)
    for start in range(0, largest_share, data.class_generation_batch_size):
        if any_rank(stop_requested()):
            return None
        chunk = mine[start : start + data.class_generation_batch_size]
        if not chunk:
            continue
        generators = [torch.Generator().manual_seed(config.training.seed + index) for index in chunk]
        # At the size the base draws well, as diffusers' script does: a base asked for
        # a smaller size (data.resolution below native, a trial) draws poor priors.
        # The data loader scales them to data.resolution like the photos.
        images = generate_images(pipeline, [data.class_prompt] * len(chunk), generators=generators,
                                 num_inference_steps=data.class_generation_steps,
                                 resolution=components.native_resolution, device=runtime.device)
        for index, image in zip(chunk, images):
            atomic.save_image(image, class_image_path(data.class_dir, index))
    if pipeline is not None:
        pipeline.to("cpu")
        del pipeline
    # Everyone's images are on the volume before anyone's data loader lists the folder.
    if any_rank(stop_requested()):
        return None
    return len(mine)
