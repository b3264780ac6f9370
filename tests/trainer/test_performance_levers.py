"""The speed levers that are on by default change no number: latents from the cache, the
batch prefetch thread and ZeRO bucket sizes give the same per-step losses as without them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import run_trainer, tiny_config, write_config
from tests.trainer.shared_runs import eager_zero_2_fp32_config, eager_zero_2_fp32_run
from trainer.config_file import validate_config
from trainer.data import DreamBoothData
from trainer.engine import MAX_BUCKET_SIZE, MIN_BUCKET_SIZE, bucket_size, build_deepspeed_config
from trainer.latents import LatentEncoder, batch_keys
from trainer.loop import BatchPrefetcher
from trainer.tiny import build_tiny_components

STEPS = 6  # 2 ranks x 6 steps over 5 instance photos: later steps revisit views, so the cache serves hits


def step_losses(stdout: str) -> list[tuple[float, float]]:
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"event": "step"')]
    return [(event["loss"], event["instance_loss"]) for event in events]


LEVERS_OFF = "levers off, optimizer offloaded"


@pytest.fixture(scope="module")
def losses_with_and_without_levers(tmp_path_factory):
    """One run at the defaults, and one with every speed lever off and ZeRO-Offload (a
    memory lever: the optimizer step on the CPU) on. Each of them must leave every number
    as it is, so one run checks them all against the defaults: a launch saved (its
    imports alone take 17 s). Its mid-run checkpoint is resumed without offload below."""
    root = tmp_path_factory.mktemp("levers")
    runs = {
        "default": {},
        LEVERS_OFF: {"training": {"cache_latents": False, "prefetch_batches": False},
                     # many small buckets: dozens of reductions per step
                     "deepspeed": {"bucket_size": 4096, "offload_optimizer": True},
                     "checkpoint": {"every_steps": STEPS // 2}},
    }
    losses = {}
    for name, changes in runs.items():
        run_root = root / name.replace(" ", "-").replace(",", "")
        # Without prior preservation: generating class images would double the cost and test nothing here.
        config = tiny_config(run_root, data={"class_prompt": None, "class_dir": None},
                             training={"max_steps": STEPS, "train_text_encoder": True, **changes.get("training", {})},
                             deepspeed={"zero_stage": 2, **changes.get("deepspeed", {})},
                             checkpoint={"every_steps": STEPS, **changes.get("checkpoint", {})},
                             logging={"format": "json"})
        result = run_trainer(write_config(run_root, config))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        losses[name] = step_losses(result.stdout)
        losses[f"{name} root"] = run_root
    return losses


@pytest.mark.slow
def test_default_levers_give_bit_identical_losses(losses_with_and_without_levers):
    default, off = losses_with_and_without_levers["default"], losses_with_and_without_levers[LEVERS_OFF]
    assert len(default) == STEPS
    assert default == off  # exact float equality, every step, every term


@pytest.mark.slow
def test_optimizer_offload_trains_the_same_and_its_checkpoint_resumes_without_it(losses_with_and_without_levers):
    default = losses_with_and_without_levers["default"]
    assert losses_with_and_without_levers[LEVERS_OFF] == default
    offloaded = losses_with_and_without_levers[f"{LEVERS_OFF} root"]
    checkpoints = offloaded / "checkpoints"
    shutil.rmtree(checkpoints / f"step-{STEPS:08d}")
    (checkpoints / "latest").write_text(f"step-{STEPS // 2:08d}")
    result = run_trainer(offloaded / "config.yaml", extra=["--set", "deepspeed.offload_optimizer=false"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert step_losses(result.stdout) == default[STEPS // 2:]


def test_cached_latents_equal_encoded_ones_and_each_view_is_encoded_once(tmp_path):
    vae = build_tiny_components()["vae"]
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    flipped = images.flip(-1)
    batches = [torch.stack([images[0], images[1]]), torch.stack([images[1], flipped[1]]), torch.stack([images[0], images[2]])]
    cached, uncached = LatentEncoder(vae, cache=True), LatentEncoder(vae, cache=False)
    for step, pixels in enumerate(batches):
        # Precomputed keys (the prefetch path) and keys computed here must agree.
        keys = batch_keys(pixels) if step % 2 else None
        a = cached.latents(pixels, torch.Generator().manual_seed(step), keys)
        b = uncached.latents(pixels, torch.Generator().manual_seed(step))
        assert torch.equal(a, b)
    assert cached.num_cached == 4  # images 0, 1, 2 and the flipped view of 1
    assert uncached.num_cached == 0


def test_prefetched_batches_are_the_batches_of_their_micro_steps(tmp_path):
    config = validate_config(tiny_config(tmp_path, data={"class_prompt": None, "class_dir": None}))
    tokenizer = build_tiny_components()["tokenizer"]
    data = DreamBoothData(config.data, [tokenizer], seed=0, rank=0, world_size=1, batch_size=2)
    prefetcher = BatchPrefetcher(lambda step: data.batch(step), enabled=True)
    # In order (served by the worker), then a jump (a resume): built on the spot.
    for step in [0, 1, 2, 7, 8]:
        got, expected = prefetcher.get(step), data.batch(step)
        assert torch.equal(got.pixel_values, expected.pixel_values) and torch.equal(got.input_ids, expected.input_ids)
    prefetcher.close()


def test_bucket_size_follows_the_model_size_within_bounds(tmp_path):
    assert bucket_size(1_000) == MIN_BUCKET_SIZE
    assert bucket_size(983_000_000) == 118 * 2**20 == 123_731_968  # SD 1.5 UNet + text encoder: eight buckets
    # The SD 1.5 UNet alone: an eighth is odd (107,440,121), which DeepSpeed refuses; aligned up.
    assert bucket_size(859_520_964) == 103 * 2**20
    assert bucket_size(10**11) == MAX_BUCKET_SIZE
    config = validate_config(tiny_config(tmp_path))
    zero = build_deepspeed_config(config, precision="fp16", world_size=8, num_trainable=983_000_000)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 123_731_968
    assert zero["overlap_comm"] and zero["contiguous_gradients"]
    explicit = validate_config(tiny_config(tmp_path, deepspeed={"bucket_size": 4096}))
    assert build_deepspeed_config(explicit, precision="fp16", world_size=8, num_trainable=10**9)["zero_optimization"]["reduce_bucket_size"] == 4096
    # Without a count (or a setting), DeepSpeed's own defaults stay.
    assert "reduce_bucket_size" not in build_deepspeed_config(config, precision="fp16", world_size=8)["zero_optimization"]


@pytest.mark.slow
def test_a_compiled_unet_trains_to_the_same_losses_and_checkpoints_under_the_same_names(tmp_path, tmp_path_factory):
    """training.compile through the real dynamo and AOTAutograd, backend aot_eager (no code
    generation: inductor on CPU takes minutes for the tiny UNet), against the eager run
    (the ZeRO-2 case of test_training.py: shared_runs.py)."""
    eager = eager_zero_2_fp32_run(tmp_path_factory)
    compiled = tmp_path / "compiled"
    result = run_trainer(write_config(compiled, eager_zero_2_fp32_config(
        compiled, compile=True, compile_backend="aot_eager")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    runs, evaluations = {}, {}
    for name, root, stdout in (("eager", eager.root, eager.result.stdout), ("compiled", compiled, result.stdout)):
        module = torch.load(root / "checkpoints" / "step-00000003" / "mp_rank_00_model_states.pt", weights_only=False)
        run = json.loads((root / "model" / "run.json").read_text())
        runs[name] = step_losses(stdout), sorted(module["module"])
        evaluations[name] = run["instance_eval_loss_before"], run["instance_eval_loss_after"]
        compile_info = run["compile"]
    # Dynamo captured the whole UNet as one graph, the training step's, with nothing left
    # to run eagerly: the eval loss (no_grad, another batch size) runs eagerly, no graph of its own.
    assert compile_info == {"backend": "aot_eager", "mode": "default", "graphs": 1, "graph_breaks": 0}
    # The same weights before training: the same value, bit for bit; after it, as close as the losses.
    assert evaluations["compiled"][0] == evaluations["eager"][0]
    assert evaluations["compiled"][1] == pytest.approx(evaluations["eager"][1], rel=1e-6)
    (eager_losses, eager_names), (compiled_losses, compiled_names) = runs["eager"], runs["compiled"]
    assert len(eager_losses) == 3
    assert [loss for loss, _ in compiled_losses] == pytest.approx([loss for loss, _ in eager_losses], rel=1e-6)
    # nn.Module.compile keeps the plain names: eager and compiled runs resume each other's checkpoints.
    assert compiled_names == eager_names and not any("_orig_mod" in name for name in compiled_names)


def test_compile_is_refused_with_zero_3(tmp_path):
    with pytest.raises(Exception, match="training.compile = true does not work with deepspeed.zero_stage = 3"):
        validate_config(tiny_config(tmp_path, training={"compile": True}, deepspeed={"zero_stage": 3}))
