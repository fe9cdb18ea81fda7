"""Optimizers and learning-rate schedules by name, from plain arguments."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from blendtune.errors import SettingError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "cosine", "step")


@dataclass
class OptimOptions:
    """The optimizer and its schedule (config section `optim`; keywords of `blendtune.fit`, where `name`
    is `optimizer=`)."""
    name: str = "sgd"            # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9        # sgd
    weight_decay: float = 1e-4
    schedule: str = "none"       # none | cosine | step (stepped once per epoch)
    step_size: int = 70          # step: epochs between decays
    gamma: float = 0.1           # step: the decay factor
    grad_clip: Optional[float] = None  # clip the gradients' global norm to this

    def validate(self) -> None:
        for key, allowed in (("name", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(self, key) not in allowed:
                raise SettingError(f"optim.{key}", f"expected one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.lr <= 0:
            raise SettingError("optim.lr", f"expected a positive learning rate, got {self.lr}")
        if self.step_size <= 0:
            raise SettingError("optim.step_size", f"expected a positive number, got {self.step_size}")


def optimizer_and_schedule(options: OptimOptions, params: Iterable[torch.nn.Parameter], epochs: int,
                           fused: bool = False):
    """The optimizer over `params` and its per-epoch schedule, from the options."""
    optimizer = build_optimizer(options.name, params, lr=options.lr, momentum=options.momentum,
                                weight_decay=options.weight_decay, fused=fused)
    return optimizer, build_scheduler(options.schedule, optimizer, epochs, options.step_size, options.gamma)


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
