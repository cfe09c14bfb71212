"""Data-parallel training across processes started by torchrun (torch.distributed, gloo or NCCL).

Each process takes every world_size-th caption of a step's batch; token counts, losses and the
module gradients are summed over processes, so every process applies the same update, equal to
one process training on the whole batch. Outside torchrun (no process group) nothing changes.
"""

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return world()[0] == 0


def shard(samples: list) -> list:
    rank, size = world()
    return samples[rank::size]


def summed(value: float | int) -> float:
    """The value summed over every process."""
    if world()[1] == 1:
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.item()


def sum_gradients(parameters) -> None:
    """Sum each parameter's gradient over processes (a process without samples contributes zeros)."""
    if world()[1] == 1:
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)


def broadcast_from_main(parameters) -> None:
    """Give every process the main process's values (fresh modules are initialised per process)."""
    if world()[1] == 1:
        return
    for parameter in parameters:
        dist.broadcast(parameter.data, src=0)


def join_from_environment(device: torch.device) -> None:
    """Under torchrun (WORLD_SIZE > 1 in the environment) join the process group once: gloo on CPU,
    NCCL on CUDA. A no-op otherwise, or when the caller already joined one."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
