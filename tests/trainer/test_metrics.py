"""Metrics through the registry and the real HTTP endpoint; port-in-use fails fast;
terminal progress bar; validation grid layout."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import socket
import struct
import termios
import threading
import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import run_trainer, tiny_config, write_config
from trainer import contract
from trainer import metrics as m
from trainer import progress
from trainer.config import ConfigError
from trainer.config_file import validate_config
from trainer.validation import image_grid, is_validation_step, samples_dir

LABELS = {"job": "sks-robot", "namespace": "team-a"}
STEP_VALUES = dict(step=7, max_steps=30, loss=0.5, instance_loss=0.3, prior_loss=0.2, learning_rate=1e-4,
                   samples_per_second=12.5, eta_seconds=3.0, samples=56)


def value(metrics: m.TrainerMetrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, {**metrics.labels, **labels})


def listening_socket() -> socket.socket:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    return taken


def read_available(fd: int) -> str:
    """Everything written to a pty so far (it hands it over in chunks)."""
    chunks = []
    while select.select([fd], [], [], 0.5)[0]:
        chunks.append(os.read(fd, 65536))
    return b"".join(chunks).decode()


def test_constant_labels_come_from_the_operator_env():
    assert m.constant_labels({"JOB_NAME": "sks-robot", "JOB_NAMESPACE": "team-a"}) == LABELS
    assert m.constant_labels({"JOB_NAME": "sks-robot"}) == {"job": "sks-robot"}
    assert m.constant_labels({}) == {}


@pytest.mark.parametrize("labels", [LABELS, {}])
def test_every_design_series_exists_from_the_start_with_the_constant_labels(labels):
    metrics = m.TrainerMetrics(max_steps=30, labels=labels)
    exposed = {sample.name: sample.labels for family in metrics.registry.collect() for sample in family.samples}
    for name in contract.METRIC_NAMES:
        key = name + "_count" if name in (contract.METRIC_STEP_SECONDS, contract.METRIC_CHECKPOINT_SECONDS) else name
        assert key in exposed, name
        assert {k: exposed[key][k] for k in labels} == labels
    assert value(metrics, contract.METRIC_MAX_STEPS) == 30
    assert value(metrics, contract.METRIC_STEP) == 0
    assert value(metrics, contract.METRIC_LOSS_SCALE) == 1.0
    assert value(metrics, contract.METRIC_SKIPPED_STEPS_TOTAL) == 0
    assert value(metrics, contract.METRIC_ETA_SECONDS) != value(metrics, contract.METRIC_ETA_SECONDS)  # NaN: not known yet (0 would say done)


def test_one_phase_at_a_time():
    metrics = m.TrainerMetrics(max_steps=3, labels=LABELS)
    assert metrics.phase == m.PHASE_STARTING
    metrics.set_phase(m.PHASE_CHECKPOINTING)
    assert {phase: value(metrics, contract.METRIC_PHASE, phase=phase) for phase in m.PHASES} == {
        phase: 1.0 if phase == m.PHASE_CHECKPOINTING else 0.0 for phase in m.PHASES
    }
    with pytest.raises(ValueError, match="unknown phase 'warming'"):
        metrics.set_phase("warming")


def test_logged_values_and_checkpoints_are_recorded():
    metrics = m.TrainerMetrics(max_steps=30, labels=LABELS)
    metrics.record_values(STEP_VALUES)
    metrics.record_checkpoint(step=6, seconds=1.5)
    assert value(metrics, contract.METRIC_LOSS) == 0.5 and value(metrics, contract.METRIC_INSTANCE_LOSS) == 0.3
    assert value(metrics, contract.METRIC_PRIOR_LOSS) == 0.2 and value(metrics, contract.METRIC_LEARNING_RATE) == 1e-4
    assert value(metrics, contract.METRIC_SAMPLES_PER_SECOND) == 12.5 and value(metrics, contract.METRIC_ETA_SECONDS) == 3.0
    assert value(metrics, contract.METRIC_CHECKPOINT_STEP) == 6
    assert value(metrics, contract.METRIC_CHECKPOINT_SECONDS + "_count") == 1 and value(metrics, contract.METRIC_CHECKPOINT_SECONDS + "_sum") == 1.5
    metrics.record_values({**STEP_VALUES, "prior_loss": None})
    assert value(metrics, contract.METRIC_PRIOR_LOSS) == 0.0


def test_a_resumed_run_continues_step_and_sample_counts():
    metrics = m.TrainerMetrics(max_steps=30, labels=LABELS)
    metrics.record_resume(step=15, samples=120)
    assert value(metrics, contract.METRIC_STEP) == 15 and value(metrics, contract.METRIC_SAMPLES_TOTAL) == 120
    assert value(metrics, contract.METRIC_CHECKPOINT_STEP) == 15
    metrics.record_position(step=16, samples=128)
    assert value(metrics, contract.METRIC_STEP) == 16 and value(metrics, contract.METRIC_SAMPLES_TOTAL) == 128


def test_endpoint_serves_the_registry_over_http():
    metrics = m.TrainerMetrics(max_steps=30, labels=LABELS)
    metrics.serve("127.0.0.1", 0)
    try:
        metrics.record_position(step=4, samples=32)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics.serving_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        families = {family.name: family for family in text_string_to_metric_families(text)}
        step = families[contract.METRIC_STEP].samples[0]
        assert step.value == 4 and step.labels == LABELS
        assert families["dreambooth_samples"].samples[0].value == 32  # the counter's family drops `_total`
    finally:
        metrics.close()
    assert metrics.serving_port is None


def test_a_finished_run_keeps_serving_its_end_state_until_the_linger_ends_or_a_sigterm():
    metrics = m.TrainerMetrics(max_steps=30, labels=LABELS)
    metrics.serve("127.0.0.1", 0)
    port = metrics.serving_port
    metrics.record_position(step=30, samples=240)
    scraped = []
    scraper = threading.Timer(0.3, lambda: scraped.append(urllib.request.urlopen(
        f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()))
    scraper.start()
    started = time.monotonic()
    metrics.close(linger_seconds=1.0)
    scraper.join()
    assert time.monotonic() - started >= 1.0
    assert f"{contract.METRIC_STEP}{{" in scraped[0] and "30.0" in scraped[0]  # a scrape during the linger sees the last step

    metrics.serve("127.0.0.1", 0)
    sigterm_at = time.monotonic() + 0.3
    started = time.monotonic()
    metrics.close(linger_seconds=60.0, stop_requested=lambda: time.monotonic() >= sigterm_at)
    assert time.monotonic() - started < 5  # the pod is going away: no minute-long wait


def test_a_taken_port_is_a_config_error_naming_port_and_key():
    taken = listening_socket()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=rf"metrics.port = {port}: 127.0.0.1:{port} is already in use"):
            m.TrainerMetrics(max_steps=3).serve("127.0.0.1", port)
    finally:
        taken.close()


def test_trainer_exits_at_once_when_its_metrics_port_is_taken(tiny_root):
    # One process: under torchrun rank 0 fails the same way at once, but torchrun then
    # needs ~30 s to end rank 1, which sits in init_process_group (C++, deaf to SIGTERM)
    # until its SIGKILL; that would only time torchrun.
    nproc = 0
    taken = listening_socket()
    port = taken.getsockname()[1]
    try:
        config = tiny_config(tiny_root, metrics={"port": port, "host": "127.0.0.1"})
        started = time.monotonic()
        result = run_trainer(write_config(tiny_root, config), nproc=nproc, timeout=120)
        seconds = time.monotonic() - started
    finally:
        taken.close()
    output = result.stdout + result.stderr
    assert f"metrics.port = {port}: 127.0.0.1:{port} is already in use" in output, output[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 2, output[-3000:]
    assert seconds < 60, seconds
    assert not (tiny_root / "checkpoints").exists()


def test_validation_steps_samples_folder_and_grid(tmp_path):
    config = validate_config(tiny_config(tmp_path, training={"max_steps": 25}, validation={"every_steps": 10}))
    assert [step for step in range(1, 26) if is_validation_step(config, step)] == [10, 20, 25]
    assert samples_dir(config) == tmp_path / "samples"
    assert not is_validation_step(validate_config(tiny_config(tmp_path)), 6)  # off by default

    from PIL import Image

    images = [Image.new("RGB", (8, 8), (index * 40, 0, 0)) for index in range(5)]
    grid = image_grid(images)
    assert grid.size == (32, 16)
    assert grid.getpixel((8 * 1, 0)) == (40, 0, 0) and grid.getpixel((0, 8)) == (160, 0, 0)
    assert image_grid(images[:2]).size == (16, 8)


def test_several_samples_per_prompt_make_a_row_each_and_the_first_is_the_one_sample_of_before(tmp_path):
    """validation.images_per_prompt: image k of the grid has seed validation.seed + k, so
    with one per prompt the samples are those of a run before the key existed."""
    from PIL import ImageChops

    from trainer.distributed import Runtime
    from trainer.models import build_components
    from trainer.validation import _generate_on_main

    components = build_components("tiny", None)
    runtime = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))

    def grid(images_per_prompt: int):
        config = validate_config(tiny_config(tmp_path, data={"resolution": 32}, validation={
            "every_steps": 1, "num_inference_steps": 2, "prompts": ["a photo of sks robot", "a robot on a beach"],
            "images_per_prompt": images_per_prompt}))
        return _generate_on_main({}, components, config, runtime)  # nothing trained: the base model draws

    one, three = grid(1), grid(3)
    assert one.size == (64, 32) and three.size == (96, 64)  # prompts side by side; then a row per prompt
    first_of = {"one": one.crop((0, 0, 32, 32)), "three": three.crop((0, 0, 32, 32))}
    assert not ImageChops.difference(first_of["one"], first_of["three"]).getbbox()
    second_prompt = three.crop((0, 32, 32, 64))
    assert ImageChops.difference(three.crop((32, 0, 64, 32)), first_of["three"]).getbbox()  # another seed
    assert ImageChops.difference(second_prompt, one.crop((32, 0, 64, 32))).getbbox()  # seed 3, not seed 1


def test_samples_follow_the_guidance_scale_negative_prompt_and_sampler_asked_for(tmp_path):
    """validation.guidance_scale, negative_prompt and scheduler reach the pipeline; unset,
    its own (7.5 for SD, no negative prompt, the tiny model's PNDM) draw the samples of before."""
    from PIL import ImageChops

    from trainer.distributed import Runtime
    from trainer.models import build_components
    from trainer.validation import _generate_on_main

    components = build_components("tiny", None)
    runtime = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))

    def grid(**asked):
        config = validate_config(tiny_config(tmp_path, data={"resolution": 32}, validation={
            "every_steps": 1, "num_inference_steps": 2, **asked}))
        return _generate_on_main({}, components, config, runtime)

    def differ(a, b) -> bool:
        return ImageChops.difference(a, b).getbbox() is not None

    unset = grid()
    assert not differ(grid(guidance_scale=7.5), unset)
    assert differ(grid(guidance_scale=1.0), unset)
    assert differ(grid(negative_prompt="blurry, low quality"), unset)
    assert not differ(grid(scheduler="PNDMScheduler"), unset)
    assert differ(grid(scheduler="DPMSolverMultistepScheduler"), unset)


