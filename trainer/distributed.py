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
