"""Model building: the Stable Diffusion components DreamBooth trains, from `model.source`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, ModelConfig

# The subfolders of a diffusers Stable Diffusion pipeline that training needs.
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Only the subfolders training reads: hub repos also hold multi-GB single-file
# checkpoints, fp16/non-EMA variants and Flax/ONNX exports that would be downloaded for nothing.
HUB_ALLOW = ["model_index.json", *(f"{part}/*" for part in PIPELINE_PARTS)]
HUB_IGNORE = ["*.ckpt", "*.msgpack", "*.onnx", "*.onnx_data", "*.h5", "*fp16*", "*non_ema*", "*.pb"]


@dataclass
class Components:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPM: adds noise during training
    inference_scheduler: Any  # the pipeline's own scheduler: generation and export

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def build_components(config: ModelConfig) -> Components:
    if config.source == "tiny":
        from trainer.tiny import build_tiny_components

        return Components(**build_tiny_components())
    folder = Path(config.source)
    if folder.is_dir():
        return load_pipeline_folder(folder)
    if folder.is_absolute() or config.source.startswith((".", "~")) or config.source.count("/") > 1:
        raise ConfigError(f"model.source = {config.source!r}: no such folder; give `tiny`, an existing diffusers folder or a hub id")
    return load_pipeline_folder(download_from_hub(config))


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
    )


def download_from_hub(config: ModelConfig) -> Path:
    """Fetch the pipeline files (huggingface_hub locks its cache, so ranks sharing a
    cache download once). The token comes from HF_TOKEN, as the operator sets it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"model.source = {config.source!r} (revision {config.revision or 'main'})"
    try:
        path = snapshot_download(
            config.source,
            revision=config.revision,
            cache_dir=config.cache_dir,
            allow_patterns=HUB_ALLOW,
            ignore_patterns=HUB_IGNORE,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except GatedRepoError:
        raise ConfigError(f"{where}: access denied (gated model); accept its license and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{where}: not found on the hub, or private without a valid HF_TOKEN") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{where}: no such revision") from None
    except LocalEntryNotFoundError:
        raise ConfigError(f"{where}: the hub cannot be reached (offline?) and the model is not in the cache") from None
    except OSError as error:
        raise ConfigError(f"{where}: download failed: {error}") from None
    return Path(path)
