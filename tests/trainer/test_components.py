"""The trainer's pure parts: loss, noise targets, DeepSpeed config, lr schedule,
class-image planning, atomic publishing and checkpoint selection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from tests.conftest import tiny_config
from trainer.atomic import write_text
from trainer.checkpoint import complete_checkpoints, find_resume_point, retract
from trainer.manifest import (
    MANIFEST,
    Manifest,
    TrainingShape,
    check_compatible,
    list_files,
    needs_universal,
    trained_parameters,
)
from trainer.class_images import class_image_path, plan_missing, share_of_rank
from trainer.config import CheckpointConfig, ConfigError
from trainer.config_file import validate_config
from trainer.engine import build_deepspeed_config, lr_multiplier, resolve_precision
from trainer.export import publish_folder
from trainer.model_card import model_card
from trainer.objective import DreamBoothDenoiser, add_noise, dreambooth_loss, min_snr_weights
from trainer.tiny import SCHEDULER_CONFIG, build_tiny_components


def test_loss_is_instance_plus_weighted_prior():
    prediction = torch.zeros(4, 2)
    target = torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0], [2.0, 2.0]])
    terms = dreambooth_loss(prediction, target, num_instance=2, prior_loss_weight=0.5)
    assert terms.instance_loss.item() == pytest.approx(1.0)
    assert terms.prior_loss.item() == pytest.approx(4.0)
    assert terms.loss.item() == pytest.approx(1.0 + 0.5 * 4.0)


def test_loss_without_class_images_has_no_prior_term():
    terms = dreambooth_loss(torch.zeros(2, 3), torch.ones(2, 3), num_instance=2, prior_loss_weight=1.0)
    assert terms.prior_loss is None and terms.loss.item() == pytest.approx(1.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_target_follows_the_scheduler_prediction_type(prediction_type):
    scheduler = DDPMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type})
    latents = torch.randn(2, 4, 8, 8)
    noised = add_noise(latents, scheduler, torch.Generator().manual_seed(0), timesteps=torch.tensor([10, 900]))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    expected = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, torch.tensor([10, 900]))
    assert torch.allclose(noised.target, expected)
    assert torch.allclose(noised.noisy, scheduler.add_noise(latents, noise, torch.tensor([10, 900])))


@pytest.mark.parametrize("prediction_type, floor", [("epsilon", 0.0), ("v_prediction", 1.0)])
def test_min_snr_weights_cap_the_signal_to_noise_ratio_at_gamma(prediction_type, floor):
    scheduler = DDPMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type})
    timesteps = torch.tensor([0, 100, 500, 999])
    alphas = scheduler.alphas_cumprod[timesteps].double()
    snr = alphas / (1 - alphas)  # SNR of x_t = sqrt(a) x_0 + sqrt(1 - a) noise
    weights = min_snr_weights(scheduler, timesteps, gamma=5.0)
    torch.testing.assert_close(weights.double(), torch.minimum(snr, torch.tensor(5.0)) / snr + floor)
    assert weights[0] < 0.01 + floor and weights[-1] == pytest.approx(1.0 + floor)  # easy steps count less


def test_weighted_instance_loss_weights_each_image_and_leaves_the_prior_term():
    prediction = torch.zeros(4, 2, 1, 1)
    target = torch.tensor([1.0, 3.0, 2.0, 2.0]).view(4, 1, 1, 1).expand(4, 2, 1, 1)
    plain = dreambooth_loss(prediction, target, num_instance=2, prior_loss_weight=0.5)
    ones = dreambooth_loss(prediction, target, num_instance=2, prior_loss_weight=0.5, instance_weights=torch.ones(2))
    assert ones.instance_loss.item() == pytest.approx(plain.instance_loss.item())
    weighted = dreambooth_loss(prediction, target, num_instance=2, prior_loss_weight=0.5,
                               instance_weights=torch.tensor([1.0, 0.0]))
    assert weighted.instance_loss.item() == pytest.approx(1.0 / 2)  # image 2's error (9) is weighted out
    assert weighted.prior_loss.item() == plain.prior_loss.item() == pytest.approx(4.0)


def test_offset_noise_shifts_each_image_and_channel_by_a_constant_and_nothing_else():
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    latents = torch.randn(2, 4, 8, 8)
    plain = add_noise(latents, scheduler, torch.Generator().manual_seed(3))
    offset = add_noise(latents, scheduler, torch.Generator().manual_seed(3), noise_offset=0.1)
    assert torch.equal(offset.timesteps, plain.timesteps)
    shift = offset.target - plain.target  # epsilon: the target is the noise
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift))
    assert 0 < shift[:, :, 0, 0].abs().max() < 0.5
    assert torch.equal(add_noise(latents, scheduler, torch.Generator().manual_seed(3), noise_offset=0.0).noisy, plain.noisy)


def test_denoiser_trains_unet_and_text_encoder_through_one_backward():
    parts = build_tiny_components()
    module = DreamBoothDenoiser(parts["unet"], parts["text_encoder"])
    ids = parts["tokenizer"](["a photo of sks robot"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids[:, None]
    out = module(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), input_ids=ids)
    assert out.shape == (2, 4, 8, 8)
    out.square().mean().backward()
    assert parts["unet"].conv_in.weight.grad is not None
    assert parts["text_encoder"].get_input_embeddings().weight.grad is not None


def test_tiny_model_is_identical_on_every_build():
    first, second = build_tiny_components(), build_tiny_components()
    for name in ("unet", "vae", "text_encoder"):
        for a, b in zip(first[name].parameters(), second[name].parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_reflects_the_trainer_config(tmp_path, stage):
    raw = tiny_config(tmp_path, training={"batch_size": 2, "gradient_accumulation": 3, "max_grad_norm": 0.5},
                      deepspeed={"zero_stage": stage, "overrides": {"zero_optimization": {"reduce_bucket_size": 123}}})
    ds = build_deepspeed_config(validate_config(raw), precision="fp16", world_size=4)
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert not ds["bf16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["torch_adam"] is False  # DeepSpeed's fused Adam on CUDA
    assert build_deepspeed_config(validate_config(raw), precision="bf16", world_size=1, device_type="cpu")["optimizer"]["params"]["torch_adam"]


@pytest.mark.parametrize("source, threshold", [("tiny", 0), ("tiny-sdxl", 0),
                                               ("stable-diffusion-v1-5/stable-diffusion-v1-5", None)])
def test_zero_3_partitions_every_tensor_only_of_the_built_in_tiny_models(tmp_path, source, threshold):
    """A real model keeps DeepSpeed's persistence threshold: its small biases and norms
    stay whole instead of costing an all-gather each per step."""
    raw = tiny_config(tmp_path, model={"source": source}, deepspeed={"zero_stage": 3})
    zero = build_deepspeed_config(validate_config(raw), precision="bf16", world_size=2, device_type="cpu")["zero_optimization"]
    assert zero.get("stage3_param_persistence_threshold") == threshold
    assert zero["stage3_gather_16bit_weights_on_model_save"] is False


def test_precision_auto_is_fp16_on_cuda_and_bf16_on_cpu():
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp16"
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_lr_schedule_warms_up_then_decays():
    shape = dict(warmup_steps=4, max_steps=14)
    assert [lr_multiplier(step, schedule="constant", **shape) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(9, schedule="linear", **shape) == pytest.approx(0.5)
    assert lr_multiplier(14, schedule="cosine", **shape) == pytest.approx(0.0)
    assert lr_multiplier(9, schedule="cosine", **shape) == pytest.approx(0.5)


@pytest.mark.parametrize("schedule, options", [("linear", {}), ("cosine", {}), ("cosine_with_restarts", {"num_cycles": 3}),
                                               ("polynomial", {"power": 2.0}), ("constant", {})])
def test_lr_schedules_after_warmup_are_diffusers(schedule, options):
    """Step for step the factors of diffusers' get_scheduler (--lr_scheduler, --lr_num_cycles,
    --lr_power), read from the real scheduler on a peak rate of 1."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_scheduler(schedule, optimizer, num_warmup_steps=0, num_training_steps=20, **options)
    for step in range(21):
        ours = lr_multiplier(step, warmup_steps=0, max_steps=20, schedule=schedule, **options)
        assert ours == pytest.approx(theirs.get_last_lr()[0], abs=2e-7), step  # polynomial's floor: 1e-7
        optimizer.step()
        theirs.step()


