"""LoRA: low-rank adapters on the attention projections, trained instead of all weights
(`lora.rank > 0`), as diffusers' `train_dreambooth_lora.py`.

The adapters are peft's, injected as diffusers' `add_adapter` injects them. The file
the export writes (`pytorch_lora_weights.safetensors`) is the one diffusers' LoRA scripts
write: peft's weights under diffusers' key names (`to_q.lora.down.weight`, a text
encoder's `q_proj.lora_linear_layer.up.weight`), with each part's adapter config as
metadata, so that `pipeline.load_lora_weights`, or a tool made for diffusers-trained
LoRAs, reads it as one of those. The exported pipeline itself has the adapters fused into the base
weights, so that `output.dir` stays a plain diffusers pipeline like a full fine-tune's.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from trainer.config import LORA_WEIGHTS_FILE, ConfigError, LoraConfig

ADAPTER = "default"  # peft's name for the one adapter a model gets from add_adapter
DEFAULT_TARGETS = {key: LoraConfig.model_fields[key].default_factory()
                   for key in ("unet_target_modules", "text_encoder_target_modules")}


def adapted_modules(components, *, train_text_encoder: bool) -> list[tuple[torch.nn.Module, str]]:
    """(module, the LoraConfig key of its targets) for each module that gets adapters."""
    return [(components.unet, "unet_target_modules")] + (
        [(encoder, "text_encoder_target_modules") for encoder in components.text_encoders] if train_text_encoder else [])


def _targets_error(lora: LoraConfig, key: str, module: torch.nn.Module, problem: str) -> ConfigError:
    return ConfigError(
        f"lora.{key} = {getattr(lora, key)}: {problem}. Name modules of {type(module).__name__} (the last part "
        f"of a module's name, e.g. {DEFAULT_TARGETS[key]}) or remove the key for the default"
    )


def check_targets(components, lora: LoraConfig, *, train_text_encoder: bool) -> None:
    """Before class images are generated: every target names a module, by peft's rule (a
    module's full name or its last dotted parts). peft itself fails only when none does,
    so a misspelt one beside a good one would be dropped without a word."""
    for module, key in adapted_modules(components, train_text_encoder=train_text_encoder):
        names = [name for name, _ in module.named_modules()]
        missing = [target for target in getattr(lora, key)
                   if not any(name == target or name.endswith("." + target) for name in names)]
        if missing:
            raise _targets_error(lora, key, module, f"no module named {', '.join(map(repr, missing))}")


def add_adapters(components, lora: LoraConfig, *, train_text_encoder: bool) -> None:
    """Freezes the UNet (and the text encoders) and adds trainable adapters to it (and,
    with training.train_text_encoder, to the text encoders' attention: both of SDXL's)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    for module, key in adapted_modules(components, train_text_encoder=train_text_encoder):
        module.requires_grad_(False)
        # peft's own call, as diffusers' add_adapter makes it: transformers' add_adapter
        # wants a newer peft than diffusers does, for the same adapters.
        # Gaussian A and zero B, as diffusers' script: the untrained adapter changes nothing.
        config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.scaled_alpha, lora_dropout=lora.dropout,
                                init_lora_weights="gaussian", target_modules=getattr(lora, key), use_dora=lora.use_dora)
        try:
            inject_adapter_in_model(config, module, adapter_name=ADAPTER)
        except ValueError as error:  # peft: "Target modules {...} not found in the base model"
            raise _targets_error(lora, key, module, str(error).rstrip(".")) from None


def has_adapters(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "peft_config", None))


def adapter_layers(state: dict[str, torch.Tensor], prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of `module` (a submodule `prefix` of the gathered denoiser state)
    named as diffusers' train_dreambooth_lora*.py save them: peft's state dict through
    diffusers' conversion (peft's own `lora_A`/`lora_B` names load in diffusers too, but
    a diffusers-trained LoRA's file holds these)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    return convert_state_dict_to_diffusers(peft_adapter_state(state, prefix, module))


def peft_adapter_state(state: dict[str, torch.Tensor], prefix: str,
                                 module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of `module` in a gathered denoiser state, under peft's names."""
    from peft import get_peft_model_state_dict

    from trainer.export import submodule_state

    return get_peft_model_state_dict(module, state_dict=submodule_state(state, prefix), adapter_name=ADAPTER)


def save_adapters(folder: Path, state: dict[str, torch.Tensor], components) -> Path:
    """`folder/pytorch_lora_weights.safetensors` from a gathered denoiser state, with each
    adapter's config (rank, alpha, targets) as metadata, so that loading it needs nothing else."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from trainer.export import trained_parts

    layers, metadata = {}, {}
    for name in trained_parts(state):
        module = getattr(components, name)
        layers[f"{name}_lora_layers"] = adapter_layers(state, name, module)
        metadata[f"{name}_lora_adapter_metadata"] = module.peft_config[ADAPTER].to_dict()
    # Each pipeline class writes (and reads) its own parts' key prefixes.
    pipeline_class = StableDiffusionXLPipeline if components.is_sdxl else StableDiffusionPipeline
    pipeline_class.save_lora_weights(folder, **layers, **metadata, weight_name=LORA_WEIGHTS_FILE)
    # safetensors writes it 0600; the volume's readers (an inference server) need what the umask gives others.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder / LORA_WEIGHTS_FILE, 0o666 & ~umask)
    return folder / LORA_WEIGHTS_FILE


def fused_modules(state: dict[str, torch.Tensor], components) -> dict[str, torch.nn.Module]:
    """Fresh fp32 UNet and text encoders (by pipeline part name): the base model's weights,
    reloaded from the model source (the engine's copies were cast to fp16/bf16), with the
    trained adapters fused into them. The adapters are put in as trained, not read back
    from the LoRA file: transformers' load_adapter (diffusers' load_lora_weights for the
    text encoders) drops DoRA's magnitudes, so a file round trip would export text
    encoders that lost them."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    from trainer.export import trained_parts
    from trainer.models import reload_base

    base = reload_base(components)
    fused = {}
    for name in trained_parts(state):
        trained, module = getattr(components, name), getattr(base, name)
        inject_adapter_in_model(trained.peft_config[ADAPTER], module, adapter_name=ADAPTER)
        # peft's own names; the keys the file uses are diffusers' conversion of these.
        adapter_state = peft_adapter_state(state, name, trained)
        result = set_peft_model_state_dict(module, adapter_state, adapter_name=ADAPTER)
        if result.unexpected_keys:
            raise RuntimeError(f"{name}: adapter weights that fit no adapter: {result.unexpected_keys[:3]}")
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge(adapter_names=[ADAPTER])
        fused[name] = recurse_remove_peft_layers(module)
        del fused[name].peft_config  # what inject_adapter_in_model set: nothing is adapted now
    return fused
