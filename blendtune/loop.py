"""The training loop: setup, one epoch of steps with every strategy hook, evaluation of every head,
checkpoints. Read `Trainer.fit` and `Trainer.train_epoch` top to bottom; nothing else trains."""
from __future__ import annotations

import contextlib
import sys
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from blendtune import distributed
from blendtune.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from blendtune.config import ExperimentConfig, dataset_options
from blendtune.data import MultimodalDataset, build_splits
from blendtune.errors import TrainingDiverged, UserError
from blendtune.functional import average_precision, classification_loss, ogr
from blendtune.models import LateFusionClassifier, build_encoder, build_fusion
from blendtune.strategies import STRATEGIES, BalancingStrategy, probe_loss

ENSEMBLE = "ensemble"  # mean of the k + 1 heads' probabilities, reported beside each head


@dataclass
class HeadStats:
    loss: float
    acc: float | None = None   # single-label
    f1: float | None = None    # macro-F1, single-label
    map: float | None = None   # mean average precision over classes, multi-label


class Evaluation:
    """Per split ('train' = T or T', 'held_out' = V, 'test'), per head: loss, accuracy, macro-F1."""

    def __init__(self, splits: dict[str, dict[str, HeadStats]]):
        self.splits = splits

    def losses(self) -> dict[str, dict[str, float]]:
        return {s: {h: st.loss for h, st in heads.items() if h != ENSEMBLE} for s, heads in self.splits.items()}

    def metrics(self) -> dict[str, float]:
        out = {}
        for split, heads in self.splits.items():
            for head, st in heads.items():
                for name in ("acc", "f1", "map"):
                    if getattr(st, name) is not None:
                        out[f"{name}/{split}/{head}"] = getattr(st, name)
                if head != ENSEMBLE:
                    out[f"loss/{split}/{head}"] = st.loss
        return out


class ShardSampler(Sampler):
    """Every rank evaluates a disjoint slice; no padding, so summed counts are exact."""

    def __init__(self, n: int):
        self.indices = list(range(distributed.rank(), n, distributed.world_size()))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"config key 'train.device': {name!r} requested, but CUDA is not available")
    if name in ("auto", "cuda"):  # the current device: Ray Train / torchrun select one per worker
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def build_model(cfg: ExperimentConfig, dataset: MultimodalDataset) -> LateFusionClassifier:
    unknown = sorted(set(cfg.model.encoders) - set(dataset.modalities))
    if unknown:
        raise UserError(f"config key 'model.encoders': modalities {unknown} are not in dataset "
                        f"{cfg.data.dataset!r} (it has {', '.join(dataset.modalities)})")
    encoders = {}
    for m, shape in dataset.input_shapes.items():
        spec = cfg.model.encoders.get(m)
        name = spec.name if spec else dataset.default_encoders[m]
        dim, hidden, dropout = (spec.dim, spec.hidden, spec.dropout) if spec else (128, 32 if name == "spec_cnn" else 256, 0.0)
        encoders[m] = build_encoder(name, shape, dim=dim, hidden=hidden, dropout=dropout)
    try:
        fusion = build_fusion(cfg.model.fusion, {m: e.out_dim for m, e in encoders.items()}, dataset.num_classes)
    except ValueError as e:
        raise UserError(f"config key 'model.fusion': {e}") from None
    return LateFusionClassifier(encoders, fusion, dataset.num_classes)


def build_optimizer(cfg: ExperimentConfig, params: Iterable[torch.nn.Parameter], lr: float | None = None):
    o = cfg.optim
    lr = o.lr if lr is None else lr
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=o.weight_decay)


def build_scheduler(cfg: ExperimentConfig, optimizer):
    if cfg.optim.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    if cfg.optim.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.optim.step_size, gamma=cfg.optim.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def per_worker_batch_size(global_batch: int, workers: int) -> int:
    """`data.batch_size` is the global batch: each of N workers takes B / N per step."""
    if global_batch % workers:
        raise UserError(f"config key 'data.batch_size': the global batch {global_batch} must be divisible by "
                        f"the {workers} workers")
    return global_batch // workers


