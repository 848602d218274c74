"""Several processes (``torchrun`` / ``accelerate launch``): what the continual engines need of torch.distributed.

``run_stream`` started by ``torchrun --nproc_per_node N script.py`` joins the process group from
the launcher's environment (gloo on the CPU, NCCL on GPUs) unless the script already did. Every
process builds the same seeded global batches and trains on its shard of each (rows
``rank::world``); gradients are averaged across processes (``DistributedDataParallel``); test sets
are split the same way and the predictions gathered, so every process computes the same accuracy
matrix; only rank 0 writes checkpoints, reports and saved models.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather_objects", "all_reduce_sum", "barrier", "init_from_env", "is_main", "rank", "shard",
           "world_size"]


def init_from_env(device: torch.device) -> None:
    """Join the process group a launcher described (``WORLD_SIZE`` > 1) if nobody did yet."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the processes, in place (no-op in a single process)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(value: Any) -> list[Any]:
    """Every process's ``value``, in rank order."""
    if world_size() == 1:
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def shard(batch, world: int, index: int):
    """This process's rows (``index::world``) of a batch of tensors (a tuple, list or one tensor)."""
    if world == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch[index::world]
    return type(batch)(shard(part, world, index) for part in batch)


class ShardedLoader:
    """The rows of each global batch of ``loader`` that belong to this process."""

    def __init__(self, loader, world: int, index: int):
        self.loader, self.world, self.index = loader, world, index
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield shard(batch, self.world, self.index)
