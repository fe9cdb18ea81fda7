"""Checkpoints hold tensors and plain containers only, written atomically, read with weights_only=True."""
from __future__ import annotations

import errno
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from blendtune.errors import UserError


def temporary_path(path: Path) -> Path:
    """Where a checkpoint is written before it replaces `path` (`last.pt` -> `last.pt.tmp`)."""
    path = Path(path)
    return path.with_suffix(path.suffix + ".tmp")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to `last.pt.tmp`, flush it to disk, then rename it over `last.pt`: a kill (or a power cut)
    at any moment leaves either the previous checkpoint or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        # Opening it truncates a `last.pt.tmp` an earlier, killed write left behind: the next save of the
        # run removes that orphan (and frees its space before writing, not after).
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            _fsync(f.fileno())  # on disk before the rename makes it `last.pt`
        os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact
    except BaseException as e:  # an error (disk full) or Ctrl-C mid-write: no partial file left behind either
        full = disk_full(e, path.parent)  # measured before the partial file frees its space
        tmp.unlink(missing_ok=True)
        if full:
            raise UserError(f"no space left on the device writing checkpoint '{path}'"
                            + (" (the previous one is kept)" if path.is_file() else "")
                            + "; free some space, then resume the run (blendtune train --resume RUN_DIR)") from None
        raise
    _sync_directory(path.parent)


def disk_full(error: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC, or (torch.save's C++ writer says only
    `basic_ios::clear` or `failed writing file`) under 1 MiB left where it wrote."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(error, RuntimeError):
        return False
    try:
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as e:  # a file system without fsync (some FUSE mounts) still gets the atomic rename
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise


def _sync_directory(directory: Path) -> None:
    """The rename itself on disk (POSIX); where directories cannot be opened (Windows), nothing to do."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_orphan(path: Path) -> bool:
    """Remove the `last.pt.tmp` a killed write left next to `path` (a SIGKILL or a lost node runs no
    cleanup); True if there was one. Resuming a run removes it (`load_checkpoint`); a save overwrites it."""
    try:
        temporary_path(path).unlink()
        return True
    except OSError:  # none there, or a read-only checkpoint folder (a restored Ray checkpoint): nothing to do
        return False


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        # A run killed during its first checkpoint write has only the partial `last.pt.tmp`: nothing can
        # resume from it, and no later run would ever remove it (it can be as large as the model).
        removed = remove_orphan(path)
        raise UserError(f"no checkpoint at '{path}'" + (
            f" (its first write was cut off: removed the partial '{temporary_path(path).name}')" if removed else ""))
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object: never load it any other way
        raise UserError(f"refused checkpoint '{path}': it holds objects other than tensors and plain containers "
                        "(blendtune reads checkpoints with weights_only=True)") from None
    except Exception as e:
        raise UserError(f"cannot load checkpoint '{path}': {str(e).strip().splitlines()[0]}") from None
    # Resuming: a `last.pt.tmp` beside a good checkpoint is what a write killed after it left (the run
    # goes on from `last.pt`); removed here, or it would stay until the run's next save.
    remove_orphan(path)
    return state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
