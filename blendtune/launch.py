"""Launching the training loop: in this process (1 worker) or on N Ray Train workers (DDP).

`blendtune train` and every sweep trial come through here, so the loggers, checkpoint reporting and
failure handling are the same for both.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from blendtune import distributed
from blendtune.config import ExperimentConfig, config_from_dict, flat_keys, to_dict
from blendtune.errors import UserError
from blendtune.loop import Trainer
from blendtune.reporting import EpochTable, MetricsFile
from blendtune.runs import CHECKPOINT, METRICS_FILE

CHECKPOINT_NAME = "last.pt"
# Ray Train's controller polls workers every 2 s by default: that adds seconds to every short trial.
# A worker group that times out waiting for resources leaks its placement group request, so Train
# waits for resources instead (Tune already limits how many trials run at once).
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3600", "RAY_DEDUP_LOGS": "0", "TUNE_GLOBAL_CHECKPOINT_S": "0",
           "RAY_AUTH_MODE": "disabled", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def epoch_loggers(cfg: ExperimentConfig, log_dir: Path, resume_epoch: int | None, heads: list[str],
                  run_id: str, run_name: str, group: str | None, table: bool) -> list[Callable[[dict], None]]:
    """What the rank-0 process does with each epoch's metrics: metrics.jsonl, the table, W&B."""
    loggers: list = [MetricsFile(log_dir / METRICS_FILE, resume_epoch)]
    if table:
        loggers.append(EpochTable(heads))
    if cfg.wandb:
        from blendtune.wandb_logger import WandbLogger
        loggers.append(WandbLogger(log_dir, flat_keys(cfg), run_id=run_id, name=run_name, project=cfg.wandb_project,
                                   group=group, entity=cfg.wandb_entity))
    return loggers


def close_loggers(loggers) -> None:
    for logger in loggers:
        if hasattr(logger, "close"):
            logger.close()


def train_locally(cfg: ExperimentConfig, run_dir: Path, resume: bool) -> dict:
    trainer = Trainer(cfg, run_dir)
    if resume:
        trainer.load(run_dir / CHECKPOINT)
        print(f"resuming at epoch {trainer.epoch + 1} of {cfg.train.epochs}", flush=True)
    trainer.callbacks = epoch_loggers(cfg, run_dir, trainer.epoch if resume else None,
                                      trainer.model.head_names, run_id=run_dir.name, run_name=run_dir.name,
                                      group=None, table=True)
    try:
        return trainer.fit()
    finally:
        close_loggers(trainer.callbacks)


# ---- Ray Train ----------------------------------------------------------------------------------
def save_ray_checkpoint(trainer: Trainer, report: Callable[..., None], metrics: dict, checkpoint_cls) -> None:
    """Report metrics from every rank (Ray needs all of them) and a checkpoint from rank 0.
    `checkpoint_cls` is ray.train.Checkpoint in Train workers, ray.tune.Checkpoint in Tune trials."""
    if distributed.rank() != 0:
        report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(trainer.state_dict(), Path(tmp) / CHECKPOINT_NAME)
        report(metrics, checkpoint=checkpoint_cls.from_directory(tmp))


def load_ray_checkpoint(trainer: Trainer, checkpoint) -> None:
    with checkpoint.as_directory() as d:
        trainer.load(Path(d) / CHECKPOINT_NAME)


