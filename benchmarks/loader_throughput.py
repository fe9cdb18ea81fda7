"""Loader throughput of the CREMA-D layout: spectrograms in the loader workers vs batched on the device.

    python benchmarks/loader_throughput.py --clips 256 --workers 0 2

Builds a CREMA-D-shaped tree in a temp dir (16 kHz WAVs of 1.5-3.5 s like CREMA-D's, 3 JPEG frames of
480x360 per clip), then times full passes of the training DataLoader (decode, resample to 22.05 kHz,
STFT 512/353, frame crop/resize 224, batch 64) for each worker count, alternating the two paths.
`device` includes the batched transform on the training device (CUDA if present, else this CPU).
Writes benchmarks/results/loader_throughput.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tree(root, args.clips)
        options = asdict(load_config(None, ["data.dataset=crema_d"]).data.crema_d)
        adapter = DATASETS.get("crema_d")(root=str(root), **options)
        datasets = {path: adapter.build(spectrogram_on=path)[0] for path in ("loader", "device")}
        rows, payload = [], {"clips": args.clips, "batch": args.batch, "device": str(device), "results": []}
        for workers in args.workers:
            def one_pass(path: str, workers=workers) -> float:
                ds = datasets[path]
                transform = ds.device_transforms.get("audio")
                transform = transform.to(device) if transform is not None else None
                loader = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=workers,
                                    collate_fn=ds.collate_fn, pin_memory=device.type == "cuda")

                def run():
                    for inputs, _, _ in loader:
                        audio = inputs["audio"].to(device, non_blocking=True)
                        inputs["visual"].to(device, non_blocking=True)
                        if transform is not None:
                            with torch.no_grad():
                                transform(audio)
                return args.clips / timed(run, sync)
            samples = alternate({p: (lambda p=p: one_pass(p)) for p in datasets}, args.repeats)
            for path, xs in samples.items():
                payload["results"].append({"workers": workers, "spectrogram_on": path, "samples_per_s": xs})
            rows.append((workers, median(samples["loader"]), median(samples["device"])))
    table = ["| loader workers | spectrogram in loader (samples/s) | spectrogram on device (samples/s) | device / loader |",
             "|---|---|---|---|"]
    table += [f"| {w} | {a:.1f} | {b:.1f} | {b / a:.2f}x |" for w, a, b in rows]
    write("loader_throughput", payload, table,
          f"{args.clips} clips, batch {args.batch}, medians of {args.repeats} alternated passes; device = {device}.")


if __name__ == "__main__":
    main()
