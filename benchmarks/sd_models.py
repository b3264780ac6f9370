"""Stable Diffusion components for the benchmarks, built from config with random
weights (no download): SD 1.5's UNet, VAE and CLIP text encoder sizes, or the tiny ones
the tests use. The tokenizer is the byte-level one of trainer.tiny: its ids are valid
in SD 1.5's 49408-token vocabulary, and tokenization is not what is measured."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from trainer import tiny
from trainer.models import Components

SD15_RESOLUTION = 512
TINY_RESOLUTION = 64

# SD 1.5's unet/config.json, vae/config.json and text_encoder/config.json (the fields that shape the models).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu",
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)


def build_components(size: str, device: torch.device, seed: int = 0) -> Components:
    """Fresh random components of `size` (`sd15` or `tiny`) in fp32, initialised on
    `device` (a GPU initialises SD 1.5's weights in a second, a CPU takes many)."""
    with torch.random.fork_rng(devices=[]), device:
        torch.manual_seed(seed)
        tokenizer = tiny.byte_level_clip_tokenizer()
        if size == "tiny":
            unet, vae, text_encoder = tiny.tiny_unet(), tiny.tiny_vae(), tiny.tiny_text_encoder(len(tokenizer))
        elif size == "sd15":
            unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
            ids = tokenizer.convert_tokens_to_ids([tiny.START_TOKEN, tiny.END_TOKEN])
            text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[1]))
        else:
            raise ValueError(f"--size {size!r}: use sd15 or tiny")
    scheduler = DDPMScheduler(**tiny.SCHEDULER_CONFIG)
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      noise_scheduler=scheduler, inference_scheduler=scheduler)


def resolution(size: str) -> int:
    return SD15_RESOLUTION if size == "sd15" else TINY_RESOLUTION
