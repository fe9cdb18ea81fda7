"""A prepared cache of decoded clips, reused by every trial of a sweep: `blendtune data prepare`.

Per sample: the waveform resampled to the layout's rate (float32, the whole clip) and every frame
decoded and resized to `frame_size` x `frame_size` (uint8; by default image_size * 8 / 7, what a 224 crop
is taken from). Both live in numpy `.npy` files read memory-mapped (`np.load(mmap_mode="r")`): loader
workers share the pages, nothing is copied per process, and a sweep of N trials reads the cache N times
instead of decoding every JPEG N times.

    <data root>/.blendtune-cache/<layout>-<options digest>/
        manifest.json   version, options, source fingerprint, counts
        waves.npy       float32 (total samples,)        wave_offsets.npy  int64 (clips + 1,)
        frames.npy      uint8 (total frames, 3, S, S)   frame_offsets.npy int64 (clips + 1,)
        keys.json       the clips in order (their audio file, relative to the data root)

Freshness: the fingerprint hashes every source file's path, size and mtime. A cache is used only if its
manifest exists (it is written last, and the folder is renamed into place whole) and its fingerprint
matches the files as they are now; a stale cache is rebuilt, a partial one is never read.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile
import torch

from blendtune.data.audio import read_clip
from blendtune.errors import UserError

CACHE_VERSION = 1
CACHE_DIR = ".blendtune-cache"


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")) if folder.is_dir() else []


def source_files(samples) -> list[Path]:
    files = []
    for s in samples:
        files.append(s.audio)
        if s.frames is not None:
            files += _frame_files(s.frames)
    return files


def fingerprint(samples, root: Path) -> str:
    """sha256 over (path relative to the root, size, mtime) of every source file, in catalog order."""
    digest = hashlib.sha256()
    for path in source_files(samples):
        st = path.stat()
        digest.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_dir(root: Path, layout: str, sample_rate: int, frame_size: int) -> Path:
    key = json.dumps({"version": CACHE_VERSION, "layout": layout, "sample_rate": sample_rate,
                      "frame_size": frame_size}, sort_keys=True)
    return Path(root) / CACHE_DIR / f"{layout}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _resampled_length(frames: int, orig: int, new: int) -> int:
    return frames if orig == new else math.ceil(frames * new / orig)  # torchaudio's Resample output length


def _decode_frame(path: Path, size: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image
    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB)
    except Exception as e:
        raise UserError(f"cannot decode JPEG file '{path}': {e}") from None
    from torchvision.transforms.v2 import functional as TF
    return TF.resize(image, [size, size], antialias=True)


ORPHAN_AGE_S = 24 * 3600  # a build on another host (a shared file system) whose process we cannot ask


def remove_orphaned_builds(caches: Path) -> list[Path]:
    """Remove the half-built caches (`.<cache>.tmp-<host>-<pid>`) that builds killed midway left in
    `caches`: this host's whose process is gone, and any other host's untouched for a day. Returns them."""
    removed = []
    host = socket.gethostname()
    for tmp in caches.glob(".*.tmp-*") if caches.is_dir() else []:
        owner, _, pid = tmp.name.rpartition(".tmp-")[2].rpartition("-")
        try:
            if owner == host and pid.isdigit():
                try:
                    os.kill(int(pid), 0)
                    continue  # still building
                except ProcessLookupError:
                    pass
                except PermissionError:
                    continue  # alive, another user's
            elif time.time() - tmp.stat().st_mtime < ORPHAN_AGE_S:
                continue
        except OSError:
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    if removed:
        print(f"blendtune: removed {len(removed)} half-built cache(s) a killed `data prepare` left (first: {removed[0]})",
              file=sys.stderr, flush=True)
    return removed


def build_cache(samples, root: Path, directory: Path, sample_rate: int, frame_size: int, threads: int = 0) -> Path:
    """Decode every sample into a new cache at `directory` (built beside it, renamed into place whole)."""
    began = time.perf_counter()
    root, directory = Path(root), Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_builds(directory.parent)
    tmp = directory.parent / f".{directory.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        lengths, counts = [], []
        for s in samples:
            info = soundfile.info(str(s.audio))
            lengths.append(_resampled_length(info.frames, info.samplerate, sample_rate))
            counts.append(len(_frame_files(s.frames)) if s.frames is not None else 0)
        wave_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        frame_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        waves = np.lib.format.open_memmap(tmp / "waves.npy", mode="w+", dtype=np.float32, shape=(int(wave_offsets[-1]),))
        frames = np.lib.format.open_memmap(tmp / "frames.npy", mode="w+", dtype=np.uint8,
                                           shape=(int(frame_offsets[-1]), 3, frame_size, frame_size))

        def fill(i: int) -> None:  # decoding (libsndfile, libjpeg) releases the GIL: threads scale
            s = samples[i]
            wave = read_clip(s.audio, sample_rate).numpy()
            a, b = wave_offsets[i], wave_offsets[i + 1]
            if len(wave) != b - a:
                raise UserError(f"'{s.audio}': decoded {len(wave)} samples, its header promised {b - a}")
            waves[a:b] = wave
            for j, path in enumerate(_frame_files(s.frames) if s.frames is not None else []):
                frames[frame_offsets[i] + j] = _decode_frame(path, frame_size).numpy()

        with ThreadPoolExecutor(max_workers=threads or min(16, (os.cpu_count() or 1) * 2)) as pool:
            list(pool.map(fill, range(len(samples))))
        waves.flush()
        frames.flush()
        np.save(tmp / "wave_offsets.npy", wave_offsets)
        np.save(tmp / "frame_offsets.npy", frame_offsets)
        (tmp / "keys.json").write_text(json.dumps([str(s.audio.relative_to(root)) for s in samples]))
        manifest = {"version": CACHE_VERSION, "sample_rate": sample_rate, "frame_size": frame_size,
                    "fingerprint": fingerprint(samples, root), "clips": len(samples), "frames": int(frame_offsets[-1]),
                    "seconds_to_build": round(time.perf_counter() - began, 2)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))  # last: marks the cache complete
        if directory.exists():
            shutil.rmtree(directory)  # the stale one it replaces
        try:
            tmp.rename(directory)
        except OSError:  # another process (a parallel trial) put a fresh one there first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


class ClipCache:
    """A complete cache, opened lazily (memory maps are made in each loader worker, not pickled)."""

    def __init__(self, directory: Path, root: Path):
        self.directory, self.root = Path(directory), Path(root)
        self.manifest = json.loads((self.directory / "manifest.json").read_text())
        self.index = {key: i for i, key in enumerate(json.loads((self.directory / "keys.json").read_text()))}
        self._arrays = None

    @classmethod
    def open(cls, directory: Path, root: Path) -> "ClipCache | None":
        """The cache at `directory`, or None when there is none or it is partial (no manifest)."""
        if not (Path(directory) / "manifest.json").is_file():
            return None
        try:
            cache = cls(directory, root)
        except (OSError, ValueError):
            return None
        return cache if cache.manifest.get("version") == CACHE_VERSION else None

    def is_fresh(self, samples) -> bool:
        return self.manifest["fingerprint"] == fingerprint(samples, self.root)

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def _open_arrays(self):
        if self._arrays is None:
            d = self.directory
            self._arrays = (np.load(d / "waves.npy", mmap_mode="r"), np.load(d / "wave_offsets.npy"),
                            np.load(d / "frames.npy", mmap_mode="r"), np.load(d / "frame_offsets.npy"))
        return self._arrays

    def position(self, sample) -> int:
        return self.index[str(sample.audio.relative_to(self.root))]

    def wave(self, i: int) -> torch.Tensor:
        waves, offsets, _, _ = self._open_arrays()
        return torch.from_numpy(np.array(waves[offsets[i]:offsets[i + 1]]))

    def frame_count(self, i: int) -> int:
        _, _, _, offsets = self._open_arrays()
        return int(offsets[i + 1] - offsets[i])

    def frames(self, i: int, picks: list[int]) -> list[torch.Tensor]:
        _, _, frames, offsets = self._open_arrays()
        return [torch.from_numpy(np.array(frames[offsets[i] + j])) for j in picks]

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.iterdir())


def fresh_cache(samples, root: Path, layout: str, sample_rate: int, frame_size: int) -> ClipCache | None:
    """The cache for these samples if one was prepared: used when fresh, rebuilt (with a line saying so)
    when the source files changed; None when none was ever prepared."""
    directory = cache_dir(root, layout, sample_rate, frame_size)
    remove_orphaned_builds(directory.parent)
    cache = ClipCache.open(directory, root)
    if cache is None:
        return None
    if cache.is_fresh(samples):
        return cache
    print(f"blendtune: the prepared cache '{directory}' is stale (source files changed); rebuilding it",
          file=sys.stderr, flush=True)
    build_cache(samples, root, directory, sample_rate, frame_size)
    return ClipCache.open(directory, root)
