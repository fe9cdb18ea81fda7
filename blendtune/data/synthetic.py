"""A k-modality synthetic set with controllable signal and memorisation per modality; needs no files.

Each modality m sees `signal_m * prototype_m[y] + noise_m * N(0, I)` in `dim` dimensions, plus
`memorize_dims` dimensions of per-sample random numbers: a network can fit the training labels through
them (train loss falls) while they carry nothing to new samples (held-out loss rises) - the overfitting
G-Blend's OGR is meant to catch.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict

import torch

from blendtune.data.base import DATASETS, DataCheck, DatasetAdapter, MultimodalDataset


@dataclass
class SyntheticModality:
    dim: int = 16
    signal: float = 1.0          # class separation of the part that generalizes
    noise: float = 1.0           # isotropic noise on that part
    memorize_dims: int = 0       # extra per-sample random dims: easy to memorise, useless on new samples


@dataclass
class SyntheticOptions:
    num_classes: int = 10
    num_train: int = 500
    num_test: int = 1000
    seed: int = 0                # the dataset is fixed by this seed, like a real one; `seed` varies the run
    modalities: Dict[str, SyntheticModality] = field(default_factory=lambda: {
        "clean": SyntheticModality(dim=16, signal=0.6),
        "memorizable": SyntheticModality(dim=16, signal=0.4, memorize_dims=512),
    })


def _make(modalities: dict, num_classes: int, n: int, prototypes: dict, gen: torch.Generator) -> MultimodalDataset:
    targets = torch.randint(num_classes, (n,), generator=gen)
    inputs = {}
    for m, spec in modalities.items():
        x = spec["signal"] * prototypes[m][targets] + spec["noise"] * torch.randn(n, spec["dim"], generator=gen)
        if spec["memorize_dims"]:
            x = torch.cat([x, torch.randn(n, spec["memorize_dims"], generator=gen)], dim=1)
        inputs[m] = x
    return MultimodalDataset(inputs, targets, num_classes)


@DATASETS.register("synthetic", options=SyntheticOptions)
class Synthetic(DatasetAdapter):
    name = "synthetic"
    reads_files = False

    def build(self, skip_bad: bool = False, spectrogram_on: str = "loader", **_in_memory_ignores):
        o = self.options
        gen = torch.Generator().manual_seed(o["seed"])
        prototypes = {m: torch.randn(o["num_classes"], spec["dim"], generator=gen) for m, spec in o["modalities"].items()}
        train = _make(o["modalities"], o["num_classes"], o["num_train"], prototypes, gen)
        test = _make(o["modalities"], o["num_classes"], o["num_test"], prototypes, gen)
        return train, test

    def check(self) -> DataCheck:
        splits = dict(zip(("train", "test"), self.build()))
        classes = [str(c) for c in range(self.options["num_classes"])]
        return DataCheck(self.name, "(generated)", classes,
                         {k: Counter(str(int(t)) for t in ds.targets) for k, ds in splits.items()}, [])
