"""Process-group setup and the few collective helpers the trainer needs.

Works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK from its env) and as a plain
`python trainer/main.py` (one process, world size 1).
"""

from __future__ import annotations

import os
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


def init_process_group(runtime: Runtime, timeout_seconds: int = 1800) -> None:
    """DeepSpeed's initializer picks nccl on CUDA and gloo on CPU; a lone process
    still gets a (one-member) group so that every code path is the same."""
    import deepspeed

    if runtime.device.type == "cuda":
        torch.cuda.set_device(runtime.device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", str(runtime.rank))
    os.environ.setdefault("LOCAL_RANK", str(runtime.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(runtime.world_size))
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_seconds), verbose=False)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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
    if dist.is_initialized():
        dist.destroy_process_group()
