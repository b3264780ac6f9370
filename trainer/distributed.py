"""Process-group setup and the few collective helpers the trainer needs.

Works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK from its env) and as a plain
`python trainer/main.py` (one process, world size 1).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.config import ConfigError
from trainer.contract import GPUS_PER_NODE_ENV


@dataclass(frozen=True)
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_runtime() -> Runtime:
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Runtime(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def check_devices() -> None:
    """Before anything else starts: the CUDA devices this process sees are the ones it
    needs (devices_problem). Raises ConfigError (exit 2) naming what is missing."""
    raw = os.environ.get(GPUS_PER_NODE_ENV, "").strip()
    try:
        expected = int(raw) if raw else 0
    except ValueError:
        raise ConfigError(f"environment variable {GPUS_PER_NODE_ENV} = {raw!r}: not a whole number of GPUs; "
                          "the operator sets it from spec.workers.gpusPerNode (unset it for a CPU run)") from None
    problem = devices_problem(expected=expected, found=torch.cuda.device_count(),
                              local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                              local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if problem:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(problem + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""))


def devices_problem(*, expected: int, found: int, local_rank: int, local_world_size: int) -> str | None:
    """What is wrong with `found` CUDA devices for a process of local rank `local_rank`
    among `local_world_size` on its node, `expected` (GPUS_PER_NODE_ENV, 0 when unset)
    being what the job asked for; None when nothing is. With no devices and none asked
    for, this is a CPU run. Checked so that a pod without its GPUs fails at once (exit 2)
    instead of training on CPU, and a lower nvidia.com/gpu limit by name instead of
    "invalid device ordinal"."""
    if not expected and not found:
        return None  # a CPU run
    needed = max(expected, local_world_size, local_rank + 1)
    if found >= needed:
        return None
    asked = (f"the job asks for {expected} GPU(s) per node ({GPUS_PER_NODE_ENV}, from spec.workers.gpusPerNode)"
             if expected else f"{local_world_size} process(es) on this node each need their own GPU")
    return (f"{asked}, but this process (local rank {local_rank} of {local_world_size}) sees {found} CUDA device(s). "
            "Likely fixes: the node's NVIDIA device plugin and container runtime (the pod's runtimeClassName, "
            f"e.g. nvidia); a pod limit nvidia.com/gpu of at least {needed} (spec.workers.resources.limits); an NVIDIA "
            f"driver that supports this image's CUDA {torch.version.cuda or '(none: a CPU-only torch)'}; "
            "or, for a CPU-only job, spec.workers.gpusPerNode: 0")


# How long the other ranks wait for rank 0's long work of its own (wait_for_main_rank):
# a universal conversion of an SDXL ZeRO checkpoint reads, merges and rewrites 12-40 GB
# in one process, an hour or more on a slow network volume. Generous: a rank 0 that
# dies ends the wait at once (see init_process_group); only a hung rank 0, or a node
# gone without a word, is waited for this long (the operator restarts a gang whose pod
# it loses).
LONG_WAIT_TIMEOUT = timedelta(hours=6)

# The gloo group of init_process_group for wait_for_main_rank; None before and after.
_long_waits: dist.ProcessGroup | None = None


def init_process_group(runtime: Runtime, timeout_seconds: int = 1800) -> None:
    """DeepSpeed's initializer picks nccl on CUDA and gloo on CPU; a lone process
    still gets a (one-member) group so that every code path is the same.
    `timeout_seconds`: the limit of each collective on that default group."""
    import deepspeed

    if runtime.device.type == "cuda":
        torch.cuda.set_device(runtime.device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", str(runtime.rank))
    os.environ.setdefault("LOCAL_RANK", str(runtime.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(runtime.world_size))
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_seconds), verbose=False)
    # Ranks waiting on the default group for rank 0's long work abort when it takes
    # longer than the group's timeout (NCCL's watchdog kills the process; gloo raises),
    # and raising that timeout would let a real hang of the training loop go unnoticed
    # as long. So those waits have a group of their own, with its own limit: gloo, on
    # CPU tensors (it needs no GPU, and no NCCL watchdog watches it), over the default
    # group's rendezvous. Its ranks talk over TCP, so when rank 0's process ends its
    # sockets close and the waiting ranks fail at once. (A file on the shared volume would
    # need a heartbeat to tell a dead rank 0 from a slow one; monitored_barrier needs a
    # gloo group all the same.) Created here, since every rank must create it, in step.
    global _long_waits
    _long_waits = dist.new_group(backend="gloo", timeout=LONG_WAIT_TIMEOUT)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wait_for_main_rank(what: str, *, failed: bool = False) -> bool:
    """Collective, after work that rank 0 does alone and the others wait for (`what`,
    e.g. "the export to output.dir"), for up to LONG_WAIT_TIMEOUT instead of the default
    group's timeout. True on every rank when `failed` is true on any. Raises, naming
    `what`, when a rank ended or stopped answering meanwhile."""
    if not dist.is_initialized():
        return failed
    if _long_waits is None:
        raise RuntimeError("wait_for_main_rank needs the long-wait group that trainer.distributed."
                           "init_process_group creates; start the process group with it")
    flag = torch.tensor([1 if failed else 0], dtype=torch.int32)
    started = time.monotonic()
    try:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_long_waits)
    except RuntimeError as caught:  # gloo's "Connection closed by peer", or its timeout
        raise RuntimeError(
            f"rank {dist.get_rank()}: the wait for rank 0 to finish {what} failed after "
            f"{time.monotonic() - started:.0f} s (the limit is {LONG_WAIT_TIMEOUT.total_seconds():.0f} s): a rank "
            f"ended or stopped answering meanwhile, and the log of rank 0 (or of the rank that failed first) says "
            f"why ({caught})"
        ) from caught
    return bool(flag.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (e.g. a stop request seen
    by one rank), so that all ranks leave a loop at the same step."""
    return any_ranks(flag)[0]


def any_ranks(*flags: bool) -> tuple[bool, ...]:
    """`any_rank` of several flags in one all-reduce."""
    if not dist.is_initialized():
        return tuple(flags)
    return tuple(bool(value) for value in _all_reduce([1 if flag else 0 for flag in flags], torch.int32,
                                                      dist.ReduceOp.MAX))


def sum_over_ranks(value: int) -> int:
    if not dist.is_initialized():
        return value
    return int(_all_reduce([value], torch.int64, dist.ReduceOp.SUM)[0])


def mean_over_ranks(values: list[float]) -> list[float]:
    if not dist.is_initialized():
        return list(values)
    return [total / dist.get_world_size() for total in _all_reduce(values, torch.float64, dist.ReduceOp.SUM)]


def _all_reduce(values: list, dtype: torch.dtype, op) -> list:
    tensor = torch.tensor(values, dtype=dtype)
    # DeepSpeed starts an nccl-only group on CUDA, and nccl reduces CUDA tensors only.
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def shutdown() -> None:
    global _long_waits
    if dist.is_initialized():
        dist.destroy_process_group()  # every group, the long-wait one too
    _long_waits = None
