"""The few collective operations strategies need; no-ops in a single process."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sums `tensor` over all ranks in place (statistics that steer gradients must agree)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenates this rank's tensors with every other rank's (evaluation scores for exact mAP)."""
    local = torch.cat(tensors, dim=dim) if tensors else None
    if not is_distributed():
        return local
    parts = [None] * world_size()
    dist.all_gather_object(parts, local)
    return torch.cat([p for p in parts if p is not None], dim=dim)
