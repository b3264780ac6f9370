"""Case (a) of benchmarks/gpu_dreambooth.py: the training step of diffusers'
examples/dreambooth/train_dreambooth.py, re-implemented faithfully for one process:
fp32 master weights (UNet and text encoder), fp16 autocast around the models with a
GradScaler (accelerate's mixed_precision="fp16"), the VAE in fp16 encoding every step,
the text encoder trained, instance and class images concatenated in one batch,
torch AdamW over both models, gradient clipping at 1.0, loss logged every step.
On CPU (the smoke run): fp32 throughout, no autocast, no scaler (bf16 convolutions are
slow on most CPUs)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


class DiffusersRecipeStep:
    def __init__(self, components, device: torch.device, *, learning_rate: float = 5e-6, prior_loss_weight: float = 1.0):
        self.device = device
        self.half = torch.float16 if device.type == "cuda" else torch.float32  # the recipe's weight_dtype
        self.unet = components.unet.to(device).train()
        self.text_encoder = components.text_encoder.to(device).train()
        self.vae = components.vae.requires_grad_(False).to(device, self.half)
        self.scheduler = components.noise_scheduler
        self.prior_loss_weight = prior_loss_weight
        self.parameters = list(itertools.chain(self.unet.parameters(), self.text_encoder.parameters()))
        self.optimizer = torch.optim.AdamW(self.parameters, lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")

    def __call__(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> float:
        pixel_values, input_ids = pixel_values.to(self.device, non_blocking=True), input_ids.to(self.device, non_blocking=True)
        with torch.no_grad():
            latents = self.vae.encode(pixel_values.to(self.half)).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(self.device.type, self.half, enabled=self.device.type == "cuda"):
            encoder_hidden_states = self.text_encoder(input_ids)[0]
            prediction = self.unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        prediction, prior_prediction = prediction.chunk(2)
        target, prior_target = noise.chunk(2)
        loss = F.mse_loss(prediction.float(), target.float()) + self.prior_loss_weight * F.mse_loss(
            prior_prediction.float(), prior_target.float())
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()
