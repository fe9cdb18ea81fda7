"""The dataset interface every adapter returns, and the held-out split G-Blend and OGR measure on."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from blendtune.errors import UserError
from blendtune.registry import Registry

DATASETS: Registry = Registry("dataset")


@dataclass
class Problem:
    """One bad sample or row, found by `DatasetAdapter.check` (or the quick scan before training)."""
    kind: str      # missing file, undecodable WAV, undecodable JPEG, empty frame folder, unknown label, ...
    path: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class DataCheck:
    dataset: str
    root: str
    classes: list[str]
    counts: dict[str, Counter]     # split -> class -> samples listed
    problems: list[Problem]
    notes: list[str] = field(default_factory=list)  # worth knowing, not refused (a class only in train)

    def format(self) -> str:
        lines = [f"{self.dataset} at {self.root}: {len(self.classes)} classes"]
        width = max([len(c) for c in self.classes] + [5])
        lines.append("split".ljust(8) + "".join(c.rjust(width + 1) for c in self.classes) + "total".rjust(8))
        for split, counter in self.counts.items():
            lines.append(split.ljust(8) + "".join(str(counter[c]).rjust(width + 1) for c in self.classes)
                         + str(sum(counter.values())).rjust(8))
        kinds = Counter(p.kind for p in self.problems)
        lines.append(f"problems: {len(self.problems)}" + (" (" + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")"
                                                           if kinds else ""))
        lines += [f"  {p}" for p in self.problems]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def class_coverage(counts: dict[str, Counter], classes: Sequence[str], where: str,
                   multilabel: bool = False) -> tuple[list[Problem], list[str]]:
    """What the splits' class counts say about the classes: a class with test samples but none to train on
    (the model can never learn it: a problem, refused), fewer than two classes to train on (a problem), a
    class with training samples but none in test, or none at all (notes). Multi-label data (rare tags are
    usual there) gets notes only."""
    train, test = counts.get("train", Counter()), counts.get("test", Counter())
    problems, notes = [], []
    only_test = [c for c in classes if test[c] and not train[c]]
    if only_test:
        problems.append(Problem("class only in test", where, f"class(es) {', '.join(map(str, only_test))}: "
                                f"{sum(test[c] for c in only_test)} test samples, none in train"))
    trained = [c for c in classes if train[c]]
    if 0 < len(trained) < 2:
        problems.append(Problem("one class", where, f"train has only class {trained[0]}: nothing to tell apart"))
    only_train = [c for c in classes if train[c] and not test[c]] if sum(test.values()) else []
    if only_train:
        notes.append(f"class(es) {', '.join(map(str, only_train))} have training samples but none in test "
                     "(their test accuracy is not measured)")
    unused = [c for c in classes if not train[c] and not test[c]]
    if unused:
        notes.append(f"class(es) {', '.join(map(str, unused))} have no samples in any split")
    if multilabel:
        return [], [f"{p.kind}: {p.detail}" for p in problems] + notes
    return problems, notes


class DatasetAdapter:
    """One on-disk layout, registered in DATASETS under `name`. Options come from `data.<name>`."""
    name = ""
    reads_files = True  # needs data.root / $BLENDTUNE_DATA_ROOT

    def __init__(self, root: str | None = None, **options):
        self.root = root
        self.options = options

    def build(self, skip_bad: bool = False, spectrogram_on: str = "loader", frames_on: str = "loader",
              use_cache: bool = True) -> tuple[Dataset, Dataset]:
        """(train, test) datasets with `targets`, `num_classes`, `modalities`, `input_shapes`, `subset`.
        File layouts decode frames in the loader or on the device (`frames_on`) and read a prepared
        cache when one is fresh (`use_cache`); in-memory datasets ignore both."""
        raise NotImplementedError

    def check(self) -> DataCheck:
        """Walk every file; nothing is trained."""
        raise NotImplementedError

    def preflight(self, skip_bad: bool = False) -> None:
        """The cheap checks that can refuse a run before its folder is made or Ray starts (a file list,
        headers, labels), raising UserError; decoding every file is `check()`'s job. Default: none."""


