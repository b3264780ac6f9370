"""Real training: 2 ranks under torchrun, real DeepSpeed (CPU accelerator, gloo, bf16)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from huggingface_hub import ModelCard

from tests.conftest import run_trainer, tiny_config, write_config
from tests.trainer.shared_runs import eager_zero_2_fp32_run
from tests.trainer.test_shard_globals import assert_deepspeed_files_load_with_weights_only
from trainer import checkpoint
from trainer.models import build_components


def read_run(root):
    return json.loads((root / "model" / "run.json").read_text())


def json_events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def assert_exports_a_loadable_pipeline(root, *, train_text_encoder: bool, source: str = "tiny") -> DiffusionPipeline:
    """diffusers loads the exported folder and draws with it; the UNet is trained, in
    fp32; the VAE is the base's, and so are the text encoders unless they were trained."""
    pipeline = DiffusionPipeline.from_pretrained(root / "model")
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a photo of sks robot", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert ModelCard.load(root / "model" / "README.md").data.instance_prompt == "a photo of sks robot"
    base = build_components(source, None)
    assert pipeline.unet.dtype == torch.float32
    assert not weights_equal(pipeline.unet, base.unet)
    assert weights_equal(pipeline.vae, base.vae)
    for name in ("text_encoder", "text_encoder_2")[:len(base.text_encoders)]:
        assert weights_equal(getattr(pipeline, name), getattr(base, name)) is not train_text_encoder, name
    return pipeline


def assert_a_complete_zero_run(root, *, zero_stage: int, max_steps: int, precision: str, train_text_encoder: bool):
    run = read_run(root)
    assert run["final_step"] == max_steps and run["resumed_from_step"] is None
    assert run["world_size"] == 2 and run["zero_stage"] == zero_stage and run["precision"] == precision
    assert run["wall_seconds"] > 0 and run["samples_per_second"] > 0
    assert_exports_a_loadable_pipeline(root, train_text_encoder=train_text_encoder)
    # What resuming them checks and loads: their DeepSpeed files name only DEEPSPEED_GLOBALS (resumes: test_resume.py).
    for folder in checkpoint.complete_checkpoints(root / "checkpoints"):
        assert_deepspeed_files_load_with_weights_only(folder)


