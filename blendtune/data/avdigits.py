"""AV-digits: each Free Spoken Digit clip paired with a distinct MNIST image of the same digit.

Audio: log-mel spectrogram (torchaudio) of the clip centre-cropped / zero-padded to a fixed window.
Image: the MNIST digit, normalised (torchvision). Groups are speakers; by default the test set is
the speakers george and jackson and the model trains on the other four.
Layout under the data root: `fsdd/recordings/{digit}_{speaker}_{take}.wav`, `mnist/mnist5k.npz`.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio
import torchvision.transforms.v2.functional as TF

from blendtune.data.base import DATASETS, MultimodalDataset, data_root
from blendtune.errors import UserError

CLIP_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def read_clip(path: Path, sample_rate: int) -> torch.Tensor:
    """Mono float waveform at `sample_rate`; a clip that cannot be decoded is named in the error."""
    try:
        wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise UserError(f"cannot decode WAV file '{path}': {e}") from None
    if wave.shape[0] == 0:
        raise UserError(f"WAV file '{path}' has no samples")
    wave = torch.from_numpy(wave.mean(axis=1))
    if rate != sample_rate:
        wave = torchaudio.functional.resample(wave, rate, sample_rate)
    return wave


def fit_to_window(wave: torch.Tensor, length: int) -> torch.Tensor:
    """Centre-crop a long clip, zero-pad a short one on both sides."""
    if len(wave) >= length:
        start = (len(wave) - length) // 2
        return wave[start:start + length]
    pad = length - len(wave)
    return torch.nn.functional.pad(wave, (pad // 2, pad - pad // 2))


def log_mel(waves: torch.Tensor, sample_rate: int, n_fft: int, hop_length: int, n_mels: int) -> torch.Tensor:
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length,
                                               n_mels=n_mels)
    return torchaudio.transforms.AmplitudeToDB(top_db=80.0)(mel(waves)).unsqueeze(1)  # (N, 1, mels, frames)


def list_clips(recordings: Path) -> list[tuple[Path, int, str]]:
    if not recordings.is_dir():
        raise UserError(f"FSDD recordings folder not found: '{recordings}' (expected <data root>/fsdd/recordings)")
    clips = []
    for path in sorted(recordings.glob("*.wav")):
        match = CLIP_NAME.match(path.name)
        if not match:
            raise UserError(f"unexpected file name '{path}': expected {{digit}}_{{speaker}}_{{take}}.wav")
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


@DATASETS.register("avdigits")
def avdigits(test_speakers: list[str], window_s: float, sample_rate: int, n_fft: int, hop_length: int,
             n_mels: int, pairing_seed: int, root: str | None = None) -> tuple[MultimodalDataset, MultimodalDataset]:
    base = data_root(root)
    clips = list_clips(base / "fsdd" / "recordings")
    images, labels = load_mnist(base / "mnist" / "mnist5k.npz")
    speakers = np.array([s for _, _, s in clips])
    unknown = sorted(set(test_speakers) - set(speakers))
    if unknown:
        raise UserError(f"config key 'data.avdigits.test_speakers': no clips from {unknown}; "
                        f"speakers found: {sorted(set(speakers.tolist()))}")
    digits = np.array([d for _, d, _ in clips])
    length = int(round(window_s * sample_rate))
    waves = torch.stack([fit_to_window(read_clip(p, sample_rate), length) for p, _, _ in clips])
    audio = log_mel(waves, sample_rate, n_fft, hop_length, n_mels)
    image = torch.from_numpy(images[pair_images(digits, labels, pairing_seed)]).unsqueeze(1) / 255.0
    image = TF.normalize(image, [MNIST_MEAN], [MNIST_STD])

    is_test = np.isin(speakers, test_speakers)
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    # Standardise the spectrogram with training-speaker statistics only: test data steers nothing.
    mean, std = audio[train_idx].mean(), audio[train_idx].std()
    audio = (audio - mean) / std
    full = MultimodalDataset({"audio": audio, "image": image}, torch.from_numpy(digits), 10,
                             groups=speakers.tolist(),
                             default_encoders={"audio": "spec_cnn", "image": "spec_cnn"})
    return full.subset(train_idx), full.subset(test_idx)