def build_strategy(cfg: ExperimentConfig) -> BalancingStrategy:
    cls = STRATEGIES.get(cfg.strategy)
    options = asdict(getattr(cfg, cls.config_section)) if cls.config_section else {}
    return cls(**options)


class Trainer:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path | None = None,
                 callbacks: Iterable[Callable[[dict], None]] = ()):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.callbacks = list(callbacks)
        self.device = resolve_device(cfg.train.device)
        amp = cfg.train.amp if cfg.train.amp != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        torch.manual_seed(cfg.seed)

        self.splits = build_splits(cfg.data.dataset, {**dataset_options(cfg), "root": cfg.data.root}, cfg.data.held_out_ratio,
                                   cfg.data.held_out_by_group, cfg.data.train_eval_size, cfg.seed,
                                   skip_bad=cfg.data.skip_bad, spectrogram_on=cfg.data.spectrogram_on)
        # e.g. spectrograms computed from waveform batches in the step (data.spectrogram_on=device)
        self.device_transforms = {m: t.to(self.device) for m, t in self.splits.train.device_transforms.items()}
        self.skipped = 0  # bad samples dropped from training batches (data.skip_bad)
        self.model = build_model(cfg, self.splits.train).to(self.device)
        self.strategy = build_strategy(cfg)
        self.strategy.setup(self.model, cfg.seed, cfg.train.epochs)
        self.train_model = self.model  # the module steps run through: DDP-wrapped with several workers
        if distributed.is_distributed():
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=not self.strategy.trains_all_parameters)
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.batch_size = per_worker_batch_size(cfg.data.batch_size, distributed.world_size())
        self.train_sampler = DistributedSampler(self.splits.train, num_replicas=distributed.world_size(),
                                                rank=distributed.rank(), shuffle=True, seed=cfg.seed)
        self.train_loader = self._loader(self.splits.train, self.batch_size, self.train_sampler, persistent=True)
        self.epoch = 0
        self.step = 0
        self.last_losses: dict | None = None

    # ---- data -------------------------------------------------------------------------------
    def _loader(self, dataset, batch_size: int, sampler, persistent: bool = False) -> DataLoader:
        workers = self.cfg.data.num_workers
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=dataset.collate_fn, pin_memory=self.device.type == "cuda",
                          persistent_workers=persistent and workers > 0)

    def _to_device(self, batch):
        inputs, targets = batch[:2]  # file datasets add a third element: bad samples dropped (data.skip_bad)
        nb = self.device.type == "cuda"
        inputs = {m: x.to(self.device, non_blocking=nb) for m, x in inputs.items()}
        with torch.no_grad():
            for m, transform in self.device_transforms.items():
                inputs[m] = transform(inputs[m])
        return inputs, targets.to(self.device, non_blocking=nb)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train from the current epoch to `train.epochs`; returns the last epoch's metrics."""
        metrics: dict = {}
        if self.epoch == 0:
            evaluation = self.evaluate(self.model)
            self.strategy.on_epoch_end(0, evaluation, self)
            self.strategy.epoch_metrics()  # epoch 0 is a measurement, not a logged epoch
            self.last_losses = evaluation.losses()
        for epoch in range(self.epoch + 1, self.cfg.train.epochs + 1):
            began = time.perf_counter()
            self.strategy.on_epoch_start(epoch, self)
            train_loss = self.train_epoch(epoch)
            self.scheduler.step()
            evaluation = self.evaluate(self.model)
            self.strategy.on_epoch_end(epoch, evaluation, self)
            metrics = {"epoch": epoch, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                       "loss/objective": train_loss, **evaluation.metrics(),
                       **self._ogr_metrics(self.last_losses, evaluation.losses()),
                       **self.strategy.epoch_metrics(), **self._skipped_metrics(),
                       "time/epoch_s": time.perf_counter() - began}
            self.epoch, self.last_losses = epoch, evaluation.losses()
            for callback in self.callbacks:
                callback(metrics)
            if self.run_dir is not None and (epoch % self.cfg.train.checkpoint_every == 0
                                             or epoch == self.cfg.train.epochs):
                self.save(self.run_dir / "checkpoints" / "last.pt")
        return metrics

    def train_epoch(self, epoch: int) -> float:
        model, strategy, optimizer = self.train_model, self.strategy, self.optimizer
        model.train()
        self.train_sampler.set_epoch(epoch)
        total = torch.zeros((), device=self.device)
        batches = tqdm(self.train_loader, desc=f"epoch {epoch}", leave=False,
                       disable=not (self.cfg.train.progress and distributed.rank() == 0 and _stderr_is_tty()))
        for batch in batches:
            inputs, targets = self._to_device(batch)
            self.skipped += batch[2] if len(batch) == 3 else 0
            if len(targets) == 0:  # every sample in it was bad and skipped
                if distributed.is_distributed():  # the other ranks would wait in this step's all-reduce
                    raise UserError("every sample of a batch was bad (data.skip_bad): with several workers that "
                                    "would desynchronise DDP; fix the files `blendtune data check` lists")
                continue
            masks = strategy.modality_masks(targets)
            with self._autocast():
                out = model(inputs, modality_masks=masks, detach_unimodal_heads=strategy.detach_unimodal_heads)
                loss = strategy.loss(out, targets, epoch)
                if strategy.detach_unimodal_heads:
                    loss = loss + probe_loss(out, targets)  # probes: no gradient reaches the encoders
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(optimizer)  # strategies modulate true gradients, not scaled ones
            strategy.after_backward(out, targets, epoch, self.step)
            if self.cfg.optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.optim.grad_clip)
            self.scaler.step(optimizer)
            self.scaler.update()
            total += loss.detach().float()
            self.step += 1
        mean_loss = float(distributed.all_reduce_sum_(total / max(len(self.train_loader), 1)) / distributed.world_size())
        if not math.isfinite(mean_loss):
            where = f"; the last good checkpoint is in '{self.run_dir / 'checkpoints'}'" if self.run_dir else ""
            raise TrainingDiverged(f"the training loss became {mean_loss} in epoch {epoch} (strategy "
                                   f"{self.cfg.strategy!r}, optim.lr={self.cfg.optim.lr}){where}")
        return mean_loss

    def train_copy(self, model: LateFusionClassifier, loss_fn, epochs: int) -> None:
        """Plain training of a model copy on `loss_fn` (G-Blend's per-head estimate), no strategy hooks."""
        optimizer = build_optimizer(self.cfg, model.parameters(), lr=self.optimizer.param_groups[0]["lr"])
        sampler = DistributedSampler(self.splits.train, num_replicas=distributed.world_size(),
                                     rank=distributed.rank(), shuffle=True, seed=self.cfg.seed + 7919)
        loader = self._loader(self.splits.train, self.batch_size, sampler)
        model.train()
        for e in range(epochs):
            sampler.set_epoch(self.epoch * 1000 + e)
            for batch in loader:
                inputs, targets = self._to_device(batch)
                if len(targets) == 0:
                    continue
                with self._autocast():
                    loss = loss_fn(model(inputs), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if distributed.is_distributed():
                    for p in model.parameters():
                        if p.grad is not None:
                            distributed.all_reduce_sum_(p.grad).div_(distributed.world_size())
                optimizer.step()

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: LateFusionClassifier) -> Evaluation:
        splits = {"train": self.splits.train_eval, "held_out": self.splits.held_out, "test": self.splits.test}
        return Evaluation({name: self._evaluate_split(model, ds) for name, ds in splits.items() if ds is not None})

    def _evaluate_split(self, model: LateFusionClassifier, dataset) -> dict[str, HeadStats]:
        was_training = model.training
        model.eval()
        heads = model.head_names + [ENSEMBLE]
        c, multilabel = dataset.num_classes, dataset.multilabel
        loss_sum = torch.zeros(len(heads), device=self.device, dtype=torch.float64)
        confusion = torch.zeros(len(heads), c * c, device=self.device, dtype=torch.float64)
        count = torch.zeros((), device=self.device, dtype=torch.float64)
        scores, labels = [], []  # multi-label: every score, for average precision
        for batch in self._loader(dataset, self.cfg.data.eval_batch_size, ShardSampler(len(dataset))):
            inputs, targets = self._to_device(batch)
            if len(targets) == 0:
                continue
            with self._autocast():
                out = model(inputs)
            logits = [out.logits[h].float() for h in model.head_names]
            count += len(targets)
            for i, lg in enumerate(logits):
                loss_sum[i] += classification_loss(lg, targets, reduction="sum")
            if multilabel:
                probs = torch.stack([lg.sigmoid() for lg in logits])
                ensemble = probs.mean(dim=0)
                loss_sum[-1] += F.binary_cross_entropy(ensemble, targets, reduction="none").mean(1).sum()
                scores.append(torch.cat([probs, ensemble[None]]).cpu())
                labels.append(targets.cpu())
                continue
            probs = torch.stack([lg.softmax(dim=1) for lg in logits]).mean(dim=0)
            for i, lg in enumerate(logits):
                confusion[i] += torch.bincount(targets * c + lg.argmax(1), minlength=c * c)
            loss_sum[-1] += F.nll_loss(probs.clamp_min(1e-12).log(), targets, reduction="sum")
            confusion[-1] += torch.bincount(targets * c + probs.argmax(1), minlength=c * c)
        distributed.all_reduce_sum_(loss_sum)
        distributed.all_reduce_sum_(confusion)
        distributed.all_reduce_sum_(count)
        model.train(was_training)
        n = count.clamp_min(1)
        if multilabel:
            scores, labels = distributed.gather_cat(scores, dim=1), distributed.gather_cat(labels, dim=0)
            aps = [average_precision(scores[i], labels).nanmean() for i in range(len(heads))]
            return {h: HeadStats(loss=float(loss_sum[i] / n), map=float(aps[i])) for i, h in enumerate(heads)}
        confusion = confusion.view(len(heads), c, c)
        tp = confusion.diagonal(dim1=1, dim2=2)
        f1 = (2 * tp / (confusion.sum(1) + confusion.sum(2)).clamp_min(1)).mean(1)
        acc = tp.sum(1) / n
        return {h: HeadStats(loss=float(loss_sum[i] / n), acc=float(acc[i]), f1=float(f1[i]))
                for i, h in enumerate(heads)}

    def _skipped_metrics(self) -> dict[str, float]:
        if not self.cfg.data.skip_bad:
            return {}
        skipped = distributed.all_reduce_sum_(torch.tensor(float(self.skipped), device=self.device))
        self.skipped = 0
        return {"data/skipped": float(skipped)}

    @staticmethod
    def _ogr_metrics(before: dict | None, after: dict) -> dict[str, float]:
        """Every strategy reports each head's OGR over the last epoch (monitoring, also for naive)."""
        if before is None or "held_out" not in after:
            return {}
        out = {}
        for head in after["train"]:
            s = ogr(before["train"][head], before["held_out"][head], after["train"][head], after["held_out"][head])
            out[f"ogr/{head}"], out[f"ogr/delta_g/{head}"], out[f"ogr/delta_o/{head}"] = s.ogr, s.delta_g, s.delta_o
        return out

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

    def apply_config_lr(self) -> None:
        """After loading a checkpoint under a changed config (a PBT explore step), the config's
        learning rate wins over the checkpoint's, keeping the schedule's progress."""
        factor = self.optimizer.param_groups[0]["lr"] / self.scheduler.base_lrs[0]
        self.scheduler.base_lrs = [self.cfg.optim.lr for _ in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.cfg.optim.lr
            group["lr"] = self.cfg.optim.lr * factor

    def save(self, path: Path) -> None:
        if distributed.rank() == 0:
            save_checkpoint(path, self.state_dict())

    def load(self, path: Path) -> None:
        self.load_state_dict(load_checkpoint(path))


def _stderr_is_tty() -> bool:
    return sys.stderr.isatty()
