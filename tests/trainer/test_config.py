"""The config contract: keys, overrides, and one-paragraph errors with exit code 2."""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.conftest import INSTANCE_IMAGES, run_trainer, tiny_config, write_config
from trainer.config import LORA_LEARNING_RATE, ConfigError, TrainerConfig, TrainingConfig
from trainer.config_file import apply_overrides, load_config, validate_config
from trainer.contract import GPUS_PER_NODE_ENV
from trainer.distributed import devices_problem


def test_contract_keys_exist_with_their_names(tmp_path):
    config = validate_config(tiny_config(tmp_path))
    for dotted in [
        "model.source", "data.instance_dir", "data.instance_prompt", "data.class_prompt", "data.class_dir",
        "data.num_class_images", "data.resolution", "training.max_steps", "training.learning_rate",
        "training.batch_size", "training.gradient_accumulation", "training.prior_loss_weight",
        "training.train_text_encoder", "training.precision", "deepspeed.zero_stage", "checkpoint.dir",
        "checkpoint.every_steps", "checkpoint.keep_last", "checkpoint.resume", "output.dir", "metrics.port",
        "metrics.host",
    ]:
        section, key = dotted.split(".")
        assert key in type(getattr(config, section)).model_fields, dotted


def test_set_overrides_are_typed_and_nested(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path))
    config = load_config(path, ["training.max_steps=17", "training.learning_rate=3e-5", "deepspeed.zero_stage=3",
                                "deepspeed.overrides={zero_optimization: {reduce_bucket_size: 1000}}"])
    assert config.training.max_steps == 17
    assert config.training.learning_rate == pytest.approx(3e-5)
    assert config.deepspeed.zero_stage == 3
    assert config.deepspeed.overrides == {"zero_optimization": {"reduce_bucket_size": 1000}}


def test_relative_paths_become_absolute_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tiny_config(tmp_path, output={"dir": "out/model"})
    config = load_config(write_config(tmp_path, raw))
    assert config.output.dir == tmp_path / "out" / "model"


def test_metrics_host_defaults_to_pod_ip(tmp_path, monkeypatch):
    monkeypatch.setenv("POD_IP", "10.1.2.3")
    assert validate_config(tiny_config(tmp_path)).metrics.host == "10.1.2.3"
    monkeypatch.delenv("POD_IP")
    assert validate_config(tiny_config(tmp_path)).metrics.host == "0.0.0.0"


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"training": {"precision": "fp8"}}, ["training.precision", "'fp8'", "'fp16'", "'bf16'"]),
        ({"training": {"learning_rate": -1}}, ["training.learning_rate", "-1", "greater than 0"]),
        ({"training": {"max_stepz": 5}}, ["training.max_stepz: unknown key; did you mean training.max_steps?"]),
        ({"trainin": {"max_steps": 5}}, ["trainin: unknown key; did you mean training?"]),
        ({"data": {"instance_prompt": None}}, ["data.instance_prompt = None", "quote text"]),
        ({"deepspeed": {"zero_stage": 4}}, ["deepspeed.zero_stage", "4"]),
        ({"data": {"resolution": 70}}, ["data.resolution", "70", "multiple of 8"]),
        ({"data": {"class_dir": None}}, ["data.class_dir", "required", "class_prompt"]),
        ({"output": None}, ["output: required section is missing (it needs output.dir)", "--set output.dir=VALUE"]),
        ({"training": {"max_steps": "many"}}, ["training.max_steps", "'many'", "integer"]),
        ({"training": {"lr_warmup_steps": 100}}, ["training.lr_warmup_steps", "100", "max_steps"]),
        ({"validation": {"scheduler": "DPMSolver"}}, ["validation.scheduler", "'DPMSolver'", "'DPMSolverMultistepScheduler'"]),
        ({"training": {"lr_num_cycles": 3}},
         ["training.lr_num_cycles = 3 has no effect with training.lr_scheduler = constant",
          "set training.lr_scheduler: cosine_with_restarts"]),
        ({"training": {"lr_scheduler": "cosine", "lr_power": 2.0}},
         ["training.lr_power = 2.0 has no effect with training.lr_scheduler = cosine", "set training.lr_scheduler: polynomial"]),
        ({"training": {"text_encoder_learning_rate": 1e-5}},
         ["training.text_encoder_learning_rate = 1e-05", "training.train_text_encoder = true"]),
        ({"lora": {"rank": -4}}, ["lora.rank", "-4", "greater than or equal to 0"]),
        ({"lora": {"use_dora": True}}, ["lora.use_dora = True has no effect with lora.rank = 0", "set lora.rank"]),
        ({"lora": {"alpha": 16, "dropout": 0.0}}, ["lora.alpha = 16", "lora.rank = 0"]),
        ({"deepspeed": {"bucket_size": 4097}}, ["deepspeed.bucket_size", "4097", "multiple of 2"]),
        ({"lora": {"unet_target_modules": []}}, ["lora.unet_target_modules", "at least 1 item"]),
        # YAML's true is no number: diffusers' --offset_noise is a switch, and true would be 1.0.
        ({"training": {"noise_offset": True}}, ["training.noise_offset = True", "takes a value", "is 0.1"]),
        ({"training": {"snr_gamma": True}}, ["training.snr_gamma = True", "write the value itself"]),
        ({"deepspeed": {"zero_stage": True}}, ["deepspeed.zero_stage = True", "switch"]),
        ({"deepspeed": {"zero_stage": 0, "offload_optimizer": True}},
         ["deepspeed.offload_optimizer = true needs ZeRO", "set deepspeed.zero_stage to 1, 2 or 3"]),
    ],
)
def test_bad_values_name_the_key_and_the_value(tmp_path, change, expected):
    raw = tiny_config(tmp_path)
    for section, values in change.items():
        if values is None:
            raw.pop(section)
        else:
            raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError) as caught:
        validate_config(raw, "job.yaml")
    message = str(caught.value)
    assert "job.yaml" in message
    for fragment in expected:
        assert fragment in message


