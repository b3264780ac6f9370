"""LoRA (`lora.rank > 0`): adapters are all that is trained, checkpointed and resumed;
the export is a fused pipeline plus the adapter file diffusers loads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from tests.conftest import run_trainer, tiny_config, write_config
from tests.trainer.test_resume import launch, resume_config, step_losses
from trainer.conditioning import encode_prompt, size_ids, unet_conditioning
from trainer.config import LORA_WEIGHTS_FILE
from trainer.export import build_pipeline
from trainer.models import build_components

LORA = {"rank": 4, "alpha": 8}


def denoise(pipeline, prompt_ids: torch.Tensor) -> torch.Tensor:
    """One UNet prediction through the pipeline's text encoders (SDXL's two): what its weights compute."""
    encoders = [module for module in (pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)) if module is not None]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeddings = encode_prompt(encoders, prompt_ids[:, None].expand(-1, len(encoders), -1))
        conditioning = unet_conditioning(embeddings, size_ids((64, 64), (0, 0), 64)[None])
        return pipeline.unet(latents, torch.tensor([500]), **conditioning).sample


def changed_weights(module: torch.nn.Module, base: torch.nn.Module) -> set[str]:
    base_state = base.state_dict()
    return {name for name, value in module.state_dict().items() if not torch.equal(value, base_state[name])}


def test_a_misspelt_target_beside_good_ones_is_refused_before_anything_is_generated():
    from trainer.config import ConfigError, LoraConfig
    from trainer.lora import check_targets

    for source in ("tiny", "tiny-sdxl"):  # the defaults name modules of both models, SDXL's two encoders included
        check_targets(build_components(source, None), LoraConfig(rank=4), train_text_encoder=True)
    components = build_components("tiny", None)
    # peft alone would adapt to_q and drop to_kk without a word.
    with pytest.raises(ConfigError, match=r"lora.unet_target_modules = \['to_q', 'to_kk'\]: no module named 'to_kk'"):
        check_targets(components, LoraConfig(rank=4, unet_target_modules=["to_q", "to_kk"]), train_text_encoder=False)
    text_targets = LoraConfig(rank=4, text_encoder_target_modules=["q_proj", "query"])
    check_targets(components, text_targets, train_text_encoder=False)  # the text encoder gets none
    with pytest.raises(ConfigError, match=r"lora.text_encoder_target_modules = .*: no module named 'query'"):
        check_targets(components, text_targets, train_text_encoder=True)


@pytest.mark.slow
def test_lora_trains_checkpoints_and_resumes_only_the_adapters_and_exports_them_fused_and_as_a_file(tmp_path):
    straight = tmp_path / "straight"
    config = resume_config(straight, lora=LORA, training={"max_steps": 6, "train_text_encoder": True},
                           checkpoint={"every_steps": 3}, validation={"every_steps": 3, "num_inference_steps": 2})
    result = run_trainer(write_config(straight, config))
    assert result.returncode == 0, result.stderr[-4000:]
    reference = step_losses(result.stdout)
    # Samples drawn with the adapters fused into a fresh base, during training and at the end.
    assert sorted(path.name for path in (straight / "samples").iterdir()) == ["step-00000003.png", "step-00000006.png"]
    run = json.loads((straight / "model" / "run.json").read_text())
    assert run["lora_rank"] == 4 and run["final_step"] == 6
    assert run["instance_eval_loss_after"] < run["instance_eval_loss_before"]

    # The checkpoint holds the adapters only: no frozen base weight is written.
    step3 = straight / "checkpoints" / "step-00000003"
    saved = torch.load(step3 / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert saved and all(".lora_A." in name or ".lora_B." in name for name in saved)
    assert sum(value.numel() for value in saved.values()) == run["trained_parameters"]
    settings = json.loads((step3 / "manifest.json").read_text())["settings"]
    assert {key: settings[key] for key in ("lora.rank", "lora.alpha", "lora.unet_target_modules")} == {
        "lora.rank": 4, "lora.alpha": 8.0, "lora.unet_target_modules": ["to_k", "to_q", "to_v", "to_out.0"]}

    # Resumed from step 3 (base weights rebuilt from model.source), steps 4-6 repeat exactly.
    resumed = tmp_path / "resumed"
    shutil.copytree(step3, resumed / "checkpoints" / step3.name)
    config = resume_config(resumed, lora=LORA, training={"max_steps": 6, "train_text_encoder": True},
                           checkpoint={"every_steps": 3, "resume": str(resumed / "checkpoints" / step3.name)})
    result = run_trainer(write_config(resumed, config))
    assert result.returncode == 0, result.stderr[-4000:]
    assert step_losses(result.stdout) == {step: loss for step, loss in reference.items() if step > 3}

    # A run that trains all weights does not take the adapters for a model.
    full = launch(write_config(straight, resume_config(straight, training={"max_steps": 6, "train_text_encoder": True})))
    _, errors = full.communicate(timeout=300)
    assert full.returncode == 2, errors[-4000:]
    assert "was written with lora.rank = 4 (this run: 0), which DeepSpeed cannot load across" in errors

    # The fused pipeline: only the adapted projections moved, from the fp32 base (not a
    # bf16 working copy); the VAE is the base's.
    exported = StableDiffusionPipeline.from_pretrained(straight / "model")
    base = build_components("tiny", None)  # the tiny model, as the run built it
    unet_changed = changed_weights(exported.unet, base.unet)
    assert unet_changed and all(name.rsplit(".", 2)[-2] in {"to_q", "to_k", "to_v", "0"} for name in unet_changed)
    text_changed = changed_weights(exported.text_encoder, base.text_encoder)
    assert text_changed and all(name.rsplit(".", 2)[-2].endswith("_proj") for name in text_changed)
    assert not changed_weights(exported.vae, base.vae)

    # The adapter file on the base model computes what the fused pipeline computes (its
    # metadata carries alpha = 8, scale 2: read with the default scale 1 it would differ).
    assert (straight / "model" / LORA_WEIGHTS_FILE).stat().st_size < 200_000
    on_base = build_pipeline(base)
    prompt_ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(2))
    untrained = denoise(on_base, prompt_ids)
    on_base.load_lora_weights(straight / "model", weight_name=LORA_WEIGHTS_FILE)
    with_adapters = denoise(on_base, prompt_ids)
    assert not torch.allclose(with_adapters, untrained, atol=1e-4)
    torch.testing.assert_close(denoise(exported, prompt_ids), with_adapters, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_sdxl_lora_under_zero_3_with_recomputed_activations_exports_loadable_adapters(tiny_root, use_dora):
    """SDXL, whose LoRA file holds three parts. ZeRO-3 partitions the frozen base weights
    too, and gradient checkpointing recomputes the adapters' inputs: the adapters of the
    UNet and both text encoders still train and export. DoRA's magnitudes read the
    partitioned base weight outside its own layer's forward, and train all the same."""
    config = tiny_config(tiny_root, model={"source": "tiny-sdxl"}, lora={"rank": 2, "use_dora": use_dora},
                         deepspeed={"zero_stage": 3}, data={"class_prompt": None, "class_dir": None},
                         training={"max_steps": 2, "train_text_encoder": True, "gradient_checkpointing": True})
    result = run_trainer(write_config(tiny_root, config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    run = json.loads((tiny_root / "model" / "run.json").read_text())
    assert run["lora_use_dora"] is use_dora
    if use_dora:
        with safe_open(tiny_root / "model" / LORA_WEIGHTS_FILE, "pt") as saved:
            magnitudes = {key.split(".")[0] for key in saved.keys() if "lora_magnitude_vector" in key}
        assert magnitudes == {"unet", "text_encoder", "text_encoder_2"}
        # The magnitudes are weights of their own: a run without DoRA does not take the checkpoint.
        plain = launch(write_config(tiny_root, {**config, "lora": {"rank": 2}}))
        _, errors = plain.communicate(timeout=300)
        assert plain.returncode == 2, errors[-4000:]
        assert "lora.use_dora = true (this run: false)" in errors
    exported = DiffusionPipeline.from_pretrained(tiny_root / "model")
    base = build_components("tiny-sdxl", None)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        assert changed_weights(getattr(exported, name), getattr(base, name)), name
    with safe_open(tiny_root / "model" / LORA_WEIGHTS_FILE, "pt") as saved:
        assert {key.split(".")[0] for key in saved.keys()} == {"unet", "text_encoder", "text_encoder_2"}
    on_base = build_pipeline(base)
    on_base.load_lora_weights(tiny_root / "model", weight_name=LORA_WEIGHTS_FILE)
    prompt_ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(denoise(exported, prompt_ids), denoise(on_base, prompt_ids), atol=2e-5, rtol=1e-4)
