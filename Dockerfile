# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target trainer  -t dreambooth-trainer:0.1.0 .
#   docker build --target operator -t dreambooth-operator:0.1.0 .
# The trainer runs `python -m trainer.launch ... trainer/main.py` from /app as uid 1000
# (the operator's worker pods ask for that user); the operator runs as uid 65532.
# Both final stages hold no compiler: what needs one is built in a builder stage.

ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04
ARG PYTHON_VERSION=3.12
ARG VERSION=0.1.0

# --- trainer: build stage (nvcc, Python headers) ------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS trainer-builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu's own python3 (3.12 on 24.04); the runtime stage installs the same one.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/build-requirements.txt docker/trainer-requirements.txt docker/deepspeed-requirements.txt /tmp/requirements/
RUN python3 -m venv $VIRTUAL_ENV && pip install --no-cache-dir -r /tmp/requirements/build-requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements/trainer-requirements.txt
# DeepSpeed's FusedAdam (the optimizer every GPU job uses) compiled now, for A100, H100
# and B200 (+PTX for newer), so no pod JIT-compiles it at start, and its CPU Adam
# (deepspeed.offload_optimizer): the runtime image has no compiler to JIT it with. The
# other ops are unused and stay JIT-only. A build has no GPU, so DeepSpeed would take
# itself for a CPU install and record that: a GPU pod then ignores the prebuilt ops
# (builder.py loads one only when the recorded accelerator is the running one) and tries
# to JIT them without a compiler. DS_ACCELERATOR=cuda records the one the pods run, and the
# check reads what was recorded, not just that the Python classes import.
ENV DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 \
    TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0+PTX" MAX_JOBS=4
RUN pip install --no-cache-dir --no-build-isolation --no-binary deepspeed -r /tmp/requirements/deepspeed-requirements.txt \
 && python -c "from deepspeed import git_version_info as built; \
assert built.accelerator_name == 'cuda' and built.installed_ops['fused_adam'] and built.installed_ops['cpu_adam'], \
(built.accelerator_name, built.installed_ops)"

# --- trainer: runtime ---------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS trainer
ARG VERSION
LABEL org.opencontainers.image.title="dreambooth-trainer" \
      org.opencontainers.image.description="DreamBooth fine-tuning of Stable Diffusion: torchrun + DeepSpeed trainer" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/dreambooth-operator/dreambooth-operator"
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*
# The worker pods run as uid/gid 1000 (operator/constants.py WORKER_UID); 24.04 ships an
# `ubuntu` user with that id, renamed so logs say what it is.
RUN (userdel -r ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 trainer \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/trainer --shell /usr/sbin/nologin trainer
COPY --from=trainer-builder /opt/venv /opt/venv
WORKDIR /app
COPY --chown=root:root trainer/ /app/trainer/
# Caches under /tmp (an emptyDir or the container's layer) so a read-only home still works;
# the model cache is better put on the job's volume through the trainer config.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/trainer \
    HF_HOME=/tmp/huggingface \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    MPLCONFIGDIR=/tmp/matplotlib
USER 1000:1000
CMD ["python", "-m", "trainer.launch", "--help"]

# --- operator: build stage ----------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS operator-builder
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv $VIRTUAL_ENV
COPY docker/operator-requirements.txt /tmp/requirements/
RUN pip install --no-cache-dir -r /tmp/requirements/operator-requirements.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
# The operator imports only the trainer's config models (pydantic); no torch comes along.
RUN pip install --no-cache-dir --no-deps .

# --- operator: runtime --------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS operator
ARG VERSION
LABEL org.opencontainers.image.title="dreambooth-operator" \
      org.opencontainers.image.description="Kubernetes operator for DreamboothJob resources (kopf)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/dreambooth-operator/dreambooth-operator"
COPY --from=operator-builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The chart runs it with a read-only root filesystem and an emptyDir on /tmp.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["python", "-m", "dreambooth_operator"]
CMD ["--all-namespaces"]
