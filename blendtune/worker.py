"""One worker's run, however it was launched: in this process (`blendtune train`), as a Ray Train
worker (DDP) or inside a Tune trial. The only module below `config` that reads an experiment config:
it builds data, model, optimizer, scheduler and strategy from it (plain arguments from here down),
hands them to the Trainer, restores, attaches the loggers and fits.

    run(cfg, RunSpec(...))      # what every launcher calls
    build_trainer(cfg)          # the parts alone (tests, benchmarks)

The config is an `ExperimentConfig` (blendtune.config) passed in as a value, never imported: arrows
point down.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from blendtune import distributed
from blendtune.data import as_dataset, build_splits, make_splits
from blendtune.devices import resolve_device
from blendtune.errors import OptionError, UserError
from blendtune.loggers import EpochTable, MetricsFile, WandbLogger, close_loggers, flat_dict, read_metrics
from blendtune.loop import Trainer, TrainOptions
from blendtune.models import EncoderSpec, build_late_fusion, classifier_for, encoders_for
from blendtune.optim import build_optimizer, build_scheduler
from blendtune.storage import TrialFiles
from blendtune.strategies import STRATEGIES, build_strategy, fusion_for
from blendtune.wandb_files import logged_steps

METRICS_FILE = "metrics.jsonl"
CHECKPOINT = Path("checkpoints") / "last.pt"


@dataclass
class RunSpec:
    """How this process's run is wired: where it logs, whether it writes checkpoints, what it resumes
    from, whom it reports each epoch to."""
    log_dir: Path | None = None              # metrics.jsonl and W&B files (rank 0 writes them)
    run_id: str = ""
    run_name: str = ""
    group: str | None = None                 # the sweep a trial belongs to (W&B group)
    table: bool = False                      # print the per-epoch table on stdout
    save_checkpoints: bool = False           # write log_dir/checkpoints/last.pt every train.checkpoint_every
    restore: Callable[[Trainer], None] | None = None  # load a checkpoint into the built trainer
    restored_lr_from_config: bool = False    # after restoring, the config's lr wins (a PBT explore step)
    announce_resume: bool = False            # print "resuming at epoch N of M"
    report: Callable[[dict, Trainer], None] | None = None  # after the loggers, every epoch (Ray)
    extra_loggers: list = field(default_factory=list)
    keep_files_at: str | None = None         # a sweep trial: metrics and W&B files are written in a scratch
                                             # folder and pushed here (a directory on the sweep's storage,
                                             # local or s3://...) every epoch, instead of log_dir


def restore_from_file(path: Path) -> Callable[[Trainer], None]:
    return lambda trainer: trainer.load(Path(path))


def run(cfg, spec: RunSpec) -> dict:
    """Build, restore, log, fit. Returns the last epoch's metrics."""
    trainer = build_trainer(cfg, spec.log_dir if spec.save_checkpoints else None)
    if spec.restore is not None:
        spec.restore(trainer)
        if spec.restored_lr_from_config:
            trainer.set_base_lr(cfg.optim.lr)
        if spec.announce_resume:
            print(f"resuming at epoch {trainer.epoch + 1} of {cfg.train.epochs}", flush=True)
    loggers = list(spec.extra_loggers)
    log_dir = Path(spec.log_dir) if spec.log_dir is not None else None
    files = TrialFiles(spec.keep_files_at) if spec.keep_files_at and distributed.rank() == 0 else None
    if files is not None:
        files.pull()  # what an earlier attempt of this trial kept: a retry, a resume, a node that died
        log_dir = files.local
    try:
        if distributed.rank() == 0 and log_dir is not None:
            # metrics.jsonl keeps only the epochs of the state training goes on from: a Ray worker restarted
            # before its first checkpoint was registered starts at epoch 0 and must not append to the old lines
            loggers += epoch_loggers(cfg, log_dir, trainer.epoch, trainer.model.head_names, spec)
        # files reach storage before Tune hears of the epoch: a scheduler may stop the trial right then (Tune
        # does not wait for the trial's thread to finish, so nothing after the last report is sure to run)
        trainer.callbacks = loggers + ([lambda metrics: files.push()] if files is not None else []) \
            + ([lambda metrics: spec.report(with_storage_time(metrics, files), trainer)] if spec.report else [])
        return trainer.fit()
    finally:
        try:
            close_loggers(loggers)
        finally:
            if files is not None:
                files.close()


