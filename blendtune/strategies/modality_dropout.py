"""Modality dropout: each training sample loses each modality's features with probability p (at least
one modality is always kept); the fused head is trained on what is left."""
from dataclasses import dataclass

import torch

from blendtune.errors import OptionError
from blendtune.strategies.base import STRATEGIES, BalancingStrategy


@dataclass
class ModalityDropoutOptions:
    p: float = 0.3               # probability that a sample loses a modality

    def validate(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise OptionError("p", f"expected 0 <= p < 1, got {self.p}")


def modality_dropout_masks(batch: int, k: int, p: float, device, generator=None) -> torch.Tensor:
    keep = torch.rand(batch, k, device=device, generator=generator) >= p
    none_kept = ~keep.any(dim=1)
    rescue = torch.randint(k, (batch,), device=device, generator=generator)
    keep[none_kept, rescue[none_kept]] = True
    return keep


@STRATEGIES.register("modality_dropout", options=ModalityDropoutOptions)
class ModalityDropout(BalancingStrategy):
    options: ModalityDropoutOptions

    def modality_masks(self, targets: torch.Tensor) -> torch.Tensor:
        return modality_dropout_masks(len(targets), len(self.model.modalities), self.options.p, targets.device)
