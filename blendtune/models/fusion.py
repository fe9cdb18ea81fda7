"""Fusion modules: features of k modalities -> fused logits. Concat and sum also expose the
per-modality share of their classifier, which OGM scores (`unimodal_logits`)."""
from __future__ import annotations

import torch
from torch import nn

from blendtune.functional import entropy_fusion_weights
from blendtune.registry import Registry

FUSIONS: Registry = Registry("fusion")


class ConcatFusion(nn.Module):
    def __init__(self, dims: dict[str, int], num_classes: int):
        super().__init__()
        self.dims = dims
        self.fc = nn.Linear(sum(dims.values()), num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(torch.cat([feats[m] for m in self.dims], dim=1))

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """logits_u = phi_u W_u^T + b/k, with W = [W_1 | ... | W_k] (OGM-GE's concat rule)."""
        out, start, k = {}, 0, len(self.dims)
        for m, d in self.dims.items():
            out[m] = feats[m] @ self.fc.weight[:, start:start + d].T + self.fc.bias / k
            start += d
        return out


class SumFusion(nn.Module):
    def __init__(self, dims: dict[str, int], num_classes: int):
        super().__init__()
        self.fcs = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(fc(feats[m]) for m, fc in self.fcs.items())

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: fc(feats[m]) for m, fc in self.fcs.items()}


class FiLMFusion(nn.Module):
    """The second modality produces (gamma, beta) that modulate the first's features (Perez et al.)."""
    ogm_scores_from_heads = True  # no per-modality share of the classifier: OGM scores the uni-modal heads

    def __init__(self, dims: dict[str, int], num_classes: int):
        super().__init__()
        if len(dims) != 2:
            raise ValueError(f"film fusion takes exactly 2 modalities, got {list(dims)}")
        (self.x, dx), (self.y, dy) = dims.items()
        self.film = nn.Linear(dy, 2 * dx)
        self.fc = nn.Linear(dx, num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        gamma, beta = self.film(feats[self.y]).chunk(2, dim=1)
        return self.fc(gamma * feats[self.x] + beta)


class GatedFusion(nn.Module):
    """A sigmoid gate computed from the first modality scales the second's projection."""
    ogm_scores_from_heads = True  # no per-modality share of the classifier: OGM scores the uni-modal heads

    def __init__(self, dims: dict[str, int], num_classes: int, hidden: int = 256):
        super().__init__()
        if len(dims) != 2:
            raise ValueError(f"gated fusion takes exactly 2 modalities, got {list(dims)}")
        (self.x, dx), (self.y, dy) = dims.items()
        self.fc_x = nn.Linear(dx, hidden)
        self.fc_y = nn.Linear(dy, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        gate = torch.sigmoid(self.fc_x(feats[self.x]))
        return self.fc(gate * self.fc_y(feats[self.y]))


class SharedHeadFusion(nn.Module):
    """One classifier shared by every modality (MLA's head): fused logits = sum_m w_m head(f_m), with
    w_m = 1/k, or per sample from the modalities' prediction entropies (`weighting="entropy"`: MLA's
    test-time uncertainty fusion, w_m = softmax_m(-H_m)). Every modality's features must have one size."""

    def __init__(self, dims: dict[str, int], num_classes: int):
        super().__init__()
        if len(set(dims.values())) != 1:
            raise ValueError(f"shared fusion applies one classifier to every modality, so their feature sizes "
                             f"must be equal (model.encoders.<modality>.dim), got {dims}")
        self.dims = dims
        self.fc = nn.Linear(next(iter(dims.values())), num_classes)
        # mean | entropy: set by the MLA strategy's setup (also when a run resumes); a plain attribute, not
        # extra state, so state_dict() stays tensors only
        self.weighting = "mean"

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.fc(feats[m]) for m in self.dims}

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = list(self.unimodal_logits(feats).values())
        if self.weighting == "entropy":
            with torch.no_grad():  # weights decide, they are not trained
                w = entropy_fusion_weights(logits)
            return sum(lg * w[:, i:i + 1].to(lg.dtype) for i, lg in enumerate(logits))
        return sum(logits) / len(logits)


FUSIONS.register("concat")(ConcatFusion)
FUSIONS.register("shared")(SharedHeadFusion)
FUSIONS.register("sum")(SumFusion)
FUSIONS.register("film")(FiLMFusion)
FUSIONS.register("gated")(GatedFusion)


def build_fusion(name: str, dims: dict[str, int], num_classes: int) -> nn.Module:
    return FUSIONS.get(name)(dims, num_classes)
