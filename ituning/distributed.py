"""Data-parallel training across processes started by torchrun, through DistributedDataParallel.

    torchrun --standalone --nproc_per_node=2 --no-python ituning train --config configs/coco-gpt2.yaml

Each process takes its contiguous share of a step's batch and runs the forward through
`data_parallel(model)`, a DistributedDataParallel wrapper whose backward all-reduces (averages) the
I-Tuning modules' gradients, once per optimizer step (`gradient_sync`); the frozen backbone is
loaded from the same files by every process and left out of DDP altogether. DDP gives every process
rank 0's module weights when it wraps the model, so every process applies the same update, equal to
one process training on the whole batch. Token counts and the reported loss are summed over
processes. Outside torchrun (no process group, or one process) nothing is wrapped and nothing changes.
"""

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0 of the process group; before torchrun's processes join one, the process it started as RANK 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def shard(samples: list) -> list:
    """This process's contiguous block of a step's samples (sizes differ by at most one), so an
    image's adjacent captions stay together and share its visual keys/values."""
    rank, size = world()
    return samples[rank * len(samples) // size : (rank + 1) * len(samples) // size]


def summed(value: float | int) -> float:
    """The value summed over every process."""
    if world()[1] == 1:
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.item()


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for without a process group)."""
    if world()[1] > 1:
        dist.barrier()


def process_device(device: str) -> str:
    """Under torchrun a bare "cuda" means this process's own GPU, cuda:LOCAL_RANK (made current)."""
    if device != "cuda" or "LOCAL_RANK" not in os.environ:
        return device
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


def launched_processes() -> int:
    """How many processes torchrun started (WORLD_SIZE); 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_from_environment(device: torch.device) -> None:
    """Under torchrun (WORLD_SIZE > 1 in the environment) join the process group once: gloo on CPU,
    NCCL on CUDA. A no-op otherwise, or when the caller already joined one."""
    if launched_processes() > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def data_parallel(model: nn.Module) -> nn.Module:
    """`model` in DistributedDataParallel when a process group of 2+ processes exists, else itself.

    Only parameters with requires_grad are reduced. The frozen parameters and the buffers are also
    kept out of DDP's start-up broadcast: every process loads them from the same files."""
    if world()[1] == 1:
        return model
    frozen = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    buffers = [name for name, _ in model.named_buffers()]
    # DDP's own (underscored) way to leave named parameters and buffers out; no constructor argument does it
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen + buffers)
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (for checkpoints and decoding)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def gradient_sync(model: nn.Module, now: bool):
    """Context for one micro-batch's forward and backward: without `now`, DDP only accumulates the
    gradient locally, so a step of several micro-batches all-reduces once, on its last."""
    if now or not isinstance(model, DistributedDataParallel):
        return nullcontext()
    return model.no_sync()
