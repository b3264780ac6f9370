"""The Dockerfile, checked without a container engine: hadolint, the shape of its final
stages (non-root user, no compiler, OCI labels, what the worker pods expect), and its
pinned requirement sets resolving for the image's Python through PyPI (see
image_resolution.py: about a minute, in the background from the start of the session).
Needs the network and fails without it."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from dreambooth_operator.constants import LAUNCHER, TRAINER_ENTRY, WORKER_UID
from tests.ship.chart import CHART, REPO
from tests.ship.dockerfile import DOCKERFILE, canonical, parse_stages, pins
from tests.ship.image_resolution import (BUILD_REQUIREMENTS, DEEPSPEED_REQUIREMENTS, IMAGE_PYTHON,
                                         OPERATOR_REQUIREMENTS, TRAINER_REQUIREMENTS, image_resolution)

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


def test_the_trainer_builder_prebuilds_deepspeeds_optimizers_for_cuda() -> None:
    """The runtime image has no compiler, so the ops the trainer uses (FusedAdam on every
    GPU job, CPU Adam with deepspeed.offload_optimizer) must be built in the builder, and
    recorded as built for CUDA: a build has no GPU, and a DeepSpeed that recorded `cpu`
    ignores its prebuilt ops in a GPU pod and tries to compile them there."""
    builder = STAGES["trainer-builder"]
    env = " ".join(builder.all("ENV"))
    for setting in ("DS_ACCELERATOR=cuda", "DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1"):
        assert setting in env, f"the trainer builder lacks {setting}"
    [install] = [run for run in builder.all("RUN") if "deepspeed-requirements.txt" in run]
    assert "--no-binary deepspeed" in install  # a wheel would bring no ops built for this image
    # The check after the install reads what DeepSpeed recorded, not only that its classes import.
    assert "accelerator_name == 'cuda'" in install and "installed_ops['fused_adam']" in install


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


def installed(report: dict) -> dict[str, Version]:
    return {canonical(item["metadata"]["name"]): Version(item["metadata"]["version"]) for item in report["install"]}


@pytest.fixture(scope="module")
def resolved_images() -> dict[str, dict]:
    return image_resolution().result(timeout=600)


@pytest.mark.slow
def test_trainer_requirements_resolve_for_the_image(resolved_images) -> None:
    versions = installed(resolved_images["trainer"])
    for name, version in {**pins(TRAINER_REQUIREMENTS), **pins(BUILD_REQUIREMENTS)}.items():
        assert versions[name] == Version(version), name
    # The pinned torch is a CUDA build whose libraries match the CUDA base image's major version.
    cuda_base = re.search(r"nvidia/cuda:(\d+)\.", TRAINER.base).group(1)
    assert versions["nvidia-cuda-runtime"].major == int(cuda_base) or f"nvidia-cuda-runtime-cu{cuda_base}" in versions
    [deepspeed] = resolved_images["deepspeed"]["install"]
    assert deepspeed["metadata"]["version"] == pins(DEEPSPEED_REQUIREMENTS)["deepspeed"]


@pytest.mark.slow
def test_operator_requirements_resolve_without_torch(resolved_images) -> None:
    versions = installed(resolved_images["operator"])
    for name, version in pins(OPERATOR_REQUIREMENTS).items():
        assert versions[name] == Version(version), name
    assert not {"torch", "deepspeed", "diffusers"} & set(versions)