def test_class_image_plan_keeps_existing_images_and_fills_the_gap(tmp_path):
    (tmp_path / "mine.jpg").write_bytes(b"x")
    class_image_path(tmp_path, 1).write_bytes(b"x")
    missing = plan_missing(tmp_path, 5)
    assert missing == [0, 2, 3]
    assert plan_missing(tmp_path, 2) == []
    assert share_of_rank(missing, 0, 2) + share_of_rank(missing, 1, 2) == [0, 3, 2]


def test_publish_folder_replaces_the_old_folder_whole(tmp_path):
    target = tmp_path / "model"
    publish_folder(target, lambda folder: (folder.mkdir(), (folder / "a").write_text("1")))
    publish_folder(target, lambda folder: (folder.mkdir(), (folder / "b").write_text("2")))
    assert sorted(path.name for path in target.iterdir()) == ["b"]
    assert [path.name for path in tmp_path.iterdir()] == ["model"]

    def crash(folder):
        folder.mkdir()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        publish_folder(target, crash)
    assert (target / "b").read_text() == "2"


def fake_checkpoint(root, step, *, complete=True, corrupt=False):
    folder = root / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "shard.pt").write_bytes(b"0123456789")
    if complete:
        manifest = {"step": step, "world_size": 2, "zero_stage": 2, "files": list_files(folder)}
        (folder / MANIFEST).write_text(json.dumps(manifest))
    if corrupt:
        (folder / "shard.pt").write_bytes(b"01234")
    return folder