@pytest.mark.parametrize("source", ["tiny", "tiny-sdxl"])
def test_every_validation_sampler_is_a_diffusers_scheduler_for_the_model(source):
    """The names validation.scheduler takes (a list the operator's CRD repeats without
    importing diffusers) are schedulers diffusers builds from the model's own config."""
    from diffusers.schedulers import KarrasDiffusionSchedulers

    from trainer.config import VALIDATION_SCHEDULERS
    from trainer.models import build_components
    from trainer.validation import sampler_class

    components = build_components(source, None)
    assert set(VALIDATION_SCHEDULERS) <= {scheduler.name for scheduler in KarrasDiffusionSchedulers}
    for name in VALIDATION_SCHEDULERS:
        sampler = sampler_class(name, components).from_config(components.inference_scheduler.config)
        sampler.set_timesteps(25)
        assert type(sampler).__name__ == name and len(sampler.timesteps) >= 25
    assert sampler_class(None, components) is type(components.inference_scheduler)


def test_step_lines_are_plain_off_a_terminal_and_a_bar_on_one(capsys, monkeypatch):
    progress.report_step(STEP_VALUES, json_format=False)
    assert capsys.readouterr().out.startswith("step 7/30 loss 0.5000 (instance 0.3000 prior 0.2000)")

    controller, terminal = pty.openpty()
    # A new pty is 0 columns wide; a real terminal has a size (tqdm fits the bar to it).
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    with os.fdopen(terminal, "w") as stream:
        monkeypatch.setattr("sys.stdout", stream)
        for step in (29, 30):
            progress.report_step({**STEP_VALUES, "step": step}, json_format=False)
        progress.report_event("checkpoint saved", json_format=False, step=30)
        stream.flush()
        screen = read_available(controller)
    os.close(controller)
    assert "\r" in screen and "30/30" in screen and "12.50 samples/s" in screen
    assert "step 29/30" not in screen  # a bar, not lines
    assert "checkpoint saved step=30" in screen
    assert not progress._terminal_bar.active


