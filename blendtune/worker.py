"""One worker's run, however it was launched: in this process (`blendtune train`, `blendtune.fit`), as a
Ray Train worker (DDP) or inside a Tune trial. It has the run built (blendtune.build: one builder for
every caller), restores it, attaches the loggers and fits.

    run(cfg, RunSpec(...))             # what every launcher calls
    run(cfg, RunSpec(...), parts)      # with the Python user's own model and data objects

The config is an `ExperimentConfig` (blendtune.config) passed in as a value, never imported: arrows
point down.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from blendtune import distributed
from blendtune.build import UserParts, build_trainer
from blendtune.loggers import EpochTable, MetricsFile, WandbLogger, close_loggers, flat_dict, read_metrics
from blendtune.loop import LAST, Trainer
from blendtune import storage
from blendtune.storage import TrialFiles
from blendtune.wandb_files import logged_steps

METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.json"        # how to rebuild the model without its data (blendtune.load)
CHECKPOINT = Path("checkpoints") / LAST


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
    callbacks: list = field(default_factory=list)  # called with each epoch's metrics after the loggers (Python API)
    keep_files_at: str | None = None         # a sweep trial: metrics and W&B files are written in a scratch
                                             # folder and pushed here (a directory on the sweep's storage,
                                             # local or s3://...) every epoch, instead of log_dir


def restore_from_file(path: Path) -> Callable[[Trainer], None]:
    return lambda trainer: trainer.load(Path(path))


def run(cfg, spec: RunSpec, parts: UserParts | None = None, on_built: Callable[[Trainer], None] | None = None) -> dict:
    """Build, restore, log, fit. Returns the last epoch's metrics. `on_built` sees the Trainer before it
    trains (the Python API keeps it)."""
    trainer = build_trainer(cfg, spec.log_dir if spec.save_checkpoints else None, parts)
    if on_built is not None:
        on_built(trainer)
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
            write_model_recipe(log_dir, trainer.model)
            # metrics.jsonl keeps only the epochs of the state training goes on from: a Ray worker restarted
            # before its first checkpoint was registered starts at epoch 0 and must not append to the old lines
            loggers += epoch_loggers(cfg, log_dir, trainer.epoch, trainer.model.head_names, spec)
        # files reach storage before Tune hears of the epoch: a scheduler may stop the trial right then (Tune
        # does not wait for the trial's thread to finish, so nothing after the last report is sure to run)
        trainer.callbacks = loggers + ([lambda metrics: files.push()] if files is not None else []) \
            + list(spec.callbacks) + ([lambda metrics: spec.report(with_storage_time(metrics, files), trainer)] if spec.report else [])
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


def write_model_recipe(log_dir: Path, model) -> None:
    """model.json: how to build the run's model again without its data (blendtune.load)."""
    recipe = getattr(model, "recipe", None)
    if recipe is not None:
        storage.write_text(str(log_dir / MODEL_FILE), json.dumps(recipe, indent=1))  # replaced atomically

