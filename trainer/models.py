"""Model building: the Stable Diffusion (1.x/2.x or XL) components DreamBooth trains,
from `model.source`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import ConfigError
from trainer.model_cache import PIPELINE_PARTS, SDXL_PARTS


@dataclass
class Components:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPM: adds noise during training
    inference_scheduler: Any  # the pipeline's own scheduler: generation and export
    text_encoder_2: Any = None  # SDXL's second text encoder (CLIPTextModelWithProjection) and its tokenizer
    tokenizer_2: Any = None
    source: str = "tiny"  # model.source
    folder: Path | None = None  # where they were loaded from; None: a built-in model

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> list:
        return [self.text_encoder, self.text_encoder_2] if self.is_sdxl else [self.text_encoder]

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer, self.tokenizer_2] if self.is_sdxl else [self.tokenizer]

    @property
    def native_resolution(self) -> int:
        """What the base was trained at: 512 px for SD 1.5, 768 for SD 2, 1024 for SDXL."""
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def build_components(source: str, folder: Path | None) -> Components:
    """From a local pipeline folder (`model_cache.model_folder` resolves and fetches
    `model.source` to one), or the built-in model `source` names when `folder` is None."""
    if folder is None:
        from trainer.tiny import BUILDERS

        return Components(**BUILDERS[source](), source=source)
    return load_pipeline_folder(folder, source)


def reload_base(components: Components) -> Components:
    """The base model again, fresh fp32 weights on the CPU, from where `components` came."""
    return build_components(components.source, components.folder)


def is_sdxl_folder(folder: Path) -> bool:
    """A diffusers folder of an SDXL pipeline (its model_index.json names the second text encoder)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return "text_encoder_2" in index


def load_pipeline_folder(folder: Path, source: str) -> Components:
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    sdxl = is_sdxl_folder(folder)
    parts = PIPELINE_PARTS + (SDXL_PARTS if sdxl else ())
    missing = [part for part in parts if not (folder / part).is_dir()]
    if missing or not (folder / "model_index.json").is_file():
        fetched_to = "" if Path(source) == folder else f" (fetched to {folder})"
        # SDXL's refiner has only the second text encoder: it refines images, it is not what DreamBooth trains.
        refiner = "; an SDXL refiner? Give the base model it refines" if sdxl and "text_encoder" in missing else ""
        raise ConfigError(
            f"model.source = {source!r}{fetched_to} is not a diffusers Stable Diffusion folder: "
            f"missing {', '.join(missing) or 'model_index.json'}{refiner}"
        )
    unet_config, vae_config = (UNet2DConditionModel.load_config(folder, subfolder="unet"),
                               AutoencoderKL.load_config(folder, subfolder="vae"))
    if unet_config.get("in_channels") != vae_config.get("latent_channels", 4):
        # Found before any weight is read; the first step would fail on a shape mismatch instead.
        raise ConfigError(
            f"model.source = {source!r}: its UNet takes {unet_config.get('in_channels')} input channels, not the "
            f"VAE's {vae_config.get('latent_channels', 4)} latent channels: an inpainting, depth or instruct model, "
            "which DreamBooth here does not train. Give its text-to-image base model instead"
        )
    scheduler_config = DDPMScheduler.load_config(folder, subfolder="scheduler")
    inference_class = getattr(diffusers, scheduler_config.get("_class_name", "PNDMScheduler"))
    second = {}
    if sdxl:
        second = dict(text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"),
                      tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
    return Components(
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
        inference_scheduler=inference_class.from_config(scheduler_config),
        **second,
        source=source,
        folder=folder,
    )
