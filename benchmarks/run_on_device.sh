#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root, with .whl/ carried
# (filled by benchmarks/prepare_device_wheels.sh). Installs the wheels into /tmp/site,
# checks that every module the benchmark imports is there (naming the missing ones),
# builds DeepSpeed's fused_adam op (the wheel ships no compiled ops: the first fp16 step
# would compile it with nvcc inside the tests' window; cut at 2 minutes, not fatal, log
# in $OUT/fused_adam_build.log; torch's extension cache keeps it for a second call on the
# same machine, which then loads it in seconds),
# runs the GPU-marked tests (the real trainer in fp16 on CUDA, under nccl: what no
# CPU run reaches; cut at 2.5 minutes, results in $OUT/gpu_tests.log), then
# benchmarks/gpu_dreambooth.py: (a), (b), (c) at 8+8 and 16+16, then (d) LoRA
# rank 16 at 1+1 (needs the image's peft), about 4-5 minutes in all (cut at 5 minutes; every
# finished case is already in the JSON). Results: $OUT/gpu_dreambooth.json and $OUT/gpu_dreambooth.log.
# The three windows (2 + 2.5 + 5 minutes) and the install fit one device call (timeout_s=600).
# SKIP_GPU_TESTS=1 goes straight to the benchmark (a second call on the same machine).
#   bash benchmarks/run_on_device.sh [extra gpu_dreambooth.py arguments]
set -euo pipefail
OUT="${OUT:-$PWD/benchmark-results}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
python3 - <<'PY'
import importlib.util, sys
needed = ["torch", "deepspeed", "diffusers", "transformers", "pydantic", "yaml", "PIL", "numpy", "hjson", "einops",
          "msgpack", "cpuinfo", "psutil", "tqdm", "ninja", "prometheus_client", "safetensors", "huggingface_hub"]
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"missing on this machine: {', '.join(missing)}; add their wheels to .whl/ (benchmarks/prepare_device_wheels.sh)")
import torch
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, nvcc: {'yes' if importlib.util.find_spec('torch.utils.cpp_extension') and __import__('shutil').which('nvcc') else 'no'}")
PY
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
# Outside the tests' and the benchmark's timed windows. Not fatal: a failed build shows
# again, named, where the op is first used.
timeout 120 python3 -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" \
  > "$OUT/fused_adam_build.log" 2>&1 || echo "fused_adam build: rc $? (see fused_adam_build.log)"
if [ -z "${SKIP_GPU_TESTS:-}" ]; then
  # Not fatal: the benchmark's figures are worth having even when a test fails.
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/trainer/test_training.py tests/trainer/test_rng.py \
    > "$OUT/gpu_tests.log" 2>&1 || echo "GPU tests: rc $? (see gpu_tests.log)"
  tail -5 "$OUT/gpu_tests.log"
fi
timeout 300 python3 benchmarks/gpu_dreambooth.py --channels-last --json "$OUT/gpu_dreambooth.json" "$@" 2>&1 | tee "$OUT/gpu_dreambooth.log"