def train_worker(config: dict) -> None:
    """The loop each Ray Train worker runs (torch.distributed is already set up by TorchTrainer)."""
    import ray.train

    cfg = config_from_dict(config["cfg"])
    log_dir = Path(config["log_dir"]) if config.get("log_dir") else None
    trainer = Trainer(cfg, log_dir if config.get("local_checkpoints") else None)
    checkpoint = ray.train.get_checkpoint()
    resumed = checkpoint is not None or bool(config.get("resume_from"))
    if checkpoint is not None:  # a restarted worker group, or a restored Tune trial
        load_ray_checkpoint(trainer, checkpoint)
    elif config.get("resume_from"):
        trainer.load(Path(config["resume_from"]))
    pg = _placement_group_id()
    loggers = []
    if distributed.rank() == 0 and log_dir is not None:
        loggers = epoch_loggers(cfg, log_dir, trainer.epoch if resumed else None, trainer.model.head_names,
                                run_id=config["run_id"], run_name=config["run_name"], group=config.get("group"),
                                table=config.get("table", False))
    report = lambda metrics, checkpoint=None: ray.train.report(  # noqa: E731
        {**metrics, "placement_group": pg}, checkpoint=checkpoint)
    trainer.callbacks = loggers + [lambda metrics: save_ray_checkpoint(trainer, report, metrics, ray.train.Checkpoint)]
    try:
        trainer.fit()
    finally:
        close_loggers(loggers)


def _placement_group_id() -> str:
    # Reported with the metrics so a sweep can free the group when Tune stops the trial (ray issue 54305).
    import ray
    pg = ray.get_runtime_context().get_placement_group_id()
    return pg or ""


def worker_cpus(cfg: ExperimentConfig, node_cpus: list[float] | None = None) -> float:
    """CPUs (and so torch threads: Ray sets OMP_NUM_THREADS to them) per Ray worker. `sweep.cpus_per_worker`
    if set; otherwise 1 in a sweep (many trials share the machine) and, for one `train workers=N` run, the
    cluster's CPUs split among its workers, at most one node's worth each (1 thread each would waste them)."""
    if cfg.sweep.cpus_per_worker is not None:
        return cfg.sweep.cpus_per_worker
    if not node_cpus:
        return 1.0
    return float(max(1, min(int(max(node_cpus)), int(sum(node_cpus) // cfg.workers))))


def torch_trainer(cfg: ExperimentConfig, loop_config: dict, name: str, storage_path: str, callbacks=(),
                  max_failures: int | None = None, cpus_per_worker: float | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = cfg.train.device != "cpu" and torch.cuda.is_available() if cfg.train.device == "auto" \
        else cfg.train.device.startswith("cuda")
    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": to_dict(cfg), **loop_config},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker or worker_cpus(cfg), **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=cfg.max_failures if max_failures is None else max_failures,
                                                           controller_failure_limit=3),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )


def init_ray(address: str | None, num_cpus: int | None = None, log_to_driver: bool = True) -> bool:
    """Connects to `address` ($RAY_ADDRESS) or starts a local Ray; False if Ray was already up."""
    import ray
    if ray.is_initialized():
        return False
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {"num_cpus": num_cpus} if address == "local" and num_cpus else {}
    ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver,
             runtime_env={"env_vars": {k: os.environ[k] for k in RAY_ENV}}, **kwargs)
    return True


def train_with_ray(cfg: ExperimentConfig, run_dir: Path, resume: bool) -> dict:
    """`blendtune train workers=N`: one Ray Train run (DDP) whose rank 0 writes the run directory."""
    import ray
    started = init_ray(cfg.sweep.address, num_cpus=max(os.cpu_count() or 1, int(cfg.workers * worker_cpus(cfg))))
    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    loop_config = {"log_dir": str(run_dir.resolve()), "local_checkpoints": True, "run_id": run_dir.name,
                   "run_name": run_dir.name, "table": True}
    if resume and (run_dir / CHECKPOINT).is_file():
        loop_config["resume_from"] = str((run_dir / CHECKPOINT).resolve())
    try:
        result = torch_trainer(cfg, loop_config, name="ray_train", storage_path=str(run_dir.resolve()),
                               cpus_per_worker=worker_cpus(cfg, node_cpus)).fit()
    finally:
        if started:
            ray.shutdown()
    if result.error:  # the workers' traceback is in Ray's logs; the user gets its last line
        last = str(result.error).strip().splitlines()[-1]
        raise UserError(f"training failed on the Ray Train workers: {last} (Ray Train run in '{run_dir / 'ray_train'}')")
    return dict(result.metrics or {})
