"""Trainer runs that several test modules check from their own angle: each launch costs
about 15 s of imports alone, so a configuration two tests need is trained once per
`make test`, even when pytest-xdist gives the two modules to different workers."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from tests.conftest import run_trainer, tiny_config, write_config


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


def session_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this test session that every xdist worker sees: the workers' base
    temporary folders (popen-gw0, ...) share their parent, which is this session's own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def trained_once(tmp_path_factory: pytest.TempPathFactory, name: str, config_for) -> FinishedRun:
    """The run of `config_for(root)`, trained by whichever worker asks first; the others
    wait for it and read its output. Not a session fixture: pytest makes one per module
    that imports it, and would train twice even without workers."""
    root = session_folder(tmp_path_factory) / name
    record = root / "finished.json"
    with FileLock(f"{root}.lock"):
        if not record.exists():
            config = config_for(root)
            result = run_trainer(write_config(root, config))
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
            record.write_text(json.dumps({"config": config, "args": result.args, "stdout": result.stdout,
                                          "stderr": result.stderr}))
    finished = json.loads(record.read_text())
    return FinishedRun(root, finished["config"],
                       subprocess.CompletedProcess(finished["args"], 0, finished["stdout"], finished["stderr"]))


def eager_zero_2_fp32_run(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """The ZeRO-2 case of test_training.py and the eager reference of the compiled run in
    test_performance_levers.py (in fp32: compiled and eager losses agree to 1e-6 there)."""
    return trained_once(tmp_path_factory, "eager-zero-2-fp32", eager_zero_2_fp32_config)