def with_storage_time(metrics: dict, files: TrialFiles | None) -> dict:
    """What Ray hears of an epoch: its metrics and, for a sweep trial, the seconds spent so far copying
    the trial's files to storage (`time/trial_files_s`)."""
    return metrics if files is None else {**metrics, "time/trial_files_s": files.seconds}


def epoch_loggers(cfg, log_dir: Path, from_epoch: int, heads: list[str], spec: RunSpec) -> list:
    """What the rank-0 process does with each epoch's metrics: metrics.jsonl, the table, W&B."""
    loggers: list = [MetricsFile(log_dir / METRICS_FILE, from_epoch)]
    if spec.table:
        loggers.append(EpochTable(heads))
    if cfg.wandb:
        # epochs kept in metrics.jsonl that no earlier W&B session has on disk (killed before W&B flushed
        # them) are logged again first, so the run's W&B history has every epoch of the state trained on
        on_disk = logged_steps(log_dir) if from_epoch else set()
        wandb = WandbLogger(log_dir, flat_values(cfg), run_id=spec.run_id, name=spec.run_name,
                            project=cfg.wandb_project, group=spec.group, entity=cfg.wandb_entity,
                            wait_until_on_disk=spec.keep_files_at is not None)  # copied to storage every epoch
        if from_epoch and (log_dir / METRICS_FILE).is_file():
            for row in read_metrics(log_dir / METRICS_FILE):
                if row["epoch"] <= from_epoch and row["epoch"] not in on_disk:
                    wandb(row)
        loggers.append(wandb)
    return loggers


def flat_values(cfg) -> dict[str, Any]:
    """{'optim.lr': 0.01, ...} of a config dataclass (the W&B run config)."""
    return flat_dict(dataclasses.asdict(cfg))


# ---- the parts ----------------------------------------------------------------------------------
def build_trainer(cfg, run_dir: Path | None = None) -> Trainer:
    """Every part of a run from its experiment config, handed to the Trainer."""
    torch.manual_seed(cfg.seed)
    splits = build_data(cfg)
    model = build_model(cfg, splits)
    device = resolve_device(cfg.train.device)
    model.to(device)
    section = STRATEGIES.section(cfg.strategy)
    with _options_named_by(section):
        strategy = build_strategy(cfg.strategy, getattr(cfg, section) if section else None)
    if strategy.needs_held_out and splits.held_out is None:
        raise UserError(f"config key 'data.held_out_ratio': {cfg.strategy} needs a held-out split (ratio > 0)")
    o = cfg.optim
    optimizer = build_optimizer(o.name, model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                fused=device.type == "cuda")
    scheduler = build_scheduler(o.schedule, optimizer, cfg.train.epochs, o.step_size, o.gamma)
    t, d = cfg.train, cfg.data
    options = TrainOptions(epochs=t.epochs, batch_size=d.batch_size, eval_batch_size=d.eval_batch_size,
                           num_workers=d.num_workers, device=t.device, amp=t.amp, grad_clip=o.grad_clip,
                           checkpoint_every=t.checkpoint_every, progress=t.progress, seed=cfg.seed,
                           skip_bad=d.skip_bad, channels_last=t.channels_last, cudnn_benchmark=t.cudnn_benchmark,
                           compile=t.compile, on_device=d.on_device, predict=t.predict)
    with _options_named_by(section):  # a strategy's setup checks its options against the data too
        return Trainer(model, strategy, splits, optimizer, scheduler, options, run_dir=run_dir)


@contextlib.contextmanager
def _options_named_by(section: str | None):
    """A strategy's OptionError names its option ('modality'); here it names the config key."""
    try:
        yield
    except OptionError as e:
        raise UserError(f"config key '{section}.{e.key}': {e.message}") from None