def test_a_restarted_run_reports_its_checkpoint_step_before_loading_it(tmp_path):
    import json

    from trainer.checkpoint import LATEST, step_folder_name
    from trainer.manifest import MANIFEST

    raw = tiny_config(tmp_path)
    assert m.checkpoint_hint(validate_config(raw).checkpoint) == m.Position()  # fresh: nothing to resume
    folder = tmp_path / "checkpoints" / step_folder_name(12)
    folder.mkdir(parents=True)
    manifest = {"step": 12, "world_size": 2, "zero_stage": 2, "files": {}}
    (folder / MANIFEST).write_text(json.dumps(manifest))  # from before the totals were kept
    (tmp_path / "checkpoints" / LATEST).write_text(folder.name)
    assert m.checkpoint_hint(validate_config(raw).checkpoint) == m.Position(step=12)
    (folder / MANIFEST).write_text(json.dumps({**manifest, "samples": 96, "skipped_steps": 3}))
    assert m.checkpoint_hint(validate_config(raw).checkpoint) == m.Position(step=12, samples=96, skipped_steps=3)
    never = tiny_config(tmp_path, checkpoint={"resume": "never"})
    assert m.checkpoint_hint(validate_config(never).checkpoint) == m.Position()
    (folder / MANIFEST).write_text("{garbled")
    assert m.checkpoint_hint(validate_config(raw).checkpoint) == m.Position()


def test_counters_start_at_the_restored_totals_so_a_resume_is_no_burst_of_samples_or_skips():
    """rate() and increase() count a series' rise from 0 to the restored total as new."""
    metrics = m.TrainerMetrics(max_steps=30, labels=LABELS)
    metrics.record_position(step=12, samples=96)  # the hint, before the endpoint serves
    metrics.record_skipped_steps(3)
    assert value(metrics, contract.METRIC_SAMPLES_TOTAL) == 96 and value(metrics, contract.METRIC_SKIPPED_STEPS_TOTAL) == 3
    metrics.record_resume(step=12, samples=96)  # the checkpoint the hint named: nothing new
    metrics.record_skipped_steps(3)
    assert value(metrics, contract.METRIC_SAMPLES_TOTAL) == 96 and value(metrics, contract.METRIC_SKIPPED_STEPS_TOTAL) == 3
    metrics.record_skipped_steps(4)
    assert value(metrics, contract.METRIC_SKIPPED_STEPS_TOTAL) == 4
