"""Shared fixtures: tiny trainer configs and a real torchrun launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
INSTANCE_IMAGES = REPO / "examples" / "instance-images"


def tiny_config(root: Path, **sections) -> dict:
    """A small, fast trainer config under `root`; `sections` update its sections."""
    config = {
        "model": {"source": "tiny"},
        "data": {
            "instance_dir": str(INSTANCE_IMAGES),
            "instance_prompt": "a photo of sks robot",
            "class_prompt": "a photo of a robot",
            "class_dir": str(root / "class-images"),
            "num_class_images": 4,
            "resolution": 64,
            "class_generation_steps": 2,
        },
        "training": {"max_steps": 6, "learning_rate": 1e-3, "precision": "bf16", "seed": 0},
        "deepspeed": {"zero_stage": 2},
        "checkpoint": {"dir": str(root / "checkpoints"), "every_steps": 3, "keep_last": 2},
        "output": {"dir": str(root / "model")},
        "logging": {"every_steps": 1},
    }
    for section, values in sections.items():
        if values is None:
            config.pop(section, None)
        else:
            config.setdefault(section, {}).update(values)
    return config


def write_config(root: Path, config: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_trainer(config_path: Path, *, nproc: int = 2, extra: list[str] = (), timeout: float = 600) -> subprocess.CompletedProcess:
    """The real entry point under the real torchrun (or plain python for nproc=0)."""
    if nproc:
        command = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}"]
    else:
        command = [sys.executable]
    command += [str(REPO / "trainer" / "main.py"), "--config", str(config_path), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    return tmp_path / "run"


def pytest_collection_finish(session: pytest.Session) -> None:
    """The image requirement check waits about a minute on PyPI: started now, in the
    background, it overlaps the tests that run before it."""
    if any("resolved_images" in getattr(item, "fixturenames", ()) for item in session.items):
        from tests.ship.image_resolution import image_resolution

        from tests.shared_across_workers import run_folder

        # Under pytest-xdist each worker collects the session and gets here: one resolves for all.
        basetemp = session.config.option.basetemp
        image_resolution(run_folder(Path(basetemp)) if os.environ.get("PYTEST_XDIST_WORKER") and basetemp else None)
