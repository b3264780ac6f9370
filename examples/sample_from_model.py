"""Load an exported pipeline the way a user would and render one image.

usage: python examples/sample_from_model.py MODEL_DIR PROMPT OUT.png [--steps N]
"""

import argparse
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("prompt")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    diffusers_logging.disable_progress_bar()
    pipeline = StableDiffusionPipeline.from_pretrained(args.model_dir)
    pipeline.set_progress_bar_config(disable=True)
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    image = pipeline(args.prompt, num_inference_steps=args.steps, height=size, width=size,
                     generator=torch.Generator().manual_seed(0)).images[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out} ({image.width}x{image.height})")


if __name__ == "__main__":
    main()