def test_lora_brings_its_own_default_learning_rate_but_keeps_a_set_one(tmp_path):
    raw = tiny_config(tmp_path, lora={"rank": 8})
    del raw["training"]["learning_rate"]
    config = validate_config(raw)
    assert config.training.learning_rate == LORA_LEARNING_RATE
    assert config.lora.scaled_alpha == 8.0
    assert validate_config(tiny_config(tmp_path, lora={"rank": 8}, training={"learning_rate": 5e-6})).training.learning_rate == 5e-6
    raw["lora"]["rank"] = 0
    assert validate_config(raw).training.learning_rate == TrainingConfig.model_fields["learning_rate"].default


def test_malformed_override_is_explained():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["training.max_steps"])


def test_json_schema_is_available_for_docs_and_the_operator():
    schema = TrainerConfig.model_json_schema()
    assert {"model", "data", "training", "deepspeed", "checkpoint", "output", "metrics"} <= set(schema["properties"])


BAD_CLI_CASES = {
    "unknown key": (["--set", "training.foo=1"], "training.foo"),
    "bad value": (["--set", "training.precision=fp64"], "training.precision"),
    "missing instance folder": (["--set", "data.instance_dir=/nonexistent/photos"], "/nonexistent/photos"),
    "empty instance folder": (["--set", "data.instance_dir={empty}"], "no images found"),
    "corrupt image": (["--set", "data.instance_dir={corrupt}"], "broken.jpg"),
    "fp16 on cpu": (["--set", "training.precision=fp16"], "needs a CUDA device"),
    "LoRA targets no module": (["--set", "lora.rank=4", "--set", "lora.unet_target_modules=[to_qq]"],
                               "lora.unet_target_modules = ['to_qq']"),
}


@pytest.mark.parametrize("case", sorted(BAD_CLI_CASES))
def test_cli_rejects_bad_input_with_exit_2_and_writes_no_output(tmp_path, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "good.png").write_bytes((INSTANCE_IMAGES / "robot-0.png").read_bytes())
    (corrupt / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    args, expected = BAD_CLI_CASES[case]
    args = [arg.format(empty=empty, corrupt=corrupt) for arg in args]
    config = write_config(tmp_path, tiny_config(tmp_path))
    result = run_trainer(config, nproc=0, extra=args, timeout=120)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "model").exists()