def test_resume_takes_latest_and_skips_incomplete_or_corrupt(tmp_path):
    config = CheckpointConfig(dir=tmp_path)
    assert find_resume_point(config) is None
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 30, complete=False)
    write_text(tmp_path / "latest", "step-00000020")
    assert find_resume_point(config).name == "step-00000020"
    fake_checkpoint(tmp_path, 25, corrupt=True)
    write_text(tmp_path / "latest", "step-00000025")
    assert find_resume_point(config).name == "step-00000020"
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["step-00000025", "step-00000020", "step-00000010"]
    assert find_resume_point(CheckpointConfig(dir=tmp_path, resume="never")) is None


def test_a_retracted_checkpoint_leaves_the_resume_path_and_latest_falls_back(tmp_path):
    config = CheckpointConfig(dir=tmp_path)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20)
    write_text(tmp_path / "latest", "step-00000020")
    assert retract(tmp_path, 20).name == "step-00000010"
    assert (tmp_path / "latest").read_text() == "step-00000010" and find_resume_point(config).name == "step-00000010"
    assert (tmp_path / "diverged-step-00000020" / "shard.pt").is_file()  # kept for a look, out of retention's count
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["step-00000010"]
    assert retract(tmp_path, 10) is None and not (tmp_path / "latest").exists() and find_resume_point(config) is None
    assert retract(tmp_path, 5) is None  # never saved at that step: nothing to move


