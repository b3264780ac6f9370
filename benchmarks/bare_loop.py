"""The baseline of benchmarks/trainer_overhead.py: the same tiny DreamBooth step in plain
PyTorch (DDP over gloo, torch AdamW, fp32), no DeepSpeed, no checkpoints, no logging.

    torchrun --nproc_per_node 2 benchmarks/bare_loop.py STEPS
Prints one JSON line from rank 0: steady-state samples/s over the last 20 steps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from trainer.tiny import build_tiny_components  # noqa: E402
from trainer.objective import DreamBoothDenoiser  # noqa: E402

WINDOW = 20


def main() -> None:
    steps = int(sys.argv[1])
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    parts = build_tiny_components()
    vae, tokenizer, scheduler = parts["vae"].requires_grad_(False), parts["tokenizer"], parts["noise_scheduler"]
    model = DistributedDataParallel(DreamBoothDenoiser(parts["unet"], parts["text_encoder"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = tokenizer(["a photo of sks robot", "a photo of a robot"], padding="max_length", max_length=77,
                    return_tensors="pt").input_ids[:, None]  # (batch, text encoders, tokens)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    marks = []
    for _ in range(steps):
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (2,))
        prediction = model(scheduler.add_noise(latents, noise, timesteps), timesteps, input_ids=ids)
        loss = F.mse_loss(prediction[:1], noise[:1]) + F.mse_loss(prediction[1:], noise[1:])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss.item()
        marks.append(time.monotonic())
    window = marks[-WINDOW - 1:]
    samples_per_second = WINDOW * 2 * dist.get_world_size() / (window[-1] - window[0])
    if dist.get_rank() == 0:
        print(json.dumps({"samples_per_second": samples_per_second}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
