"""Ranks waiting for rank 0's long work of its own (trainer.distributed.wait_for_main_rank),
on real 2-process gloo groups. The default group gets a timeout of a few seconds here
(the trainer's is 30 minutes, which a real SDXL checkpoint's universal conversion can
outlast), and rank 0 is busy longer than that before it converts a real ZeRO checkpoint
with DeepSpeed's converter: the waiting rank must wait it out, and fail at once, with a
message naming the conversion, when rank 0's process ends instead."""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from tests.trainer.prometheus_server import free_port

DEFAULT_GROUP_TIMEOUT = 2  # seconds, for init_process_group's default group
RANK0_BUSY = 3 * DEFAULT_GROUP_TIMEOUT  # before rank 0 starts converting
DIES_AFTER = 1.0  # rank 0's process ends this long after the other rank started waiting
EXIT_OF_DEAD_RANK = 17


def use_ranks(rank: int, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def write_checkpoint(root: Path, port: int) -> None:
    """One process: a real ZeRO-2 checkpoint of a small model, saved as the trainer saves one."""
    use_ranks(0, 1, port)
    import torch

    from trainer import checkpoint
    from trainer.config_file import validate_config
    from trainer.distributed import init_process_group, read_runtime, shutdown
    from trainer.engine import build_engine

    config = validate_config(tiny_config(root, training={"precision": "fp32"}))
    runtime = read_runtime()
    init_process_group(runtime)
    torch.manual_seed(0)
    engine = build_engine(config, torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)),
                          precision="fp32", world_size=1, device_type="cpu")
    engine.backward(engine(torch.randn(8, 16)).pow(2).mean())
    engine.step()
    checkpoint.save(engine, config.checkpoint, runtime, step=1, state={checkpoint.STEP_KEY: 1})
    shutdown()


def convert(scenario: str, rank: int, folder: str, port: int, start, results) -> None:
    """One of two ranks resuming `folder` (written by one process): convert_to_universal,
    with rank 0 busy RANK0_BUSY seconds first ("slow"), or ending DIES_AFTER seconds in ("dies")."""
    use_ranks(rank, 2, port)
    import deepspeed  # noqa: F401  (imported by init_process_group: seconds, and not in step on a busy machine)

    from trainer import checkpoint
    from trainer.distributed import init_process_group, read_runtime, shutdown

    runtime = read_runtime()
    start.wait()  # both imported: the rendezvous itself fits in the short timeout
    init_process_group(runtime, timeout_seconds=DEFAULT_GROUP_TIMEOUT)
    if rank == 0:
        time.sleep(DIES_AFTER if scenario == "dies" else RANK0_BUSY)
        if scenario == "dies":
            os._exit(EXIT_OF_DEAD_RANK)  # as when the kernel kills a converter out of memory
    started = time.monotonic()
    try:
        outcome = ("converted", str(checkpoint.convert_to_universal(Path(folder), runtime)))
    except Exception as caught:
        outcome = ("failed", f"{type(caught).__name__}: {caught}")
    results.put((rank, *outcome, time.monotonic() - started))
    shutdown()


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("long-waits")
    writer = multiprocessing.get_context("spawn").Process(target=write_checkpoint, args=(root, free_port()))
    writer.start()
    writer.join(timeout=600)  # the first DeepSpeed run of a fresh venv builds its CPU ops
    assert writer.exitcode == 0
    return root / "checkpoints" / "step-00000001"


def run_pair(scenario: str, folder: Path) -> tuple[dict[int, tuple], list[int]]:
    context = multiprocessing.get_context("spawn")
    start, results, port = context.Barrier(2), context.Queue(), free_port()
    ranks = [context.Process(target=convert, args=(scenario, rank, str(folder), port, start, results))
             for rank in range(2)]
    for process in ranks:
        process.start()
    outcomes = {}
    deadline = time.monotonic() + 300
    while len(outcomes) < 2 and time.monotonic() < deadline and any(process.is_alive() for process in ranks):
        try:
            rank, *outcome = results.get(timeout=1)
            outcomes[rank] = tuple(outcome)
        except queue.Empty:
            pass
    for process in ranks:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    return outcomes, [process.exitcode for process in ranks]


def test_the_other_ranks_wait_out_a_universal_conversion_that_outlasts_the_default_groups_timeout(saved_checkpoint):
    outcomes, exit_codes = run_pair("slow", saved_checkpoint)
    target = saved_checkpoint.parent / f"universal-{saved_checkpoint.name}"
    assert outcomes.get(1, ("none",))[:2] == ("converted", str(target)), outcomes
    assert outcomes[0][:2] == ("converted", str(target))
    # Rank 1 really waited past the default group's timeout, for rank 0's sleep and its conversion.
    assert outcomes[1][2] > RANK0_BUSY
    assert (target / "zero").is_dir() and exit_codes == [0, 0]


def test_a_rank_0_that_dies_during_the_conversion_ends_the_wait_at_once_naming_it(saved_checkpoint):
    outcomes, exit_codes = run_pair("dies", saved_checkpoint)
    assert exit_codes[0] == EXIT_OF_DEAD_RANK and list(outcomes) == [1], outcomes
    outcome, message, waited = outcomes[1]
    assert outcome == "failed"
    assert (f"rank 1: the wait for rank 0 to finish the universal conversion of {saved_checkpoint} failed after"
            in message), message
    assert "the log of rank 0 (or of the rank that failed first) says why" in message
    # Ended by the dead peer's closed connection, not by LONG_WAIT_TIMEOUT (hours).
    assert waited < DIES_AFTER + 10, message
