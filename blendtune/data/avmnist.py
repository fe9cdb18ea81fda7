"""AV-MNIST (Vielzeuf et al. 2018, CentralNet; the AV-MNIST of MultiBench), built from the data here.

The recipe makes both modalities weak so that neither alone solves the task:
- image: each MNIST digit reconstructed from the leading principal components that hold less than
  `1 - image_energy_removed` of the variance (75% of the energy removed by default). The PCA is fit on
  the training speakers' images only. As in the public generator
  (slyviacassell/_MFAS, datasets/avmnist_gen.py @8e82a0a: `n_comp = argmax(cumsum(ratio) > 0.25)`,
  components `[:n_comp]`), except that its PCA is fit on each split separately and ours on training only.
- audio: the FSDD clip with noise added at `snr_db` relative to the clip's own power. The original mixes
  in ESC-50 recordings, which are not here: we add white Gaussian noise (seeded by `noise_seed`, fixed like
  the dataset), which masks every frequency band alike.
Pairing by digit, speaker split, features and options otherwise as AV-digits (`blendtune.data.avdigits`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from blendtune.data.avdigits import AVDigits, AVDigitsOptions, load_pairs, to_datasets
from blendtune.data.base import DATASETS, MultimodalDataset
from blendtune.errors import OptionError


@dataclass
class AVMNISTOptions(AVDigitsOptions):
    image_energy_removed: float = 0.75   # share of the images' PCA variance removed (0: the images as they are)
    snr_db: float = 0.0                  # clip power / noise power, in dB
    noise_seed: int = 0                  # the noise, fixed like the dataset

    def validate(self) -> None:
        if not 0.0 <= self.image_energy_removed < 1.0:
            raise OptionError("image_energy_removed", f"expected 0 <= value < 1, got {self.image_energy_removed}")
        if not math.isfinite(self.snr_db):
            raise OptionError("snr_db", f"expected a finite number of dB, got {self.snr_db}")


def remove_pca_energy(images: np.ndarray, fit_rows: np.ndarray, fraction: float) -> np.ndarray:
    """`images` (N, ...) reconstructed from the leading principal components of `images[fit_rows]` that
    hold less than `1 - fraction` of their variance (at least one component when fraction < 1); the mean
    of the fitted rows is added back. fraction 0 keeps every component: the images come back unchanged."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    mean = flat[fit_rows].mean(axis=0)
    _, singular, components = np.linalg.svd(flat[fit_rows] - mean, full_matrices=False)
    explained = np.cumsum(singular ** 2) / np.sum(singular ** 2)
    over = explained > 1.0 - fraction  # none when fraction is below float precision: keep everything
    keep = len(explained) if fraction <= 0 or not over.any() else max(1, int(np.argmax(over)))
    basis = components[:keep]
    rebuilt = mean + (flat - mean) @ basis.T @ basis
    return rebuilt.reshape(images.shape).astype(np.float32)


def add_noise(waves: torch.Tensor, clip_lengths: np.ndarray, snr_db: float, seed: int) -> torch.Tensor:
    """White Gaussian noise over each whole window, its power `snr_db` below the power of the clip's own
    samples (padding excluded)."""
    lengths = torch.as_tensor(clip_lengths, dtype=waves.dtype).clamp(min=1)
    signal_power = waves.pow(2).sum(dim=1) / lengths
    noise_std = torch.sqrt(signal_power / (10.0 ** (snr_db / 10.0)))
    noise = torch.randn(waves.shape, generator=torch.Generator().manual_seed(seed), dtype=waves.dtype)
    return waves + noise * noise_std[:, None]


@DATASETS.register("avmnist", options=AVMNISTOptions)
class AVMNIST(AVDigits):
    """Options: data.avmnist (the AV-digits options, image_energy_removed, snr_db, noise_seed)."""
    name = "avmnist"

    def build(self, skip_bad: bool = False, spectrogram_on: str = "loader", **_in_memory_ignores):
        return avmnist(root=self.root, skip_bad=skip_bad, **self.options)


def avmnist(test_speakers: list[str], window_s: float, sample_rate: int, n_fft: int, hop_length: int, n_mels: int,
            pairing_seed: int, image_energy_removed: float, snr_db: float, noise_seed: int, root: str | None = None,
            skip_bad: bool = False) -> tuple[MultimodalDataset, MultimodalDataset]:
    pairs = load_pairs(test_speakers, window_s, sample_rate, pairing_seed, root, skip_bad, option_prefix="data.avmnist")
    pairs = replace(pairs, images=remove_pca_energy(pairs.images, ~pairs.is_test, image_energy_removed),
                    waves=add_noise(pairs.waves, pairs.clip_lengths, snr_db, noise_seed))
    return to_datasets(pairs, sample_rate, n_fft, hop_length, n_mels)