def test_a_checkpoint_of_another_shape_is_named_not_loaded():
    saved = TrainingShape(world_size=2, settings={
        "deepspeed.zero_stage": 2, "training.precision": "fp16", "training.train_text_encoder": True, "lora.rank": 8,
        "lora.alpha": 8.0, "lora.unet_target_modules": ["to_q", "to_v"]})

    def run(**changes):
        return TrainingShape(world_size=2, settings={**saved.settings, **{k.replace("__", "."): v for k, v in changes.items()}})

    assert saved.mismatches(run()) == []
    assert saved.mismatches(run(deepspeed__zero_stage=1)) == []  # ZeRO-1 and -2 lay the optimizer state out alike
    assert saved.mismatches(run(deepspeed__zero_stage=3, training__train_text_encoder=False)) == [
        "deepspeed.zero_stage = 2 (this run: 3)", "training.train_text_encoder = true (this run: false)"]
    assert saved.mismatches(run(training__precision="bf16", lora__alpha=16.0, lora__unet_target_modules=["to_q"])) == [
        "training.precision = 'fp16' (this run: 'bf16')", "lora.alpha = 8.0 (this run: 16.0)",
        "lora.unet_target_modules = ['to_q', 'to_v'] (this run: ['to_q'])"]
    # Another world size loads through a universal conversion; without ZeRO there are no shards to convert.
    assert needs_universal(saved, 4) and not needs_universal(saved, 2)
    assert not needs_universal(run(deepspeed__zero_stage=0), 4)
    # Without adapters the run has no lora.alpha: the rank says what differs.
    no_lora = TrainingShape(world_size=2, settings={k: v for k, v in saved.settings.items() if k in (
        "deepspeed.zero_stage", "training.precision", "training.train_text_encoder")} | {"lora.rank": 0})
    assert saved.mismatches(no_lora) == ["lora.rank = 8 (this run: 0)"]
    # The text encoder in a param group of its own: a checkpoint from before that (its manifest
    # has no optimizer.param_groups) holds one group, which DeepSpeed cannot load into two.
    two_groups = run(optimizer__param_groups=2)
    assert saved.mismatches(two_groups) == ["optimizer.param_groups = 1 (this run: 2)"]
    with pytest.raises(ConfigError, match="older than training.text_encoder_learning_rate, resume it with that trainer's image"):
        check_compatible(Path("step-00000100"), saved, two_groups)
    assert TrainingShape(world_size=2, settings=two_groups.settings).mismatches(two_groups) == []
    # This trainer's checkpoint (both groups), resumed without the text encoder: the keys, no older trainer blamed.
    current = TrainingShape(world_size=2, settings=two_groups.settings)
    with pytest.raises(ConfigError) as refused:
        check_compatible(Path("step-00000100"), current, run(training__train_text_encoder=False, optimizer__param_groups=1))
    assert "training.train_text_encoder = true (this run: false)" in str(refused.value)
    assert "optimizer.param_groups = 2 (this run: 1)" in str(refused.value) and "older than" not in str(refused.value)


def test_another_base_architecture_is_refused_by_its_trained_parameters(tmp_path):
    """A changed model.source with other layer sizes fails DeepSpeed's load like a
    corrupt file would: the trained parameters' names and shapes tell the two apart."""
    from diffusers import UNet2DConditionModel

    components = build_tiny_components()
    denoiser = DreamBoothDenoiser(components["unet"])
    assert trained_parameters(denoiser) == trained_parameters(DreamBoothDenoiser(build_tiny_components()["unet"]))
    wider = UNet2DConditionModel.from_config({**components["unet"].config, "block_out_channels": (32, 96)})
    elements = sum(parameter.numel() for parameter in denoiser.parameters())
    assert trained_parameters(denoiser).startswith(f"{elements:,} in {len(list(denoiser.parameters()))} tensors, layout ")
    assert trained_parameters(DreamBoothDenoiser(wider)) != trained_parameters(denoiser)
    # A frozen part is not trained: it does not count.
    denoiser.unet.conv_in.requires_grad_(False)
    assert trained_parameters(denoiser).startswith(f"{elements - components['unet'].conv_in.weight.numel() - 32:,} in ")

    settings = {"deepspeed.zero_stage": 2, "training.precision": "bf16", "training.train_text_encoder": False, "lora.rank": 0}
    saved = TrainingShape(world_size=2, settings=settings, parameters=trained_parameters(DreamBoothDenoiser(wider)))
    run = TrainingShape(world_size=2, settings=settings, parameters=trained_parameters(DreamBoothDenoiser(components["unet"])))
    with pytest.raises(ConfigError, match=r"trains other parameters \(.+\) than this run \(.+\): model.source is another "
                                          r"architecture .+ resume with that model, or set checkpoint.resume=never"):
        check_compatible(tmp_path, saved, run)
    check_compatible(tmp_path, run, run)
    check_compatible(tmp_path, TrainingShape(world_size=2, settings=settings), run)  # not recorded: not compared