# ZeRO-2 with the text encoder trained is the learning test's run below; with it frozen,
# the test after this one.
@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, train_text_encoder, extra", [
    (3, False, {}),  # ZeRO-3 with the text encoders trained: the SDXL test below
    # The recipe's loss options: Min-SNR weighting and offset noise.
    (0, True, {"snr_gamma": 5.0, "noise_offset": 0.1}),
    # Micro-batches of 2, two of them per optimizer step, activations recomputed.
    (1, True, {"batch_size": 2, "gradient_accumulation": 2, "gradient_checkpointing": True}),
])
def test_zero_runs_complete_and_export_a_loadable_pipeline(tiny_root, zero_stage, train_text_encoder, extra):
    config = tiny_config(tiny_root, deepspeed={"zero_stage": zero_stage},
                         training={"max_steps": 4, "train_text_encoder": train_text_encoder, **extra})
    result = run_trainer(write_config(tiny_root, config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert_a_complete_zero_run(tiny_root, zero_stage=zero_stage, max_steps=4, precision="bf16",
                               train_text_encoder=train_text_encoder)


@pytest.mark.slow
def test_a_zero_2_run_with_the_text_encoder_frozen_completes_and_exports_a_loadable_pipeline(tmp_path_factory):
    """The run is the eager reference of the compiled-UNet test (shared_runs.py), in fp32."""
    shared = eager_zero_2_fp32_run(tmp_path_factory)
    assert_a_complete_zero_run(shared.root, zero_stage=2, max_steps=3, precision="fp32", train_text_encoder=False)


@pytest.mark.slow
def test_sdxl_from_a_local_folder_trains_both_text_encoders_under_zero_3_and_exports_an_xl_pipeline(tiny_root, tmp_path):
    """SDXL: two text encoders, the pooled prompt and the size ids. The source is the
    tiny-sdxl model saved as a diffusers folder (found to be SDXL by its model_index.json);
    ZeRO-3 partitions the UNet and both encoders; class images and samples come from the
    XL pipeline."""
    from trainer.export import build_pipeline

    base_folder = tmp_path / "sdxl-base"
    build_pipeline(build_components("tiny-sdxl", None)).save_pretrained(base_folder)
    # From a folder the trainer keeps DeepSpeed's persistence threshold, under which every
    # tensor of the tiny model stays whole: 0 as for the built-in ones, so ZeRO-3 partitions.
    config = tiny_config(tiny_root, model={"source": str(base_folder)},
                         deepspeed={"zero_stage": 3,
                                    "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
                         training={"max_steps": 4, "train_text_encoder": True},
                         validation={"every_steps": 4, "num_inference_steps": 2})
    result = run_trainer(write_config(tiny_root, config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    run = read_run(tiny_root)
    assert run["pipeline"] == "StableDiffusionXLPipeline" and run["zero_stage"] == 3 and run["world_size"] == 2
    assert run["class_images_generated"] == 4 and (tiny_root / "samples" / "step-00000004.png").is_file()
    assert run["instance_eval_loss_after"] < run["instance_eval_loss_before"], run

    pipeline = assert_exports_a_loadable_pipeline(tiny_root, train_text_encoder=True, source="tiny-sdxl")
    assert type(pipeline).__name__ == "StableDiffusionXLPipeline"
    card = ModelCard.load(tiny_root / "model" / "README.md")
    assert "StableDiffusionXLPipeline.from_pretrained" in card.text and "stable-diffusion-xl" in card.data.tags
    assert "both text encoders" in card.text
    # The card shows the grid of the exported weights, copied beside it.
    assert (tiny_root / "model" / "samples.png").read_bytes() == (tiny_root / "samples" / "step-00000004.png").read_bytes()
    assert '![Samples of the exported weights at step 4: "a photo of sks robot" (1 per prompt' in card.text
    assert read_run(tiny_root)["samples"] == "samples.png"


@pytest.mark.slow
def test_the_model_learns_its_subject_with_prior_preservation_and_class_images_are_made_once(tiny_root):
    config = tiny_config(
        tiny_root,
        data={"num_class_images": 6},
        deepspeed={"zero_stage": 2},
        training={"max_steps": 24, "learning_rate": 1e-3, "train_text_encoder": True},
        checkpoint={"every_steps": 8, "keep_last": 2},
        logging={"format": "json"},
    )
    path = write_config(tiny_root, config)
    result = run_trainer(path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    run = read_run(tiny_root)
    assert run["zero_stage"] == 2 and run["world_size"] == 2 and run["train_text_encoder"] is True
    # Denoising loss on the instance photos, fixed noise and timesteps, before vs after.
    assert run["instance_eval_loss_after"] < 0.5 * run["instance_eval_loss_before"], run
    assert_exports_a_loadable_pipeline(tiny_root, train_text_encoder=True)

    events = json_events(result.stdout)
    steps = [event for event in events if event["event"] == "step"]
    assert [event["step"] for event in steps] == list(range(1, 25))
    assert all(event["prior_loss"] is not None and event["prior_loss"] > 0 for event in steps)
    assert all(event["loss"] == pytest.approx(event["instance_loss"] + event["prior_loss"], rel=1e-6) for event in steps)

    # Six class images, three made by each rank.
    made = {event["rank"]: event["generated"] for event in events if event["event"] == "class images"}
    assert made == {0: 3, 1: 3} and run["class_images_generated"] == 6
    class_dir = tiny_root / "class-images"
    stamps = {path.name: path.stat().st_mtime_ns for path in class_dir.iterdir()}
    assert len(stamps) == 6

    # Retention kept the last two checkpoints, `latest` names the newest.
    assert sorted(path.name for path in (tiny_root / "checkpoints").glob("step-*")) == ["step-00000016", "step-00000024"]
    assert (tiny_root / "checkpoints" / "latest").read_text() == "step-00000024"

    # A second run: no class image is regenerated, training continues from the checkpoint.
    again = run_trainer(path, extra=["--set", "training.max_steps=26"])
    assert again.returncode == 0, again.stderr[-5000:]
    made = {event["rank"]: event["generated"] for event in json_events(again.stdout) if event["event"] == "class images"}
    assert made == {0: 0, 1: 0}
    assert {path.name: path.stat().st_mtime_ns for path in class_dir.iterdir()} == stamps
    rerun = read_run(tiny_root)
    assert rerun["resumed_from_step"] == 24 and rerun["final_step"] == 26 and rerun["class_images_generated"] == 0



@pytest.mark.slow
def test_scale_lr_and_the_schedule_set_the_rate_each_step_trains_at(tmp_path):
    """training.scale_lr, as diffusers' --scale_lr: the peak rate is learning_rate times the
    instance images of one step (1 x 2 accumulated x 2 processes); the schedule (here
    polynomial, power 2) decays it from there."""
    root = tmp_path / "run"
    config = tiny_config(root, training={"max_steps": 2, "learning_rate": 1e-4, "scale_lr": True,
                                         "gradient_accumulation": 2, "lr_scheduler": "polynomial", "lr_power": 2.0},
                         data={"class_prompt": None, "class_dir": None}, logging={"format": "json"})
    result = run_trainer(write_config(root, config))
    assert result.returncode == 0, result.stderr[-4000:]
    steps = [event for event in json_events(result.stdout) if event["event"] == "step"]
    assert [step["learning_rate"] for step in steps] == pytest.approx([4e-4, 4e-4 * (1 - 1 / 2) ** 2])
    assert read_run(root)["learning_rate"] == pytest.approx(4e-4)
    card = ModelCard.load(root / "model" / "README.md")
    assert "learning rate 0.0004 (0.0001 x 1 x 2 x 2, scaled by the images of a step)" in card.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: fp16 with dynamic loss scaling (CPU twin: bf16 runs above)")
@pytest.mark.parametrize("source, lora", [("tiny", {}), ("tiny", {"rank": 4}), ("tiny", {"rank": 4, "use_dora": True}),
                                          ("tiny-sdxl", {}), ("tiny-sdxl", {"rank": 4})])
def test_fp16_on_cuda(tiny_root, source, lora):
    config = tiny_config(tiny_root, model={"source": source}, lora=lora,
                         training={"max_steps": 4, "precision": "fp16", "train_text_encoder": True})
    result = run_trainer(write_config(tiny_root, config), nproc=1)
    assert result.returncode == 0, result.stderr[-5000:]
    assert read_run(tiny_root)["precision"] == "fp16" and read_run(tiny_root)["lora_rank"] == lora.get("rank", 0)
    assert_exports_a_loadable_pipeline(tiny_root, train_text_encoder=True, source=source)


@pytest.mark.slow
def test_a_local_diffusers_folder_is_a_model_source(tiny_root, tmp_path):
    """Export the tiny model as a pipeline folder, then fine-tune from that folder; the
    export in fp16 (output.dtype), half the size."""
    from trainer.export import build_pipeline

    base = tmp_path / "base-model"
    parts = build_components("tiny", None)
    build_pipeline(parts).save_pretrained(base)
    config = tiny_config(tiny_root, model={"source": str(base)}, data={"class_prompt": None, "class_dir": None},
                         training={"max_steps": 2}, output={"dtype": "fp16"})
    config_path = write_config(tiny_root, config)
    result = run_trainer(config_path, nproc=0)
    assert result.returncode == 0, result.stderr[-5000:]
    assert read_run(tiny_root)["world_size"] == 1 and read_run(tiny_root)["output_dtype"] == "fp16"
    exported = StableDiffusionPipeline.from_pretrained(tiny_root / "model", dtype=torch.float16)
    assert exported.unet.config.sample_size == 8 and exported.unet.dtype == exported.vae.dtype == torch.float16
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (tiny_root / "model" / weights).stat().st_size < 0.55 * (base / weights).stat().st_size
    assert "from_pretrained(\"PATH_OR_REPO\", dtype=torch.float16)" in (tiny_root / "model" / "README.md").read_text()

    # The same job pointed at a base of another architecture: its checkpoint cannot load
    # there. Refused by name; before, the load error made it look corrupt, the run started
    # over, and retention deleted the progress.
    wider = tmp_path / "wider-model"
    unet = type(parts.unet).from_config({**parts.unet.config, "block_out_channels": (32, 96)})
    build_pipeline(parts, unet=unet).save_pretrained(wider)
    other = run_trainer(config_path, nproc=0, extra=["--set", f"model.source={wider}", "--set", "training.max_steps=4"])
    assert other.returncode == 2, other.stderr[-5000:]
    assert "trains other parameters" in other.stderr and "model.source is another architecture" in other.stderr
    assert read_run(tiny_root)["final_step"] == 2 and (tiny_root / "checkpoints" / "step-00000002").is_dir()


@pytest.mark.parametrize("source, message", [
    ("/nonexistent/sd15", "no such folder"),
    ("some-org/some-model", "cannot be reached (offline?)"),
])
def test_unavailable_model_source_is_a_clear_error(tiny_root, monkeypatch, source, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tiny_root / "hf-home"))
    config = tiny_config(tiny_root, model={"source": source})
    result = run_trainer(write_config(tiny_root, config), nproc=0, timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"model.source = {source!r}" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tiny_root / "model").exists()


def test_ctrl_c_asks_for_a_checkpoint_as_sigterm_does_and_a_second_one_stops_at_once():
    from trainer.signals import StopFlag

    before = {signum: signal.getsignal(signum) for signum in StopFlag.SIGNALS}
    stop = StopFlag(grace_seconds=60)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs in the main thread between two bytecodes
        assert stop() and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        stop.close()  # the grace-period watchdog would end this process
    assert {signum: signal.getsignal(signum) for signum in StopFlag.SIGNALS} == before

