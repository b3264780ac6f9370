"""The images' pinned requirement sets, resolved for the image's Python and platform
through PyPI (`pip install --dry-run`: metadata only, no multi-GB CUDA wheels).

It takes about a minute, nearly all of it waiting on the network, so the test session
starts it in the background as soon as it knows a test needs it
(`tests/conftest.py::pytest_collection_finish`), and the tests before it run meanwhile.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

from tests.shared_across_workers import computed_once
from tests.ship.dockerfile import DOCKER_DIR

TRAINER_REQUIREMENTS = DOCKER_DIR / "trainer-requirements.txt"
DEEPSPEED_REQUIREMENTS = DOCKER_DIR / "deepspeed-requirements.txt"
BUILD_REQUIREMENTS = DOCKER_DIR / "build-requirements.txt"
OPERATOR_REQUIREMENTS = DOCKER_DIR / "operator-requirements.txt"
# Ubuntu 24.04's python3 and the operator's python:3.12-slim base.
IMAGE_PYTHON = "3.12"
IMAGE_ENVIRONMENT = {"python_version": IMAGE_PYTHON, "python_full_version": IMAGE_PYTHON + ".3",
                     "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                     "os_name": "posix", "implementation_name": "cpython", "extra": ""}
# PyPI wheels of the CUDA libraries are tagged anywhere from manylinux_2_17 to _2_28;
# pip does not widen an explicit --platform, so the image's glibc (2.39) gets them all.
IMAGE_PLATFORMS = ["manylinux2014_x86_64", *(f"manylinux_2_{minor}_x86_64" for minor in range(17, 40))]


def pip(*args: str, timeout: float = 240) -> dict:
    """`pip install --dry-run` against PyPI alone: this machine's pip config (local wheel
    folders, a torch cap) is left out, so the answer is what a docker build would get."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_") or key == "PIP_CERT"}
    env["PIP_CONFIG_FILE"] = os.devnull
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--disable-pip-version-check", "--report", "-", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-3000:]}"
    return json.loads(result.stdout)


def for_the_image(target: Path, *args: str) -> list[str]:
    """Resolve for the image's Python and platform; --target (an empty folder, never
    written by a dry run) is what pip demands for a foreign platform."""
    platforms = [arg for platform in IMAGE_PLATFORMS for arg in ("--platform", platform)]
    # fast-deps reads each wheel's METADATA by HTTP range requests: the index serves no
    # separate metadata files (PEP 658), and whole wheels would be ~3.5 GB of CUDA libraries.
    return ["--use-feature=fast-deps", "--target", str(target), "--python-version", IMAGE_PYTHON, *platforms, "--only-binary=:all:", *args]


def runtime_requirements(report: dict) -> list[str]:
    """What an installed package requires at run time on the image (extras left out)."""
    [package] = report["install"]
    requirements = [Requirement(r) for r in package["metadata"].get("requires_dist", [])]
    return [str(r).split(";")[0] for r in requirements
            if r.marker is None or Marker(str(r.marker)).evaluate(IMAGE_ENVIRONMENT)]


def resolve_images() -> dict[str, dict]:
    """pip's reports for the trainer image, the operator image and deepspeed alone."""
    with tempfile.TemporaryDirectory() as target, concurrent.futures.ThreadPoolExecutor(2) as pool:
        # deepspeed is an sdist: its metadata needs setup.py, run here against the local torch.
        operator = pool.submit(pip, *for_the_image(Path(target), "-r", str(OPERATOR_REQUIREMENTS)))
        deepspeed = pip("--no-deps", "--no-build-isolation", "-r", str(DEEPSPEED_REQUIREMENTS))
        trainer = pip(*for_the_image(Path(target), "-r", str(BUILD_REQUIREMENTS), "-r", str(TRAINER_REQUIREMENTS),
                                     *runtime_requirements(deepspeed)))
        return {"trainer": trainer, "operator": operator.result(), "deepspeed": deepspeed}


_lock = threading.Lock()
_resolution: concurrent.futures.Future | None = None


def image_resolution(shared_folder: Path | None = None) -> concurrent.futures.Future:
    """The one resolution of this test session, started on the first call (with the
    folder the xdist workers share, if any)."""
    global _resolution
    with _lock:
        if _resolution is None:
            _resolution = concurrent.futures.Future()
            threading.Thread(target=_resolve_into, args=(_resolution, shared_folder), name="image-resolution",
                             daemon=True).start()
        return _resolution


def resolve_images_once_per_run(shared_folder: Path | None) -> dict[str, dict]:
    """Every pytest-xdist worker starts this with the run's shared folder: the first
    resolves and writes the reports there, the others read them."""
    if shared_folder is None:
        return resolve_images()
    return computed_once(shared_folder / "image-resolution.json", resolve_images)


def _resolve_into(future: concurrent.futures.Future, shared_folder: Path | None) -> None:
    try:
        future.set_result(resolve_images_once_per_run(shared_folder))
    except BaseException as error:  # noqa: BLE001 - handed to the test that waits for it
        future.set_exception(error)
