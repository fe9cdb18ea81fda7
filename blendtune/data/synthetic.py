"""A k-modality synthetic set with controllable signal and memorisation per modality; needs no files.

Each modality m sees `signal_m * prototype_m[y] + noise_m * N(0, I)` in `dim` dimensions, plus
`memorize_dims` dimensions of per-sample random numbers: a network can fit the training labels through
them (train loss falls) while they carry nothing to new samples (held-out loss rises) - the overfitting
G-Blend's OGR is meant to catch.
"""
from __future__ import annotations

import torch

from blendtune.data.base import DATASETS, MultimodalDataset


def _make(modalities: dict, num_classes: int, n: int, prototypes: dict, gen: torch.Generator) -> MultimodalDataset:
    targets = torch.randint(num_classes, (n,), generator=gen)
    inputs = {}
    for m, spec in modalities.items():
        x = spec["signal"] * prototypes[m][targets] + spec["noise"] * torch.randn(n, spec["dim"], generator=gen)
        if spec["memorize_dims"]:
            x = torch.cat([x, torch.randn(n, spec["memorize_dims"], generator=gen)], dim=1)
        inputs[m] = x
    return MultimodalDataset(inputs, targets, num_classes)


@DATASETS.register("synthetic")
def synthetic(num_classes: int, num_train: int, num_test: int, seed: int, modalities: dict,
              root=None) -> tuple[MultimodalDataset, MultimodalDataset]:
    gen = torch.Generator().manual_seed(seed)
    prototypes = {m: torch.randn(num_classes, spec["dim"], generator=gen) for m, spec in modalities.items()}
    train = _make(modalities, num_classes, num_train, prototypes, gen)
    test = _make(modalities, num_classes, num_test, prototypes, gen)
    return train, test
