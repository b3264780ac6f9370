#!/usr/bin/env bash
# Run here, before the device run: fills the ignored folder .whl/ with what the GPU
# machine's image lacks (it has torch, transformers and accelerate, but no deepspeed,
# diffusers or pydantic): the wheels in ../shared/device-wheels plus the small
# dependencies of deepspeed and of our trainer that are not among them, for its Python 3.12.
#   bash benchmarks/prepare_device_wheels.sh
# then, with the device tool: run(command="bash benchmarks/run_on_device.sh", carry=[".whl"], timeout_s=480)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED_WHEELS="${SHARED_WHEELS:-../shared/device-wheels}"
# Imported by deepspeed (einops, msgpack, cpuinfo, ninja) or by our trainer (prometheus_client); harmless
# where the image has them already. Pillow, psutil, tqdm and PyYAML come with its transformers/accelerate.
# pytest and its plugins run the GPU-marked tests there (run_on_device.sh).
EXTRA=(einops msgpack py-cpuinfo ninja prometheus-client pytest pluggy iniconfig pytest-timeout)

mkdir -p .whl
cp "$SHARED_WHEELS"/*.whl .whl/
python3 -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .whl "${EXTRA[@]}"
git check-ignore -q .whl/ || echo ".whl/" >> "$(git rev-parse --git-common-dir)/info/exclude"
ls .whl
