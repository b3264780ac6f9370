"""Trainer runs that several test modules check from their own angle: each launch costs
about 17 s of imports alone, so a configuration two tests need is trained once per session."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import run_trainer, tiny_config, write_config


@dataclass(frozen=True)
class FinishedRun:
    root: Path
    config: dict
    result: subprocess.CompletedProcess


_finished: dict[str, FinishedRun] = {}


def eager_zero_2_fp32_config(root: Path, **training) -> dict:
    """2 ranks, ZeRO-2, text encoder frozen, fp32, 3 steps, a checkpoint at step 3, no
    prior preservation; `training` adds keys (the compiled twin's)."""
    return tiny_config(root, data={"class_prompt": None, "class_dir": None},
                       training={"max_steps": 3, "precision": "fp32", **training}, deepspeed={"zero_stage": 2},
                       checkpoint={"every_steps": 3}, logging={"format": "json"})


def eager_zero_2_fp32_run(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """The ZeRO-2 case of test_training.py and the eager reference of the compiled run in
    test_performance_levers.py (in fp32: compiled and eager losses agree to 1e-6 there).

    Cached here, not a session fixture imported into both modules: pytest makes one
    fixture per module that holds it, and would train twice."""
    if "eager" not in _finished:
        root = tmp_path_factory.mktemp("eager-zero-2-fp32")
        config = eager_zero_2_fp32_config(root)
        result = run_trainer(write_config(root, config))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        _finished["eager"] = FinishedRun(root, config, result)
    return _finished["eager"]