def test_a_manifest_from_before_the_shape_check_is_compared_on_what_it_has(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"step": 3, "world_size": 2, "zero_stage": 2, "files": {}}))
    older = Manifest.read(tmp_path).shape
    assert older.settings == {"deepspeed.zero_stage": 2, "lora.rank": 0}
    run = TrainingShape(world_size=2, settings={"deepspeed.zero_stage": 2, "training.precision": "bf16",
                                               "training.train_text_encoder": False, "lora.rank": 0})
    assert older.mismatches(run) == []


@pytest.mark.parametrize("source, lora_rank", [("stable-diffusion-v1-5/stable-diffusion-v1-5", 8), ("tiny", 0)])
def test_the_model_card_says_what_was_trained_from_what_and_how_to_load_it(tmp_path, source, lora_rank):
    from huggingface_hub import ModelCard

    config = validate_config(tiny_config(tmp_path, model={"source": source}, lora={"rank": lora_rank},
                                         training={"train_text_encoder": True}))
    card = ModelCard(model_card(config, {"final_step": 800, "world_size": 16, "precision": "fp16", "zero_stage": 2,
                                         "pipeline": "StableDiffusionPipeline"}))
    assert card.data.library_name == "diffusers" and card.data.instance_prompt == "a photo of sks robot"
    assert card.data.base_model == (source if source != "tiny" else None)  # only a hub id is a Hub base model
    assert ("lora" in card.data.tags) is bool(lora_rank) and "dreambooth" in card.data.tags
    assert "800 steps" in card.text and "fp16, DeepSpeed ZeRO-2" in card.text
    assert 'prior preservation with 4 images of "a photo of a robot"' in card.text
    assert ('load_lora_weights("PATH_OR_REPO", weight_name="pytorch_lora_weights.safetensors")' in card.text) is bool(lora_rank)
    assert "learning rate 0.001 (constant)" in card.text
    assert "## Samples" not in card.text  # no validation grid: none shown
    sampled = validate_config(tiny_config(tmp_path, validation={"every_steps": 100, "prompts": ["a", "b c"],
                                                                "scheduler": "DPMSolverMultistepScheduler"}))
    text = model_card(sampled, {"final_step": 800, "world_size": 1, "precision": "bf16", "zero_stage": 2,
                                "pipeline": "StableDiffusionPipeline", "samples": "samples.png"})
    assert ('![Samples of the exported weights at step 800: "a", "b c" (1 per prompt, seeds from 0; 25 steps of '
            'DPMSolverMultistepScheduler)](samples.png)') in text


def test_scale_lr_multiplies_each_group_by_the_images_of_a_step(tmp_path):
    from trainer.engine import group_learning_rates
    from trainer.model_card import model_card

    settings = {"learning_rate": 1e-6, "text_encoder_learning_rate": 5e-7, "train_text_encoder": True, "batch_size": 2,
                "gradient_accumulation": 3}
    plain = validate_config(tiny_config(tmp_path, training=settings))
    scaled = validate_config(tiny_config(tmp_path, training={**settings, "scale_lr": True}))
    assert group_learning_rates(plain, world_size=16) == [1e-6, 5e-7]
    assert group_learning_rates(scaled, world_size=16) == pytest.approx([96e-6, 48e-6])
    card = model_card(scaled, {"final_step": 800, "world_size": 16, "precision": "fp16", "zero_stage": 2,
                               "pipeline": "StableDiffusionPipeline"})
    assert "learning rate 9.6e-05 (1e-06 x 2 x 3 x 16, scaled by the images of a step)" in card
    from trainer.distributed import Runtime
    from trainer.loop import rate_now

    runtime = Runtime(rank=0, local_rank=0, world_size=16, device=torch.device("cpu"))
    assert rate_now(plain, runtime) == "1e-06"  # what a divergence's message tells to lower
    assert rate_now(scaled, runtime) == "1e-06, 9.6e-05 as training.scale_lr scaled it"


