#!/usr/bin/env bash
# `make demo`: a 2-process CPU DreamBooth run on the tiny model with prior preservation
# and ZeRO-2, then one image from the exported pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=runs/local-tiny
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
# A fresh training each time; class images from an earlier demo are kept and reused.
rm -rf "$RUN/checkpoints" "$RUN/model" "$RUN/samples"
torchrun --nproc_per_node 2 trainer/main.py --config examples/local-tiny.yaml
python examples/sample_from_model.py "$RUN/model" "a photo of sks robot" "$RUN/samples/sks-robot.png"
cat <<DONE

Demo finished.
  model (diffusers pipeline): $RUN/model        (run summary: $RUN/model/run.json)
  checkpoints:                $RUN/checkpoints  (latest: $(cat "$RUN/checkpoints/latest"))
  class images:               $RUN/class-images
  sample image:               $RUN/samples/sks-robot.png
  model card:                 $RUN/model/README.md
LoRA adapters instead of all weights (the model folder then also holds them alone):
  torchrun --nproc_per_node 2 trainer/main.py --config examples/local-tiny.yaml --set lora.rank=8 \
    --set checkpoint.dir=runs/local-tiny-lora/checkpoints --set output.dir=runs/local-tiny-lora/model
DONE
