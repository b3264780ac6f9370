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

from trainer.conditioning import size_ids, tokenize
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


@dataclass
class SourceImage:
    image: Image.Image  # resized: its short side is the training resolution
    original_size: tuple[int, int]  # (height, width) as decoded: SDXL is conditioned on it
    caption: str | None = None  # its own prompt (data.caption_files)


def read_caption(image_path: Path, key: str) -> str | None:
    """The text of the caption file beside an image (dog1.jpg -> dog1.txt), None without one."""
    path = image_path.with_suffix(DataConfig.CAPTION_SUFFIX)
    if not path.is_file():
        return None
    try:
        caption = " ".join(path.read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{key}: cannot read caption {path}: {error}; save it as UTF-8 text or remove it") from None
    if not caption:
        raise ConfigError(f"{key}: caption {path} is empty; write the photo's prompt there, or remove the file to "
                          "use data.instance_prompt")
    return caption


def load_image_set(folder: Path, key: str, resolution: int, limit: int | None = None,
                   captions: bool = False) -> list[SourceImage]:
    paths = list_images(folder, key)[:limit]
    if not paths:
        raise ConfigError(
            f"{key} = {str(folder)!r}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); add the photos there"
        )
    sources = []
    for path in paths:
        image = load_rgb(path, key)
        caption = read_caption(path, key) if captions else None
        sources.append(SourceImage(resize_short_side(image, resolution), (image.height, image.width), caption))
    return sources


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (seed, step, rank, ...), stable across
    processes and Python runs (unlike hash())."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class View:
    pixels: torch.Tensor  # CHW float in [-1, 1]
    crop_top_left: tuple[int, int]  # in the (flipped) resized image, as SDXL's training script counts it


def augment(image: Image.Image, resolution: int, *, center_crop: bool, random_flip: bool, rng: random.Random) -> View:
    """Crop to a square and maybe flip."""
    width, height = image.size
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left, top = rng.randint(0, width - resolution), rng.randint(0, height - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = width - resolution - left  # the same crop, seen in the mirrored image
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return View(torch.from_numpy(array).permute(2, 0, 1).contiguous(), (top, left))


@dataclass
class Batch:
    pixel_values: torch.Tensor  # instance images first, then as many class images
    input_ids: torch.Tensor  # (batch, text encoders, tokens): conditioning.tokenize
    num_instance: int
    time_ids: torch.Tensor  # (batch, 6): conditioning.size_ids; only SDXL reads them

    @classmethod
    def of(cls, views: list[View], sources: list[SourceImage], ids: list[torch.Tensor], num_instance: int,
           resolution: int) -> "Batch":
        return cls(pixel_values=torch.stack([view.pixels for view in views]), input_ids=torch.stack(ids),
                   num_instance=num_instance,
                   time_ids=torch.stack([size_ids(source.original_size, view.crop_top_left, resolution)
                                         for view, source in zip(views, sources)]))


class DreamBoothData:
    """Instance images with the instance prompt and, with prior preservation, class
    images with the class prompt. A sample pairs instance i and class i (modulo)."""

    def __init__(self, config: DataConfig, tokenizers: list, *, seed: int, rank: int, world_size: int, batch_size: int):
        self.config = config
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.instance_images = load_image_set(config.instance_dir, "data.instance_dir", config.resolution,
                                              captions=config.caption_files)
        self.class_images: list[SourceImage] = []
        if config.with_prior_preservation:
            self.class_images = load_image_set(
                config.class_dir, "data.class_dir", config.resolution, limit=config.num_class_images
            )
        default_ids = tokenize(tokenizers, config.instance_prompt)
        self.instance_ids = [tokenize(tokenizers, source.caption) if source.caption else default_ids
                             for source in self.instance_images]  # per image: its caption or the instance prompt
        self.class_ids = tokenize(tokenizers, config.class_prompt) if config.class_prompt else None

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
        views, sources, ids = [], [], []
        picks = self.sample_indices(micro_step)
        streams = [(self.instance_images, self.instance_ids)]
        if self.class_ids is not None:
            streams.append((self.class_images, [self.class_ids] * len(self.class_images)))
        for stream, (images, prompt_ids) in enumerate(streams):
            for epoch, index in picks:
                source = images[index % len(images)]
                views.append(self._view(source, index, epoch, stream))
                sources.append(source)
                ids.append(prompt_ids[index % len(images)])
        return Batch.of(views, sources, ids, len(picks), self.config.resolution)

    def instance_batch(self) -> Batch:
        """Every instance image once, centered and unflipped: the fixed evaluation set."""
        views = [
            augment(source.image, self.config.resolution, center_crop=True, random_flip=False, rng=random.Random(0))
            for source in self.instance_images
        ]
        return Batch.of(views, self.instance_images, self.instance_ids, len(views), self.config.resolution)

    def _view(self, source: SourceImage, index: int, epoch: int, stream: int) -> View:
        rng = random.Random(derived_seed(self.seed, epoch, index, stream))
        return augment(
            source.image,
            self.config.resolution,
            center_crop=self.config.center_crop,
            random_flip=self.config.random_flip,
            rng=rng,
        )
