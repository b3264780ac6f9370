"""Real DeepSpeed fp16 engines on the CPU, for tests/trainer/test_fp16.py; run as its own
process (`python -m tests.trainer.fp16_cpu SCENARIO ROOT ZERO_STAGE`), since a
DeepSpeed engine needs a process group. The trainer refuses fp16 on CPU
(engine.resolve_precision) because it is not what a user should train with there, but
DeepSpeed runs it (its fp16 optimizers with torch's Adam, gloo): these scenarios build the
trainer's own engine with precision fp16 and print what the test checks, as JSON.

overflow: the trainer's loop on the tiny model, with the loss scaled by 1e30 from step 3
  on (finite in fp32, gradients beyond fp16's range at any loss scale): the fp16 loss
  scale falls to its minimum and the loop must end the run as diverged.
export: a small model trained a few steps at a rate below fp16's resolution: the
  exported weights must be the fp32 master copies, not the unchanged fp16 ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from tests.conftest import tiny_config  # noqa: E402
from trainer.config_file import validate_config  # noqa: E402
from trainer.distributed import init_process_group, read_runtime  # noqa: E402
from trainer.engine import build_engine  # noqa: E402


def accept_fp16_on_any_cpu() -> None:
    """DeepSpeed's CPU accelerator reports fp16 only where oneDNN has fp16 kernels (CPUs
    with AVX512-FP16 or AMX-FP16; not the AMD EPYCs some CI machines have), and its engine
    then refuses fp16. torch computes fp16 on any CPU, more slowly: these scenarios test
    DeepSpeed's fp16 optimizers and our handling of them, not the CPU's kernels."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if not accelerator.is_fp16_supported():
        type(accelerator).is_fp16_supported = lambda self: True


OVERFLOW_FROM_MICRO_STEP = 2  # steps 1 and 2 train (and checkpoint) normally
LOSS_FACTOR = 1e30


def overflow(root: Path, zero_stage: int) -> dict:
    from trainer.data import DreamBoothData
    from trainer.loop import DenoisingStep, TrainingDiverged, TrainState, train
    from trainer.models import build_components
    from trainer.objective import build_denoiser

    config = validate_config(tiny_config(
        root, data={"class_prompt": None, "class_dir": None}, training={"max_steps": 12, "precision": "fp16"},
        # From a loss scale of 2 and halved at the first overflow: the minimum (1) at step 3.
        deepspeed={"zero_stage": zero_stage, "overrides": {"fp16": {"initial_scale_power": 1, "hysteresis": 1}}},
        checkpoint={"every_steps": 1, "keep_last": 10}))
    runtime = read_runtime()
    init_process_group(runtime)
    components = build_components("tiny", None)
    module = build_denoiser(components, train_text_encoder=False, gradient_checkpointing=False, device=runtime.device)
    engine = build_engine(config, module, precision="fp16", world_size=1, device_type="cpu")

    class OverflowingStep(DenoisingStep):
        def losses(self, batch, micro_step):
            terms = super().losses(batch, micro_step)
            if micro_step >= OVERFLOW_FROM_MICRO_STEP:
                return dataclasses.replace(terms, loss=terms.loss.float() * LOSS_FACTOR)
            return terms

    data = DreamBoothData(config.data, components.tokenizers, seed=0, rank=0, world_size=1, batch_size=1)
    state = TrainState()
    try:
        train(config, engine, OverflowingStep(engine, components, config, runtime, "fp16"), data, runtime, state,
              stop_requested=lambda: False)
        outcome, message = "finished", None
    except TrainingDiverged as diverged:
        outcome, message = "diverged", str(diverged)
    return {"outcome": outcome, "message": message, "step": state.step, "skipped_steps": engine.skipped_steps,
            "optimizer": type(engine.optimizer).__name__,
            "checkpoints": sorted(path.name for path in config.checkpoint.dir.glob("*step-*")),
            "latest": (config.checkpoint.dir / "latest").read_text()}


def export(root: Path, zero_stage: int) -> dict:
    from trainer.export import gather_fp32_state_dict

    config = validate_config(tiny_config(root, training={"precision": "fp16", "learning_rate": 1e-5},
                                         deepspeed={"zero_stage": zero_stage}))
    runtime = read_runtime()
    init_process_group(runtime)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    engine = build_engine(config, module, precision="fp16", world_size=1, device_type="cpu")
    for _ in range(3):
        loss = engine(torch.randn(8, 16).half()).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    exported = gather_fp32_state_dict(engine, keep=True)
    masters = {}
    for group in getattr(engine.optimizer, "fp32_groups", []):  # FP16_UnfusedOptimizer's own copies, in order
        masters.update(zip([name for name, _ in engine.module.named_parameters()][len(masters):], group))
    return {
        "optimizer": type(engine.optimizer).__name__,
        "names": sorted(exported),
        "equal_to_master": all(torch.equal(exported[name], master) for name, master in masters.items()),
        "masters_compared": len(masters),
        "equal_to_fp16": {name: torch.equal(exported[name], parameter.detach().float())
                          for name, parameter in engine.module.named_parameters()},
        "dtypes": sorted({str(tensor.dtype) for tensor in exported.values()}),
    }


if __name__ == "__main__":
    scenario, root, stage = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    accept_fp16_on_any_cpu()
    print(json.dumps({"overflow": overflow, "export": export}[scenario](root, stage)))
