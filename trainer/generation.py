"""Drawing images with a pipeline: class images and validation samples.

On CUDA the denoising (UNet, text encoders) runs under fp16 autocast, and the VAE
decodes outside it, in fp32. SDXL's VAE overflows in fp16 (NaN latents, black images).
Its pipeline upcasts the VAE itself, but only when the VAE's weights are fp16; ours
stay fp32, and an autocast around the whole pipeline would still run its convolutions
in fp16. So the pipeline stops at the latents, and they are decoded here, as it would.

Class images are drawn before the models are frozen, and samples while they train: their
weights require grad, and autocast's cast cache would keep an fp16 copy of each such
weight for the whole pipeline call (about 20 GB more for SDXL). So it runs without that
cache: a weight is cast again at each use, which computes the same values. The VAE
decodes one image at a time: a batch at 1024 px needs several GB of activations per image.
"""

from __future__ import annotations

import torch

from trainer.latents import latent_statistics


def generate_images(pipeline, prompts: list[str], *, num_inference_steps: int, resolution: int,
                    generators: list[torch.Generator], device: torch.device, guidance_scale: float | None = None,
                    negative_prompt: str | None = None) -> list:
    """PIL images, one per prompt; guidance and negative prompt the pipeline's own unless given."""
    options = {"guidance_scale": guidance_scale} if guidance_scale is not None else {}
    if negative_prompt is not None:
        options["negative_prompt"] = [negative_prompt] * len(prompts)
    with torch.no_grad():
        with torch.autocast(device.type, torch.float16, enabled=device.type == "cuda", cache_enabled=False):
            latents = pipeline(prompts, num_inference_steps=num_inference_steps, height=resolution, width=resolution,
                               generator=generators, output_type="latent", **options).images
        pixels = torch.cat([decode_latents(pipeline.vae, latent[None]) for latent in latents])
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
