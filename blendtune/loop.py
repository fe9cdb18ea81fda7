"""The training loop: one epoch of steps with every strategy hook, evaluation of every head, checkpoints,
early stopping. Read `Trainer.fit` and `Trainer.train_epoch` top to bottom; nothing else trains
(G-Blend's per-head estimate goes through the same `train_steps`).

The Trainer takes built parts — model, strategy, data splits, optimizer, scheduler — and plain options:
`TrainOptions` (declared here: the config's `train` section) and `LoaderOptions` (blendtune.feeding:
the config's `data` loader keys). `blendtune.build` makes every run's parts, for the CLI, Ray workers
and the Python API alike. Batches come from `feeding.Feed`; strategies' services from `services`.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
from tqdm import tqdm

from blendtune import distributed
from blendtune.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from blendtune.data import Splits
from blendtune.devices import PRECISIONS, autocast_dtype, resolve_device
from blendtune.errors import SettingError, TrainingDiverged, UserError
from blendtune.evaluation import (PREDICT_RULES, BestEpoch, Evaluation, evaluate_heads, monitored_metric, ogr_metrics,
                                  prediction_head, prediction_metrics)
from blendtune.feeding import Feed, LoaderOptions
from blendtune.models import LateFusionClassifier
from blendtune.services import StrategyServices
from blendtune.strategies import BalancingStrategy, probe_loss

LAST, BEST = "last.pt", "best.pt"  # in <run_dir>/checkpoints/


@dataclass
class TrainOptions:
    """How the loop trains (config section `train`; keywords of `blendtune.fit`)."""
    epochs: int = 10
    device: str = "auto"         # auto | cpu | cuda | cuda:N
    amp: str = "auto"            # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16  ("off" would read as a YAML boolean)
    checkpoint_every: int = 1    # epochs between checkpoints in the run directory (and always the last)
    test_every: int = 1          # epochs between test-set evaluations (and always the last, and an early stop):
                                 # only the logs read test metrics, so a larger value saves time and nothing else
    progress: bool = True        # a progress bar on an interactive terminal
    channels_last: Optional[bool] = None  # unset: on for CUDA and CPU (NHWC convs and pools run faster on both)
    cudnn_benchmark: bool = True          # CUDA: let cuDNN pick the fastest conv algorithms for the shapes
    compile: bool = False                 # torch.compile the model for the training step (slow to start)
    # the prediction head: fused | ensemble | held_out_best (chosen on V); a unimodal run uses its modality's
    predict: str = "fused"
    monitor: Optional[str] = None         # the held-out metric early stopping and keep_best watch (loss/... lower is
                                          # better); unset: the prediction head's held-out accuracy (mAP)
    early_stopping_patience: Optional[int] = None  # stop after this many epochs without a better monitor
    keep_best: bool = False               # end with the best epoch's weights by monitor (checkpoints/best.pt)

    def validate(self) -> None:
        if self.amp not in PRECISIONS:
            raise SettingError("train.amp", f"expected one of {', '.join(PRECISIONS)}, got {self.amp!r}")
        if self.predict not in PREDICT_RULES:
            raise SettingError("train.predict", f"expected one of {', '.join(PREDICT_RULES)}, got {self.predict!r}")
        for key in ("epochs", "checkpoint_every", "test_every", "early_stopping_patience"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise SettingError(f"train.{key}", f"expected a positive number, got {value}")
        if self.monitor is not None and "/held_out/" not in self.monitor:
            raise SettingError("train.monitor", f"selection looks at held-out data only: expected a held_out "
                                                f"metric such as acc/held_out/fused, got {self.monitor!r}")

    @property
    def watches_held_out(self) -> bool:
        return self.early_stopping_patience is not None or self.keep_best


class Trainer:
    """Trains a LateFusionClassifier with a balancing strategy: `fit()` runs the epochs, evaluates every
    head on every split, calls `callbacks` with each epoch's metrics and checkpoints into `run_dir`."""

    def __init__(self, model: LateFusionClassifier, strategy: BalancingStrategy, splits: Splits,
                 optimizer: torch.optim.Optimizer, scheduler=None, options: TrainOptions | None = None,
                 loader: LoaderOptions | None = None, *, seed: int = 0, grad_clip: float | None = None,
                 sampler=None, loader_options: Mapping[str, Any] | None = None,
                 run_dir: str | Path | None = None, callbacks: Iterable[Callable[[dict], None]] = ()):
        self.options = o = options or TrainOptions()
        o.validate()
        self.seed, self.grad_clip = seed, grad_clip  # seed: the order of batches (and G-Blend's copies' batches)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.callbacks = list(callbacks)
        if o.predict == "held_out_best" and splits.held_out is None:
            raise SettingError("train.predict", "held_out_best chooses on held-out data; set data.held_out_ratio > 0")
        if o.watches_held_out and splits.held_out is None:
            raise SettingError("train.early_stopping_patience" if o.early_stopping_patience is not None else "train.keep_best",
                               "early stopping and keep_best watch a held-out metric; set data.held_out_ratio > 0")
        self.best = BestEpoch(monitored_metric(o.monitor, splits.multilabel)) if o.watches_held_out else None
        self.best_weights: dict | None = None
        self.device = resolve_device(o.device)
        self.amp_dtype = autocast_dtype(o.amp, self.device)
        self.splits = splits
        self.skipped = 0  # bad samples dropped from training batches (data.skip_bad)
        self.channels_last = o.channels_last if o.channels_last is not None else self.device.type in ("cuda", "cpu")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = o.cudnn_benchmark
        self.model = model.to(self.device, memory_format=torch.channels_last) if self.channels_last \
            else model.to(self.device)
        self.strategy = strategy
        self.strategy.setup(self.model, seed, o.epochs)
        self.train_model = self.wrap_for_training(self.model, strategy.trains_all_parameters)
        if o.compile and (not strategy.compiles or (strategy.syncs_gradients and distributed.is_distributed())):
            raise SettingError("train.compile", f"strategy {type(strategy).__name__} " + (
                strategy.compile_refusal if not strategy.compiles else BalancingStrategy.compile_refusal
                + " with several workers"))
        if o.compile:  # the step runs through the compiled module; state_dict and evaluation use the model
            self.train_model = torch.compile(self.train_model)
        self.optimizer = optimizer
        self.scheduler = scheduler or torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
        self.scaler = self.grad_scaler()
        self.feed = Feed(splits, loader or LoaderOptions(), self.device, seed, self.channels_last, sampler,
                         loader_options)
        self.context = StrategyServices(self)
        self.epoch = 0
        self.step = 0
        self.last_losses: dict | None = None
        self.stopped_early = False

    @property
    def train_loader(self):
        return self.feed.train_loader

    # ---- parts ------------------------------------------------------------------------------
    def wrap_for_training(self, model: torch.nn.Module, trains_all_parameters: bool) -> torch.nn.Module:
        """The module steps run through: DDP-wrapped (gradients all-reduced in buckets) with several workers."""
        if not distributed.is_distributed():
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=not trains_all_parameters)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train from the current epoch to `epochs` (or until early stopping); returns the last epoch's
        metrics. With keep_best, the model ends with the best epoch's weights."""
        try:
            return self._fit()
        except RuntimeError as error:  # a model written for NCHW: `.view` cannot flatten an NHWC tensor
            if self.channels_last and "view size is not compatible with input tensor's size and stride" in str(error):
                raise SettingError("train.channels_last", "the model calls .view() on a conv output, which runs "
                                   "channels_last (NHWC) by default: use .reshape() or .flatten() there, or set "
                                   "train.channels_last=false") from error
            raise

    def _fit(self) -> dict:
        metrics: dict = {}
        if self.epoch == 0:
            evaluation = self.evaluate(self.model)
            self.strategy.on_epoch_end(0, evaluation, self.context)
            self.strategy.pop_epoch_metrics()  # epoch 0 is a measurement, not a logged epoch
            self.last_losses = evaluation.losses()
        for epoch in range(self.epoch + 1, self.options.epochs + 1):
            if self.stopped_early:  # a resumed run that had stopped early stays stopped
                break
            began = time.perf_counter()
            self.strategy.on_epoch_start(epoch, self.context)
            train_loss = self.train_epoch(epoch)
            # BatchNorm statistics: DDP broadcasts rank 0's before each forward, so the last step's update
            # stays per rank; share it before evaluation and the checkpoint (which holds rank 0's).
            distributed.broadcast_(list(self.model.buffers()))
            self.scheduler.step()
            evaluation = self.evaluate(self.model)  # T (or T') and V: all a strategy or a selection may see
            self.strategy.on_epoch_end(epoch, evaluation, self.context)
            head = self.strategy.only_head or prediction_head(evaluation, self.options.predict, self.model.modalities)
            metrics = {"epoch": epoch, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                       "loss/objective": train_loss, **evaluation.metrics(),
                       **prediction_metrics(evaluation, head, self.model.modalities),
                       **ogr_metrics(self.last_losses, evaluation.losses()),
                       **self.strategy.pop_epoch_metrics(), **self._skipped_metrics()}
            self.epoch, self.last_losses = epoch, evaluation.losses()
            if self.best is not None:
                metrics.update(self._watch(epoch, metrics))
            if self._tests_after(epoch):  # after all that steers training, early stopping included
                test = Evaluation({"test": self._evaluate_split(self.model, self.splits.test, "test")})
                metrics.update({**test.metrics(), **prediction_metrics(test, head, self.model.modalities)})
            metrics["time/epoch_s"] = time.perf_counter() - began
            for callback in self.callbacks:
                callback(metrics)
            if self.run_dir is not None and (epoch % self.options.checkpoint_every == 0
                                             or epoch == self.options.epochs or self.stopped_early):
                self.save(self.run_dir / "checkpoints" / LAST)
        if self.options.keep_best and self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
        return metrics

    def _watch(self, epoch: int, metrics: dict) -> dict:
        """Early stopping and keep-best: the monitored held-out metric of this epoch against the best."""
        try:
            improved = self.best.update(epoch, metrics)
        except KeyError:
            held_out = sorted(k for k in metrics if "/held_out/" in k)
            raise SettingError("train.monitor", f"{self.best.metric!r} is not a metric of this run; its held-out "
                                                f"metrics are {', '.join(held_out)}") from None
        if improved and self.options.keep_best:
            self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if self.run_dir is not None and distributed.rank() == 0:
                save_checkpoint(self.run_dir / "checkpoints" / BEST,
                                {"epoch": epoch, "metric": self.best.metric, "value": self.best.best,
                                 "model": self.best_weights})
        patience = self.options.early_stopping_patience
        self.stopped_early = patience is not None and self.best.epochs_without_improvement >= patience \
            and epoch < self.options.epochs
        return {"best/epoch": self.best.epoch, "best/value": self.best.best,
                **({"stopped_early": 1.0} if self.stopped_early else {})}

    def train_epoch(self, epoch: int) -> float:
        self.feed.set_epoch(self.feed.train_sampler, epoch)
        loader = self.feed.train_loader
        batches = tqdm(loader, desc=f"epoch {epoch}", leave=False,
                       disable=not (self.options.progress and distributed.rank() == 0 and _stderr_is_tty()))
        total = self.train_steps(self.train_model, batches, self.optimizer, self.scaler, self.strategy, epoch,
                                 main=True)
        mean_loss = float(distributed.all_reduce_sum_(total / max(len(loader), 1)) / distributed.world_size())
        if not math.isfinite(mean_loss):
            checkpoint = self.run_dir / "checkpoints" / LAST if self.run_dir else None
            where = (f"; the last good checkpoint is '{checkpoint}'" if checkpoint is not None and checkpoint.is_file()
                     else "; no checkpoint was written before it")
            raise TrainingDiverged(f"the training loss became {mean_loss} in epoch {epoch} (strategy "
                                   f"{type(self.strategy).__name__}, lr={self.optimizer.param_groups[0]['lr']}){where}")
        return mean_loss

    def train_steps(self, model: torch.nn.Module, batches, optimizer, scaler, strategy: BalancingStrategy,
                    epoch: int, main: bool) -> torch.Tensor:
        """One pass over `batches`: the step every training in blendtune takes. `main`: the run's own
        model (counts steps and skipped samples); otherwise a copy (G-Blend's per-head estimate)."""
        model.train()
        total = torch.zeros((), device=self.device)
        for batch in batches:
            inputs, targets = self.feed.to_device(batch)
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
                with self.autocast():
                    out = model(inputs, modality_masks=masks, detach_unimodal_heads=strategy.detach_unimodal_heads)
                for loss in self._step_losses(strategy, out, targets, epoch):  # MLA: one per modality
                    optimizer.zero_grad(set_to_none=True)
                    strategy.backward(loss, out, targets, scaler)
                    scaler.unscale_(optimizer)  # strategies modulate true gradients, not scaled ones
                    strategy.after_backward(out, targets, epoch, self.step)
                    if self.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
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
            with self.autocast():
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

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate(self, model: LateFusionClassifier, test: bool = False) -> Evaluation:
        """Every head on T (or T') and V, and on the test split with `test=True`. `fit` evaluates test apart,
        after the strategy and the selection have had the rest: nothing that steers training reads test."""
        splits = {"train": self.splits.train_eval, "held_out": self.splits.held_out,
                  **({"test": self.splits.test} if test else {})}
        return Evaluation({name: self._evaluate_split(model, ds, name) for name, ds in splits.items() if ds is not None})

    def _tests_after(self, epoch: int) -> bool:
        return self.splits.test is not None and (epoch % self.options.test_every == 0
                                                  or epoch == self.options.epochs or self.stopped_early)

    def _evaluate_split(self, model: LateFusionClassifier, dataset, split: str):
        batches = (self.feed.to_device(batch) for batch in self.feed.eval_loader(dataset))
        return evaluate_heads(model, batches, self.splits.num_classes, self.splits.multilabel, self.device,
                              self.autocast, split)

    def _skipped_metrics(self) -> dict[str, float]:
        if not self.feed.options.skip_bad:
            return {}
        skipped = distributed.all_reduce_sum_(torch.tensor(float(self.skipped), device=self.device))
        self.skipped = 0
        return {"data/skipped": float(skipped)}

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "step": self.step, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "strategy": self.strategy.state_dict(),
                 "last_losses": self.last_losses, "rng": rng_state()}
        if self.best is not None:
            state["best"] = {**self.best.state_dict(), "stopped_early": self.stopped_early,
                             "weights": self.best_weights if self.options.keep_best else None}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.strategy.load_state_dict(state["strategy"])
        self.epoch, self.step, self.last_losses = state["epoch"], state["step"], state["last_losses"]
        if self.best is not None and state.get("best") is not None:
            self.best.load_state_dict(state["best"])
            self.stopped_early, self.best_weights = state["best"]["stopped_early"], state["best"]["weights"]
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


def _stderr_is_tty() -> bool:
    return sys.stderr.isatty()
