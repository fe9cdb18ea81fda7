"""The experiments and search spaces that ship with blendtune, found by name.

In a checkout (or an editable install) they are the top-level `experiments/` and `search_spaces/`; a wheel
carries copies as `blendtune/_shipped/` (setup.py puts them there). `blendtune train synthetic_naive` and
`--space ogm` name them; a path that exists always wins."""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _folder(name: str) -> Path:
    installed = _PACKAGE / "_shipped" / name
    if installed.is_dir():
        return installed
    return _PACKAGE.parent / name  # the checkout's own folder


def experiments_dir() -> Path:
    return _folder("experiments")


def spaces_dir() -> Path:
    return _folder("search_spaces")


def names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def resolve(path: str | Path, folder: Path) -> Path:
    """`path` itself if it exists; else a bare name (`synthetic_naive`, `synthetic_naive.yaml`, also as the
    README writes it, `experiments/synthetic_naive.yaml`) in `folder`;
    else `path` unchanged (the caller's not-found message names it)."""
    path = Path(path)
    bare = len(path.parts) == 1 or (len(path.parts) == 2 and path.parts[0] == folder.name)  # experiments/x.yaml
    if path.exists() or not bare:
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    shipped = folder / f"{stem}.yaml"
    return shipped if shipped.is_file() else path
