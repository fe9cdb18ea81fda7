"""The user's own data: any map-style dataset (or sequence) of `(dict[modality, Tensor], target)` items,
given the interface blendtune's datasets have (targets, classes, subsets, collation).

`target` is a class index (int or 0-d tensor) or, for multi-label data, a multi-hot float vector.
The targets are read once (from a `targets` attribute when the dataset has one, else item by item):
they steer the stratified held-out split and give the number of classes.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from blendtune.errors import UserError


def _as_target(value: Any) -> torch.Tensor:
    t = torch.as_tensor(value)
    return t if t.is_floating_point() and t.dim() == 1 else t.long().reshape(())


class ItemDataset(Dataset):
    """Wraps the user's dataset; `subset` and `for_evaluation` return views, nothing is copied."""

    def __init__(self, items: Sequence, num_classes: int | None = None, groups: Sequence[str] | None = None,
                 indices: Sequence[int] | None = None, targets: torch.Tensor | None = None, name: str = "dataset",
                 collate_fn: Callable | None = None):
        if not hasattr(items, "__getitem__") or not hasattr(items, "__len__"):
            raise UserError(f"{name}: expected a map-style dataset or a sequence of (inputs, target), "
                            f"got {type(items).__name__}")
        self.items, self.name = items, name
        # batches are made by the user's collate_fn (e.g. padding variable-length audio), else torch's default
        self.collate_fn = collate_fn or default_collate
        self.indices = list(range(len(items))) if indices is None else [int(i) for i in indices]
        self.targets = targets if targets is not None else self._read_targets()
        multilabel = self.targets.dim() == 2
        if num_classes is None:
            num_classes = int(self.targets.shape[1]) if multilabel else int(self.targets.max()) + 1 if len(self) else 0
        self.num_classes = num_classes
        self.groups = list(groups) if groups is not None else None
        self.device_transforms: dict = {}

    def _read_targets(self) -> torch.Tensor:
        source = getattr(self.items, "targets", None)
        if source is not None and len(source) == len(self.items):
            values = [source[i] for i in self.indices]
        else:
            values = [self._item(i)[1] for i in self.indices]
        if not values:
            return torch.zeros(0, dtype=torch.long)
        return torch.stack([_as_target(v) for v in values])

    def _item(self, i: int):
        item = self.items[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], dict)):
            raise UserError(f"{self.name}[{i}]: expected an item (dict[modality, Tensor], target), "
                            f"got {type(item).__name__}")
        return item

    @property
    def multilabel(self) -> bool:
        return self.targets.dim() == 2

    @property
    def modalities(self) -> list[str]:
        return list(self._item(self.indices[0])[0]) if self.indices else []

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        inputs = self._item(self.indices[0])[0]
        return {m: tuple(torch.as_tensor(x).shape) for m, x in inputs.items()}

    default_encoders: dict = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        inputs, target = self._item(self.indices[i])
        return {m: torch.as_tensor(x) for m, x in inputs.items()}, _as_target(target)

    def subset(self, indices) -> "ItemDataset":
        idx = np.asarray(indices, dtype=np.int64)
        groups = [self.groups[i] for i in idx] if self.groups is not None else None
        return ItemDataset(self.items, self.num_classes, groups, [self.indices[i] for i in idx],
                           self.targets[torch.as_tensor(idx, dtype=torch.long)] if len(idx) else self.targets[:0],
                           self.name, self.collate_fn)

    def for_evaluation(self) -> "ItemDataset":
        return self


def as_dataset(data, name: str, num_classes: int | None = None, groups: Sequence[str] | None = None,
               collate_fn: Callable | None = None):
    """blendtune's datasets pass through; anything else map-style is wrapped (batched by `collate_fn`)."""
    if data is None or isinstance(data, ItemDataset) or all(hasattr(data, a) for a in ("collate_fn", "subset",
                                                                                       "for_evaluation", "targets")):
        if collate_fn is not None and data is not None:
            if not isinstance(data, ItemDataset):
                raise UserError(f"{name}: collate_fn= is for datasets of your own; this blendtune dataset batches itself")
            data.collate_fn = collate_fn
        return data
    return ItemDataset(data, num_classes, groups, name=name, collate_fn=collate_fn)
