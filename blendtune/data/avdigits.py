"""AV-digits: each Free Spoken Digit clip paired with a distinct MNIST image of the same digit.

Audio: log-mel spectrogram (torchaudio) of the clip centre-cropped / zero-padded to a fixed window.
Image: the MNIST digit, normalised (torchvision). Groups are speakers; by default the test set is
the speakers george and jackson and the model trains on the other four.
Layout under the data root: `fsdd/recordings/{digit}_{speaker}_{take}.wav`, `mnist/mnist5k.npz`.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from collections import Counter

import numpy as np
import torch
import torchaudio

from blendtune.data.audio import MIN_CLIP_S, fit_to_window, read_clip
from blendtune.data.audiovisual import SHORT_CLIP, Sample, scan, warn_short_clips
from blendtune.data.base import DATASETS, DataCheck, DatasetAdapter, MultimodalDataset, Problem, data_root
from blendtune.errors import SettingError, UserError

@dataclass
class AVDigitsOptions:
    test_speakers: List[str] = field(default_factory=lambda: ["george", "jackson"])
    window_s: float = 1.0        # clips (0.14-2.3 s) are centre-cropped or zero-padded to this
    sample_rate: int = 8000
    n_fft: int = 256
    hop_length: int = 80
    n_mels: int = 40
    pairing_seed: int = 0        # which MNIST image goes with which clip; fixed like the dataset


CLIP_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def log_mel(waves: torch.Tensor, sample_rate: int, n_fft: int, hop_length: int, n_mels: int) -> torch.Tensor:
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length,
                                               n_mels=n_mels)
    return torchaudio.transforms.AmplitudeToDB(top_db=80.0)(mel(waves)).unsqueeze(1)  # (N, 1, mels, frames)


def list_clips(recordings: Path, problems: list[Problem] | None = None) -> list[tuple[Path, int, str]]:
    """(path, digit, speaker) per clip. A misnamed file is an error, or a problem when `problems` collects."""
    if not recordings.is_dir():
        raise UserError(f"FSDD recordings folder not found: '{recordings}' (expected <data root>/fsdd/recordings)")
    clips = []
    for path in sorted(recordings.glob("*.wav")):
        match = CLIP_NAME.match(path.name)
        if not match:
            if problems is None:
                raise UserError(f"unexpected file name '{path}': expected {{digit}}_{{speaker}}_{{take}}.wav")
            problems.append(Problem("unknown label", str(path), "expected {digit}_{speaker}_{take}.wav"))
            continue
        clips.append((path, int(match.group(1)), match.group(2)))
    if not clips:
        raise UserError(f"no WAV files in '{recordings}'")
    return clips


def load_mnist(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UserError(f"MNIST file not found: '{path}' (expected <data root>/mnist/mnist5k.npz)")
    try:
        with np.load(path) as npz:
            return npz["images"].astype(np.float32), npz["labels"].astype(np.int64)
    except Exception as e:
        raise UserError(f"cannot read MNIST file '{path}' (expected arrays 'images' and 'labels'): {e}") from None


def pair_images(digits: np.ndarray, mnist_labels: np.ndarray, seed: int) -> np.ndarray:
    """A distinct MNIST index of the same digit for every clip, fixed by `seed`."""
    rng = np.random.default_rng(seed)
    picks = np.empty(len(digits), dtype=np.int64)
    for d in np.unique(digits):
        clips = np.flatnonzero(digits == d)
        pool = rng.permutation(np.flatnonzero(mnist_labels == d))
        if len(pool) < len(clips):
            raise UserError(f"MNIST has {len(pool)} images of digit {d}, AV-digits needs {len(clips)}")
        picks[clips] = pool[:len(clips)]
    return picks


@DATASETS.register("avdigits", options=AVDigitsOptions)
class AVDigits(DatasetAdapter):
    """Options: data.avdigits (test_speakers, window_s, sample_rate, n_fft, hop_length, n_mels, pairing_seed)."""
    name = "avdigits"

    def build(self, skip_bad: bool = False, spectrogram_on: str = "loader", **_in_memory_ignores):
        # Decoded once into memory (3,000 short clips): no loader workers, no device-side spectrogram needed.
        return avdigits(root=self.root, skip_bad=skip_bad, **self.options)

    def check(self) -> DataCheck:
        base = data_root(self.root)
        problems: list[Problem] = []
        clips = list_clips(base / "fsdd" / "recordings", problems)
        speakers = {s for _, _, s in clips}
        split = {True: "test", False: "train"}
        samples = [Sample(p.stem, split[s in self.options["test_speakers"]], (str(d),), p, None, s) for p, d, s in clips]
        problems += [p for p in scan(samples, decode=True) if p is not None]
        try:
            load_mnist(base / "mnist" / "mnist5k.npz")
        except UserError as e:
            problems.append(Problem("unreadable MNIST file", str(base / "mnist" / "mnist5k.npz"), str(e)))
        for speaker in sorted(set(self.options["test_speakers"]) - speakers):
            problems.append(Problem("unknown test speaker", speaker, f"speakers found: {sorted(speakers)}"))
        counts = {k: Counter(s.labels[0] for s in samples if s.split == k) for k in ("train", "test")}
        return DataCheck(self.name, str(base), [str(d) for d in range(10)], counts, problems)


@dataclass
class DigitPairs:
    """Every clip decoded to the window and paired with its MNIST image, before any feature is made."""
    waves: torch.Tensor        # (N, samples), each clip fitted to the window
    clip_lengths: np.ndarray   # samples of each clip's own audio inside the window (the rest is padding)
    images: np.ndarray         # (N, 28, 28) float32, 0..255
    digits: np.ndarray
    speakers: np.ndarray
    is_test: np.ndarray        # the test speakers' clips


def load_pairs(test_speakers: list[str], window_s: float, sample_rate: int, pairing_seed: int,
               root: str | None = None, skip_bad: bool = False, option_prefix: str = "data.avdigits") -> DigitPairs:
    base = data_root(root)
    problems: list[Problem] = []
    clips = list_clips(base / "fsdd" / "recordings", problems if skip_bad else None)
    length = int(round(window_s * sample_rate))
    waves, good, native_lengths = [], [], []
    for clip in clips:  # each clip decoded once; a bad one is an error, or skipped with skip_bad
        try:
            wave = read_clip(clip[0], sample_rate)
            waves.append(fit_to_window(wave, length))
            native_lengths.append(len(wave))
            good.append(clip)
        except UserError as e:
            if not skip_bad:
                raise
            problems.append(Problem("undecodable WAV", str(clip[0]), str(e)))
    clips = good
    warn_short_clips([Problem(SHORT_CLIP, str(c[0])) for c, n in zip(clips, native_lengths) if n < MIN_CLIP_S * sample_rate])
    if problems:
        print(f"blendtune: skipping {len(problems)} bad clip(s) (first: {problems[0]})", file=sys.stderr)
    images, labels = load_mnist(base / "mnist" / "mnist5k.npz")
    speakers = np.array([s for _, _, s in clips])
    unknown = sorted(set(test_speakers) - set(speakers))
    if unknown:
        raise SettingError(f"{option_prefix}.test_speakers", f"no clips from {unknown}; "
                        f"speakers found: {sorted(set(speakers.tolist()))}")
    digits = np.array([d for _, d, _ in clips])
    return DigitPairs(torch.stack(waves), np.minimum(native_lengths, length), images[pair_images(digits, labels, pairing_seed)],
                      digits, speakers, np.isin(speakers, test_speakers))


def to_datasets(pairs: DigitPairs, sample_rate: int, n_fft: int, hop_length: int,
                n_mels: int) -> tuple[MultimodalDataset, MultimodalDataset]:
    """Log-mel spectrograms and normalised images; train = every speaker not held for test."""
    audio = log_mel(pairs.waves, sample_rate, n_fft, hop_length, n_mels)
    # torchvision's normalize, written out (the same values): importing torchvision costs seconds per process
    image = (torch.from_numpy(np.ascontiguousarray(pairs.images, dtype=np.float32)).unsqueeze(1) / 255.0 - MNIST_MEAN) / MNIST_STD
    train_idx, test_idx = np.flatnonzero(~pairs.is_test), np.flatnonzero(pairs.is_test)
    # Standardise the spectrogram with training-speaker statistics only: test data steers nothing.
    mean, std = audio[train_idx].mean(), audio[train_idx].std()
    audio = (audio - mean) / std
    full = MultimodalDataset({"audio": audio, "image": image}, torch.from_numpy(pairs.digits), 10,
                             groups=pairs.speakers.tolist(),
                             default_encoders={"audio": "spec_cnn", "image": "spec_cnn"})
    return full.subset(train_idx), full.subset(test_idx)


def avdigits(test_speakers: list[str], window_s: float, sample_rate: int, n_fft: int, hop_length: int,
             n_mels: int, pairing_seed: int, root: str | None = None,
             skip_bad: bool = False) -> tuple[MultimodalDataset, MultimodalDataset]:
    pairs = load_pairs(test_speakers, window_s, sample_rate, pairing_seed, root, skip_bad)
    return to_datasets(pairs, sample_rate, n_fft, hop_length, n_mels)