def dataset_options(cfg) -> dict:
    """The options section `data.<dataset>` of the chosen dataset as keyword arguments for its adapter."""
    section = getattr(cfg.data, cfg.data.dataset, None)
    return dataclasses.asdict(section) if section is not None else {}


def build_data(cfg):
    d = cfg.data
    if d._target_:
        made = locate(d._target_, "data._target_")(**d.args)
        if isinstance(made, dict):
            train, held_out, test = made.get("train"), made.get("held_out"), made.get("test")
        elif isinstance(made, (tuple, list)) and len(made) in (2, 3):
            train, held_out, test = (made[0], None, made[1]) if len(made) == 2 else made
        else:
            raise UserError(f"config key 'data._target_': {d._target_} must return (train, test), "
                            f"(train, held_out, test) or a dict of them, got {type(made).__name__}")
        if train is None or test is None:
            raise UserError(f"config key 'data._target_': {d._target_} returned no train or no test dataset")
        train, test = as_dataset(train, "train"), as_dataset(test, "test", num_classes=None)
        held_out = as_dataset(held_out, "held_out", num_classes=train.num_classes) if held_out is not None else None
        return make_splits(train, test, d.held_out_ratio, d.held_out_by_group, d.train_eval_size, cfg.seed,
                           held_out=held_out, name=d._target_)
    return build_splits(d.dataset, {**dataset_options(cfg), "root": d.root}, d.held_out_ratio, d.held_out_by_group,
                        d.train_eval_size, cfg.seed, skip_bad=d.skip_bad, spectrogram_on=d.spectrogram_on,
                        frames_on=d.frames_on, use_cache=d.use_cache)


def build_model(cfg, splits):
    """blendtune's encoders for the data's input shapes, or the user's backbone (`model._target_`),
    with the uni-modal heads and the fusion."""
    m, train = cfg.model, splits.train
    fusion = fusion_for(cfg.strategy, m.fusion)  # MLA is defined with a shared head
    if m._target_:
        backbone = locate(m._target_, "model._target_")(**m.args)
        if not isinstance(backbone, torch.nn.Module):
            raise UserError(f"config key 'model._target_': {m._target_} built a {type(backbone).__name__}, "
                            "expected a torch.nn.Module")
        try:
            return classifier_for(backbone, sample_batch(train), fusion, splits.num_classes)
        except ValueError as e:
            raise UserError(f"config key 'model._target_': {m._target_}: {e}") from None
    unknown = sorted(set(m.encoders) - set(train.modalities))
    if unknown:
        raise UserError(f"config key 'model.encoders': modalities {unknown} are not in the data "
                        f"(it has {', '.join(train.modalities)})")
    specs = {name: EncoderSpec(e.name, e.dim, e.hidden, e.dropout) for name, e in m.encoders.items()}
    encoders = encoders_for(train.input_shapes, specs, getattr(train, "default_encoders", {}) or {})
    try:
        return build_late_fusion(encoders, fusion, splits.num_classes)
    except ValueError as e:
        raise UserError(f"config key 'model.fusion': {e}") from None


def sample_batch(dataset, size: int = 2) -> dict[str, torch.Tensor]:
    """The inputs of a small batch of `dataset` (to measure a backbone's features)."""
    indices = list(range(min(size, len(dataset))))
    if hasattr(dataset, "__getitems__"):  # in-memory datasets index a whole batch at once
        return dataset.__getitems__(indices)[0]
    items = [dataset[i] for i in indices]
    collate = getattr(dataset, "collate_fn", None)
    if collate is None:
        from torch.utils.data import default_collate as collate
    return collate([item for item in items if item is not None])[0]


def locate(path: str, key: str) -> Callable:
    """`my_pkg.models.MyModel` -> the object (like torchtune's `_component_`, Hydra's `_target_`)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise UserError(f"config key '{key}': expected an import path like my_pkg.MyModel, got {path!r}")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"config key '{key}': cannot import {path!r}: {e}") from None
    if not callable(obj):
        raise UserError(f"config key '{key}': {path!r} is not callable")
    return obj
