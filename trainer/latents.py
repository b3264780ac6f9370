"""VAE latents of the training images, optionally computed once per image.

The frozen VAE maps an image to the same distribution (mean, std) every step; only the
sample drawn from it changes. With the cache on, each distinct image (a flipped view is
a different image) is encoded once and every step draws its sample from the kept
moments with the same generator call as an uncached encode, so the losses are
bit-identical. Images are keyed by their content, so any augmentation is covered; a
random crop makes almost every view new, which is why the trainer turns the cache off
then (see TrainingConfig.cache_latents).

Memory: at 512 px the moments of one view are 2 x 4x64x64 floats = 128 KiB in fp32 on the
device, so 200 class images with flips (400 views) plus the instance photos take ~52 MiB.
"""

from __future__ import annotations

import hashlib

import torch

from trainer.objective import encode_moments, sample_latents


def image_key(image: torch.Tensor) -> bytes:
    """A digest of the pixels (about 2 ms for a 512 px image; hashlib releases the GIL,
    so the batch prefetch thread computes it off the training thread)."""
    return hashlib.sha256(image.detach().cpu().contiguous().numpy().tobytes()).digest()


def batch_keys(pixel_values: torch.Tensor) -> list[bytes]:
    return [image_key(image) for image in pixel_values]


class LatentEncoder:
    """Latents for a batch of images: encode each image alone, or take its moments from
    the cache. `keys` may be passed in when they were computed ahead (prefetch)."""

    def __init__(self, vae, *, cache: bool):
        self.vae = vae
        self.cache: dict[bytes, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def moments(self, pixel_values: torch.Tensor, keys: list[bytes] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None:
            pairs = [encode_moments(self.vae, image) for image in pixel_values]
        else:
            keys = keys if keys is not None else batch_keys(pixel_values)
            for key, image in zip(keys, pixel_values):
                if key not in self.cache:
                    self.cache[key] = encode_moments(self.vae, image)
            pairs = [self.cache[key] for key in keys]
        means, stds = zip(*pairs)
        return torch.stack(means), torch.stack(stds)

    def latents(self, pixel_values: torch.Tensor, generator: torch.Generator, keys: list[bytes] | None = None) -> torch.Tensor:
        means, stds = self.moments(pixel_values, keys)
        return sample_latents(means, stds, generator, self.vae.config.scaling_factor)

    @property
    def num_cached(self) -> int:
        return 0 if self.cache is None else len(self.cache)
