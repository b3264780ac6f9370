"""What a checkpoint says about itself, and whether this run may load it: the manifest
(written last: a folder without one was never finished), the files and sizes it lists,
and the training shape its shards depend on (world size, ZeRO stage, precision,
adapters, trained parameters). A checkpoint of another shape is refused by name, not
skipped as corrupt: skipping would start over, and retention would delete the progress."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import atomic
from trainer.config import ConfigError, LoraConfig
from trainer.distributed import Runtime

MANIFEST = "manifest.json"
# The run's totals at the checkpoint, for a restarted run's metrics to start from (metrics.checkpoint_hint).
SAMPLES = "samples"
SKIPPED_STEPS = "skipped_steps"  # fp16 overflow skips (DeepSpeed restores its own count)

# Settings a manifest written before they were recorded lacks, with the value every
# trainer before them had: one optimizer param group (the text encoders got their own
# with training.text_encoder_learning_rate).
LEGACY_SETTINGS = {"optimizer.param_groups": 1}

# How the checkpoint's own files are written. 2: the RNG files hold only what
# torch.load(weights_only=True) builds (rng.py), and CUDA's state of the rank's own device
# alone. 1, a manifest without `format`: NumPy's generator key in them is a pickled
# ndarray, and CUDA's a list with one state per device the pod saw.
FORMAT = 2


@dataclass(frozen=True)
class TrainingShape:
    """What a checkpoint's shards depend on. DeepSpeed cannot load one of another shape,
    and a load error alone would make it look corrupt: skipped, the run would start over
    and retention would then delete the progress. So a mismatch is refused, named."""

    world_size: int
    settings: dict[str, Any]  # config key -> value; a key an older manifest lacks is not compared
    # What is trained, as `trained_parameters` prints it: another base architecture (a
    # changed model.source) fails DeepSpeed's load just like a corrupt file. None: not recorded.
    parameters: str | None = None

    @classmethod
    def of(cls, engine, runtime: Runtime, lora: LoraConfig | None = None) -> "TrainingShape":
        """This run's shape, read from the engine itself (and the adapters it trains)."""
        precision = "fp16" if engine.fp16_enabled() else "bf16" if engine.bfloat16_enabled() else "fp32"
        return cls.planned(engine.module, runtime, zero_stage=engine.zero_optimization_stage(), precision=precision,
                           lora=lora, param_groups=len(engine.lr_scheduler.optimizer.param_groups))

    @classmethod
    def planned(cls, module: torch.nn.Module, runtime: Runtime, *, zero_stage: int, precision: str,
                lora: LoraConfig | None, param_groups: int | None = None) -> "TrainingShape":
        """The shape of a run that will train `module` so; before its engine exists (its
        optimizer's `param_groups` still None, then not compared)."""
        train_text_encoder = getattr(module, "text_encoder", None) is not None
        settings: dict[str, Any] = {"deepspeed.zero_stage": zero_stage,
                                    "training.precision": precision, "training.train_text_encoder": train_text_encoder,
                                    "lora.rank": lora.rank if lora is not None else 0}
        if param_groups is not None:
            settings["optimizer.param_groups"] = param_groups
        if lora is not None and lora.enabled:
            # Other targets are other weights; another alpha would load and silently rescale them.
            settings |= {"lora.alpha": lora.scaled_alpha, "lora.use_dora": lora.use_dora,
                         "lora.unet_target_modules": list(lora.unet_target_modules)}
            if train_text_encoder:
                settings["lora.text_encoder_target_modules"] = list(lora.text_encoder_target_modules)
        return cls(world_size=runtime.world_size, settings=settings, parameters=trained_parameters(module))

    def mismatches(self, run: "TrainingShape") -> list[str]:
        """`key = saved (this run: value)` for each difference that stops a load."""
        def show(value: Any) -> str:
            return str(value).lower() if isinstance(value, bool) else repr(value)

        found = []
        for key, saved in {**LEGACY_SETTINGS, **self.settings}.items():
            current = run.settings.get(key, saved)
            # ZeRO stages 1 and 2 partition the optimizer state alike and load each other.
            if saved != current and not (key == "deepspeed.zero_stage" and {saved, current} == {1, 2}):
                found.append(f"{key} = {show(saved)} (this run: {show(current)})")
        return found


def trained_parameters(module: torch.nn.Module) -> str:
    """`<elements> in <tensors> tensors, layout <digest>` of the trained parameters: equal
    exactly when their names and shapes are (ZeRO-3 keeps the full shape in ds_shape)."""
    shapes = [(name, tuple(getattr(parameter, "ds_shape", parameter.shape)))
              for name, parameter in module.named_parameters() if parameter.requires_grad]
    elements = sum(int(np.prod(shape)) for _, shape in shapes)
    digest = hashlib.sha256(";".join(f"{name}:{shape}" for name, shape in shapes).encode()).hexdigest()[:12]
    return f"{elements:,} in {len(shapes)} tensors, layout {digest}"


