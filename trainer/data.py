"""Instance and class images: reading, checking, augmenting, and a data order that is a
pure function of (seed, micro step) so that a resumed run sees the same batches."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.config import ConfigError, DataConfig

IMAGE_SUFFIXES = DataConfig.IMAGE_SUFFIXES


def list_images(folder: Path, key: str) -> list[Path]:
    """The image files of `folder`, sorted; hidden files (temporaries) are ignored."""
    if not folder.exists():
        raise ConfigError(f"{key} = {str(folder)!r}: no such folder")
    if not folder.is_dir():
        raise ConfigError(f"{key} = {str(folder)!r}: not a folder")
    return sorted(
        path for path in folder.iterdir()
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
    )


def load_rgb(path: Path, key: str) -> Image.Image:
    """Decode one image upright (EXIF orientation) as RGB; transparency over white."""
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ConfigError(f"{key}: cannot read image {path}: {error}; replace or remove the file") from None
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def resize_short_side(image: Image.Image, resolution: int) -> Image.Image:
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def load_image_set(folder: Path, key: str, resolution: int, limit: int | None = None) -> list[Image.Image]:
    paths = list_images(folder, key)[:limit]
    if not paths:
        raise ConfigError(
            f"{key} = {str(folder)!r}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); add the photos there"
        )
    return [resize_short_side(load_rgb(path, key), resolution) for path in paths]


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (seed, step, rank, ...), stable across
    processes and Python runs (unlike hash())."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def augment(image: Image.Image, resolution: int, *, center_crop: bool, random_flip: bool, rng: random.Random) -> torch.Tensor:
    """Crop to a square and maybe flip; returns CHW float in [-1, 1]."""
    width, height = image.size
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left, top = rng.randint(0, width - resolution), rng.randint(0, height - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass
class Batch:
    pixel_values: torch.Tensor  # instance images first, then as many class images
    input_ids: torch.Tensor
    num_instance: int


class DreamBoothData:
    """Instance images with the instance prompt and, with prior preservation, class
    images with the class prompt. A sample pairs instance i and class i (modulo)."""

    def __init__(self, config: DataConfig, tokenizer, *, seed: int, rank: int, world_size: int, batch_size: int):
        self.config = config
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.instance_images = load_image_set(config.instance_dir, "data.instance_dir", config.resolution)
        self.class_images: list[Image.Image] = []
        if config.with_prior_preservation:
            self.class_images = load_image_set(
                config.class_dir, "data.class_dir", config.resolution, limit=config.num_class_images
            )
        self.instance_ids = tokenize(tokenizer, config.instance_prompt)
        self.class_ids = tokenize(tokenizer, config.class_prompt) if config.class_prompt else None

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def sample_indices(self, micro_step: int) -> list[tuple[int, int]]:
        """(epoch, index) of this rank's samples at a micro step. The global stream is
        one seeded permutation per epoch; micro step m takes the next batch*world
        positions and rank r the r-th run of `batch_size` among them."""
        size = len(self)
        first = (micro_step * self.world_size + self.rank) * self.batch_size
        picks = []
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, size)
            order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            picks.append((epoch, int(order[offset])))
        return picks

    def batch(self, micro_step: int) -> Batch:
        pixels, ids = [], []
        picks = self.sample_indices(micro_step)
        for epoch, index in picks:
            pixels.append(self._view(self.instance_images, index, epoch, stream=0))
            ids.append(self.instance_ids)
        if self.class_ids is not None:
            for epoch, index in picks:
                pixels.append(self._view(self.class_images, index, epoch, stream=1))
                ids.append(self.class_ids)
        return Batch(pixel_values=torch.stack(pixels), input_ids=torch.stack(ids), num_instance=len(picks))

    def instance_batch(self) -> Batch:
        """Every instance image once, centered and unflipped: the fixed evaluation set."""
        pixels = [
            augment(image, self.config.resolution, center_crop=True, random_flip=False, rng=random.Random(0))
            for image in self.instance_images
        ]
        ids = [self.instance_ids] * len(pixels)
        return Batch(pixel_values=torch.stack(pixels), input_ids=torch.stack(ids), num_instance=len(pixels))

    def _view(self, images: list[Image.Image], index: int, epoch: int, stream: int) -> torch.Tensor:
        rng = random.Random(derived_seed(self.seed, epoch, index, stream))
        return augment(
            images[index % len(images)],
            self.config.resolution,
            center_crop=self.config.center_crop,
            random_flip=self.config.random_flip,
            rng=rng,
        )


def tokenize(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids[0]
