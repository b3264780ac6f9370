"""DreamBooth training throughput and memory on one GPU, in one process: (a) diffusers'
train_dreambooth.py step (benchmarks/diffusers_recipe.py), (b) our trainer's step in
the same configuration (1 instance + 1 class image, text encoder trained, DeepSpeed
ZeRO-2 fp16), (c) ours at throughput batches (8 + 8 and larger). SD 1.5-sized models
with random weights (benchmarks/sd_models.py), 512 px, nothing downloaded. Beside the
targets: (d) ours with LoRA, and, with --cases e, (e) SDXL base-sized LoRA at 1024 px.

Per case: step time, samples/s (instance + class images), peak GPU memory of the whole
case (weights, optimizer state, activations), FLOPs of one step counted with
torch.utils.flop_counter, and model FLOP utilisation against the card's dense fp16 peak.
Ours runs with its defaults, so the VAE latents come from the cache: the timed steps
start after every image was seen once (warm-up), as in the later epochs of a run.

    python benchmarks/gpu_dreambooth.py [--json results.json]             # on a GPU
    python benchmarks/gpu_dreambooth.py --device cpu --size tiny --steps 2 # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import sd_models  # noqa: E402
from diffusers_recipe import DiffusersRecipeStep  # noqa: E402

# Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity), matched on the device name.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
TORCH_FUSED_ADAMW = {"optimizer": {"params": {"torch_adam": True, "fused": True}}}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    matches = [key for key in PEAK_TFLOPS if key in name]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def write_images(folder: Path, count: int, size: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index:03d}.png")
    return folder


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(step, micro_step: int) -> float:
    with FlopCounterMode(display=False) as counter:
        step(micro_step)
    return float(counter.get_total_flops())


def measure(name: str, step, *, device, samples_per_step: int, warmup: int, steps: int, peak: float | None,
            flops: float | None = None) -> dict:
    """Warm-up steps, timed steps, then one counted step (the counter slows it down;
    `flops` given: not counted, e.g. for a compiled step, which the counter would make
    recompile). The case's models are built already; its peak memory counts from before
    they were. The first step's time includes a compile, where there is one."""
    started = time.perf_counter()
    step(0)
    synchronize(device)
    first_step_seconds = time.perf_counter() - started
    for micro_step in range(1, warmup):
        step(micro_step)
    synchronize(device)
    started = time.perf_counter()
    for micro_step in range(warmup, warmup + steps):
        step(micro_step)
    synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    flops = flops if flops is not None else count_flops(step, warmup + steps)
    tflops_per_second = flops / seconds / 1e12
    result = {
        "case": name, "samples_per_step": samples_per_step, "step_seconds": seconds, "first_step_seconds": first_step_seconds,
        "samples_per_second": samples_per_step / seconds, "tflop_per_step": flops / 1e12,
        "achieved_tflops": tflops_per_second, "mfu": tflops_per_second / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    print(json.dumps(result), flush=True)
    return result


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def diffusers_case(name: str, args, device, data_root: Path, peak) -> dict:
    from trainer.data import DreamBoothData

    components = sd_models.build_components(args.size, device)
    data = DreamBoothData(trainer_config(args, device, data_root, size=args.size, batch_size=1).data, components.tokenizers,
                          seed=0, rank=0, world_size=1, batch_size=1)
    # The recipe's DataLoader workers prepare batches ahead: not on the timed path.
    batches = [data.batch(micro_step) for micro_step in range(args.warmup + args.steps + 1)]
    recipe = DiffusersRecipeStep(components, device)
    try:
        return measure(name, lambda m: recipe(batches[m].pixel_values, batches[m].input_ids[:, 0]),
                       device=device, samples_per_step=2, warmup=args.warmup, steps=args.steps, peak=peak)
    finally:
        del recipe, components, batches


def trainer_config(args, device, data_root: Path, *, size: str, batch_size: int, overrides: dict | None = None,
                   channels_last: bool = False, lora_rank: int = 0):
    from trainer.config_file import validate_config

    images = data_root / size
    return validate_config({
        "model": {"source": "tiny"},  # unused: the components come from sd_models
        "data": {"instance_dir": str(images / "instance"), "instance_prompt": "a photo of sks dog",
                 "class_prompt": "a photo of dog", "class_dir": str(images / "class"),
                 "num_class_images": args.images, "resolution": sd_models.resolution(size),
                 "random_flip": False},  # with flips, 2x the warm-up until every view is cached
        "training": {"batch_size": batch_size, "train_text_encoder": True, "learning_rate": 5e-6,
                     "precision": "fp16" if device.type == "cuda" else "fp32", "max_steps": 10**6,
                     "channels_last": channels_last},
        "lora": {"rank": lora_rank},
        "deepspeed": {"zero_stage": 2, "overrides": overrides or {}},
        "checkpoint": {"dir": str(data_root / "checkpoints")},
        "output": {"dir": str(data_root / "model")},
    }, source="benchmark")


def our_case(name: str, args, device, data_root: Path, peak, *, batch_size: int, overrides: dict,
             channels_last: bool = False, lora_rank: int = 0, compile_mode: str | None = None,
             flops: float | None = None, size: str | None = None) -> dict:
    from trainer.data import DreamBoothData
    from trainer.distributed import read_runtime
    from trainer.engine import build_engine
    from trainer.loop import BatchPrefetcher, DenoisingStep, train_micro_step
    from trainer.objective import build_denoiser, compile_unet

    size = size or args.size
    config = trainer_config(args, device, data_root, size=size, batch_size=batch_size, overrides=overrides,
                            channels_last=channels_last, lora_rank=lora_rank)
    runtime = read_runtime()
    components = sd_models.build_components(size, device)
    data = DreamBoothData(config.data, components.tokenizers, seed=0, rank=0, world_size=1, batch_size=batch_size)
    module = build_denoiser(components, train_text_encoder=True, gradient_checkpointing=False, device=runtime.device,
                            channels_last=config.training.channels_last, lora=config.lora)
    if compile_mode is not None:
        compile_unet(module, backend="inductor", mode=compile_mode)
    engine = build_engine(config, module, precision=config.training.precision, world_size=1, device_type=device.type)
    denoising_step = DenoisingStep(engine, components, config, runtime, config.training.precision)
    batches = BatchPrefetcher(lambda micro_step: denoising_step.prepare(data.batch(micro_step)), enabled=True)
    engine.train()

    def step(micro_step: int) -> float:
        return train_micro_step(engine, denoising_step, batches.get(micro_step), micro_step).loss.item()

    # Every image encoded once before timing: the cache's steady state.
    warmup = max(args.warmup, math.ceil(args.images / batch_size) + 1)
    try:
        return measure(name, step, device=device, samples_per_step=2 * batch_size,
                       warmup=warmup, steps=args.steps, peak=peak, flops=flops)
    finally:
        batches.close()
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine, module, denoising_step, components


def choose_optimizer(device: torch.device, requested: str) -> tuple[str, dict]:
    """DeepSpeed's FusedAdam is JIT-compiled (needs nvcc and ninja); torch's fused AdamW
    needs neither. `auto` takes FusedAdam when it builds."""
    if device.type != "cuda" or requested == "torch-fused":
        return ("torch AdamW" if device.type != "cuda" else "torch fused AdamW"), (TORCH_FUSED_ADAMW if device.type == "cuda" else {})
    try:
        from deepspeed.ops.adam import FusedAdam

        FusedAdam([torch.zeros(1, device=device, requires_grad=True)])
        return "DeepSpeed FusedAdam", {}
    except Exception as error:  # noqa: BLE001 (any build failure means: use the other one)
        if requested == "deepspeed":
            raise
        print(f"DeepSpeed FusedAdam unavailable ({type(error).__name__}: {str(error)[:200]}); using torch fused AdamW",
              file=sys.stderr)
        return "torch fused AdamW", TORCH_FUSED_ADAMW


def single_process_group(device: torch.device) -> None:
    from trainer.distributed import init_process_group, read_runtime

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_process_group(read_runtime())


def markdown_table(report: dict) -> str:
    lines = [f"{report['device_name']}, {report['date']}, torch {report['torch']}, {report['size']} at "
             f"{report['resolution']} px, optimizer of ours: {report['optimizer']}", "",
             "| case | step (s) | samples/s | peak memory (GiB) | TFLOP/step | MFU |", "|---|---|---|---|---|---|"]
    for row in report["cases"]:
        if "error" in row:
            lines.append(f"| {row['case']} | {row['error']} | | | | |")
            continue
        memory = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "n/a"
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        lines.append(f"| {row['case']} | {row['step_seconds']:.4f} | {row['samples_per_second']:.1f} | {memory} | "
                     f"{row['tflop_per_step']:.3g} | {mfu} |")
    return "\n".join(lines)


def targets(cases: list[dict]) -> dict:
    """The issue's targets, where the cases needed for them ran."""
    ok = [row for row in cases if "error" not in row]
    a = next((row for row in ok if row["case"].startswith("(a)")), None)
    b = next((row for row in ok if row["case"].startswith("(b)")), None)
    c = [row for row in ok if row["case"].startswith("(c)") and row["mfu"] is not None]
    found = {}
    if a and b:
        found["b_over_a_samples_per_second"] = b["samples_per_second"] / a["samples_per_second"]
        if a["peak_memory_gib"] is not None:
            found["b_minus_a_peak_memory_gib"] = b["peak_memory_gib"] - a["peak_memory_gib"]
    if c:
        found["best_c_mfu"] = max(row["mfu"] for row in c)
    return found


def our_cases(args) -> list[tuple[str, dict]]:
    """(name, our_case keywords) of the cases of our trainer."""
    cases = [("(b) ours, ZeRO-2, 1+1", {"batch_size": 1})] if "b" in args.cases else []
    if "c" in args.cases:
        cases += [(f"(c) ours, ZeRO-2, {n}+{n}", {"batch_size": n}) for n in args.throughput_batches]
        if args.channels_last and args.throughput_batches:
            n = args.throughput_batches[0]
            cases.append((f"(c) ours, ZeRO-2, channels_last, {n}+{n}", {"batch_size": n, "channels_last": True}))
    if "d" in args.cases:
        # Not one of the targets: what the LoRA recipe costs beside (b).
        cases.append((f"(d) ours, LoRA rank {args.lora_rank}, ZeRO-2, 1+1", {"batch_size": 1, "lora_rank": args.lora_rank}))
    if "e" in args.cases:
        # SDXL base at its 1024 px, the LoRA recipe of diffusers' train_dreambooth_lora_sdxl.py.
        size = xl_size(args.size)
        cases.append((f"(e) ours, SDXL LoRA rank {args.lora_rank}, ZeRO-2, 1+1, {sd_models.resolution(size)} px",
                      {"batch_size": 1, "lora_rank": args.lora_rank, "size": size}))
    if args.compile and args.throughput_batches:
        # Last: the compile takes minutes (first_step_seconds). FLOPs: those of the same step uncompiled.
        n = args.throughput_batches[0]
        cases.append((f"(c) ours, ZeRO-2, torch.compile {args.compile}, {n}+{n}",
                      {"batch_size": n, "compile_mode": args.compile}))
    return cases


def xl_size(size: str) -> str:
    return "tiny-sdxl" if size == "tiny" else "sdxl"


def uncompiled_flops(cases: list[dict], batch_size: int) -> float | None:
    """FLOPs of our measured step at this batch, for its compiled twin (the same math)."""
    row = next((row for row in cases if row["case"].startswith("(c)") and "tflop_per_step" in row
                and row["samples_per_step"] == 2 * batch_size), None)
    return row["tflop_per_step"] * 1e12 if row else None


def run_case(name: str, run, device) -> dict:
    release(device)
    # Left over from earlier cases (should be ~0): part of this case's peak.
    before = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    try:
        return run(name) | {"memory_before_case_gib": before}
    except torch.OutOfMemoryError as error:
        return {"case": name, "error": f"out of memory: {str(error).splitlines()[0][:120]}"}
    except Exception as error:  # noqa: BLE001 (device time is scarce: one broken case must not cost the others)
        traceback.print_exc()
        first_line = (str(error).splitlines() or [""])[0][:160]
        return {"case": name, "error": f"{type(error).__name__}: {first_line}"}
    finally:
        release(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--images", type=int, default=8, help="instance images and as many class images")
    parser.add_argument("--throughput-batches", type=int, nargs="*", default=[8, 16], help="(c): instance images per step")
    parser.add_argument("--cases", default="abcd", help="which of a, b, c, d (LoRA), e (SDXL LoRA) to run")
    parser.add_argument("--lora-rank", type=int, default=16, help="(d): adapter rank")
    parser.add_argument("--compile", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"], default=None,
                        help="also (c) at the first throughput batch with the UNet torch.compiled (inductor) in this mode")
    parser.add_argument("--channels-last", action="store_true", help="also (c) at the first throughput batch with channels_last")
    parser.add_argument("--optimizer", choices=["auto", "deepspeed", "torch-fused"], default="auto")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense fp16 peak, if the card is not known")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    single_process_group(device)
    peak = peak_tflops(device, args.peak_tflops)
    optimizer, overrides = choose_optimizer(device, args.optimizer)
    report = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "torch": torch.__version__, "size": args.size,
        "resolution": sd_models.resolution(args.size), "optimizer": optimizer, "peak_tflops": peak, "cases": [],
    }

    def record(row: dict) -> None:
        # Written after every case: a run cut short by its time limit still leaves its figures.
        report["cases"].append(row)
        report["targets"] = targets(report["cases"])
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2))

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        args.images = max([args.images, *args.throughput_batches])
        for size in {args.size, *([xl_size(args.size)] if "e" in args.cases else [])}:
            for stream, seed in (("instance", 1), ("class", 2)):
                write_images(root / size / stream, args.images, sd_models.resolution(size), seed)
        if "a" in args.cases:
            name = "(a) diffusers train_dreambooth.py, 1+1"
            record(run_case(name, lambda name: diffusers_case(name, args, device, root, peak), device))
        for name, keywords in our_cases(args):
            if "compile_mode" in keywords:
                keywords = {**keywords, "flops": uncompiled_flops(report["cases"], keywords["batch_size"])}
            record(run_case(name, lambda name, keywords=keywords: our_case(
                name, args, device, root, peak, overrides=overrides, **keywords), device))
    print(markdown_table(report))
    print(json.dumps({"targets": report["targets"]}))
    return report


if __name__ == "__main__":
    main()
