"""Optimizers and learning-rate schedules by name, from plain arguments."""
from __future__ import annotations

from typing import Iterable

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "cosine", "step")


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.9,
                    weight_decay: float = 0.0, fused: bool = False) -> torch.optim.Optimizer:
    """`fused`: one kernel for the whole update (CUDA); otherwise torch's foreach implementation."""
    extra = {"fused": True} if fused else {}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **extra)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, weight_decay=weight_decay, **extra)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, epochs: int, step_size: int = 70,
                    gamma: float = 0.1):
    """Stepped once per epoch by the loop."""
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    if name == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    raise ValueError(f"unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
