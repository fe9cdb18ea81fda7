"""The training loop: one epoch of steps with every strategy hook, evaluation of every head, checkpoints.
Read `Trainer.fit` and `Trainer.train_epoch` top to bottom; nothing else trains (G-Blend's per-head
estimate goes through the same `_train_steps`).

The Trainer takes built parts — model, strategy, data splits, optimizer, scheduler — and plain
`TrainOptions`; `blendtune.worker` builds them from an experiment config, `blendtune.fit` from the
user's own model and data.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from blendtune import distributed
from blendtune.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from blendtune.data import Splits
from blendtune.devices import autocast_dtype, resolve_device
from blendtune.errors import TrainingDiverged, UserError
from blendtune.evaluation import (PREDICT_RULES, Evaluation, ShardSampler, evaluate_heads, ogr_metrics,
                                  prediction_head, prediction_metrics)
from blendtune.models import LateFusionClassifier
from blendtune.strategies import BalancingStrategy, HeadLoss, probe_loss


@dataclass
class TrainOptions:
    epochs: int = 10
    batch_size: int = 64         # the global batch: each of N DDP workers takes batch_size / N
    eval_batch_size: int = 512
    num_workers: int = 0         # DataLoader worker processes
    device: str = "auto"         # auto | cpu | cuda | cuda:N
    amp: str = "auto"            # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    grad_clip: float | None = None
    checkpoint_every: int = 1    # epochs between checkpoints in run_dir (and always the last)
    progress: bool = True        # a progress bar on an interactive terminal
    seed: int = 0                # the order of batches (and G-Blend's copies' batches)
    skip_bad: bool = False       # count bad samples that file datasets dropped (data/skipped)
    channels_last: bool | None = None  # conv encoders in NHWC; None: on CUDA
    cudnn_benchmark: bool = True       # CUDA only
    compile: bool = False              # torch.compile the module the training step runs through
    on_device: bool | None = None      # in-memory datasets batched on the device; None: on CUDA when they fit
    predict: str = "fused"             # fused | ensemble | held_out_best (chosen on held-out data each epoch)


def per_worker_batch_size(global_batch: int, workers: int) -> int:
    """`batch_size` is the global batch: each of N workers takes B / N per step."""
    if global_batch % workers:
        raise UserError(f"config key 'data.batch_size': the global batch {global_batch} must be divisible by "
                        f"the {workers} workers")
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


class LoopContext:
    """The narrow view of the loop that strategies' epoch hooks get (`strategies.TrainingContext`)."""

    def __init__(self, trainer: "Trainer"):
        # A weak reference: a Trainer <-> context cycle would leave the Trainer to the cycle collector, which
        # closes the DataLoader's queues before its workers are joined (a 5 s wait per worker).
        self._trainer = weakref.proxy(trainer)

    epoch = property(lambda self: self._trainer.epoch)
    step = property(lambda self: self._trainer.step)
    last_losses = property(lambda self: self._trainer.last_losses)

    def evaluate(self, model: LateFusionClassifier) -> Evaluation:
        return self._trainer.evaluate(model)

    def train_head(self, model: LateFusionClassifier, head: str, epochs: int) -> None:
        self._trainer.train_head(model, head, epochs)

    steps_per_epoch = property(lambda self: len(self._trainer.train_loader))
    train_size = property(lambda self: len(self._trainer.splits.train))
    train_targets = property(lambda self: self._trainer.splits.train.targets)

    def features(self, model: LateFusionClassifier, indices) -> Iterator[tuple[dict, torch.Tensor]]:
        """(fp32 features per modality, targets) of this rank's shard of the training samples `indices`,
        in eval mode without gradients (PMR's prototypes); sum and all-reduce what you need of them."""
        return self._trainer.training_features(model, indices)


