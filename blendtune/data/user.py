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


def _checked_target(value: Any, where: str) -> torch.Tensor:
    """A class index (a whole number from 0) or a multi-hot vector of 0/1, else one line naming the item."""
    try:
        t = torch.as_tensor(value)
    except Exception:
        raise UserError(f"{where}: target {value!r} is not a class index or a multi-hot vector") from None
    if t.dim() == 1 and t.is_floating_point():
        if not bool(((t == 0) | (t == 1)).all()):
            raise UserError(f"{where}: a multi-hot target holds 0 or 1, got {t.tolist()}")
        return t
    if t.numel() != 1 or t.dtype == torch.bool or t.is_complex():
        raise UserError(f"{where}: target {value!r} is not a class index (an int, or a 0-d integer tensor)")
    v = t.reshape(()).double().item()
    if not np.isfinite(v) or v != round(v):
        raise UserError(f"{where}: target {v:g} is not a class index (whole numbers 0, 1, ...)")
    if v < 0:
        raise UserError(f"{where}: target {v:g} is outside the classes (0, 1, ...)")
    return t.long().reshape(())


class _CollateNamingItems:
    """The batch collate (the user's, or torch's default), whose failure on items of different shapes
    names the first item that differs from item 0 (found by reading the dataset: the error path only)."""

    def __init__(self, collate: Callable, dataset: "ItemDataset"):
        self.collate, self.dataset = collate, dataset

    def __call__(self, batch):
        try:
            return self.collate(batch)
        except RuntimeError as e:
            if "equal size" not in str(e) or self.collate is not default_collate:
                raise
            raise UserError(self.dataset.odd_shape_message()) from None


def _shapes(inputs) -> dict[str, tuple]:
    return {m: tuple(torch.as_tensor(x).shape) for m, x in inputs.items()}


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
        self.collate_fn = collate_fn if collate_fn is not None else _CollateNamingItems(default_collate, self)
        self.indices = list(range(len(items))) if indices is None else [int(i) for i in indices]
        self.targets = targets if targets is not None else self._read_targets()
        multilabel = self.targets.dim() == 2
        if num_classes is None:
            num_classes = int(self.targets.shape[1]) if multilabel else int(self.targets.max()) + 1 if len(self) else 0
        elif targets is None and not multilabel and len(self) and int(self.targets.max()) >= num_classes:
            i = int((self.targets >= num_classes).nonzero()[0])
            raise UserError(f"{name}[{self.indices[i]}]: class {int(self.targets[i])} is outside the {num_classes} "
                            f"classes (0..{num_classes - 1}) of the training data")
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
        targets = [_checked_target(v, f"{self.name}[{i}]") for i, v in zip(self.indices, values)]
        kinds = {t.dim() for t in targets}
        if len(kinds) > 1:
            raise UserError(f"{self.name}: targets mix class indices and multi-hot vectors (item "
                            f"{self.indices[[t.dim() for t in targets].index(max(kinds))]} is multi-hot)")
        try:
            return torch.stack(targets)
        except RuntimeError:
            raise UserError(f"{self.name}: multi-hot targets of different lengths") from None

    def odd_shape_message(self) -> str:
        first = _shapes(self._item(self.indices[0])[0])
        for i in self.indices[1:]:
            shapes = _shapes(self._item(i)[0])
            if shapes != first:
                odd = {m: s for m, s in shapes.items() if first.get(m) != s}
                return (f"{self.name}[{i}]: inputs of shape {odd}, while {self.name}[{self.indices[0]}] has "
                        f"{ {m: first.get(m) for m in odd} }; torch's default collate stacks items of one shape: "
                        "pass collate_fn= (e.g. padding each batch to its longest item)")
        return f"{self.name}: items have inputs of different shapes; pass collate_fn= to batch them"

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
