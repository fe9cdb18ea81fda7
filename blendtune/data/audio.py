"""Audio decoding and spectrograms shared by the adapters (soundfile decodes, torchaudio transforms)."""
from __future__ import annotations

import functools
from pathlib import Path

import soundfile
import torch
import torchaudio
from torch import nn

from blendtune.errors import UserError


MIN_CLIP_S = 0.1  # shorter clips (the shortest FSDD digit is 0.14 s) are flagged: a broken or truncated file


@functools.lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    # The resampling kernel is built once per rate pair, not per clip.
    return torchaudio.transforms.Resample(orig, new)


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
        wave = _resampler(rate, sample_rate)(wave)
    return wave


def fit_to_window(wave: torch.Tensor, length: int, mode: str = "zero") -> torch.Tensor:
    """Centre-crop a long clip; a short one is zero-padded on both sides (`zero`) or repeated until it
    fills the window (`tile`, as the OGM-GE code prepares CREMA-D)."""
    if len(wave) >= length:
        start = (len(wave) - length) // 2 if mode == "zero" else 0
        return wave[start:start + length]
    if mode == "tile":
        return wave.repeat(-(-length // len(wave)))[:length]
    pad = length - len(wave)
    return torch.nn.functional.pad(wave, (pad // 2, pad - pad // 2))


class LogSpectrogram(nn.Module):
    """(..., samples) -> (..., 1, freq, frames). n_mels=0: log-magnitude STFT, log(|X| + 1e-7) as the
    OGM-GE code computes it; n_mels>0: log-mel in dB. Runs in loader workers or batched on the GPU."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int = 0):
        super().__init__()
        self.n_mels = n_mels
        if n_mels:
            self.transform = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft,
                                                                  hop_length=hop_length, n_mels=n_mels)
            self.to_db = torchaudio.transforms.AmplitudeToDB(top_db=80.0)
        else:
            self.transform = torchaudio.transforms.Spectrogram(n_fft=n_fft, hop_length=hop_length, power=1.0)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = self.transform(wave.float()).unsqueeze(-3)
        # dB relative to each clip's own maximum (channel dim added first), so a clip's values do not
        # depend on the batch it is computed in.
        return self.to_db(spec) if self.n_mels else torch.log(spec + 1e-7)
