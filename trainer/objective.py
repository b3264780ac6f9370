"""What DreamBooth optimises: the denoiser module DeepSpeed wraps and the loss.

loss = MSE(instance half) + prior_loss_weight * MSE(class half), against the noise
(epsilon prediction) or the velocity (v-prediction), as the scheduler config says. With
training.snr_gamma the instance half's per-image errors are Min-SNR weighted, as in
diffusers' train_dreambooth.py (the prior term stays a plain MSE there too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.conditioning import PromptEmbeddings, encode_prompt, unet_conditioning


class DreamBoothDenoiser(nn.Module):
    """The UNet and, when they are trained, the text encoders (SDXL has two) in one
    module: DeepSpeed then shards, scales and steps them under one engine (diffusers'
    example cannot). The attribute names are the checkpoints' parameter prefixes."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None, text_encoder_2: nn.Module | None = None,
                 *, channels_last: bool = False):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        # Only the input is converted: a convolution runs channels-last when its input is,
        # and the activations after it follow. The weights stay contiguous: DeepSpeed
        # broadcasts and flattens them as plain buffers (a channels-last weight fails there).
        self.channels_last = channels_last

    def forward(self, noisy_latents, timesteps, input_ids=None, encoder_hidden_states=None, pooled_embeds=None,
                time_ids=None):
        """Trained text encoders encode `input_ids`; otherwise the frozen encoders' output
        comes in as `encoder_hidden_states` (and SDXL's `pooled_embeds`)."""
        if self.channels_last:
            noisy_latents = noisy_latents.contiguous(memory_format=torch.channels_last)
        if self.text_encoder is not None:
            encoders = [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])
            embeddings = encode_prompt(encoders, input_ids)
        else:
            embeddings = PromptEmbeddings(encoder_hidden_states, pooled_embeds)
        return self.unet(noisy_latents, timesteps, **unet_conditioning(embeddings, time_ids)).sample


def build_denoiser(components, *, train_text_encoder: bool, gradient_checkpointing: bool, device,
                   channels_last: bool = False, lora=None) -> DreamBoothDenoiser:
    """The trainable module; the frozen VAE (and text encoders, when they are not trained)
    keep fp32 weights and move to the device to run beside the engine. With `lora`
    (an enabled LoraConfig) only adapters on the UNet (and text encoders) are trained."""
    components.vae.requires_grad_(False).to(device)
    for text_encoder in components.text_encoders:
        text_encoder.requires_grad_(train_text_encoder)
    if lora is not None and lora.enabled:
        from trainer.lora import add_adapters

        add_adapters(components, lora, train_text_encoder=train_text_encoder)
    if gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
    for text_encoder in components.text_encoders:
        if not train_text_encoder:
            text_encoder.to(device)
        elif gradient_checkpointing:
            text_encoder.gradient_checkpointing_enable()
    if not train_text_encoder:
        return DreamBoothDenoiser(components.unet, channels_last=channels_last)
    return DreamBoothDenoiser(components.unet, components.text_encoder, components.text_encoder_2,
                              channels_last=channels_last)


def compile_unet(denoiser: DreamBoothDenoiser, *, backend: str, mode: str) -> None:
    """torch.compile the UNet in place (nn.Module.compile): parameter names, and so
    DeepSpeed's checkpoints and the export, stay those of the plain module. The compile
    itself happens in the first step."""
    options = {"backend": backend} | ({"mode": mode} if mode != "default" else {})
    denoiser.unet.compile(**options)


def compile_report() -> dict[str, int]:
    """What dynamo compiled in this process: graphs, and graph breaks (each one a piece
    that runs eagerly, where the speed-up stops)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


@dataclass
class LossTerms:
    loss: torch.Tensor
    instance_loss: torch.Tensor
    prior_loss: torch.Tensor | None


def dreambooth_loss(prediction: torch.Tensor, target: torch.Tensor, num_instance: int, prior_loss_weight: float,
                    instance_weights: torch.Tensor | None = None) -> LossTerms:
    """`instance_weights`: one per instance image (Min-SNR); None is the plain mean."""
    prediction, target = prediction.float(), target.float()
    if instance_weights is None:
        instance_loss = F.mse_loss(prediction[:num_instance], target[:num_instance])
    else:
        errors = F.mse_loss(prediction[:num_instance], target[:num_instance], reduction="none")
        per_image = errors.mean(dim=tuple(range(1, errors.dim())))
        instance_loss = (per_image * instance_weights.to(per_image.device, per_image.dtype)).mean()
    if prediction.shape[0] == num_instance:
        return LossTerms(loss=instance_loss, instance_loss=instance_loss, prior_loss=None)
    prior_loss = F.mse_loss(prediction[num_instance:], target[num_instance:])
    return LossTerms(loss=instance_loss + prior_loss_weight * prior_loss, instance_loss=instance_loss, prior_loss=prior_loss)


@dataclass
class NoisedLatents:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), as diffusers' --snr_gamma: min(SNR, gamma) / SNR
    per timestep, so that the many easy low-noise steps stop dominating; a v-prediction
    model's weight is floored at one (+1)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma) / snr
    if noise_scheduler.config.prediction_type == "v_prediction":
        weights = weights + 1
    return weights


def add_noise(latents: torch.Tensor, noise_scheduler, generator: torch.Generator, timesteps: torch.Tensor | None = None,
              noise_offset: float = 0.0) -> NoisedLatents:
    """`noise_offset` adds that much of one random constant per image and channel to the
    noise (offset noise, as diffusers' --noise_offset): the model can then learn images
    much darker or brighter than average. Drawn after the timesteps, so that only the
    noise differs from a run without it."""
    noise = torch.randn(latents.shape, generator=generator)
    if timesteps is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    noise = noise.to(latents.device)
    timesteps = timesteps.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")
    return NoisedLatents(noisy=noisy, timesteps=timesteps, target=target)
