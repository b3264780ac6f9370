"""Training latents are what the pipeline decodes: the VAE's scaling, and the per-channel
mean and std some SDXL VAEs add (Playground v2.5's), applied on the way in as the SDXL
pipeline undoes them on the way out."""

from __future__ import annotations

import pytest
import torch

from trainer.generation import decode_latents
from trainer.latents import LatentEncoder
from trainer.tiny import tiny_vae


@pytest.mark.parametrize("statistics", [None, ([0.5, -0.3, 0.2, 0.1], [0.8, 1.3, 0.6, 1.1])],
                         ids=["scaling only", "mean and std"])
def test_the_pipelines_decode_of_training_latents_is_the_vaes_decode_of_its_sample(statistics):
    torch.manual_seed(0)
    vae = tiny_vae(scaling_factor=0.13025)
    if statistics is not None:
        vae.register_to_config(latents_mean=statistics[0], latents_std=statistics[1])
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    encoder = LatentEncoder(vae, cache=False)
    latents = encoder.latents(images, torch.Generator().manual_seed(1))
    means, stds = encoder.moments(images)
    sample = means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(1))
    expected = sample * vae.config.scaling_factor
    if statistics is not None:  # diffusers' SDXL LoRA script: (z - mean) * scaling_factor / std
        mean, std = (torch.tensor(values).view(1, -1, 1, 1) for values in statistics)
        expected = (sample - mean) * vae.config.scaling_factor / std
    torch.testing.assert_close(latents, expected)
    with torch.no_grad():
        torch.testing.assert_close(decode_latents(vae, latents), vae.decode(sample, return_dict=False)[0],
                                   rtol=1e-4, atol=1e-4)
