"""The late-fusion classifier: k encoders, k uni-modal heads and one fused head (k + 1 heads)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FUSED = "fused"


@dataclass
class ModelOutput:
    features: dict[str, torch.Tensor]   # per modality, before fusion
    logits: dict[str, torch.Tensor]     # per head: every modality and FUSED


class LateFusionClassifier(nn.Module):
    def __init__(self, encoders: dict[str, nn.Module], fusion: nn.Module, num_classes: int):
        super().__init__()
        self.modalities = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.heads = nn.ModuleDict({m: nn.Linear(e.out_dim, num_classes) for m, e in encoders.items()})
        self.fusion = fusion

    @property
    def head_names(self) -> list[str]:
        return self.modalities + [FUSED]

    def forward(self, inputs: dict[str, torch.Tensor], modality_masks: torch.Tensor | None = None,
                detach_unimodal_heads: bool = False) -> ModelOutput:
        """`modality_masks` (B, k) zeroes modalities' features before fusion (modality dropout).
        With `detach_unimodal_heads` the uni-modal heads read detached features: they are then probes
        that measure each encoder without sending it gradient."""
        feats = {m: self.encoders[m](inputs[m]) for m in self.modalities}
        logits = {m: self.heads[m](f.detach() if detach_unimodal_heads else f) for m, f in feats.items()}
        fusion_in = feats
        if modality_masks is not None:
            fusion_in = {m: f * modality_masks[:, i:i + 1].to(f.dtype) for i, (m, f) in enumerate(feats.items())}
        logits[FUSED] = self.fusion(fusion_in)
        return ModelOutput(feats, logits)

    def encoder_parameters(self, modality: str) -> list[tuple[str, nn.Parameter]]:
        return list(self.encoders[modality].named_parameters())
