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


def encode_moments(vae, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent distribution of one CHW image. Encoded alone: a
    batched convolution may round differently from a single-image one, and an image's
    latents must not depend on the images it happens to be batched with (or on whether
    they came from the latent cache)."""
    parameter = next(vae.parameters())
    pixels = image[None].to(parameter.device, parameter.dtype)
    with torch.no_grad():
        distribution = vae.encode(pixels).latent_dist
    return distribution.mean[0], distribution.std[0]


def sample_latents(means: torch.Tensor, stds: torch.Tensor, generator: torch.Generator, vae_config) -> torch.Tensor:
    """One draw from the stacked per-image distributions, scaled for the UNet."""
    # Sampled on the CPU generator so that the draw is the same on every device.
    noise = torch.randn(means.shape, generator=generator, dtype=torch.float32).to(means.device, means.dtype)
    latents = (means + stds * noise).float()
    statistics = latent_statistics(vae_config, latents)
    if statistics is None:
        return latents * vae_config.scaling_factor
    mean, std = statistics
    return (latents - mean) * vae_config.scaling_factor / std


def latent_statistics(vae_config, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel (mean, std) that some SDXL VAEs normalise their latents with (e.g.
    Playground v2.5's), shaped to broadcast over `like`; None for the usual scaling alone.
    The SDXL pipeline undoes them when it decodes, so training must apply them."""
    mean, std = getattr(vae_config, "latents_mean", None), getattr(vae_config, "latents_std", None)
    if mean is None or std is None:
        return None
    return tuple(torch.tensor(values).view(1, -1, 1, 1).to(like) for values in (mean, std))


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
        return sample_latents(means, stds, generator, self.vae.config)

    @property
    def num_cached(self) -> int:
        return 0 if self.cache is None else len(self.cache)
