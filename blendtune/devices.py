"""Which device and precision a run uses: one rule for the loop, Ray Train workers and Tune trials."""
from __future__ import annotations

import torch

from blendtune.errors import SettingError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def wants_gpu(device: str) -> bool:
    """Does a run on `device` ('auto', 'cpu', 'cuda', 'cuda:N') ask its launcher (Ray) for a GPU?
    'auto' does when this machine has CUDA; any 'cuda...' always does (the worker then fails clearly
    if it gets none)."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SettingError("train.device", f"{name!r} requested, but CUDA is not available")
    if name in ("auto", "cuda"):  # the current device: Ray Train / torchrun select one per worker
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SettingError("train.device", f"expected auto, cpu, cuda or cuda:N, got {name!r}") from None


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """None for fp32; `auto` means bf16 on CUDA and fp32 elsewhere (`amp`: one of PRECISIONS, checked by
    TrainOptions.validate)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