class MultimodalDataset(Dataset):
    """In-memory k-modality classification data; an item is ({modality: tensor}, target)."""

    def __init__(self, inputs: dict[str, Tensor], targets: Tensor, num_classes: int,
                 groups: Sequence[str] | None = None, default_encoders: dict[str, str] | None = None):
        n = len(targets)
        for m, x in inputs.items():
            if len(x) != n:
                raise ValueError(f"modality {m!r} has {len(x)} samples, targets have {n}")
        self.inputs = inputs
        self.targets = targets if targets.is_floating_point() else targets.long()  # float: multi-hot
        self.num_classes = num_classes
        self.groups = list(groups) if groups is not None else None
        self.default_encoders = default_encoders or {m: "mlp" for m in inputs}

    @property
    def modalities(self) -> list[str]:
        return list(self.inputs)

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {m: tuple(x.shape[1:]) for m, x in self.inputs.items()}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return {m: x[i] for m, x in self.inputs.items()}, self.targets[i]

    def __getitems__(self, indices) -> tuple[dict[str, Tensor], Tensor]:
        # DataLoader fetches a whole batch with one indexing op per modality instead of per sample.
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {m: x[idx] for m, x in self.inputs.items()}, self.targets[idx]

    multilabel = property(lambda self: self.targets.dim() == 2)
    device_transforms: dict = {}

    @staticmethod
    def collate_fn(batch):
        return batch  # __getitems__ already returns a collated batch

    def for_evaluation(self) -> "MultimodalDataset":
        return self

    def on_device(self, device) -> "MultimodalDataset":
        """The same samples with every tensor on `device` (batches are then indexed there)."""
        return MultimodalDataset({m: x.to(device) for m, x in self.inputs.items()}, self.targets.to(device),
                                 self.num_classes, self.groups, self.default_encoders)

    def subset(self, indices) -> "MultimodalDataset":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        groups = [self.groups[i] for i in idx.tolist()] if self.groups is not None else None
        return MultimodalDataset({m: x[idx] for m, x in self.inputs.items()}, self.targets[idx],
                                 self.num_classes, groups, self.default_encoders)


@dataclass
class Splits:
    train: MultimodalDataset      # T: what the model trains on
    held_out: MultimodalDataset | None  # V: carved from the training set, never trained on
    train_eval: MultimodalDataset  # T or a fixed subset T' for measuring train loss
    test: MultimodalDataset | None  # optional for datasets of the user's own (then no test metrics)

    @property
    def modalities(self) -> list[str]:
        return self.train.modalities

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def multilabel(self) -> bool:
        return bool(self.train.multilabel)

    @property
    def device_transforms(self) -> dict:
        """Per modality, a module the training step applies to each batch on the device."""
        return dict(getattr(self.train, "device_transforms", {}) or {})


def absolute_root(path: str) -> str:
    """`~/data` or `../data` made absolute (symlinks kept as written), for processes that run elsewhere
    (Ray trials run in their own directories); a URL (`s3://...`) unchanged."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def data_root(root: str | None) -> Path:
    root = root or os.environ.get("BLENDTUNE_DATA_ROOT")
    if not root:
        raise UserError("data root not set: set data.root=DIR or the BLENDTUNE_DATA_ROOT environment variable")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f"data root {str(path)!r} (data.root / BLENDTUNE_DATA_ROOT) is not a directory")
    return path


def held_out_indices(targets: np.ndarray, ratio: float, seed: int, groups: Sequence[str] | None = None,
                     folds: int = 0, fold: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held_out) index arrays. Stratified by class, or whole groups when `groups` is given.
    With `folds` = k >= 2, the held-out part is fold `fold` of a seeded k-fold partition (each class, or
    the groups, dealt into k folds) instead of a `ratio` share: k trials see k disjoint held-out sets."""
    n = len(targets)
    rng = np.random.default_rng(seed)
    if folds >= 2:
        return _fold_indices(targets, seed, groups, folds, fold)
    if ratio <= 0:
        return np.arange(n), np.arange(0)
    if groups is not None:
        groups = np.asarray(groups)
        names = np.unique(groups)
        if len(names) < 2:
            raise UserError(f"group-aware held-out split needs at least 2 groups, the training set has {len(names)}")
        rng.shuffle(names)
        chosen, count = [], 0
        for name in names[:-1]:  # always leave one group to train on
            chosen.append(name)
            count += int((groups == name).sum())
            if count >= ratio * n:
                break
        mask = np.isin(groups, chosen)
        return np.flatnonzero(~mask), np.flatnonzero(mask)
    held = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        take = int(round(ratio * len(idx)))
        if len(idx) > 1:
            take = min(max(take, 1), len(idx) - 1)
        held.append(idx[:take])
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(n), held), held


