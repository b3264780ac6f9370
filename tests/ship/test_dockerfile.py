"""The Dockerfile, checked without a container engine: hadolint, the shape of its final
stages (non-root user, no compiler, OCI labels, what the worker pods expect), and its
pinned requirement sets resolving for the image's Python through PyPI (`pip install
--dry-run`: metadata only, no multi-GB CUDA wheels; about a minute). Needs the network
and fails without it."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

from dreambooth_operator.constants import LAUNCHER, TRAINER_ENTRY, WORKER_UID
from tests.ship.chart import CHART, REPO
from tests.ship.dockerfile import DOCKER_DIR, DOCKERFILE, canonical, parse_stages, pins

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
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|cuda-nvcc\S*|python3?-dev|\S+-dev)\b")

STAGES = parse_stages(DOCKERFILE.read_text())
TRAINER, OPERATOR = STAGES["trainer"], STAGES["operator"]


def test_hadolint_is_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_trainer_image_is_what_the_worker_pods_run() -> None:
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", TRAINER.base), TRAINER.base
    assert TRAINER.all("USER") == [f"{WORKER_UID}:{WORKER_UID}"]
    assert any(f"--uid {WORKER_UID}" in run for run in TRAINER.all("RUN")), "no user with the workers' uid"
    [workdir] = TRAINER.all("WORKDIR")
    assert any(copy.split()[-1].rstrip("/") == f"{workdir}/{Path(TRAINER_ENTRY).parent}" for copy in TRAINER.all("COPY"))
    env = " ".join(TRAINER.all("ENV"))
    assert "PATH=/opt/venv/bin:" in env, f"`{LAUNCHER[0]}` must be the venv's python"
    for cache in ("HF_HOME", "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR"):
        assert re.search(rf"{cache}=/tmp/", env), f"{cache} must be writable by uid {WORKER_UID}"


def test_the_operator_image_matches_the_chart() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    uid = values["podSecurityContext"]["runAsUser"]
    assert OPERATOR.all("USER") == [f"{uid}:{uid}"]
    assert OPERATOR.all("ENTRYPOINT") == ['["python", "-m", "dreambooth_operator"]']
    assert OPERATOR.base.startswith(f"python:{IMAGE_PYTHON}-slim")


@pytest.mark.parametrize("stage", [TRAINER, OPERATOR], ids=lambda s: s.name)
def test_final_stages_have_no_compiler_and_carry_oci_labels(stage) -> None:
    assert "devel" not in stage.base
    for run in stage.all("RUN"):
        assert not COMPILERS.search(run), f"{stage.name} installs a compiler: {run}"
    for copy in stage.all("COPY"):
        if copy.startswith("--from="):
            builder = STAGES[copy.split()[0].removeprefix("--from=")]
            assert builder.name.endswith("-builder"), copy
    labels = " ".join(stage.all("LABEL"))
    for key in ("title", "description", "version", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels, f"{stage.name}: no OCI label {key}"


def test_pins_agree_with_the_project() -> None:
    """The images pin what `make test` runs and what pyproject.toml allows."""
    makefile = (REPO / "Makefile").read_text()
    trainer, deepspeed = pins(TRAINER_REQUIREMENTS), pins(DEEPSPEED_REQUIREMENTS)
    assert f"torch=={trainer['torch']}" in makefile and f"deepspeed=={deepspeed['deepspeed']}" in makefile
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = [Requirement(r) for r in project["dependencies"]]
    extras = project["optional-dependencies"]
    images = (("trainer", {**trainer, **deepspeed}), ("storage", trainer), ("operator", pins(OPERATOR_REQUIREMENTS)))
    for extra, pinned in images:
        for requirement in [*base, *(Requirement(r) for r in extras[extra])]:
            name = canonical(requirement.name)
            assert name in pinned, f"docker/ pins nothing for {requirement.name} (pyproject [{extra}])"
            assert requirement.specifier.contains(pinned[name]), f"{name}=={pinned[name]} violates {requirement}"


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


def installed(report: dict) -> dict[str, Version]:
    return {canonical(item["metadata"]["name"]): Version(item["metadata"]["version"]) for item in report["install"]}


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    target = tmp_path_factory.mktemp("pip-target")
    # deepspeed is an sdist: its metadata needs setup.py, run here against the local torch.
    deepspeed = pip("--no-deps", "--no-build-isolation", "-r", str(DEEPSPEED_REQUIREMENTS))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        trainer = pool.submit(pip, *for_the_image(target, "-r", str(BUILD_REQUIREMENTS), "-r", str(TRAINER_REQUIREMENTS),
                                                  *runtime_requirements(deepspeed)))
        operator = pool.submit(pip, *for_the_image(target, "-r", str(OPERATOR_REQUIREMENTS)))
        return {"trainer": trainer.result(), "operator": operator.result(), "deepspeed": deepspeed}


@pytest.mark.slow
def test_trainer_requirements_resolve_for_the_image(resolved) -> None:
    versions = installed(resolved["trainer"])
    for name, version in {**pins(TRAINER_REQUIREMENTS), **pins(BUILD_REQUIREMENTS)}.items():
        assert versions[name] == Version(version), name
    # The pinned torch is a CUDA build whose libraries match the CUDA base image's major version.
    cuda_base = re.search(r"nvidia/cuda:(\d+)\.", TRAINER.base).group(1)
    assert versions["nvidia-cuda-runtime"].major == int(cuda_base) or f"nvidia-cuda-runtime-cu{cuda_base}" in versions
    [deepspeed] = resolved["deepspeed"]["install"]
    assert deepspeed["metadata"]["version"] == pins(DEEPSPEED_REQUIREMENTS)["deepspeed"]


@pytest.mark.slow
def test_operator_requirements_resolve_without_torch(resolved) -> None:
    versions = installed(resolved["operator"])
    for name, version in pins(OPERATOR_REQUIREMENTS).items():
        assert versions[name] == Version(version), name
    assert not {"torch", "deepspeed", "diffusers"} & set(versions)