def test_a_gpu_job_that_sees_no_gpu_stops_before_training_on_cpu(tmp_path, monkeypatch):
    """What the operator sets on a GPU job's workers, on this CPU-only machine: exit 2 at
    once, naming what was expected, what was found and what to fix. Without it the same
    command trains on CPU (every CPU training test here)."""
    assert not torch.cuda.is_available()
    monkeypatch.setenv(GPUS_PER_NODE_ENV, "1")
    result = run_trainer(write_config(tmp_path, tiny_config(tmp_path)), nproc=0, timeout=120)
    assert result.returncode == 2, result.stderr
    assert (f"error: the job asks for 1 GPU(s) per node ({GPUS_PER_NODE_ENV}, from spec.workers.gpusPerNode), but "
            "this process (local rank 0 of 1) sees 0 CUDA device(s). Likely fixes: the node's NVIDIA device plugin "
            "and container runtime (the pod's runtimeClassName, e.g. nvidia); a pod limit nvidia.com/gpu of at "
            "least 1 (spec.workers.resources.limits)") in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "model").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("expected, found, local_rank, local_world_size, needed", [
    (8, 4, 0, 8, 8),  # nvidia.com/gpu limit below gpusPerNode
    (0, 1, 1, 2, 2),  # a plain torchrun with more processes than GPUs: not "invalid device ordinal"
    (0, 2, 2, 4, 4),
])
def test_too_few_gpus_for_the_node_s_processes_are_named(expected, found, local_rank, local_world_size, needed):
    problem = devices_problem(expected=expected, found=found, local_rank=local_rank, local_world_size=local_world_size)
    assert f"local rank {local_rank} of {local_world_size}) sees {found} CUDA device(s)" in problem
    assert f"nvidia.com/gpu of at least {needed} " in problem


@pytest.mark.parametrize("expected, found, local_rank, local_world_size", [
    (0, 0, 1, 2),  # a CPU run, as many processes as asked for
    (8, 8, 7, 8),
    (4, 8, 3, 4),  # more devices than needed
    (0, 2, 1, 2),  # a plain torchrun on a GPU machine
])
def test_enough_gpus_or_a_cpu_run_pass(expected, found, local_rank, local_world_size):
    assert devices_problem(expected=expected, found=found, local_rank=local_rank, local_world_size=local_world_size) is None


def test_cli_reports_a_missing_config_file(tmp_path):
    result = run_trainer(tmp_path / "nope.yaml", nproc=0, timeout=60)
    assert result.returncode == 2
    assert "nope.yaml: no such file" in result.stderr


def test_yaml_round_trip_of_the_example_config():
    from tests.conftest import REPO

    raw = yaml.safe_load((REPO / "examples" / "local-tiny.yaml").read_text())
    config = validate_config(raw, "examples/local-tiny.yaml")
    assert config.deepspeed.zero_stage == 2 and config.data.with_prior_preservation


def test_config_reference_doc_is_up_to_date():
    from tests.conftest import REPO
    import subprocess
    import sys

    check = subprocess.run([sys.executable, str(REPO / "scripts" / "render_config_reference.py"), "--check"])
    assert check.returncode == 0, "docs/config.md is stale: run python scripts/render_config_reference.py"


@pytest.mark.parametrize("key", ["checkpoint.dir", "output.dir", "data.class_dir"])
def test_a_folder_the_run_writes_is_checked_before_it_trains(tmp_path, key):
    from trainer.main import check_inputs

    section, field = key.split(".")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for path, expected in ((a_file, "exists and is not a folder"),
                           (a_file / "inside", f"{a_file} is a file, so no folder can be made there")):
        config = validate_config(tiny_config(tmp_path, **{section: {field: str(path)}}))
        with pytest.raises(ConfigError) as caught:
            check_inputs(config)
        assert f"{key} = {str(path)!r}: {expected}" in str(caught.value)
    # Folders that do not exist yet are made by the run.
    check_inputs(validate_config(tiny_config(tmp_path, **{section: {field: str(tmp_path / "new" / "folder")}})))


def test_a_checkpoint_named_to_resume_from_must_be_complete_before_anything_starts(tmp_path):
    from trainer.main import check_inputs

    for value in ("latest", str(tmp_path)):
        config = validate_config(tiny_config(tmp_path, checkpoint={"resume": value}))
        with pytest.raises(ConfigError) as caught:
            check_inputs(config)
        assert f"checkpoint.resume = {value!r}: not a complete checkpoint folder: unreadable manifest" in str(caught.value)
        assert "or set auto (the latest complete one) or never (start over)" in str(caught.value)