def _fold_indices(targets: np.ndarray, seed: int, groups, folds: int, fold: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = len(targets)
    if groups is not None:
        groups = np.asarray(groups)
        names = np.unique(groups)
        if len(names) < folds:
            raise UserError(f"data.held_out_folds={folds} with data.held_out_by_group: the training set has only "
                            f"{len(names)} groups; use at most that many folds")
        rng.shuffle(names)
        mask = np.isin(groups, names[fold::folds])
        return np.flatnonzero(~mask), np.flatnonzero(mask)
    held = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        held.append(np.array_split(idx, folds)[fold])
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(n), held), held


def build_splits(dataset: str, data_args: dict, held_out_ratio: float, held_out_by_group: bool,
                 train_eval_size: int | None, seed: int, skip_bad: bool = False,
                 spectrogram_on: str = "loader", folds: int = 0, fold: int = 0, **loading) -> Splits:
    """Build the named dataset and carve the held-out split from its training part (seeded).
    `loading`: frames_on, use_cache (file layouts)."""
    full_train, test = DATASETS.get(dataset)(**data_args).build(skip_bad=skip_bad, spectrogram_on=spectrogram_on,
                                                                **loading)
    return make_splits(full_train, test, held_out_ratio, held_out_by_group, train_eval_size, seed, name=dataset,
                       folds=folds, fold=fold)


def check_classes_are_trained(train, others: dict) -> None:
    """Single-label data: at least two classes to train on, and no test or held-out item of a class that
    no training item has (the model could never learn it; its accuracy would only measure the others)."""
    if train.targets.dim() != 1:
        return
    trained = torch.bincount(train.targets, minlength=train.num_classes) > 0
    if int(trained.sum()) < 2:
        raise UserError(f"train: every item is class {int(train.targets[0])}; a classifier needs two classes or more")
    for split, data in others.items():
        if data is None or data.targets.dim() != 1 or not len(data):
            continue
        unseen = (data.targets >= len(trained)) | ~trained[data.targets.clamp(max=len(trained) - 1)]
        if bool(unseen.any()):
            i = int(unseen.nonzero()[0])
            c = int(data.targets[i])
            raise UserError(f"{split}[{i}]: class {c}, which no training item has ({int(unseen.sum())} {split} items "
                            "are of classes the model never trains on); train on every class you test")


def make_splits(full_train, test, held_out_ratio: float, held_out_by_group: bool = False,
                train_eval_size: int | None = None, seed: int = 0, held_out=None, name: str = "dataset",
                folds: int = 0, fold: int = 0) -> Splits:
    """Splits from built datasets (`test` may be None): `held_out` as given, else carved from `full_train` (seeded,
    stratified by class or by whole groups); T' a fixed subset of the training part if asked."""
    if len(full_train) == 0 or (test is not None and len(test) == 0):
        raise UserError(f"{name}: the {'training' if len(full_train) == 0 else 'test'} split is empty")
    check_classes_are_trained(full_train, {"test": test, "held_out": held_out})
    if held_out is not None:
        train = full_train
    else:
        groups = full_train.groups if held_out_by_group else None
        if held_out_by_group and groups is None:
            raise UserError(f"data.held_out_by_group=true, but {name} has no groups")
        strata = full_train.targets.argmax(1) if full_train.targets.dim() == 2 else full_train.targets
        train_idx, held_idx = held_out_indices(strata.numpy(), held_out_ratio, seed, groups, folds, fold)
        train = full_train.subset(train_idx)
        held_out = full_train.subset(held_idx) if len(held_idx) else None
    held_out = held_out.for_evaluation() if held_out is not None and len(held_out) else None
    train_eval = train.for_evaluation()
    if train_eval_size is not None and train_eval_size < len(train):
        pick = np.sort(np.random.default_rng(seed + 1).choice(len(train), train_eval_size, replace=False))
        train_eval = train.subset(pick).for_evaluation()
    return Splits(train, held_out, train_eval, test)
