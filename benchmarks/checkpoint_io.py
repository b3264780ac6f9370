"""Checkpoint save/load time against a raw sequential write/read of the same bytes.

    python benchmarks/checkpoint_io.py [--channels 160] [--dir /tmp/ckpt-bench] [--lora-rank 16]

Builds a UNet2DConditionModel of SD 1.5's shape at reduced width (default: about 215M
parameters), wraps it in a real DeepSpeed engine (1 process, ZeRO-2, bf16 on CPU),
then times trainer.checkpoint.save and trainer.checkpoint.load_latest, and, in the same
run on the same disk, writing and reading one file of the checkpoint's total size.
With --lora-rank, the same UNet with LoRA adapters of that rank is measured too (its
checkpoints hold the adapters only), with its bytes and times as ratios of the full one's.
Prints a JSON line; the README's performance section quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from trainer import checkpoint  # noqa: E402
from trainer.config_file import validate_config  # noqa: E402
from trainer.manifest import list_files  # noqa: E402
from trainer.distributed import init_process_group, read_runtime, shutdown  # noqa: E402
from trainer.engine import build_engine  # noqa: E402
from trainer.lora import add_adapters  # noqa: E402
from trainer.objective import DreamBoothDenoiser  # noqa: E402


def sd_shaped_unet(channels: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(channels, channels * 2, channels * 4, channels * 4),
        cross_attention_dim=768,
        attention_head_dim=8,
        sample_size=64,
    )


def raw_write_read(path: Path, num_bytes: int, chunk: int = 64 << 20) -> tuple[float, float]:
    block = os.urandom(chunk)
    started = time.perf_counter()
    with open(path, "wb") as handle:
        written = 0
        while written < num_bytes:
            handle.write(block[: min(chunk, num_bytes - written)])
            written += min(chunk, num_bytes - written)
    write_seconds = time.perf_counter() - started
    started = time.perf_counter()
    with open(path, "rb") as handle:
        while handle.read(chunk):
            pass
    return write_seconds, time.perf_counter() - started


def best_save_and_load(engine, config, runtime, root: Path, repeats: int) -> dict:
    """Best of `repeats`: save and load times, and raw I/O of the same bytes on the same disk."""
    results = []
    for repeat in range(repeats):
        step = repeat + 1
        started = time.perf_counter()
        folder = checkpoint.save(engine, config.checkpoint, runtime, step=step,
                                 state={"step": step, "micro_step": step, "samples": 0}, lora=config.lora)
        save_seconds = time.perf_counter() - started
        num_bytes = sum(list_files(folder).values())
        started = time.perf_counter()
        loaded, _ = checkpoint.load_latest(engine, config.checkpoint, runtime, lora=config.lora)
        load_seconds = time.perf_counter() - started
        assert loaded == folder
        raw_write, raw_read = raw_write_read(root / "raw.bin", num_bytes)
        (root / "raw.bin").unlink()
        results.append(dict(save_seconds=save_seconds, load_seconds=load_seconds,
                            raw_write_seconds=raw_write, raw_read_seconds=raw_read, bytes=num_bytes))
    return {key: min(result[key] for result in results) for key in results[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=160)
    parser.add_argument("--dir", default="/tmp/dreambooth-checkpoint-bench")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=0, help="also measure a LoRA run's checkpoints (adapters only)")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    runtime = read_runtime()
    init_process_group(runtime)
    try:
        report = {}
        for lora_rank in [0] + ([args.lora_rank] if args.lora_rank else []):
            config = validate_config({
                "data": {"instance_dir": str(root), "instance_prompt": "x"},
                "training": {"precision": "bf16"},
                "lora": {"rank": lora_rank},
                "checkpoint": {"dir": str(root / f"checkpoints-lora{lora_rank}"), "keep_last": 1},
                "output": {"dir": str(root / "model")},
            })
            unet = sd_shaped_unet(args.channels)
            if lora_rank:
                add_adapters(SimpleNamespace(unet=unet), config.lora, train_text_encoder=False)
            module = DreamBoothDenoiser(unet)
            engine = build_engine(config, module, precision="bf16", world_size=1, device_type="cpu")
            best = best_save_and_load(engine, config, runtime, root, args.repeats)
            if not lora_rank:
                report = {
                    "parameters": sum(p.numel() for p in module.parameters()),
                    "checkpoint_bytes": best["bytes"],
                    **{key: round(value, 3) for key, value in best.items() if key != "bytes"},
                    "save_vs_raw_write": round(best["save_seconds"] / best["raw_write_seconds"], 2),
                    "load_vs_raw_read": round(best["load_seconds"] / best["raw_read_seconds"], 2),
                }
            else:
                report["lora"] = {
                    "rank": lora_rank,
                    "trained_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
                    "checkpoint_bytes": best["bytes"],
                    "save_seconds": round(best["save_seconds"], 3), "load_seconds": round(best["load_seconds"], 3),
                    "bytes_vs_full": round(best["bytes"] / report["checkpoint_bytes"], 4),
                    "save_vs_full": round(best["save_seconds"] / report["save_seconds"], 3),
                    "load_vs_full": round(best["load_seconds"] / report["load_seconds"], 3),
                }
            del engine, module, unet
        print(json.dumps(report))
    finally:
        shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
