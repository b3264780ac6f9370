"""Trainer runs that several test modules check from their own angle: each launch costs
about 15 s of imports alone, so a configuration two tests need is trained once per
`make test`, even when pytest-xdist gives the two modules to different workers."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import run_trainer, tiny_config, write_config
from tests.shared_across_workers import computed_once, run_folder


@dataclass(frozen=True)
class FinishedRun:
    root: Path
    config: dict
    result: subprocess.CompletedProcess


def eager_zero_2_fp32_config(root: Path, **training) -> dict:
    """2 ranks, ZeRO-2, text encoder frozen, fp32, 3 steps, a checkpoint at step 3, no
    prior preservation; `training` adds keys (the compiled twin's)."""
    return tiny_config(root, data={"class_prompt": None, "class_dir": None},
                       training={"max_steps": 3, "precision": "fp32", **training}, deepspeed={"zero_stage": 2},
                       checkpoint={"every_steps": 3}, logging={"format": "json"})


def trained_once(tmp_path_factory: pytest.TempPathFactory, name: str, config_for) -> FinishedRun:
    """The run of `config_for(root)`, trained by whichever worker asks first; the others
    wait for it and read its output. Not a session fixture: pytest makes one per module
    that imports it, and would train twice even without workers."""
    root = run_folder(tmp_path_factory.getbasetemp()) / name

    def train() -> dict:
        config = config_for(root)
        result = run_trainer(write_config(root, config))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        return {"config": config, "args": result.args, "stdout": result.stdout, "stderr": result.stderr}

    finished = computed_once(root.with_name(f"{name}.json"), train)
    return FinishedRun(root, finished["config"],
                       subprocess.CompletedProcess(finished["args"], 0, finished["stdout"], finished["stderr"]))


def eager_zero_2_fp32_run(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """The ZeRO-2 case of test_training.py and the eager reference of the compiled run in
    test_performance_levers.py (in fp32: compiled and eager losses agree to 1e-6 there)."""
    return trained_once(tmp_path_factory, "eager-zero-2-fp32", eager_zero_2_fp32_config)
