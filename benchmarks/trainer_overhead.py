"""Our trainer's overhead on CPU: the tiny model, 2 processes, the same step (1 instance +
1 class image, text encoder trained, VAE encode each step, fp32), measured in one run
against the bare PyTorch loop in benchmarks/bare_loop.py. Steady state: samples/s over
the last 20 steps of each (the trainer's sliding-window figure).

    python benchmarks/trainer_overhead.py [--steps 60] [--set training.cache_latents=false ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def run(command: list[str]) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return result.stdout


def ours(steps: int, root: Path, overrides: list[str]) -> float:
    config = {
        "data": {"instance_dir": str(REPO / "examples" / "instance-images"), "instance_prompt": "a photo of sks robot",
                 "class_prompt": "a photo of a robot", "class_dir": str(root / "class"), "num_class_images": 2,
                 "resolution": 64, "class_generation_steps": 1},
        "training": {"max_steps": steps, "learning_rate": 1e-4, "precision": "fp32", "train_text_encoder": True},
        "deepspeed": {"zero_stage": 2},
        "checkpoint": {"dir": str(root / "ckpt"), "every_steps": steps + 1},
        "output": {"dir": str(root / "model")},
        "logging": {"format": "json"},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = [argument for override in overrides for argument in ("--set", override)]
    stdout = run([TORCHRUN, "--standalone", "--nproc_per_node=2", "trainer/main.py", "--config", str(path), *settings])
    steps_seen = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"event": "step"')]
    return steps_seen[-1]["samples_per_second"]


def bare(steps: int) -> float:
    stdout = run([TORCHRUN, "--standalone", "--nproc_per_node=2", "benchmarks/bare_loop.py", str(steps)])
    return json.loads(stdout.strip().splitlines()[-1])["samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="trainer config override")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        trainer_rate = ours(args.steps, Path(folder), args.set)
    bare_rate = bare(args.steps)
    print(json.dumps({"trainer_samples_per_second": round(trainer_rate, 2), "bare_samples_per_second": round(bare_rate, 2),
                      "trainer_vs_bare": round(trainer_rate / bare_rate, 3)}))


if __name__ == "__main__":
    main()
