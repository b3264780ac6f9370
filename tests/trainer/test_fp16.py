"""fp16 with dynamic loss scaling through real DeepSpeed fp16 engines on the CPU (see
fp16_cpu.py: the trainer refuses fp16 on CPU for users, DeepSpeed runs it): an overflow
at the minimum loss scale ends the run as diverged, and ZeRO-0's export takes the fp32
master weights. The whole run on a GPU: test_training.py's test_fp16_on_cuda."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.trainer.test_shard_globals import assert_deepspeed_files_load_with_weights_only


def run_scenario(scenario: str, root, zero_stage: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    result = subprocess.run([sys.executable, "-m", "tests.trainer.fp16_cpu", scenario, str(root), str(zero_stage)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# ZeRO 1 (DeepSpeed's DynamicLossScaler raises at the minimum, as under 2 and 3) and
# ZeRO 0 (FP16_UnfusedOptimizer only skips the step, and would skip every one to the end).
@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, optimizer", [(1, "DeepSpeedZeroOptimizer"), (0, "FP16_UnfusedOptimizer")])
def test_an_fp16_overflow_at_the_minimum_loss_scale_ends_the_run_as_diverged(tmp_path, zero_stage, optimizer):
    outcome = run_scenario("overflow", tmp_path, zero_stage)
    assert outcome["optimizer"] == optimizer
    # Step 3 overflows at scale 2 (skipped, scale 1), step 4 at the minimum: diverged, not an uncaught Exception.
    assert outcome["outcome"] == "diverged", outcome
    assert outcome["step"] == 3 and outcome["skipped_steps"] == (1 if zero_stage else 2)
    message = outcome["message"]
    assert "at step 4 the fp16 gradients overflowed although the loss scale was already at its minimum" in message
    assert "training.learning_rate (now 0.001)" in message and "training.precision: bf16" in message
    # Skipped steps changed no weight: the checkpoints before are kept, none is retracted.
    assert outcome["checkpoints"] == ["step-00000001", "step-00000002", "step-00000003"]
    # fp16's dynamic loss scaler in them is among what a resume allows DeepSpeed's files to name.
    assert_deepspeed_files_load_with_weights_only(tmp_path / "checkpoints" / "step-00000003")
    assert outcome["latest"] == "step-00000003"
    assert "the next run resumes from step-00000003" in message


@pytest.mark.slow
def test_fp16_zero_0_exports_the_fp32_master_weights_not_the_fp16_ones(tmp_path):
    """A rate below fp16's resolution: the masters move, the fp16 working copies round
    the move away. DeepSpeed's safe_get_full_fp32_param knows no ZeRO-0 fp16 master."""
    exported = run_scenario("export", tmp_path, 0)
    assert exported["optimizer"] == "FP16_UnfusedOptimizer"
    assert exported["names"] == ["0.bias", "0.weight", "1.bias", "1.weight"] and exported["dtypes"] == ["torch.float32"]
    assert exported["masters_compared"] == 4 and exported["equal_to_master"]
    assert not any(exported["equal_to_fp16"].values()), exported
