"""Stable Diffusion components for the benchmarks, built from config with random
weights (no download): SD 1.5's UNet, VAE and CLIP text encoder sizes, SDXL base's (its
UNet and two text encoders), or the tiny ones the tests use. The tokenizer is the byte-level one of trainer.tiny: its ids are valid
in SD 1.5's 49408-token vocabulary, and tokenization is not what is measured."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from trainer import tiny
from trainer.models import Components

RESOLUTIONS = {"sd15": 512, "sdxl": 1024, "tiny": 64, "tiny-sdxl": 64}
SIZES = tuple(RESOLUTIONS)

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
# SDXL base 1.0's unet/config.json (2,567,463,684 weights) and text_encoder_2's (OpenCLIP
# bigG, 694,659,840); its first text encoder is SD 1.5's, its VAE SD 1.5's with another
# scaling factor. tests/benchmarks counts the weights on the meta device.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu",
)
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025}
SDXL_TEXT_2 = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)


def _text_config(tokenizer, **sizes) -> CLIPTextConfig:
    ids = tokenizer.convert_tokens_to_ids([tiny.START_TOKEN, tiny.END_TOKEN])
    return CLIPTextConfig(**sizes, bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[1])


def build_components(size: str, device: torch.device, seed: int = 0) -> Components:
    """Fresh random components of `size` (SIZES) in fp32, initialised on `device` (a GPU
    initialises SD 1.5's weights in a second, a CPU takes many)."""
    if size not in SIZES:
        raise ValueError(f"--size {size!r}: use one of {', '.join(SIZES)}")
    if size in tiny.BUILDERS:
        with device:
            return Components(**tiny.BUILDERS[size](), source=size)
    with torch.random.fork_rng(devices=[]), device:
        torch.manual_seed(seed)
        tokenizer = tiny.byte_level_clip_tokenizer()
        text_encoder = CLIPTextModel(_text_config(tokenizer, **SD15_TEXT))
        sdxl = {}
        if size == "sdxl":
            unet, vae = UNet2DConditionModel(**SDXL_UNET), AutoencoderKL(**SDXL_VAE)
            sdxl = {"text_encoder_2": CLIPTextModelWithProjection(_text_config(tokenizer, **SDXL_TEXT_2)),
                    "tokenizer_2": tokenizer}
        else:
            unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
    scheduler = DDPMScheduler(**tiny.SCHEDULER_CONFIG)
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      noise_scheduler=scheduler, inference_scheduler=scheduler, source=size, **sdxl)


def resolution(size: str) -> int:
    return RESOLUTIONS[size]
