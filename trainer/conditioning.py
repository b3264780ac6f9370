"""What the UNet is conditioned on besides the noisy latents and the timestep.

Stable Diffusion 1.x/2.x: the last hidden states of one CLIP text encoder.
SDXL (two text encoders, as diffusers' `train_dreambooth_lora_sdxl.py` and its pipeline
do it): the penultimate hidden states of both, concatenated; the pooled, projected
output of the second (`text_embeds`); and six size-and-crop numbers per image
(`time_ids`: the photo's original height and width, the crop's top and left, the
target height and width), so that the model learns what a crop looks like.

Prompts travel as token ids of shape (..., text encoders, tokens): one row per tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIZE_IDS = 6  # (original height, original width, crop top, crop left, target height, target width)


def tokenize(tokenizers: list, prompt: str) -> torch.Tensor:
    """(len(tokenizers), max tokens): the prompt as each text encoder reads it."""
    return torch.stack([
        tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                  return_tensors="pt").input_ids[0]
        for tokenizer in tokenizers
    ])


@dataclass
class PromptEmbeddings:
    hidden_states: torch.Tensor  # (batch, tokens, cross-attention width)
    pooled: torch.Tensor | None  # (batch, projection width): SDXL's text_embeds; None for SD

    def to(self, dtype: torch.dtype) -> "PromptEmbeddings":
        return PromptEmbeddings(self.hidden_states.to(dtype), None if self.pooled is None else self.pooled.to(dtype))


def encode_prompt(text_encoders: list, input_ids: torch.Tensor) -> PromptEmbeddings:
    """`input_ids`: (batch, len(text_encoders), tokens)."""
    if len(text_encoders) == 1:
        return PromptEmbeddings(text_encoders[0](input_ids[:, 0])[0], None)
    hidden, pooled = [], None
    for index, text_encoder in enumerate(text_encoders):
        output = text_encoder(input_ids[:, index], output_hidden_states=True)
        # SDXL conditions on the layer before the last, and on the last encoder's projected pooled output.
        hidden.append(output.hidden_states[-2])
        pooled = output[0]
    return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)


def size_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], resolution: int) -> torch.Tensor:
    """SDXL's micro-conditioning of one training image, as its pipeline passes it at
    inference (with original = target size and a (0, 0) crop by default)."""
    return torch.tensor([*original_size, *crop_top_left, resolution, resolution], dtype=torch.float32)


def unet_conditioning(embeddings: PromptEmbeddings, time_ids: torch.Tensor | None) -> dict:
    """The keyword arguments of UNet2DConditionModel's forward besides sample and timestep."""
    if embeddings.pooled is None:
        return {"encoder_hidden_states": embeddings.hidden_states}
    # time_ids stay float32: the UNet embeds them sinusoidally in float32, and bf16 would
    # round a photo's size (3025 px becomes 3024).
    return {"encoder_hidden_states": embeddings.hidden_states,
            "added_cond_kwargs": {"text_embeds": embeddings.pooled, "time_ids": time_ids.float()}}
