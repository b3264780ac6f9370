"""Model building: the Stable Diffusion components DreamBooth trains, from `model.source`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import ConfigError
from trainer.model_cache import PIPELINE_PARTS


@dataclass
class Components:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPM: adds noise during training
    inference_scheduler: Any  # the pipeline's own scheduler: generation and export
    folder: Path | None = None  # where they were loaded from; None: the built-in tiny model

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def build_components(folder: Path | None) -> Components:
    """From a local pipeline folder (`model_cache.model_folder` resolves and fetches
    `model.source` to one), or the built-in tiny model when None."""
    if folder is None:
        from trainer.tiny import build_tiny_components

        return Components(**build_tiny_components())
    return load_pipeline_folder(folder)


def reload_base(components: Components) -> Components:
    """The base model again, fresh fp32 weights on the CPU, from where `components` came."""
    return build_components(components.folder)


def load_pipeline_folder(folder: Path) -> Components:
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    missing = [part for part in PIPELINE_PARTS if not (folder / part).is_dir()]
    if missing or not (folder / "model_index.json").is_file():
        raise ConfigError(
            f"model.source = {str(folder)!r} is not a diffusers Stable Diffusion folder: "
            f"missing {', '.join(missing) or 'model_index.json'}"
        )
    scheduler_config = DDPMScheduler.load_config(folder, subfolder="scheduler")
    inference_class = getattr(diffusers, scheduler_config.get("_class_name", "PNDMScheduler"))
    return Components(
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
        inference_scheduler=inference_class.from_config(scheduler_config),
        folder=folder,
    )
