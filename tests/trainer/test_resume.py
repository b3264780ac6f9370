"""Checkpoints survive what spot GPUs do to them: SIGTERM, kill -9 mid-write, corruption."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_trainer, tiny_config, write_config
from tests.trainer.prometheus_server import free_port
from tests.trainer.test_rng import OpensAFile
from trainer import checkpoint, rng
from trainer.config import CheckpointConfig
from trainer.contract import step_folder_name
from trainer.manifest import MANIFEST, list_files


def step_losses(stdout: str) -> dict[int, float]:
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {event["step"]: event["loss"] for event in events if event["event"] == "step"}


def launch(config_path, *extra) -> subprocess.Popen:
    """The worker pod's command: torchrun through our launcher, which maps exit codes."""
    command = [sys.executable, "-m", "trainer.launch", "--standalone", "--nproc_per_node=2",
               str(REPO / "trainer" / "main.py"), "--config", str(config_path), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_node_missing_from_the_rendezvous_ends_the_launcher_with_what_to_look_at_after_rdzv_conf_timeout():
    """The operator's worker command: static rendezvous of 2 nodes, of which only this one
    comes. The wait is the --rdzv_conf timeout (the operator passes 1800 s), then exit 1."""
    command = [sys.executable, "-m", "trainer.launch", "--nnodes", "2", "--node_rank", "0", "--nproc_per_node", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--rdzv_conf", "timeout=3",
               str(REPO / "trainer" / "main.py"), "--config", "unused.yaml"]
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert 3 <= time.monotonic() - started < 60
    assert "launcher: the nodes did not all reach the rendezvous (Timed out after" in result.stderr
    assert "1/2 clients joined" in result.stderr and "Traceback" not in result.stderr


def read_until(process: subprocess.Popen, predicate, timeout: float) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if predicate(line):
            return lines
    raise AssertionError("expected output never came:\n" + "".join(lines[-20:]))


def resume_config(root, **sections):
    # bf16: what `auto` picks on CPU; resume is bit-for-bit there (and in fp32).
    base = dict(training={"max_steps": 12, "precision": "bf16", "lr_warmup_steps": 3, "lr_scheduler": "linear"},
                checkpoint={"every_steps": 100, "keep_last": 3, "grace_seconds": 20}, logging={"format": "json"})
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return tiny_config(root, **base)


def straight_config(root):
    """12 steps, a checkpoint every 3 (all kept), the text encoder trained at its own rate:
    two param groups go through every resume below."""
    return resume_config(root, training={"train_text_encoder": True, "text_encoder_learning_rate": 1e-4},
                         checkpoint={"every_steps": 3, "keep_last": 4})


@dataclass(frozen=True)
class StraightRun:
    root: Path
    losses: dict[int, float]

    def copy_to(self, root: Path, *steps: int, model: bool = False) -> Path:
        """A volume holding these of its checkpoints (the last one `latest`), its class images
        (as a job's volume has them, so no run makes them again), its model if asked, and
        its config: the state a run of that config leaves, without training it again."""
        for step in steps:
            name = step_folder_name(step)
            shutil.copytree(self.root / "checkpoints" / name, root / "checkpoints" / name)
        (root / "checkpoints" / "latest").write_text(step_folder_name(steps[-1]))
        shutil.copytree(self.root / "class-images", root / "class-images")
        if model:
            shutil.copytree(self.root / "model", root / "model")
        return write_config(root, straight_config(root))


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> StraightRun:
    """One uninterrupted run that several tests resume from or compare with: each trainer
    launch costs about 15 s of imports and setup alone."""
    root = tmp_path_factory.mktemp("straight")
    result = run_trainer(write_config(root, straight_config(root)))
    assert result.returncode == 0, result.stderr[-4000:]
    losses = step_losses(result.stdout)
    assert sorted(losses) == list(range(1, 13))
    return StraightRun(root, losses)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path, straight):
    reference = straight.losses
    interrupted = tmp_path / "interrupted"
    config_path = write_config(interrupted, straight_config(interrupted))
    process = launch(config_path)
    seen = read_until(process, lambda line: '"step": 4,' in line, timeout=300)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    rest, errors = process.communicate(timeout=120)
    elapsed = time.monotonic() - signalled
    assert process.returncode == 143, errors[-4000:]
    assert elapsed < 20, f"took {elapsed:.1f}s to stop, more than checkpoint.grace_seconds"
    first_part = step_losses("".join(seen) + rest)
    stopped_at = max(first_part)
    assert stopped_at >= 4
    assert (interrupted / "checkpoints" / "latest").read_text() == f"step-{stopped_at:08d}"
    # run.json at the end of every run: no model yet, only the record of where it stopped.
    stopped = json.loads((interrupted / "model" / "run.json").read_text())
    assert (stopped["outcome"], stopped["final_step"], stopped["resumed_from_step"]) == ("stopped", stopped_at, None)
    assert stopped["samples_per_second"] > 0 and not (interrupted / "model" / "model_index.json").exists()

    resumed = run_trainer(config_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    run = json.loads((interrupted / "model" / "run.json").read_text())
    assert run["resumed_from_step"] == stopped_at and run["final_step"] == 12 and run["outcome"] == "done"
    second_part = step_losses(resumed.stdout)
    assert sorted(second_part) == list(range(stopped_at + 1, 13))
    # Exactly the same numbers, not merely close: data order, noise, optimizer and
    # lr-scheduler state all continue where they stopped.
    assert {**first_part, **second_part} == reference


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of the worker processes under a launcher."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            if parent != launcher_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as handle:
                env = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if b"RANK" in env:
            found[int(env[b"RANK"])] = int(entry)
    return found


@pytest.mark.slow
def test_kill_9_of_a_rank_while_it_writes_a_checkpoint_resumes_from_the_previous_one(tmp_path):
    root = tmp_path / "run"
    config_path = write_config(root, resume_config(root, training={"max_steps": 8}, checkpoint={"every_steps": 3}))
    process = launch(config_path)
    read_until(process, lambda line: '"step": 1,' in line, timeout=300)
    # Rank 1's RNG file of the step-6 checkpoint is a FIFO: writing it blocks until
    # read, which holds rank 1 in the middle of that checkpoint, deterministically.
    blocked = root / "checkpoints" / "step-00000006"
    blocked.mkdir(parents=True)
    os.mkfifo(blocked / "rng-rank00001.pt")
    read_until(process, lambda line: '"step": 6,' in line, timeout=300)
    time.sleep(2)
    assert not (blocked / "manifest.json").exists()
    os.kill(worker_pids(process.pid)[1], signal.SIGKILL)
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 137, errors[-3000:]
    assert (root / "checkpoints" / "latest").read_text() == "step-00000003"

    resumed = run_trainer(config_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    run = json.loads((root / "model" / "run.json").read_text())
    assert run["resumed_from_step"] == 3 and run["final_step"] == 8
    assert json.loads((root / "checkpoints" / "step-00000006" / "manifest.json").read_text())["step"] == 6


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_skipped_another_world_size_resumes_and_another_shape_is_refused(tmp_path, straight):
    root = tmp_path / "run"
    config_path = straight.copy_to(root, 3, 6)
    newest = root / "checkpoints" / "step-00000006"
    # Same size, garbage content: passes the manifest's size check, fails to load.
    states = newest / "mp_rank_00_model_states.pt"
    states.write_bytes(b"\0" * states.stat().st_size)

    # Named in checkpoint.resume, it is refused, not skipped: the run would start from step 0 and overwrite it.
    named = launch(config_path, "--set", "training.max_steps=7", "--set", f"checkpoint.resume={newest}")
    _, errors = named.communicate(timeout=300)
    assert named.returncode == 2, errors[-4000:]
    assert f"checkpoint.resume = '{newest}' does not load" in errors
    assert [path.name for path in checkpoint.complete_checkpoints(root / "checkpoints")] == ["step-00000006", "step-00000003"]

    resumed = run_trainer(config_path, extra=["--set", "training.max_steps=7"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "step-00000006 skipped" in resumed.stderr
    assert json.loads((root / "model" / "run.json").read_text())["resumed_from_step"] == 3

    # One process instead of two (a gang resized): the ZeRO shards of 2 ranks go through
    # DeepSpeed's universal checkpoint conversion, and the same weights go on training.
    before = json.loads((root / "model" / "run.json").read_text())
    alone = run_trainer(config_path, nproc=0, extra=["--set", "training.max_steps=9"], timeout=300)
    assert alone.returncode == 0, alone.stderr[-4000:]
    events = [json.loads(line) for line in alone.stdout.splitlines() if line.startswith("{")]
    step_7 = str(root / "checkpoints" / "step-00000007")
    assert {"event": "converting checkpoint for another world size", "checkpoint": step_7,
            "world_size": "2 -> 1"} in events
    assert {"event": "resumed", "checkpoint": step_7, "step": 7, "world_size": "2 -> 1"} in events
    after = json.loads((root / "model" / "run.json").read_text())
    assert (after["world_size"], after["resumed_from_step"], after["final_step"]) == (1, 7, 9)
    # The eval loss is of all instance images at fixed noise: it matches only if every weight came through.
    assert after["instance_eval_loss_before"] == before["instance_eval_loss_after"]
    assert sorted(path.name for path in (root / "checkpoints").iterdir() if "universal" in path.name) == []

    # Another ZeRO stage and precision: DeepSpeed cannot load the shards. Refused by name,
    # not skipped as corrupt (which would start over, and retention would delete the progress).
    kept = checkpoint.complete_checkpoints(root / "checkpoints")
    changed = launch(config_path, "--set", "training.max_steps=9", "--set", "deepspeed.zero_stage=3",
                     "--set", "training.precision=fp32")
    output, errors = changed.communicate(timeout=300)
    assert changed.returncode == 2, errors[-4000:]
    # Refused before the conversion for 2 processes, which takes hours for a real model.
    assert "converting checkpoint" not in output
    assert ("was written with deepspeed.zero_stage = 2 (this run: 3), training.precision = 'bf16' (this run: 'fp32'), "
            "which DeepSpeed cannot load across; set those keys back") in errors
    assert checkpoint.complete_checkpoints(root / "checkpoints") == kept and kept[0].name == "step-00000009"
    assert sorted(path.name for path in (root / "checkpoints").iterdir() if "universal" in path.name) == []


@pytest.mark.slow
def test_a_resized_gang_skips_a_checkpoint_that_does_not_convert_for_the_one_before(tmp_path, straight):
    """One process instead of two, and the newest checkpoint's optimizer shard crafted (as
    on a damaged or tampered volume): the conversion refuses it without unpickling it, and
    the run converts and resumes the checkpoint before it, as a failed load is skipped."""
    root = tmp_path / "run"
    config_path = straight.copy_to(root, 3, 6)
    newest, before = root / "checkpoints" / "step-00000006", root / "checkpoints" / "step-00000003"
    shard = sorted(newest.glob("*_optim_states.pt"))[-1]
    marker = tmp_path / "payload-ran"
    torch.save({**torch.load(shard, weights_only=False), "payload": OpensAFile(marker)}, shard)
    relist(newest)

    alone = run_trainer(config_path, nproc=0, extra=["--set", "training.max_steps=7"], timeout=300)
    assert alone.returncode == 0, alone.stderr[-4000:]
    assert not marker.exists()
    assert (f"checkpoint {newest} skipped: DeepSpeed could not convert it for this world size ({shard} names "
            "io.open, which DeepSpeed's own checkpoints never hold; it was not unpickled") in alone.stderr
    events = [json.loads(line) for line in alone.stdout.splitlines() if line.startswith("{")]
    assert [event["checkpoint"] for event in events if event["event"] == "converting checkpoint for another world size"
            ] == [str(newest), str(before)]
    assert {"event": "resumed", "checkpoint": str(before), "step": 3, "world_size": "2 -> 1"} in events
    run = json.loads((root / "model" / "run.json").read_text())
    assert (run["world_size"], run["resumed_from_step"], run["final_step"]) == (1, 3, 7)
    assert sorted(path.name for path in (root / "checkpoints").iterdir() if "universal" in path.name) == []


@pytest.mark.slow
def test_when_no_checkpoint_loads_the_run_stops_instead_of_training_on_partly_loaded_weights(tmp_path, straight):
    root = tmp_path / "run"
    config_path = straight.copy_to(root, 3, model=True)
    [only] = checkpoint.complete_checkpoints(root / "checkpoints")
    optimizer_states = sorted(only.glob("*optim_states.pt"))[0]  # the module's weights load, then this fails
    optimizer_states.write_bytes(b"\0" * optimizer_states.stat().st_size)

    resumed = launch(config_path, "--set", "training.max_steps=5")
    _, errors = resumed.communicate(timeout=300)
    assert resumed.returncode == 2, errors[-4000:]
    assert f"checkpoint {only} skipped: it does not load" in errors
    assert (f"none of the 1 complete checkpoint(s) in checkpoint.dir = '{root / 'checkpoints'}' loads "
            "(step-00000003; each skipped above with its error)") in errors
    assert checkpoint.complete_checkpoints(root / "checkpoints") == [only]
    assert json.loads((root / "model" / "run.json").read_text())["final_step"] == 12  # the first run's, untouched


def relist(folder, *, drop=()):
    """The manifest rewritten for the files as they are now, as anyone who can write the volume can."""
    raw = json.loads((folder / MANIFEST).read_text())
    raw = {key: value for key, value in raw.items() if key not in drop} | {"files": list_files(folder)}
    (folder / MANIFEST).write_text(json.dumps(raw))


@pytest.mark.slow
def test_crafted_rng_files_and_deepspeed_shards_are_never_unpickled_their_checkpoint_is_skipped_and_one_of_format_1_resumes(
        tmp_path, straight):
    root = tmp_path / "run"
    config_path = straight.copy_to(root, 9, 12)
    reference = straight.losses

    # Step 9 as a trainer before format 2 wrote it: NumPy's key a pickled ndarray, no `format` in the manifest.
    older = root / "checkpoints" / "step-00000009"
    for rank in (0, 1):
        state = torch.load(older / rng.file_name(rank), weights_only=True)
        name, key, *position = state["numpy"]
        torch.save({**state, "numpy": (name, key.numpy().astype(np.uint32), *position)}, older / rng.file_name(rank))
    relist(older, drop=["format"])
    # Step 12: rank 1's file replaced by a payload, its manifest made to match.
    newest = root / "checkpoints" / "step-00000012"
    marker = tmp_path / "payload-ran"
    torch.save({"python": OpensAFile(marker)}, newest / rng.file_name(1))
    relist(newest)

    resumed = run_trainer(config_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert not marker.exists()
    assert (f"checkpoint {newest} skipped: it does not load ({newest / rng.file_name(1)} is not generator state as "
            "this trainer writes it (it names io.open); it was not unpickled") in resumed.stderr
    run = json.loads((root / "model" / "run.json").read_text())
    assert (run["resumed_from_step"], run["final_step"]) == (9, 12)
    assert step_losses(resumed.stdout) == {step: loss for step, loss in reference.items() if step > 9}

    # Step 12 again, as the resumed run wrote it: one of DeepSpeed's own shards (which
    # DeepSpeed unpickles in full) now carries the payload beside its state, and still loads.
    shard = sorted(newest.glob("*_optim_states.pt"))[-1]
    torch.save({**torch.load(shard, weights_only=False), "payload": OpensAFile(marker)}, shard)
    relist(newest)
    refused = f"({shard} names io.open, which DeepSpeed's own checkpoints never hold; it was not unpickled"
    # Named in checkpoint.resume, it is refused: no other is tried.
    named = launch(config_path, "--set", f"checkpoint.resume={newest}")
    _, errors = named.communicate(timeout=300)
    assert not marker.exists()
    assert named.returncode == 2, errors[-4000:]
    assert f"checkpoint.resume = '{newest}' does not load {refused}" in errors
    # Found by auto, it is skipped for the one before.
    again = run_trainer(config_path)
    assert not marker.exists()
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"checkpoint {newest} skipped: it does not load {refused}" in again.stderr
    assert json.loads((root / "model" / "run.json").read_text())["resumed_from_step"] == 9
    assert step_losses(again.stdout) == {step: loss for step, loss in reference.items() if step > 9}


@pytest.mark.slow
def test_a_raised_learning_rate_applies_on_resume_and_the_divergence_it_causes_stops_the_run_keeping_good_checkpoints(tmp_path):
    """Learning rates changed on resume must take effect (DeepSpeed would restore the
    checkpoint's), the text encoders' (a param group of their own) as well, and the NaN
    losses a raised rate brings stop the run: nothing exported, the checkpoint whose
    weights gave the first NaN retracted, the good ones kept."""
    root = tmp_path / "run"
    # No prior preservation: the class images would only add time here.
    config_path = write_config(root, resume_config(
        root, training={"max_steps": 3, "learning_rate": 1e-3, "lr_scheduler": "constant", "lr_warmup_steps": 0,
                        "train_text_encoder": True, "text_encoder_learning_rate": 1e-4},
        checkpoint={"every_steps": 1, "keep_last": 3}, data={"class_prompt": None, "class_dir": None}))
    first = run_trainer(config_path)
    assert first.returncode == 0, first.stderr[-4000:]
    healthy = step_losses(first.stdout)

    def learning_rates(folder):  # the schedule's peak rate and current rate of each param group
        scheduler = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["lr_scheduler"]
        return scheduler["base_lrs"], scheduler["_last_lr"]

    assert learning_rates(root / "checkpoints" / "step-00000003") == ([1e-3, 1e-4], [1e-3, 1e-4])
    process = launch(config_path, "--set", "training.max_steps=9", "--set", "training.learning_rate=1e4",
                     "--set", "training.text_encoder_learning_rate=1e-5", "--set", "training.max_nonfinite_steps=2")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 4, err[-4000:]
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    # The rates take effect; the other keys that change what a step computes are named too.
    assert {"event": "changed since the checkpoint", "training.learning_rate": "0.001 -> 10000",
            "training.text_encoder_learning_rate": "0.0001 -> 1e-05", "training.max_steps": "3 -> 9"} in events
    assert learning_rates(root / "checkpoints" / "diverged-step-00000004") == ([1e4, 1e-5], [1e4, 1e-5])
    steps = {event["step"]: event for event in events if event["event"] == "step"}
    assert steps[4]["learning_rate"] == 1e4 and steps[4]["loss"] is not None  # step 3's weights, the new rate
    assert sorted(steps) == [4, 5, 6] and steps[5]["loss"] is None and steps[6]["loss"] is None  # NaN: null in JSON
    assert ("training diverged: the loss was NaN or infinite on every step from step 5 to step 6 "
            "(training.max_nonfinite_steps = 2); checkpoint step-00000004, whose weights gave the first one, was renamed "
            "diverged-step-00000004; the next run resumes from step-00000003. Lower training.learning_rate (now 10000)") in err
    folder = root / "checkpoints"
    assert (folder / "latest").read_text() == "step-00000003" and (folder / "diverged-step-00000004").is_dir()
    assert [path.name for path in checkpoint.complete_checkpoints(folder)] == ["step-00000003", "step-00000002"]
    first_export = json.loads((root / "model" / "run.json").read_text())
    # The first run's export stands: the diverged run's record does not replace its model's.
    assert (first_export["final_step"], first_export["outcome"]) == (3, "done")

    # What the next run (with a lower rate) resumes from: the last checkpoint before the divergence.
    assert checkpoint.find_resume_point(CheckpointConfig(dir=folder)).name == "step-00000003"
    assert all(loss is not None for loss in healthy.values())


@pytest.mark.slow
def test_a_sigterm_to_one_rank_during_class_image_generation_stops_every_rank_at_the_same_batch(tmp_path):
    """A preemption reaches the pods of a gang one by one: a stop request one rank has
    and another not yet must end both at the same batch, by their own agreement. Here
    both ranks share a node, whose torchrun agent would SIGTERM the other once the first
    exits (the old code's only way out, which the second message tells apart); ranks on
    other nodes have no such agent: they generated their whole share and then waited in
    a barrier the stopped rank never reached, until the process group timed out."""
    root = tmp_path / "run"
    config_path = write_config(root, resume_config(root, data={
        "num_class_images": 400, "class_generation_batch_size": 1}))
    process = launch(config_path)
    class_dir = root / "class-images"
    deadline = time.monotonic() + 300
    while len(list(class_dir.glob("*.png"))) < 4 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.kill(worker_pids(process.pid)[1], signal.SIGTERM)
    output, errors = process.communicate(timeout=120)
    assert process.returncode == 143, errors[-3000:]
    assert "stopped by SIGTERM during class-image generation" in output
    assert "stopped by another rank's stop request during class-image generation" in output
    # Both left within a batch of the request: nowhere near the 200 images of each share.
    assert 4 <= len(list(class_dir.glob("*.png"))) < 40
    assert not (root / "checkpoints" / "latest").exists()