@dataclass(frozen=True)
class Manifest:
    step: int
    shape: TrainingShape
    files: dict[str, int]  # relative path -> size in bytes
    samples: int = 0  # 0 in a manifest from before the totals were kept
    skipped_steps: int = 0
    time: float | None = None  # when it was written (seconds since the epoch); for people, never compared
    format: int = FORMAT

    def write(self, folder: Path) -> None:
        """Last, once every file it lists is written: its presence makes the checkpoint complete."""
        atomic.write_json(folder / MANIFEST, {
            "format": self.format, "step": self.step, "world_size": self.shape.world_size,
            # zero_stage also at the top: what manifests held before `settings`.
            "zero_stage": self.shape.settings["deepspeed.zero_stage"], "settings": self.shape.settings,
            "trained_parameters": self.shape.parameters, "time": self.time,
            SAMPLES: self.samples, SKIPPED_STEPS: self.skipped_steps, "files": self.files,
        }, indent=1)

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        raw = json.loads((folder / MANIFEST).read_text())
        # Manifests before `settings` was kept: the stage, and no adapters.
        settings = {"deepspeed.zero_stage": raw["zero_stage"], "lora.rank": 0, **raw.get("settings", {})}
        shape = TrainingShape(world_size=raw["world_size"], settings=settings, parameters=raw.get("trained_parameters"))
        return cls(step=raw["step"], shape=shape, files=raw["files"], samples=int(raw.get(SAMPLES, 0)),
                   skipped_steps=int(raw.get(SKIPPED_STEPS, 0)), time=raw.get("time"),
                   format=int(raw.get("format", 1)))

    def problems(self, folder: Path) -> list[str]:
        found = []
        for name, size in self.files.items():
            path = folder / name
            if not path.is_file():
                found.append(f"{name} is missing")
            elif path.stat().st_size != size:
                found.append(f"{name} has {path.stat().st_size} bytes, the manifest says {size}")
        return found


def list_files(folder: Path) -> dict[str, int]:
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST and not path.name.startswith(".")
    }


def read_complete(folder: Path) -> tuple[Manifest | None, str | None]:
    """(its manifest, None) for a checkpoint folder whose files match its manifest, else
    (None, what is wrong)."""
    try:
        manifest = Manifest.read(folder)
    except (OSError, ValueError, KeyError) as error:
        return None, f"unreadable manifest ({error})"
    problems = manifest.problems(folder)
    return (None, "; ".join(problems)) if problems else (manifest, None)


def needs_universal(saved: TrainingShape, world_size: int) -> bool:
    """Only ZeRO shards depend on the world size: without ZeRO (stage 0) every rank's
    optimizer state is the same, saved once, and loads at any size as it is."""
    return saved.world_size != world_size and saved.settings["deepspeed.zero_stage"] != 0


def check_compatible(folder: Path, saved: TrainingShape, run: TrainingShape, *, any_world_size: bool = False) -> None:
    """A checkpoint of another shape would not load, or load wrongly: refused, not skipped.
    `any_world_size`: it is loaded through its universal conversion."""
    if saved.world_size != run.world_size and not any_world_size:
        raise ConfigError(
            f"checkpoint {folder} was written by {saved.world_size} processes, this run has {run.world_size}; "
            "resume with the same nodes x processes per node, or set checkpoint.resume=never to start over"
        )
    start_over = "set checkpoint.resume=never (or another checkpoint.dir) to start over"
    mismatches = saved.mismatches(run)
    if mismatches:
        # One group saved where the text encoders trained: only a trainer before their own group wrote that.
        legacy = "optimizer.param_groups" not in saved.settings and saved.settings.get("training.train_text_encoder")
        older = ("; optimizer.param_groups is not a key: the checkpoint was written by a trainer older than "
                 "training.text_encoder_learning_rate, resume it with that trainer's image"
                 if legacy and any(found.startswith("optimizer.param_groups") for found in mismatches) else "")
        raise ConfigError(
            f"checkpoint {folder} was written with {', '.join(mismatches)}, which DeepSpeed cannot load across; "
            f"set those keys back to resume it, or {start_over}{older}"
        )
    if None not in (saved.parameters, run.parameters) and saved.parameters != run.parameters:
        raise ConfigError(
            f"checkpoint {folder} trains other parameters ({saved.parameters}) than this run ({run.parameters}): "
            f"model.source is another architecture than the one it was written from; resume with that model, or "
            f"{start_over}"
        )