def test_sdxl_denoiser_conditions_on_both_encoders_the_pooled_prompt_and_the_size_ids():
    from trainer.conditioning import encode_prompt, size_ids, tokenize
    from trainer.models import build_components
    from trainer.objective import build_denoiser

    components = build_components("tiny-sdxl", None)
    module = build_denoiser(components, train_text_encoder=True, gradient_checkpointing=False, device=torch.device("cpu"))
    ids = torch.stack([tokenize(components.tokenizers, "a photo of sks robot")] * 2)
    with torch.no_grad():
        embeddings = encode_prompt(components.text_encoders, ids)
    # Both encoders' hidden states side by side (32 + 32), the second's pooled projection.
    assert ids.shape == (2, 2, 77)
    assert embeddings.hidden_states.shape == (2, 77, 64) and embeddings.pooled.shape == (2, 32)
    noisy, timesteps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 500])
    square = torch.stack([size_ids((64, 64), (0, 0), 64)] * 2)
    prediction = module(noisy, timesteps, input_ids=ids, time_ids=square)
    with torch.no_grad():
        # A crop of a larger photo is another conditioning.
        cropped = module(noisy, timesteps, input_ids=ids, time_ids=torch.stack([size_ids((96, 128), (16, 32), 64)] * 2))
        # Frozen encoders' output passed in (the loop's cache) is the same conditioning.
        frozen = DreamBoothDenoiser(components.unet)(noisy, timesteps, encoder_hidden_states=embeddings.hidden_states,
                                                      pooled_embeds=embeddings.pooled, time_ids=square)
    assert not torch.allclose(prediction, cropped)
    torch.testing.assert_close(frozen, prediction)
    prediction.square().mean().backward()
    for name in ("unet", "text_encoder", "text_encoder_2"):
        assert any(parameter.grad is not None for parameter in getattr(module, name).parameters()), name


def test_an_sdxl_folder_is_recognised_and_one_without_its_second_tokenizer_is_refused(tmp_path):
    import shutil

    from trainer.export import build_pipeline
    from trainer.models import build_components, load_pipeline_folder

    folder = tmp_path / "xl"
    build_pipeline(build_components("tiny-sdxl", None)).save_pretrained(folder)
    loaded = load_pipeline_folder(folder, "example-org/xl")
    assert loaded.is_sdxl and len(loaded.tokenizers) == 2
    assert type(loaded.inference_scheduler).__name__ == "EulerDiscreteScheduler"
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(ConfigError, match=f"model.source = 'example-org/xl' \\(fetched to {folder}\\) .* missing tokenizer_2$"):
        load_pipeline_folder(folder, "example-org/xl")
    # The refiner's layout: the second text encoder only.
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(ConfigError, match="missing text_encoder, tokenizer_2; an SDXL refiner"):
        load_pipeline_folder(folder, "example-org/xl")


def test_the_native_resolution_is_the_unet_sample_size_in_pixels():
    from types import SimpleNamespace

    from trainer.models import Components

    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=(128, 256, 512, 512)))  # 3 downsamplings: 8x
    for sample_size, pixels in ((64, 512), (96, 768), (128, 1024)):  # SD 1.5, SD 2, SDXL unet/config.json
        unet = SimpleNamespace(config=SimpleNamespace(sample_size=sample_size))
        parts = Components(unet=unet, vae=vae, text_encoder=None, tokenizer=None, noise_scheduler=None,
                           inference_scheduler=None)
        assert parts.native_resolution == pixels


