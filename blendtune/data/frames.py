"""Which frames of a clip a sample uses: shared by JPEG folders, the prepared cache and video files."""
from __future__ import annotations

import torch


def pick_frames(count: int, wanted: int, train: bool) -> list[int]:
    """Training: a random sorted subset (as the OGM-GE code); evaluation: evenly spaced, deterministic."""
    if train:
        idx = torch.randperm(count)[:wanted] if count >= wanted else torch.randint(count, (wanted,))
        return sorted(idx.tolist())
    return torch.linspace(0, count - 1, wanted).round().long().tolist()
