"""Your own parts, as blendtune sees them: a backbone and a data function, importable by path.

    model._target_: my_av.TwoStreamNet     (YAML or key=value; `model.args` its keyword arguments)
    data._target_: my_av.make_data         (`data.args` likewise)

Nothing here imports blendtune: any nn.Module whose forward maps a dict of input batches to a dict of
(B, D) features per modality, and any datasets of (dict[modality, Tensor], target) items will do.
"""
from __future__ import annotations

import torch
from torch import nn


class TwoStreamNet(nn.Module):
    """An audio stream (1-D conv over a (1, T) signal) and a video stream (MLP over a frame vector).
    No `modality_parameters` method: blendtune finds each stream's parameters itself (autograd, one batch)."""

    def __init__(self, audio_len: int = 64, video_dim: int = 32, dim: int = 32):
        super().__init__()
        self.audio = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(8), nn.Flatten(),
                                   nn.Linear(64, dim), nn.ReLU())
        self.video = nn.Sequential(nn.Linear(video_dim, 64), nn.ReLU(), nn.Linear(64, dim), nn.ReLU())

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"audio": self.audio(inputs["audio"]), "video": self.video(inputs["video"])}


class ClipDataset(torch.utils.data.Dataset):
    """Map-style: item i is ({'audio': (1, T), 'video': (D,)}, class index)."""

    def __init__(self, audio: torch.Tensor, video: torch.Tensor, targets: torch.Tensor):
        self.audio, self.video, self.targets = audio, video, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return {"audio": self.audio[i], "video": self.video[i]}, int(self.targets[i])


def make_data(num_train: int = 600, num_test: int = 300, num_classes: int = 4, audio_len: int = 64,
              video_dim: int = 32, seed: int = 0):
    """Video carries the class clearly; audio weakly (a tone per class under heavy noise)."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, video_dim, generator=gen)
    freqs = torch.linspace(2, 8, num_classes)

    def split(n: int) -> ClipDataset:
        y = torch.randint(num_classes, (n,), generator=gen)
        t = torch.arange(audio_len) / audio_len
        tone = torch.sin(2 * torch.pi * freqs[y, None] * t)
        audio = (tone + torch.randn(n, audio_len, generator=gen)).unsqueeze(1)
        video = prototypes[y] + 0.8 * torch.randn(n, video_dim, generator=gen)
        return ClipDataset(audio, video, y)

    return split(num_train), split(num_test)