@pytest.mark.parametrize("source, latents_mean", [("tiny", None), ("tiny-sdxl", None), ("tiny-sdxl", [0.5, -0.5, 0.25, 0.0])])
def test_images_decoded_apart_from_the_denoising_are_the_pipelines_own(source, latents_mean):
    """Class images and samples stop the pipeline at its latents and decode them outside
    fp16 autocast (SDXL's VAE overflows in fp16): the same images as the pipeline's own
    decode (with SDXL's optional latent mean and std too)."""
    from trainer.export import build_pipeline
    from trainer.generation import generate_images
    from trainer.models import build_components

    components = build_components(source, None)
    if latents_mean is not None:
        config = {key: value for key, value in components.vae.config.items() if key != "_use_default_values"}
        vae = type(components.vae).from_config({**config, "latents_mean": latents_mean, "latents_std": [2.0, 1.0, 0.5, 1.5]})
        vae.load_state_dict(components.vae.state_dict())
        assert vae.config.latents_mean == latents_mean
        components.vae = vae
    pipeline = build_pipeline(components)
    pipeline.set_progress_bar_config(disable=True)
    prompts = ["a photo of a robot", "a photo of sks robot"]

    def seeds():
        return [torch.Generator().manual_seed(seed) for seed in (3, 4)]

    # Drawn before the models are frozen: the weights require grad, and must again after.
    for model in (pipeline.unet, pipeline.text_encoder):
        model.requires_grad_(True)
    cast_cache_on = []
    pipeline.unet.register_forward_pre_hook(lambda module, args: cast_cache_on.append(torch.is_autocast_cache_enabled()))
    ours = generate_images(pipeline, prompts, num_inference_steps=2, resolution=64, generators=seeds(),
                           device=torch.device("cpu"))
    # Without autocast's cast cache, which would hold an fp16 copy of every such weight on CUDA.
    assert cast_cache_on and not any(cast_cache_on)
    assert all(weight.requires_grad for model in (pipeline.unet, pipeline.text_encoder) for weight in model.parameters())
    # Decoded one by one, the pipeline's own batch decode's pixels. Not always its bytes: on
    # some CPUs (AMD EPYC here) the batch of 2 takes other oneDNN kernels than a batch of 1,
    # a few 1e-6 apart, which can round a pixel to the next level. A decode that missed a
    # step (the scaling factor, SDXL's latent mean and std) is off by far more.
    theirs = pipeline(prompts, num_inference_steps=2, height=64, width=64, generator=seeds()).images
    differences = [np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)) for a, b in zip(ours, theirs)]
    assert len(ours) == len(theirs) == 2 and all(d.shape == (64, 64, 3) for d in differences)
    assert max(d.max() for d in differences) <= 1 and sum((d > 0).sum() for d in differences) < 20
    assert ours[0].tobytes() != ours[1].tobytes()


def test_an_inpainting_model_is_refused_by_name_before_its_weights_are_read(tmp_path):
    """Its UNet takes 9 channels (latents, mask, masked image): the first step would fail on a shape."""
    from trainer.export import build_pipeline
    from trainer.models import build_components, load_pipeline_folder

    parts = build_components("tiny", None)
    inpainting = type(parts.unet).from_config({**parts.unet.config, "in_channels": 9})
    build_pipeline(parts, unet=inpainting).save_pretrained(tmp_path / "inpainting")
    with pytest.raises(ConfigError, match="its UNet takes 9 input channels, not the VAE's 4 latent channels: an inpainting"):
        load_pipeline_folder(tmp_path / "inpainting", "example-org/inpainting")


def test_a_file_is_written_under_a_temporary_name_no_other_pod_uses(tmp_path):
    """Pods have PID namespaces of their own, so two writers of one shared folder (jobs
    sharing class images) may have the same PID: the pod's hostname tells them apart."""
    import os
    import socket

    from trainer.atomic import _replace

    seen = []
    _replace(tmp_path / "class-00000.png", lambda handle: seen.extend(os.listdir(tmp_path)) or handle.write(b"png"))
    assert seen == [f".class-00000.png.tmp-{socket.gethostname()}-{os.getpid()}"]
    assert os.listdir(tmp_path) == ["class-00000.png"] and (tmp_path / "class-00000.png").read_bytes() == b"png"
