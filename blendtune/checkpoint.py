"""Checkpoints hold tensors and plain containers only, written atomically, read with weights_only=True."""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from blendtune.errors import UserError


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"no checkpoint at '{path}'")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object: never load it any other way
        raise UserError(f"refused checkpoint '{path}': it holds objects other than tensors and plain containers "
                        "(blendtune reads checkpoints with weights_only=True)") from None
    except Exception as e:
        raise UserError(f"cannot load checkpoint '{path}': {str(e).strip().splitlines()[0]}") from None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
