"""Feeding the loop: batches of each split (a DataLoader, or index ops on data already on the device),
moved to the device with the step's transforms. The loader settings (`data.batch_size`, ...) are
declared here once; the config schema's `data` section and the Python API take them from here."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from blendtune import distributed
from blendtune.data import Splits
from blendtune.errors import SettingError, UserError
from blendtune.evaluation import ShardSampler


@dataclass
class LoaderOptions:
    """How batches are made (config section `data`; keywords of `blendtune.fit`)."""
    batch_size: int = 64
    eval_batch_size: Optional[int] = None  # unset: 512 on CUDA; on CPU data.batch_size (a spectrogram CNN
                                           # evaluates 1.4x faster in batches of 64 than of 512 there)
    num_workers: int = 0         # DataLoader worker processes (file-based datasets decode there)
    skip_bad: bool = False       # skip samples whose files are missing or broken (and log how many)
    on_device: Optional[bool] = None  # in-memory data held on the training device, batched there without a
                                      # DataLoader; unset: on for in-memory data with a CUDA device

    def validate(self) -> None:
        for key in ("batch_size", "eval_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise SettingError(f"data.{key}", f"expected a positive number, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise SettingError("data.num_workers", f"expected 0 or more, got {self.num_workers}")


# What the loader_options of the Python API may not set: blendtune sets them from its own options.
_OWN_LOADER_KEYS = {"batch_size": "batch_size", "shuffle": "sampler", "sampler": "sampler",
                    "batch_sampler": "batch_size and sampler", "collate_fn": "collate_fn",
                    "num_workers": "num_workers", "dataset": "train/held_out/test"}


def check_loader_options(extra: Mapping[str, Any]) -> dict:
    """DataLoader keyword arguments a user adds (pin_memory, prefetch_factor, worker_init_fn, ...)."""
    for key in extra:
        if key in _OWN_LOADER_KEYS:
            raise UserError(f"loader_options: {key!r} is set by blendtune; pass {_OWN_LOADER_KEYS[key]}= instead")
    import inspect
    accepted = set(inspect.signature(DataLoader.__init__).parameters) - {"self"}
    unknown = sorted(set(extra) - accepted)
    if unknown:
        raise UserError(f"loader_options: {', '.join(unknown)} are not DataLoader arguments")
    return dict(extra)


def per_worker_batch_size(global_batch: int, workers: int) -> int:
    """`batch_size` is the global batch: each of N workers takes B / N per step."""
    if global_batch % workers:
        raise SettingError("data.batch_size", f"the global batch {global_batch} must be divisible by the "
                                              f"{workers} workers")
    return global_batch // workers


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def capped_loader_workers(requested: int) -> int:
    """More loader processes than CPUs only compete with each other (and flood the terminal with
    DataLoader warnings): at most one per CPU, said in one line."""
    cpus = available_cpus()
    if requested > cpus:
        print(f"blendtune: note: data.num_workers={requested} capped to the {cpus} CPUs available", file=sys.stderr,
              flush=True)
        return cpus
    return requested


class Feed:
    """The loaders of one run's splits on one device. Built once by the Trainer; strategies' services
    (G-Blend's per-head copies, PMR's prototypes) draw their batches from it too."""

    def __init__(self, splits: Splits, options: LoaderOptions, device: torch.device, seed: int,
                 channels_last: bool, sampler: Sampler | None = None, loader_options: Mapping[str, Any] | None = None):
        self.splits, self.options, self.device, self.seed = splits, options, device, seed
        self.channels_last = channels_last
        if sampler is not None and distributed.is_distributed():
            raise UserError("sampler=: a sampler of your own orders one process's batches; with several workers "
                            "each takes its shard through a DistributedSampler (leave sampler unset)")
        self.user_sampler = sampler
        self.loader_options = check_loader_options(loader_options or {})
        # e.g. spectrograms computed from waveform batches in the step (data.spectrogram_on=device)
        self.device_transforms = {m: t.to(device) for m, t in splits.device_transforms.items()}
        self.workers = capped_loader_workers(options.num_workers)
        self.batch_size = per_worker_batch_size(options.batch_size, distributed.world_size())
        self.on_device = self._keep_on_device(options.on_device)
        self.train_sampler = self.sampler(seed)
        self.train_loader = self.loader(splits.train, self.batch_size, self.train_sampler, persistent=True)

    def sampler(self, seed: int):
        """The training order: the user's sampler, or this rank's shard, reshuffled each epoch (seeded)."""
        if self.user_sampler is not None:
            return self.user_sampler
        return DistributedSampler(self.splits.train, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                  shuffle=True, seed=seed)

    @staticmethod
    def set_epoch(sampler, epoch: int) -> None:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def _keep_on_device(self, wanted: bool | None) -> bool:
        """In-memory data (tensors per modality) can live on the device: each batch is then one index op
        there, no DataLoader, no host-to-device copy per step."""
        splits = self.splits
        in_memory = all(isinstance(getattr(ds, "inputs", None), dict) and hasattr(ds, "on_device")
                        for ds in (splits.train, splits.train_eval, splits.held_out, splits.test) if ds is not None)
        if wanted is None:
            wanted = in_memory and self.user_sampler is None and not self.loader_options \
                and self.device.type == "cuda" and self._fits_on_device()
        elif wanted and not in_memory:
            raise SettingError("data.on_device", "only in-memory datasets (synthetic, avdigits, features, your own "
                                                 "tensors) can be held on the device")
        if wanted:
            for name in ("train", "train_eval", "held_out", "test"):
                ds = getattr(splits, name)
                if ds is not None:
                    setattr(splits, name, ds.on_device(self.device))
        return wanted

    def _fits_on_device(self) -> bool:
        datasets = [ds for ds in (self.splits.train, self.splits.held_out, self.splits.test) if ds is not None]
        size = sum(x.numel() * x.element_size() for ds in datasets for x in [*ds.inputs.values(), ds.targets])
        free, _ = torch.cuda.mem_get_info(self.device)
        return size < 0.25 * free

    def loader(self, dataset, batch_size: int, sampler, persistent: bool = False, own_generator: bool = False) -> Iterable:
        if self.on_device:
            return DeviceBatches(dataset, batch_size, sampler)
        options = {"pin_memory": self.device.type == "cuda", **self.loader_options}
        if own_generator:  # each DataLoader iterator draws its workers' seed from this, not torch's global
            options.setdefault("generator", torch.Generator())  # RNG: evaluating leaves training's draws alone
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.workers,
                          collate_fn=getattr(dataset, "collate_fn", None),
                          persistent_workers=persistent and self.workers > 0, **options)

    def eval_loader(self, dataset) -> Iterable:
        """This rank's disjoint slice of `dataset`, in order (evaluation sums exact counts over ranks)."""
        return self.loader(dataset, self.eval_batch_size, ShardSampler(len(dataset)), own_generator=True)

    @property
    def eval_batch_size(self) -> int:
        if self.options.eval_batch_size is not None:
            return self.options.eval_batch_size
        return 512 if self.device.type == "cuda" else self.batch_size

    def to_device(self, batch):
        inputs, targets = batch[:2]  # file datasets add a third element: bad samples dropped (data.skip_bad)
        nb = self.device.type == "cuda"
        inputs = {m: x.to(self.device, non_blocking=nb) for m, x in inputs.items()}  # (FramePayload has .to too)
        with torch.no_grad():
            for m, transform in self.device_transforms.items():
                inputs[m] = transform(inputs[m])
        if self.channels_last:
            inputs = {m: x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
                      for m, x in inputs.items()}
        return inputs, targets.to(self.device, non_blocking=nb)


class DeviceBatches:
    """Batches of an in-memory dataset already on the device, in the sampler's order: the same batches a
    DataLoader would give (BatchSampler, drop_last=False), without its per-step work."""

    def __init__(self, dataset, batch_size: int, sampler):
        self.dataset, self.batch_size, self.sampler = dataset, batch_size, sampler
        self.num_workers = 0

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        device = self.dataset.targets.device
        order = torch.as_tensor(list(self.sampler), dtype=torch.long, device=device)
        for batch in order.split(self.batch_size):
            yield self.dataset.__getitems__(batch)
