"""Modality dropout: each training sample loses each modality's features with probability p (at least
one modality is always kept); the fused head is trained on what is left."""
import torch

from blendtune.strategies.base import STRATEGIES, BalancingStrategy


def modality_dropout_masks(batch: int, k: int, p: float, device, generator=None) -> torch.Tensor:
    keep = torch.rand(batch, k, device=device, generator=generator) >= p
    none_kept = ~keep.any(dim=1)
    rescue = torch.randint(k, (batch,), device=device, generator=generator)
    keep[none_kept, rescue[none_kept]] = True
    return keep


@STRATEGIES.register("modality_dropout")
class ModalityDropout(BalancingStrategy):
    config_section = "modality_dropout"

    def __init__(self, p: float):
        self.p = p

    def modality_masks(self, targets: torch.Tensor) -> torch.Tensor:
        return modality_dropout_masks(len(targets), len(self.model.modalities), self.p, targets.device)
