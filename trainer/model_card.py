"""The exported model's README.md: a Hugging Face model card (YAML metadata the Hub
indexes, then how it was trained and how to use it), as diffusers' scripts write one.
With `output.uri: hf://org/repo` it becomes the repo's page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.config import BUILT_IN_MODELS, LORA_WEIGHTS_FILE, TrainerConfig

CARD_FILE = "README.md"
# The last validation grid, beside the card that shows it (diffusers' cards show theirs).
SAMPLES_FILE = "samples.png"
SDXL_PIPELINE = "StableDiffusionXLPipeline"

_TEMPLATE = """---
{{ card_data }}
---

# DreamBooth: {{ instance_prompt }}

{{ base_model_text }} fine-tuned with [DreamBooth](https://dreambooth.github.io/) by
dreambooth-operator: {{ trained }}. Use `{{ instance_prompt }}` in a prompt for the subject.

## Use

```python
{% if dtype %}import torch
{% endif %}from diffusers import {{ pipeline_class }}

# this folder, or the repo it was uploaded to
pipeline = {{ pipeline_class }}.from_pretrained("PATH_OR_REPO"{% if dtype %}, dtype=torch.{{ dtype }}{% endif %})
image = pipeline("{{ instance_prompt }} on the beach").images[0]
```
{% if lora_rank %}
The adapters alone are in `{{ lora_file }}`, for any copy of the base model:
`pipeline.load_lora_weights("PATH_OR_REPO", weight_name="{{ lora_file }}")`.
{% endif %}
{% if samples %}
## Samples

![{{ samples }}]({{ samples_file }})

{{ samples }}.
{% endif %}
## Training

{{ details }}. Every figure of the run is in `run.json`.
"""


def model_card(config: TrainerConfig, run_info: dict[str, Any]) -> str:
    """Pure: the card's text from the config and the run's record."""
    from huggingface_hub import ModelCard, ModelCardData

    from trainer.model_cache import looks_like_hub_id

    source = config.model.source
    on_hub = source not in BUILT_IN_MODELS and not Path(source).is_dir() and looks_like_hub_id(source)
    lora = config.lora
    tags = ["text-to-image", "stable-diffusion", "diffusers", "dreambooth", "dreambooth-operator"]
    sdxl = run_info["pipeline"] == SDXL_PIPELINE
    tags += ["stable-diffusion-xl"] if sdxl else []
    tags += (["lora", "dora"] if lora.use_dora else ["lora"]) if lora.enabled else []
    data = ModelCardData(library_name="diffusers", base_model=source if on_hub else None, tags=tags,
                         instance_prompt=config.data.instance_prompt, pipeline_tag="text-to-image")
    training = config.training
    trained = (f"{'DoRA' if lora.use_dora else 'LoRA'} adapters of rank {lora.rank} (alpha {lora.scaled_alpha:g}) on the UNet" if lora.enabled
               else "all UNet weights")
    trained += (" and both text encoders" if sdxl else " and the text encoder") if training.train_text_encoder else ""
    details = [f"{run_info['final_step']} steps of {training.batch_size} instance image(s) per process on "
               f"{run_info['world_size']} process(es), learning rate {learning_rate(config, run_info)} ({training.lr_scheduler})",
               f"{run_info['precision']}, DeepSpeed ZeRO-{run_info['zero_stage']}",
               f"{config.data.resolution} px"]
    if config.data.caption_files:
        details.append("each photo with its own caption where it has one")
    if config.data.with_prior_preservation:
        details.append(f"prior preservation with {config.data.num_class_images} images of "
                       f"\"{config.data.class_prompt}\" (weight {training.prior_loss_weight:g})")
    card = ModelCard.from_template(
        data, template_str=_TEMPLATE, instance_prompt=config.data.instance_prompt, trained=trained,
        base_model_text=f"[{source}](https://huggingface.co/{source})" if on_hub else f"`{source}`",
        lora_rank=lora.rank, lora_file=LORA_WEIGHTS_FILE, details="; ".join(details), pipeline_class=run_info["pipeline"],
        dtype={"fp16": "float16", "bf16": "bfloat16"}.get(run_info.get("output_dtype")),
        samples=samples_caption(config, run_info) if run_info.get("samples") else None, samples_file=SAMPLES_FILE,
    )
    return str(card)


def samples_caption(config: TrainerConfig, run_info: dict[str, Any]) -> str:
    """What the grid shows: its prompts, row by row, and how they were drawn."""
    from trainer.validation import validation_prompts

    validation = config.validation
    prompts = ", ".join(f'"{prompt}"' for prompt in validation_prompts(config))
    sampler = validation.scheduler or "the model's own sampler"
    guidance = f", guidance {validation.guidance_scale:g}" if validation.guidance_scale is not None else ""
    return (f"Samples of the exported weights at step {run_info['final_step']}: {prompts} "
            f"({validation.images_per_prompt} per prompt, seeds from {validation.seed}; "
            f"{validation.num_inference_steps} steps of {sampler}{guidance})")


def learning_rate(config: TrainerConfig, run_info: dict[str, Any]) -> str:
    """The UNet's peak rate as trained, and how it was scaled (training.scale_lr)."""
    from trainer.engine import group_learning_rates

    training = config.training
    rate = group_learning_rates(config, run_info["world_size"])[0]
    if not training.scale_lr:
        return f"{rate:g}"
    return (f"{rate:g} ({training.learning_rate:g} x {training.batch_size} x {training.gradient_accumulation} "
            f"x {run_info['world_size']}, scaled by the images of a step)")
