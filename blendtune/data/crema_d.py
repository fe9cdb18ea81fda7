"""CREMA-D as the OGM-GE code prepares it (Peng et al., CVPR 2022):

    <root>/AudioWAV/<clip>.wav
    <root>/Image-01-FPS/<clip>/*.jpg        (frames extracted at 1 fps; `frames_dir` for other rates)
    <root>/train.csv, <root>/test.csv       rows `<clip>,<EMOTION>`, no header

Six emotions; the actor id (the clip name's first field, e.g. 1001 in 1001_DFA_ANG_XX) is the group, so
`data.held_out_by_group=true` holds out whole actors. Audio: 3 s at 22.05 kHz, a short clip repeated to
fill it, log-magnitude STFT with n_fft 512 / hop 353 (1 x 257 x 188), as the OGM-GE code.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass

from blendtune.data.audiovisual import AudioVisualAdapter, Catalog, ClipConfig, Sample
from blendtune.data.base import DATASETS, Problem
from blendtune.errors import UserError

EMOTIONS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]


@dataclass
class CremaDOptions(ClipConfig):
    train_csv: str = "train.csv"
    test_csv: str = "test.csv"
    audio_dir: str = "AudioWAV"
    frames_dir: str = "Image-01-FPS"


@DATASETS.register("crema_d", options=CremaDOptions)
class CremaD(AudioVisualAdapter):
    name = "crema_d"

    def catalog(self) -> Catalog:
        p = self.paths
        samples, problems = [], []
        for split, csv_name in (("train", p["train_csv"]), ("test", p["test_csv"])):
            table = self.root / csv_name
            if not table.is_file():
                raise UserError(f"CREMA-D split file not found: '{table}' (rows <clip>,<EMOTION>; "
                                f"data.crema_d.{split}_csv names it)")
            with open(table, newline="") as f:
                for line, row in enumerate(csv.reader(f), start=1):
                    if not row or not "".join(row).strip():
                        continue
                    where = f"{table}:{line}"
                    if len(row) < 2:
                        problems.append(Problem("bad row", where, f"expected <clip>,<EMOTION>, got {row}"))
                        continue
                    clip, emotion = row[0].strip(), row[1].strip()
                    if emotion not in EMOTIONS:
                        problems.append(Problem("unknown label", where, f"{emotion!r} is not one of {', '.join(EMOTIONS)}"))
                        continue
                    samples.append(Sample(clip, split, (emotion,), self.root / p["audio_dir"] / f"{clip}.wav",
                                          self.root / p["frames_dir"] / clip, group=clip.split("_")[0]))
        return Catalog(samples, EMOTIONS, multilabel=False, problems=problems)
