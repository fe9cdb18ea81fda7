"""Kinetics-Sounds / VGGSound style: one CSV lists every clip.

    <root>/<csv>                 header `id,label,split` (optional `group` column); split is train or test
    <root>/audio/<id>.wav
    <root>/frames/<id>/*.jpg     or   <root>/video/<id>.mp4 (torchcodec; audio from it when no WAV)

Classes are the labels found in the CSV (sorted) unless `classes` lists them. With `multilabel: true`
(AudioSet-like) the label field holds several labels separated by `label_separator`; training then
uses a sigmoid / binary cross-entropy per class and reports mAP.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from typing import List

from blendtune.data.audiovisual import SPLITS, AudioVisualAdapter, Catalog, ClipConfig, Sample
from blendtune.data.base import DATASETS, Problem
from blendtune.errors import UserError


@dataclass
class AVCSVOptions(ClipConfig):
    csv: str = "data.csv"        # header id,label,split (+ optional group)
    audio_dir: str = "audio"
    frames_dir: str = "frames"
    video_dir: str = "video"     # <id>.mp4 (or .mkv, .webm, .avi, .mov): frames, and audio when no WAV
    classes: List[str] = field(default_factory=list)  # empty: the labels found in the CSV, sorted
    multilabel: bool = False     # labels separated by label_separator; BCE loss, mAP
    label_separator: str = ";"
    sample_rate: int = 16000
    window_s: float = 10.0
    hop_length: int = 160
    num_frames: int = 3


VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


@DATASETS.register("av_csv", options=AVCSVOptions)
class AVCSV(AudioVisualAdapter):
    name = "av_csv"

    def sample(self, clip: str, split: str, labels: tuple, group: str | None) -> Sample:
        """A clip's files: a frame folder if there is one, else a video file; a WAV if there is one, else
        the video's own audio."""
        p = self.paths
        wav, frames = self.root / p["audio_dir"] / f"{clip}.wav", self.root / p["frames_dir"] / clip
        video = next((v for v in (self.root / p["video_dir"] / f"{clip}{x}" for x in VIDEO_SUFFIXES) if v.is_file()),
                     None)
        if frames.is_dir() or video is None:
            return Sample(clip, split, labels, wav, frames, group=group)
        return Sample(clip, split, labels, wav if wav.is_file() else video, None, group=group, video=video)

    def catalog(self) -> Catalog:
        p = self.paths
        table = self.root / p["csv"]
        if not table.is_file():
            raise UserError(f"clip list not found: '{table}' (a CSV with header id,label,split; data.av_csv.csv names it)")
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
        missing = {"id", "label", "split"} - set(header)
        if missing:
            raise UserError(f"'{table}': missing column(s) {', '.join(sorted(missing))}; expected header id,label,split")
        separator = p["label_separator"] if p["multilabel"] else None
        declared = list(p["classes"])
        samples, problems = [], []
        seen: dict[str, tuple[int, str]] = {}
        for line, row in enumerate(rows, start=2):
            where = f"{table}:{line}"
            labels = tuple(x.strip() for x in (row["label"].split(separator) if separator else [row["label"]]) if x.strip())
            unknown = [x for x in labels if declared and x not in declared]
            if not labels or unknown:
                problems.append(Problem("unknown label", where, f"{unknown or row['label']!r} not in data.av_csv.classes"
                                        if unknown else "empty label"))
                continue
            if row["split"] not in SPLITS:
                problems.append(Problem("bad row", where, f"split {row['split']!r}: expected train or test"))
                continue
            clip = row["id"].strip()
            if clip in seen:  # the same clip twice: trained on twice, or (in both splits) tested on what it trained on
                first_line, first_split = seen[clip]
                kind = "split overlap" if first_split != row["split"] else "duplicate id"
                problems.append(Problem(kind, where, f"{clip!r} is already listed at line {first_line} "
                                                     f"({first_split}); this row ({row['split']}) is dropped only "
                                                     "with data.skip_bad=true"))
                continue
            seen[clip] = (line, row["split"])
            samples.append(self.sample(clip, row["split"], labels, row.get("group") or None))
        classes = declared or sorted({x for s in samples for x in s.labels})
        return Catalog(samples, classes, multilabel=bool(p["multilabel"]), problems=problems)
