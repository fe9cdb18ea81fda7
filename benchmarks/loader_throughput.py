"""Loader throughput of the CREMA-D layout, by decoding path.

    python benchmarks/loader_throughput.py --clips 256 --workers 0 2                 (CPU)
    python benchmarks/loader_throughput.py --clips 1024 --workers 0 4 8 --video      (GPU machine)

Builds a CREMA-D-shaped tree in a temp dir (16 kHz WAVs of 1.5-3.5 s like CREMA-D's, 3 JPEG frames of
480x360 per clip), then times full passes of the training DataLoader plus the step's device transforms
(decode, resample to 22.05 kHz, STFT 512/353, frame crop/resize 224, batch 64), alternating the paths:
- `files`: everything in the loader workers (JPEG decode on the CPU)
- `spectrogram on device`: data.spectrogram_on=device
- `frames on device`: data.frames_on=device too (workers read JPEG bytes; decode_jpeg batched on the device)
- `cache`: after `blendtune data prepare` (memory-mapped waveforms and 256x256 frames), loader transforms
- `cache, on device`: the cache with spectrogram and frame transforms on the device
- `mp4` (--video): the av_csv layout with one 3-frame mp4 per clip (torchcodec), audio from the mp4
"device" is CUDA if present, else this CPU. Also reports the cache's build time and size per clip.
Writes benchmarks/results/loader_throughput.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile
import torch
from torch.utils.data import DataLoader
from torchvision.io import encode_jpeg, write_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, median, timed, write  # noqa: E402

from blendtune.config import load_config  # noqa: E402
from blendtune.data import DATASETS  # noqa: E402

EMOTIONS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]


def make_tree(root: Path, clips: int) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(clips):
        clip = f"{1001 + i % 91}_C{i:04d}_{EMOTIONS[i % 6]}_XX"
        wave = rng.normal(0, 0.1, int(16000 * rng.uniform(1.5, 3.5))).astype(np.float32)
        (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
        soundfile.write(root / "AudioWAV" / f"{clip}.wav", wave, 16000)
        frames = root / "Image-01-FPS" / clip
        frames.mkdir(parents=True)
        for f in range(3):
            img = torch.from_numpy(rng.integers(0, 255, (3, 360, 480), dtype=np.uint8))
            write_file(str(frames / f"{f:03d}.jpg"), encode_jpeg(img, quality=90))
        rows.append(f"{clip},{EMOTIONS[i % 6]}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "test.csv").write_text("\n".join(rows[:6]) + "\n")


def make_video_tree(root: Path, clips: int) -> None:
    from blendtune.data.video import write_test_video
    rng = np.random.default_rng(0)
    (root / "video").mkdir(parents=True)
    rows = ["id,label,split"]
    for i in range(clips):
        frames = torch.from_numpy(rng.integers(0, 255, (3, 3, 360, 480), dtype=np.uint8))
        audio = torch.from_numpy(rng.normal(0, 0.1, int(16000 * rng.uniform(1.5, 3.5))).astype(np.float32))
        write_test_video(root / "video" / f"c{i:04d}.mp4", frames, fps=1, audio=audio, sample_rate=16000)
        rows.append(f"c{i:04d},{EMOTIONS[i % 6]},{'test' if i < 6 else 'train'}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")


PATHS = {  # name -> (spectrogram_on, frames_on, use_cache)
    "files": ("loader", "loader", False),
    "spectrogram on device": ("device", "loader", False),
    "frames on device": ("device", "device", False),
    "cache": ("loader", "loader", True),
    "cache, on device": ("device", "device", True),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--video", action="store_true", help="also time an mp4 tree (torchcodec)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "crema"
        make_tree(root, args.clips)
        options = asdict(load_config(None, ["data.dataset=crema_d"]).data.crema_d)
        adapter = DATASETS.get("crema_d")(root=str(root), **options)
        began = time.perf_counter()
        cache = adapter.prepare()
        build_s, size = time.perf_counter() - began, cache.size_bytes()
        datasets = {name: adapter.build(spectrogram_on=s, frames_on=f, use_cache=c)[0]
                    for name, (s, f, c) in PATHS.items()}
        if args.video:
            video_root = Path(tmp) / "ks"
            make_video_tree(video_root, args.clips)
            av = asdict(load_config(None, ["data.dataset=av_csv", "data.av_csv.sample_rate=22050",
                                           "data.av_csv.window_s=3", "data.av_csv.hop_length=353",
                                           "data.av_csv.num_frames=1", "data.av_csv.n_fft=512"]).data.av_csv)
            datasets["mp4"] = DATASETS.get("av_csv")(root=str(video_root), **av).build(use_cache=False)[0]
        rows, payload = [], {"clips": args.clips, "batch": args.batch, "device": str(device), "results": [],
                             "cache_build_s": build_s, "cache_bytes": size}
        for workers in args.workers:
            def one_pass(name: str, workers=workers) -> float:
                ds = datasets[name]
                transforms = {m: t.to(device) for m, t in ds.device_transforms.items()}
                loader = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=workers,
                                    collate_fn=ds.collate_fn, pin_memory=device.type == "cuda")

                def run():
                    for inputs, _, _ in loader:
                        moved = {m: x.to(device, non_blocking=True) for m, x in inputs.items()}
                        with torch.no_grad():
                            for m, t in transforms.items():
                                moved[m] = t(moved[m])
                return len(ds) / timed(run, sync)
            samples = alternate({name: (lambda n=name: one_pass(n)) for name in datasets}, args.repeats)
            for name, xs in samples.items():
                payload["results"].append({"workers": workers, "path": name, "samples_per_s": xs})
            rows.append((workers, {name: median(xs) for name, xs in samples.items()}))
    names = list(datasets)
    table = ["| loader workers | " + " | ".join(f"{n} (samples/s)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    table += [f"| {w} | " + " | ".join(f"{r[n]:.1f} ({r[n] / r['files']:.2f}x)" for n in names) + " |"
              for w, r in rows]
    write("loader_throughput", payload, table,
          f"{args.clips} clips, batch {args.batch}, medians of {args.repeats} alternated passes; device = {device}; "
          f"(x) = vs `files` at the same worker count. Cache: built in {build_s:.1f} s, {size / 1e6:.1f} MB "
          f"({size / args.clips / 1e6:.2f} MB and {build_s / args.clips * 1e3:.1f} ms per clip; 7,442 clips: "
          f"~{size / args.clips * 7442 / 1e9:.1f} GB, ~{build_s / args.clips * 7442 / 60:.1f} min here).")


if __name__ == "__main__":
    main()
