"""Data-parallel training on ``torch.distributed`` (DDP): what the loop needs to run under
``torchrun`` unchanged.

``torchrun --nproc-per-node N slimtune adapt ...`` starts N processes with ``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK`` set; :func:`start` joins them into one process group (``gloo`` on
CPU, ``nccl`` when CUDA is there) and puts each process on its own GPU. ``--batch`` is per
process: every micro-batch the task hands out ``batch × world`` examples of the one seeded order
and each process takes its own consecutive ``batch`` of them (:func:`shard`), so N processes
with batch b see exactly the examples one process with batch N·b sees, and DDP's mean of the
processes' gradients is that process's gradient. Only rank 0 evaluates, writes checkpoints, logs
and the result; every process resumes from the same checkpoint.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    """The number of processes of this run (``WORLD_SIZE`` under torchrun, else 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def start() -> int:
    """Join the process group when started by torchrun with more than one process (once);
    return the world size."""
    n = world_size()
    if n > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return n


def stop() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1 and dist.is_initialized():
        dist.barrier()


def mean_over_processes(value: float) -> float:
    """The mean of ``value`` over the processes (itself with one)."""
    if world_size() == 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def shard(batch, index: int, n: int, size: int):
    """Process ``index``'s ``size`` examples of a batch of ``n * size`` (a tensor, or a dict of
    tensors whose first dimension is the example)."""
    if n == 1:
        return batch
    part = slice(index * size, (index + 1) * size)
    if isinstance(batch, dict):
        return {k: v[part] for k, v in batch.items()}
    return batch[part]


def wrap(model: nn.Module) -> nn.Module:
    """The module the loss runs through: ``model`` itself, or a DDP wrapper around it (which
    broadcasts rank 0's parameters and buffers first, and averages gradients in backward)."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=device)


def broadcast_object(value):
    """Rank 0's ``value`` on every process (a picklable object)."""
    if world_size() == 1 or not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
