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


def all_reduce_mean_(tensors) -> None:
    """Averages each tensor over all ranks in place: the gradients of strategies that leave DDP's
    bucketed reducer out (`syncs_gradients`). Every rank passes the same shapes in the same order."""
    def mean(flat: torch.Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size()
    _flat_per_dtype_(tensors, mean)


def broadcast_(tensors, src: int = 0) -> None:
    """Every rank's tensors become rank `src`'s in place (BatchNorm buffers, which DDP broadcasts only
    before a synced forward)."""
    _flat_per_dtype_(tensors, lambda flat: dist.broadcast(flat, src=src))


def _flat_per_dtype_(tensors, collective) -> None:
    """One collective per dtype over the tensors concatenated, copied back in place."""
    if not is_distributed():
        return
    tensors = list(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        same = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in same])
        collective(flat)
        for t, part in zip(same, flat.split([t.numel() for t in same])):
            t.copy_(part.view_as(t))


def gather_cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenates this rank's tensors with every other rank's (evaluation scores for exact mAP)."""
    local = torch.cat(tensors, dim=dim) if tensors else None
    if not is_distributed():
        return local
    parts = [None] * world_size()
    dist.all_gather_object(parts, local)
    return torch.cat([p for p in parts if p is not None], dim=dim)
