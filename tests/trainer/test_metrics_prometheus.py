"""A real Prometheus scrapes a real 2-rank ZeRO-3 training (then its resumption) and sees
every series of DESIGN.md with the operator's labels; the same run writes validation
sample grids and TensorBoard events."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from tests.conftest import run_trainer, tiny_config, write_config
from tests.trainer.prometheus_server import PrometheusServer, free_port, install_prometheus
from trainer import contract
from trainer import metrics as m

JOB = {"job": "sks-robot", "namespace": "team-a"}
MAX_STEPS = 20
RESUMED_MAX_STEPS = 22
# 2 ranks x 1 instance image + 1 class image per step.
SAMPLES_PER_STEP = 4
VALIDATION_PROMPTS = ["a photo of sks robot", "a photo of sks robot on the moon"]


def exposed_names(name: str) -> list[str]:
    """What Prometheus stores for one of our metrics."""
    if name in (contract.METRIC_STEP_SECONDS, contract.METRIC_CHECKPOINT_SECONDS):
        return [name + "_bucket", name + "_sum", name + "_count"]
    return [name]


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return install_prometheus()


@pytest.fixture
def trainer_port() -> int:
    return free_port()


@pytest.fixture
def prometheus(prometheus_binary, tmp_path, trainer_port):
    server = PrometheusServer(prometheus_binary, tmp_path / "prometheus", [f"127.0.0.1:{trainer_port}"])
    yield server
    server.stop()


def values_of(result: list[dict]) -> list[float]:
    assert len(result) == 1, result
    return [float(value) for _, value in result[0]["values"]]


def last(prometheus: PrometheusServer, query: str, start: float, end: float) -> float:
    return values_of(prometheus.query_range(query, start, end))[-1]


@pytest.mark.slow
def test_prometheus_sees_a_two_rank_run_and_its_resumption(tiny_root, prometheus, trainer_port, monkeypatch):
    monkeypatch.setenv("JOB_NAME", JOB["job"])
    monkeypatch.setenv("JOB_NAMESPACE", JOB["namespace"])
    config = tiny_config(
        tiny_root,
        deepspeed={"zero_stage": 3},
        training={"max_steps": MAX_STEPS, "train_text_encoder": True},
        checkpoint={"every_steps": 10, "keep_last": 2},
        metrics={"port": trainer_port, "host": "127.0.0.1", "linger_seconds": 2.5},
        validation={"every_steps": 10, "prompts": VALIDATION_PROMPTS, "num_inference_steps": 2, "seed": 7},
        tensorboard={"enabled": True},
    )
    path = write_config(tiny_root, config)
    started = time.time()
    result = run_trainer(path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    first_end = time.time()

    selector = '{job="%s",namespace="%s"}' % (JOB["job"], JOB["namespace"])
    steps = values_of(prometheus.query_range(contract.METRIC_STEP + selector, started, first_end))
    assert steps == sorted(steps), "dreambooth_step went backwards"
    assert steps[-1] == MAX_STEPS and len({step for step in steps if 0 < step < MAX_STEPS}) >= 3, steps

    names = {series["__name__"] for series in prometheus.series('{__name__=~"dreambooth_.+"}', started, first_end)}
    expected = {exposed for name in contract.METRIC_NAMES for exposed in exposed_names(name)}
    assert expected <= names, sorted(expected - names)
    for series in prometheus.series('{__name__=~"dreambooth_.+"}', started, first_end):
        assert {series.get("job"), series.get("namespace")} == set(JOB.values()), series

    def final(name: str) -> float:
        return last(prometheus, name + selector, started, first_end)

    assert final(contract.METRIC_MAX_STEPS) == MAX_STEPS
    assert final(contract.METRIC_SAMPLES_TOTAL) == MAX_STEPS * SAMPLES_PER_STEP
    assert final(contract.METRIC_STEP_SECONDS + "_count") == MAX_STEPS
    assert final(contract.METRIC_CHECKPOINT_SECONDS + "_count") == 2 and final(contract.METRIC_CHECKPOINT_STEP) == MAX_STEPS
    assert final(contract.METRIC_CLASS_IMAGES_GENERATED) == 4
    assert final(contract.METRIC_LOSS_SCALE) == 1 and final(contract.METRIC_SKIPPED_STEPS_TOTAL) == 0  # bf16: nothing is scaled
    assert final(contract.METRIC_GPU_MEMORY_BYTES) == 0  # CPU
    assert final(contract.METRIC_LOSS) > 0 and final(contract.METRIC_INSTANCE_LOSS) > 0 and final(contract.METRIC_PRIOR_LOSS) > 0
    assert final(contract.METRIC_LEARNING_RATE) == pytest.approx(1e-3)
    assert max(values_of(prometheus.query_range(contract.METRIC_SAMPLES_PER_SECOND + selector, started, first_end))) > 0
    assert last(prometheus, contract.METRIC_PHASE + '{phase="done",job="%s"}' % JOB["job"], started, first_end) == 1
    assert max(values_of(prometheus.query_range(contract.METRIC_PHASE + '{phase="training"}', started, first_end))) == 1

    # Samples: one grid per validation step, one 64 px image per prompt, on rank 0 only.
    samples = tiny_root / "samples"
    assert sorted(path.name for path in samples.iterdir()) == [f"step-{step:08d}.png" for step in (10, 20)]
    assert Image.open(samples / "step-00000020.png").size == (128, 64)
    assert Image.open(samples / "step-00000010.png").tobytes() != Image.open(samples / "step-00000020.png").tobytes()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_root / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("loss/total")] == list(range(1, MAX_STEPS + 1))
    assert [event.step for event in events.Images("validation/samples")] == [10, 20]

    # Resume from the last checkpoint and train on: the step and sample counts go on from there.
    resumed = run_trainer(path, extra=["--set", f"training.max_steps={RESUMED_MAX_STEPS}"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    steps = values_of(prometheus.query_range(contract.METRIC_STEP + selector, first_end, time.time()))
    assert steps[-1] == RESUMED_MAX_STEPS
    # Never 0 while the restarted run loads: the endpoint starts at the checkpoint's step.
    assert all(step >= MAX_STEPS for step in steps), steps
    assert last(prometheus, contract.METRIC_SAMPLES_TOTAL + selector, first_end, time.time()) == RESUMED_MAX_STEPS * SAMPLES_PER_STEP
    assert (samples / f"step-{RESUMED_MAX_STEPS:08d}.png").is_file()
