"""Drawing images with a pipeline: class images and validation samples.

On CUDA the denoising (UNet, text encoders) runs under fp16 autocast, and the VAE
decodes outside it, in fp32. SDXL's VAE overflows in fp16 (NaN latents, black images).
Its pipeline upcasts the VAE itself, but only when the VAE's weights are fp16; ours
stay fp32, and an autocast around the whole pipeline would still run its convolutions
in fp16. So the pipeline stops at the latents, and they are decoded here, as it would.
"""

from __future__ import annotations

import torch

from trainer.latents import latent_statistics


def generate_images(pipeline, prompts: list[str], *, num_inference_steps: int, resolution: int,
                    generators: list[torch.Generator], device: torch.device) -> list:
    """PIL images, one per prompt."""
    with torch.no_grad():
        with torch.autocast(device.type, torch.float16, enabled=device.type == "cuda"):
            latents = pipeline(prompts, num_inference_steps=num_inference_steps, height=resolution, width=resolution,
                               generator=generators, output_type="latent").images
        pixels = decode_latents(pipeline.vae, latents)
    return pipeline.image_processor.postprocess(pixels, output_type="pil")


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] from a pipeline's latents, in the VAE's own dtype: the decode of
    diffusers' SD and SDXL pipelines (SDXL's with its optional latent mean and std)."""
    latents = latents.to(vae.dtype)
    statistics = latent_statistics(vae.config, latents)
    if statistics is None:
        latents = latents / vae.config.scaling_factor
    else:
        mean, std = statistics
        latents = latents * std / vae.config.scaling_factor + mean
    return vae.decode(latents, return_dict=False)[0]
