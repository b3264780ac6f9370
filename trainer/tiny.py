"""The built-in `tiny` Stable Diffusion and `tiny-sdxl`: the real diffusers/transformers
classes at toy sizes, randomly initialised from fixed configs and a seed, so that tests,
the demo and CI train a real pipeline without downloading anything.

The VAE keeps SD's 8x spatial downsampling and 4 latent channels, so a 64 px image
becomes an 8x8 latent exactly as a 512 px one becomes 64x64 in SD 1.5.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from trainer.conditioning import SIZE_IDS
from trainer.config import BUILT_IN_MODELS

TINY_SEED = 1234
TEXT_HIDDEN_SIZE = 32
MAX_PROMPT_TOKENS = 77
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)


def byte_level_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (and their end-of-word
    forms) with no merges: every prompt tokenizes, one token per byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": len(symbols) + index for index, symbol in enumerate(symbols)})
    vocab[START_TOKEN] = len(vocab)
    vocab[END_TOKEN] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_PROMPT_TOKENS)


def tiny_text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=TEXT_HIDDEN_SIZE,
    )


def tiny_text_encoder(vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(tiny_text_config(vocab_size))


# What both tiny UNets share: 8x8 latents of 4 channels, two blocks.
UNET_SHAPE = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  norm_num_groups=16)


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        **UNET_SHAPE,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=8,
    )


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """SDXL's UNet layout at toy size: cross-attention over both encoders' hidden states
    side by side, and the "text_time" embedding of the pooled prompt and the six size ids."""
    time_embed_dim = 8
    return UNet2DConditionModel(
        **UNET_SHAPE,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=SIZE_IDS * time_embed_dim + TEXT_HIDDEN_SIZE,
    )


def tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def build_tiny_components() -> dict:
    """Everything a StableDiffusionPipeline needs, identical on every call."""
    # A private generator state keeps the caller's RNG untouched and every rank identical.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        tokenizer = byte_level_clip_tokenizer()
        return dict(
            unet=tiny_unet(),
            vae=tiny_vae(),
            text_encoder=tiny_text_encoder(len(tokenizer)),
            tokenizer=tokenizer,
            noise_scheduler=DDPMScheduler(**SCHEDULER_CONFIG),
            inference_scheduler=PNDMScheduler(**SCHEDULER_CONFIG, skip_prk_steps=True, steps_offset=1),
        )


def build_tiny_sdxl_components() -> dict:
    """Everything a StableDiffusionXLPipeline needs, identical on every call; the VAE
    scaling factor and the Euler scheduler are SDXL's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        tokenizer = byte_level_clip_tokenizer()
        return dict(
            unet=tiny_sdxl_unet(),
            vae=tiny_vae(scaling_factor=0.13025),
            text_encoder=tiny_text_encoder(len(tokenizer)),
            text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(len(tokenizer))),
            tokenizer=tokenizer,
            tokenizer_2=byte_level_clip_tokenizer(),
            noise_scheduler=DDPMScheduler(**SCHEDULER_CONFIG),
            inference_scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG, timestep_spacing="leading", steps_offset=1),
        )


# model.source -> builder. The names the config accepts are config.BUILT_IN_MODELS (config.py
# stays torch-free, so it cannot import these); a name added there without a builder here
# fails at import, not at a run's first step.
BUILDERS = {"tiny": build_tiny_components, "tiny-sdxl": build_tiny_sdxl_components}
if set(BUILDERS) != set(BUILT_IN_MODELS):
    raise ImportError(f"trainer.tiny builds {sorted(BUILDERS)}, config.BUILT_IN_MODELS names {list(BUILT_IN_MODELS)}")
