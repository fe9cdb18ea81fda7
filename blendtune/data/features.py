"""Pre-extracted features, any number of modalities — the usual way to sweep at scale:

    <root>/train/<modality>.npy      N x D (a vector per sample) or N x T x D (a sequence, pooled by the mlp)
    <root>/train/labels.npy          N integer classes, or N x C of 0/1 (multi-label: BCE and mAP)
    <root>/train/groups.npy          optional: N group names (speakers, videos) for group-aware held-out
    <root>/test/...                  the same files

`.npz` works too (its only array, or the one named `features` / `labels`). Held in memory.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np
import torch

from blendtune.data.base import (DATASETS, DataCheck, DatasetAdapter, MultimodalDataset, Problem, class_coverage,
                                 data_root)
from blendtune.errors import UserError

SPLITS = ("train", "test")
RESERVED = ("labels", "groups")


def read_array(path: Path, key: str) -> np.ndarray:
    try:
        if path.suffix == ".npz":
            with np.load(path) as npz:
                names = list(npz.keys())
                name = key if key in names else (names[0] if len(names) == 1 else None)
                if name is None:
                    raise ValueError(f"several arrays ({', '.join(names)}) and none named {key!r}")
                return npz[name]
        return np.load(path)
    except Exception as e:
        raise UserError(f"cannot read array file '{path}': {e}") from None


def find(folder: Path, name: str) -> Path | None:
    for suffix in (".npy", ".npz"):
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    return None


def label_problems(labels: np.ndarray, where: str) -> list[Problem]:
    """Class indices must be whole numbers from 0 (N labels), multi-hot rows 0 or 1 (N x C)."""
    if not np.issubdtype(labels.dtype, np.number) and labels.dtype != bool:
        return [Problem("bad label", where, f"expected integer classes, got {labels.dtype}")]
    values = labels.astype(np.float64)
    if labels.ndim == 2:
        bad = np.flatnonzero(~np.isin(values, (0.0, 1.0)).all(axis=1))
        return [Problem("bad label", where, f"multi-hot rows hold 0 or 1; row {bad[0]} holds "
                                            f"{values[bad[0]][~np.isin(values[bad[0]], (0.0, 1.0))][0]:g}")] if len(bad) else []
    bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
    if len(bad):
        return [Problem("bad label", where, f"row {bad[0]}: {values[bad[0]]:g} is not a class index (whole numbers 0, 1, ...)")]
    bad = np.flatnonzero(values < 0)
    if len(bad):
        return [Problem("label outside the classes", where, f"row {bad[0]}: {values[bad[0]]:g}; classes are 0, 1, ...")]
    return []


@dataclass
class FeaturesOptions:
    modalities: List[str] = field(default_factory=list)  # empty: every <name>.npy in train/ but labels/groups


@DATASETS.register("features", options=FeaturesOptions)
class Features(DatasetAdapter):
    """Options: data.features.modalities (empty: every array file but labels/groups)."""
    name = "features"

    def modalities(self, base: Path) -> list[str]:
        if self.options["modalities"]:
            return list(self.options["modalities"])
        found = sorted({p.stem for p in (base / "train").glob("*.np[yz]")} - set(RESERVED))
        if not found:
            raise UserError(f"no feature files in '{base / 'train'}' (expected <modality>.npy beside labels.npy)")
        return found

    def read_split(self, base: Path, split: str, modalities: list[str]):
        folder = base / split
        arrays, problems = {}, []
        for name in [*modalities, "labels"]:
            path = find(folder, name)
            if path is None:
                problems.append(Problem("missing file", str(folder / f"{name}.npy")))
                continue
            arrays[name] = read_array(path, "labels" if name == "labels" else "features")
        groups = find(folder, "groups")
        if groups is not None:
            arrays["groups"] = read_array(groups, "groups")
        labels = arrays.get("labels")
        for name, x in arrays.items():
            if labels is not None and len(x) != len(labels):
                problems.append(Problem("length mismatch", str(find(folder, name)),
                                        f"{len(x)} rows, labels have {len(labels)}"))
            elif name in modalities and (x.ndim not in (2, 3) or not np.issubdtype(x.dtype, np.number)):
                problems.append(Problem("bad array", str(find(folder, name)),
                                        f"expected numbers N x D or N x T x D, got {x.dtype} {x.shape}"))
            elif name in modalities and not np.isfinite(x).all():
                rows = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
                problems.append(Problem("non-finite values", str(find(folder, name)),
                                        f"{len(rows)} rows with NaN/inf, first row {rows[0]}"))
        if labels is not None and labels.ndim not in (1, 2):
            problems.append(Problem("bad array", str(find(folder, "labels")), f"expected N or N x C, got {labels.shape}"))
        elif labels is not None:
            problems += label_problems(labels, str(find(folder, "labels")))
        return arrays, problems

    def load(self):
        """(root, modalities, arrays per split, problems, notes): whole-array checks, then the labels'
        classes across the splits."""
        base = data_root(self.root)
        modalities = self.modalities(base)
        splits, problems, notes = {}, [], []
        for split in SPLITS:
            arrays, found = self.read_split(base, split, modalities)
            splits[split], problems = arrays, problems + found
        if not problems:
            shapes = {s: {m: splits[s][m].shape[1:] for m in modalities} for s in SPLITS}
            for m in modalities:
                if shapes["train"][m] != shapes["test"][m]:
                    problems.append(Problem("shape mismatch", str(find(base / "test", m)),
                                            f"test {shapes['test'][m]} vs train {shapes['train'][m]}"))
        if not problems and splits["train"]["labels"].ndim != splits["test"]["labels"].ndim:
            problems.append(Problem("shape mismatch", str(find(base / "test", "labels")),
                                    "train and test labels differ: one is class indices, the other multi-hot"))
        if not problems:
            found, notes = class_coverage(self.class_counts(splits), self.classes(splits), str(base / "*" / "labels"),
                                          multilabel=splits["train"]["labels"].ndim == 2)
            problems += found
        return base, modalities, splits, problems, notes

    def classes(self, splits) -> list[str]:
        return [str(c) for c in range(self.num_classes(splits))]

    @staticmethod
    def class_counts(splits) -> dict[str, Counter]:
        counts = {s: Counter() for s in SPLITS}
        for s in SPLITS:
            labels = splits[s]["labels"]
            if labels.ndim == 2:
                counts[s].update({str(c): int(n) for c, n in enumerate(labels.sum(axis=0))})
            else:
                counts[s].update(str(int(c)) for c in labels)
        return counts

    def preflight(self, skip_bad: bool = False) -> None:
        base, _, _, problems, _ = self.load()
        self.raise_problems(base, problems)  # whole arrays: nothing data.skip_bad could leave out

    @staticmethod
    def raise_problems(base, problems) -> None:
        if problems:
            raise UserError(f"features in '{base}': {problems[0]}"
                            + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
                            + "; `blendtune data check features` lists them")

    @staticmethod
    def num_classes(splits) -> int:
        labels = [splits[s]["labels"] for s in SPLITS]
        return labels[0].shape[1] if labels[0].ndim == 2 else int(max(x.max() for x in labels)) + 1

    def build(self, skip_bad: bool = False, spectrogram_on: str = "loader", **_in_memory_ignores):
        base, modalities, splits, problems, _ = self.load()
        self.raise_problems(base, problems)  # whole arrays: nothing to skip sample by sample
        num_classes = self.num_classes(splits)
        out = []
        for split in SPLITS:
            a = splits[split]
            labels = a["labels"]
            targets = torch.from_numpy(labels.astype(np.float32) if labels.ndim == 2 else labels.astype(np.int64))
            groups = [str(g) for g in a["groups"]] if "groups" in a else None
            out.append(MultimodalDataset({m: torch.from_numpy(np.ascontiguousarray(a[m], dtype=np.float32))
                                          for m in modalities}, targets, num_classes, groups,
                                         default_encoders={m: "mlp" for m in modalities}))
        return tuple(out)

    def check(self) -> DataCheck:
        base, modalities, splits, problems, notes = self.load()
        labelled = all("labels" in splits[s] and splits[s]["labels"].ndim in (1, 2) and not label_problems(splits[s]["labels"], "") for s in SPLITS)
        classes = self.classes(splits) if labelled else []
        counts = self.class_counts(splits) if labelled else {s: Counter() for s in SPLITS}
        return DataCheck(self.name, str(base), classes, counts, problems, notes)