class Trainer:
    def __init__(self, model: LateFusionClassifier, strategy: BalancingStrategy, splits: Splits,
                 optimizer: torch.optim.Optimizer, scheduler=None, options: TrainOptions | None = None,
                 run_dir: str | Path | None = None, callbacks: Iterable[Callable[[dict], None]] = ()):
        self.options = o = options or TrainOptions()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.callbacks = list(callbacks)
        if o.predict not in PREDICT_RULES:
            raise UserError(f"config key 'train.predict': expected one of {', '.join(PREDICT_RULES)}, got {o.predict!r}")
        if o.predict == "held_out_best" and splits.held_out is None:
            raise UserError("config key 'train.predict': held_out_best chooses on held-out data; "
                            "set data.held_out_ratio > 0")
        self.device = resolve_device(o.device)
        self.amp_dtype = autocast_dtype(o.amp, self.device)
        self.splits = splits
        # e.g. spectrograms computed from waveform batches in the step (data.spectrogram_on=device)
        self.device_transforms = {m: t.to(self.device) for m, t in splits.device_transforms.items()}
        self.skipped = 0  # bad samples dropped from training batches (data.skip_bad)
        self.channels_last = o.channels_last if o.channels_last is not None else self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = o.cudnn_benchmark
        self.model = model.to(self.device, memory_format=torch.channels_last) if self.channels_last \
            else model.to(self.device)
        self.strategy = strategy
        self.strategy.setup(self.model, o.seed, o.epochs)
        self.train_model = self._for_training(self.model, strategy.trains_all_parameters)
        if o.compile and (not strategy.compiles or (strategy.syncs_gradients and distributed.is_distributed())):
            raise UserError(f"config key 'train.compile': strategy {type(strategy).__name__} takes several backward "
                            "passes or optimizer steps per forward, which a compiled graph does not allow"
                            + ("" if not strategy.compiles else " with several workers"))
        if o.compile:  # the step runs through the compiled module; state_dict and evaluation use the model
            self.train_model = torch.compile(self.train_model)
        self.optimizer = optimizer
        self.scheduler = scheduler or torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
        self.scaler = self._grad_scaler()
        self.loader_workers = capped_loader_workers(o.num_workers)
        self.batch_size = per_worker_batch_size(o.batch_size, distributed.world_size())
        self.train_sampler = self._sampler(o.seed)
        self.on_device = self._keep_on_device(o.on_device)
        self.train_loader = self._loader(splits.train, self.batch_size, self.train_sampler, persistent=True)
        self.context = LoopContext(self)
        self.epoch = 0
        self.step = 0
        self.last_losses: dict | None = None

    # ---- parts ------------------------------------------------------------------------------
    def _for_training(self, model: torch.nn.Module, trains_all_parameters: bool) -> torch.nn.Module:
        """The module steps run through: DDP-wrapped (gradients all-reduced in buckets) with several workers."""
        if not distributed.is_distributed():
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=not trains_all_parameters)

    def _grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _sampler(self, seed: int) -> DistributedSampler:
        return DistributedSampler(self.splits.train, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                  shuffle=True, seed=seed)

    def _keep_on_device(self, wanted: bool | None) -> bool:
        """In-memory data (tensors per modality) can live on the device: each batch is then one index op
        there, no DataLoader, no host-to-device copy per step."""
        in_memory = all(isinstance(getattr(ds, "inputs", None), dict) and hasattr(ds, "on_device")
                        for ds in (self.splits.train, self.splits.train_eval, self.splits.held_out, self.splits.test)
                        if ds is not None)
        if wanted is None:
            wanted = in_memory and self.device.type == "cuda" and self._fits_on_device()
        elif wanted and not in_memory:
            raise UserError("config key 'data.on_device': only in-memory datasets (synthetic, avdigits, features, "
                            "your own tensors) can be held on the device")
        if wanted:
            for name in ("train", "train_eval", "held_out", "test"):
                ds = getattr(self.splits, name)
                if ds is not None:
                    setattr(self.splits, name, ds.on_device(self.device))
        return wanted

    def _fits_on_device(self) -> bool:
        datasets = [ds for ds in (self.splits.train, self.splits.held_out, self.splits.test) if ds is not None]
        size = sum(x.numel() * x.element_size() for ds in datasets for x in [*ds.inputs.values(), ds.targets])
        free, _ = torch.cuda.mem_get_info(self.device)
        return size < 0.25 * free

    def _loader(self, dataset, batch_size: int, sampler, persistent: bool = False):
        if self.on_device:
            return DeviceBatches(dataset, batch_size, sampler)
        workers = self.loader_workers
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=getattr(dataset, "collate_fn", None), pin_memory=self.device.type == "cuda",
                          persistent_workers=persistent and workers > 0)

    def _to_device(self, batch):
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

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train from the current epoch to `epochs`; returns the last epoch's metrics."""
        metrics: dict = {}
        if self.epoch == 0:
            evaluation = self.evaluate(self.model)
            self.strategy.on_epoch_end(0, evaluation, self.context)
            self.strategy.pop_epoch_metrics()  # epoch 0 is a measurement, not a logged epoch
            self.last_losses = evaluation.losses()
        for epoch in range(self.epoch + 1, self.options.epochs + 1):
            began = time.perf_counter()
            self.strategy.on_epoch_start(epoch, self.context)
            train_loss = self.train_epoch(epoch)
            # BatchNorm statistics: DDP broadcasts rank 0's before each forward, so the last step's update
            # stays per rank; share it before evaluation and the checkpoint (which holds rank 0's).
            distributed.broadcast_(list(self.model.buffers()))
            self.scheduler.step()
            evaluation = self.evaluate(self.model)
            self.strategy.on_epoch_end(epoch, evaluation, self.context)
            head = prediction_head(evaluation, self.options.predict, self.model.modalities)
            metrics = {"epoch": epoch, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                       "loss/objective": train_loss, **evaluation.metrics(),
                       **prediction_metrics(evaluation, head, self.model.modalities),
                       **ogr_metrics(self.last_losses, evaluation.losses()),
                       **self.strategy.pop_epoch_metrics(), **self._skipped_metrics(),
                       "time/epoch_s": time.perf_counter() - began}
            self.epoch, self.last_losses = epoch, evaluation.losses()
            for callback in self.callbacks:
                callback(metrics)
            if self.run_dir is not None and (epoch % self.options.checkpoint_every == 0
                                             or epoch == self.options.epochs):
                self.save(self.run_dir / "checkpoints" / "last.pt")
        return metrics

    def train_epoch(self, epoch: int) -> float:
        self.train_sampler.set_epoch(epoch)
        batches = tqdm(self.train_loader, desc=f"epoch {epoch}", leave=False,
                       disable=not (self.options.progress and distributed.rank() == 0 and _stderr_is_tty()))
        total = self._train_steps(self.train_model, batches, self.optimizer, self.scaler, self.strategy, epoch,
                                  main=True)
        mean_loss = float(distributed.all_reduce_sum_(total / max(len(self.train_loader), 1)) / distributed.world_size())
        if not math.isfinite(mean_loss):
            checkpoint = self.run_dir / "checkpoints" / "last.pt" if self.run_dir else None
            where = (f"; the last good checkpoint is '{checkpoint}'" if checkpoint is not None and checkpoint.is_file()
                     else "; no checkpoint was written before it")
            raise TrainingDiverged(f"the training loss became {mean_loss} in epoch {epoch} (strategy "
                                   f"{type(self.strategy).__name__}, lr={self.optimizer.param_groups[0]['lr']}){where}")
        return mean_loss

    def _train_steps(self, model: torch.nn.Module, batches, optimizer, scaler, strategy: BalancingStrategy,
                     epoch: int, main: bool) -> torch.Tensor:
        """One pass over `batches`: the step every training in blendtune takes. `main`: the run's own
        model (counts steps and skipped samples); otherwise a copy (G-Blend's per-head estimate)."""
        model.train()
        total = torch.zeros((), device=self.device)
        for batch in batches:
            inputs, targets = self._to_device(batch)
            if main:
                self.skipped += batch[2] if len(batch) == 3 else 0
            if len(targets) == 0:  # every sample in it was bad and skipped
                if distributed.is_distributed():  # the other ranks would wait in this step's all-reduce
                    raise UserError("every sample of a batch was bad (data.skip_bad): with several workers that "
                                    "would desynchronise DDP; fix the files `blendtune data check` lists")
                continue
            masks = strategy.modality_masks(targets)
            # A strategy that syncs gradients itself (several backward passes or optimizer steps per
            # forward: MMPareto, MLA) runs outside DDP's one-backward-per-forward bucketed all-reduce.
            with self._manual_sync(model, strategy):
                with self._autocast():
                    out = model(inputs, modality_masks=masks, detach_unimodal_heads=strategy.detach_unimodal_heads)
                for loss in self._step_losses(strategy, out, targets, epoch):  # MLA: one per modality
                    optimizer.zero_grad(set_to_none=True)
                    strategy.backward(loss, out, targets, scaler)
                    scaler.unscale_(optimizer)  # strategies modulate true gradients, not scaled ones
                    strategy.after_backward(out, targets, epoch, self.step)
                    if self.options.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), self.options.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    total += loss.detach().float()
            if main:
                self.step += 1
        return total

    def _step_losses(self, strategy: BalancingStrategy, out, targets: torch.Tensor, epoch: int) -> Iterator[torch.Tensor]:
        """The strategy's losses, one per optimizer step, each computed under autocast when its step comes
        (after the earlier steps); the first carries the probe losses of detached uni-modal heads."""
        turns = strategy.step_losses(out, targets, epoch)
        first = True
        while True:
            with self._autocast():
                loss = next(turns, None)
                if loss is None:
                    return
                if first and strategy.detach_unimodal_heads:
                    loss = loss + probe_loss(out, targets)  # probes: no gradient reaches the encoders
            first = False
            yield loss

    @staticmethod
    def _manual_sync(model: torch.nn.Module, strategy: BalancingStrategy):
        if strategy.syncs_gradients and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # (A forward under no_sync() stops DDP broadcasting buffers; rank 0's BatchNorm statistics are
            # broadcast at the end of each epoch instead, for every strategy: `fit`.)
            return model.no_sync()
        return contextlib.nullcontext()

    def train_head(self, model: LateFusionClassifier, head: str, epochs: int) -> None:
        """Train `model` (a copy of the run's model) on head `head`'s loss alone for `epochs` epochs with
        the loop's own step: a fresh optimizer like the run's at its current learning rate, its own grad
        scaler, the same clipping, DDP's bucketed all-reduce. Its batches come from their own seeded
        order, so the main run's data order is not disturbed."""
        optimizer = _fresh_optimizer_like(self.optimizer, model.parameters())
        strategy = HeadLoss(head, touch_every_output=distributed.is_distributed())
        strategy.setup(model, self.options.seed, epochs)
        train_model = self._for_training(model, strategy.trains_all_parameters)
        sampler = self._sampler(self.options.seed + 7919)
        loader = self._loader(self.splits.train, self.batch_size, sampler)
        scaler = self._grad_scaler()
        for e in range(epochs):
            sampler.set_epoch(self.epoch * 1000 + e)
            self._train_steps(train_model, loader, optimizer, scaler, strategy, self.epoch + 1 + e, main=False)

    @torch.no_grad()
    def training_features(self, model: LateFusionClassifier, indices) -> Iterator[tuple[dict, torch.Tensor]]:
        subset = self.splits.train.subset(indices).for_evaluation()
        loader = self._loader(subset, self.options.eval_batch_size, ShardSampler(len(subset)))
        was_training = model.training
        model.eval()
        try:
            for batch in loader:
                inputs, targets = self._to_device(batch)
                if len(targets):
                    with self._autocast():
                        out = model(inputs)
                    yield {m: f.float() for m, f in out.features.items()}, targets
        finally:
            model.train(was_training)

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate(self, model: LateFusionClassifier) -> Evaluation:
        splits = {"train": self.splits.train_eval, "held_out": self.splits.held_out, "test": self.splits.test}
        return Evaluation({name: self._evaluate_split(model, ds) for name, ds in splits.items() if ds is not None})

    def _evaluate_split(self, model: LateFusionClassifier, dataset):
        loader = self._loader(dataset, self.options.eval_batch_size, ShardSampler(len(dataset)))
        return evaluate_heads(model, (self._to_device(batch) for batch in loader), self.splits.num_classes,
                              self.splits.multilabel, self.device, self._autocast)

    def _skipped_metrics(self) -> dict[str, float]:
        if not self.options.skip_bad:
            return {}
        skipped = distributed.all_reduce_sum_(torch.tensor(float(self.skipped), device=self.device))
        self.skipped = 0
        return {"data/skipped": float(skipped)}

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "strategy": self.strategy.state_dict(),
                "last_losses": self.last_losses, "rng": rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.strategy.load_state_dict(state["strategy"])
        self.epoch, self.step, self.last_losses = state["epoch"], state["step"], state["last_losses"]
        set_rng_state(state["rng"])

    def set_base_lr(self, lr: float) -> None:
        """After loading a checkpoint under a changed config (a PBT explore step), this learning rate
        wins over the checkpoint's, keeping the schedule's progress."""
        factor = self.optimizer.param_groups[0]["lr"] / self.scheduler.base_lrs[0]
        self.scheduler.base_lrs = [lr for _ in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = lr
            group["lr"] = lr * factor

    def save(self, path: Path) -> None:
        if distributed.rank() == 0:
            save_checkpoint(path, self.state_dict())

    def load(self, path: Path) -> None:
        self.load_state_dict(load_checkpoint(path))


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


def _fresh_optimizer_like(optimizer: torch.optim.Optimizer, params) -> torch.optim.Optimizer:
    """A new optimizer of the same class and hyper-parameters (no state), at the current learning rate."""
    defaults = {**optimizer.defaults, "lr": optimizer.param_groups[0]["lr"]}
    try:
        return type(optimizer)(params, **defaults)
    except TypeError as e:
        raise UserError(f"cannot build a fresh {type(optimizer).__name__} for G-Blend's per-head estimate from "
                        f"its defaults: {e}") from None


def _stderr_is_tty() -> bool:
    return sys.stderr.isatty()
