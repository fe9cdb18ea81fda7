"""Launching a run's workers: in this process (1 worker) or on N Ray Train workers (DDP). Both end in
`worker.run`, as every sweep trial does, so loggers, checkpoints and resume are the same everywhere.

The experiment config arrives as a value (an `ExperimentConfig`); this module reads its launch keys
(`workers`, `train.device`, `max_failures`, `sweep.cpus_per_worker`, `sweep.address`) and nothing else.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from blendtune import distributed, worker
from blendtune.data.base import absolute_root
from blendtune.devices import wants_gpu
from blendtune.errors import UserError
from blendtune.loop import Trainer

CHECKPOINT_NAME = worker.CHECKPOINT.name  # the file inside a Ray checkpoint directory
# Ray Train's controller polls workers every 2 s by default: that adds seconds to every short trial.
# A worker group that times out waiting for resources leaks its placement group request, so Train
# waits for resources instead (Tune already limits how many trials run at once).
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3600", "RAY_DEDUP_LOGS": "0",
           "RAY_AUTH_MODE": "disabled", "PYTHONWARNINGS": "ignore::DeprecationWarning",
           "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}  # sweeps add the JSON logger themselves


def local_run_spec(run_dir: Path, resume: bool, table: bool = True, callbacks=()) -> worker.RunSpec:
    """A run in this process writing `run_dir` (config.yaml is already there): metrics.jsonl, W&B,
    model.json, checkpoints; restored from its last checkpoint when resuming."""
    return worker.RunSpec(log_dir=run_dir, run_id=run_dir.name, run_name=run_dir.name, table=table,
                          save_checkpoints=True, announce_resume=resume, callbacks=list(callbacks),
                          restore=worker.restore_from_file(run_dir / worker.CHECKPOINT) if resume else None)


def train_locally(cfg, run_dir: Path, resume: bool, parts=None) -> dict:
    """`blendtune train` with one worker: this process trains, writes the run directory, prints the table."""
    return worker.run(cfg, local_run_spec(run_dir, resume), parts)


# ---- Ray Train ----------------------------------------------------------------------------------
def report_with_checkpoint(trainer: Trainer, report: Callable[..., None], metrics: dict, checkpoint_cls) -> None:
    """Report metrics from every rank (Ray needs all of them) and a checkpoint from rank 0.
    `checkpoint_cls` is ray.train.Checkpoint in Train workers, ray.tune.Checkpoint in Tune trials."""
    if distributed.rank() != 0:
        report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(trainer.state_dict(), Path(tmp) / CHECKPOINT_NAME)
        report(metrics, checkpoint=checkpoint_cls.from_directory(tmp))


def restore_from_ray(checkpoint) -> Callable[[Trainer], None]:
    def restore(trainer: Trainer) -> None:
        with checkpoint.as_directory() as d:
            trainer.load(Path(d) / CHECKPOINT_NAME)
    return restore


def train_worker(config: dict) -> None:
    """The loop each Ray Train worker runs (torch.distributed is already set up by TorchTrainer)."""
    import ray.train

    cfg = config["cfg"]
    log_dir = Path(config["log_dir"]) if config.get("log_dir") else None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group, or a restored Tune trial
        restore = restore_from_ray(checkpoint)
    elif config.get("resume_from"):
        restore = worker.restore_from_file(Path(config["resume_from"]))
    else:
        restore = None
    pg = _placement_group_id()

    def report(metrics: dict, trainer: Trainer) -> None:
        report_with_checkpoint(trainer, lambda m, checkpoint=None: ray.train.report({**m, "placement_group": pg},
                                                                                   checkpoint=checkpoint),
                               metrics, ray.train.Checkpoint)

    worker.run(cfg, worker.RunSpec(log_dir=log_dir, run_id=config.get("run_id", ""),
                                   run_name=config.get("run_name", ""), group=config.get("group"),
                                   table=config.get("table", False), keep_files_at=config.get("keep_files_at"),
                                   save_checkpoints=bool(config.get("local_checkpoints")), restore=restore,
                                   report=report), config.get("parts"))


def _placement_group_id() -> str:
    # Reported with the metrics so a sweep can free the group when Tune stops the trial (ray issue 54305).
    import ray
    pg = ray.get_runtime_context().get_placement_group_id()
    return pg or ""


def worker_cpus(cfg, node_cpus: list[float] | None = None) -> float:
    """CPUs (and so torch threads: Ray sets OMP_NUM_THREADS to them) per Ray worker. `sweep.cpus_per_worker`
    if set; otherwise 1 in a sweep (many trials share the machine) and, for one `train workers=N` run, the
    cluster's CPUs split among its workers, at most one node's worth each (1 thread each would waste them)."""
    if cfg.sweep.cpus_per_worker is not None:
        return cfg.sweep.cpus_per_worker
    if not node_cpus:
        return 1.0
    return float(max(1, min(int(max(node_cpus)), int(sum(node_cpus) // cfg.workers))))


def torch_trainer(cfg, loop_config: dict, name: str, storage_path: str, callbacks=(),
                  max_failures: int | None = None, cpus_per_worker: float | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = wants_gpu(cfg.train.device)
    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg, **loop_config},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker or worker_cpus(cfg), **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=cfg.max_failures if max_failures is None else max_failures,
                                                           controller_failure_limit=3),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )


def init_ray(address: str | None, num_cpus: int | None = None, log_to_driver: bool = True) -> bool:
    """Connects to `address` ($RAY_ADDRESS) or starts a local Ray; False if Ray was already up.
    Workers find the modules the driver finds (a user's `model._target_`): the driver's import path
    goes to them as PYTHONPATH."""
    import ray
    if ray.is_initialized():
        return False
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {"num_cpus": num_cpus} if address == "local" and num_cpus else {}
    ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver,
             runtime_env={"env_vars": worker_env(address == "local")}, **kwargs)
    return True


def worker_env(local: bool) -> dict[str, str]:
    """Environment variables Ray workers get. Ray runs each trial in its own directory, so paths the
    user gave relative to theirs are made absolute (on a local Ray, where both share a file system)."""
    env = {k: os.environ.get(k, v) for k, v in RAY_ENV.items()}
    # W&B names the service it started in this process in the environment (WANDB_SERVICE: an earlier fit,
    # a notebook); workers inheriting it would all log through that one service, where a trial restarted
    # after its worker was killed finds its run id still "in use". Empty: each worker starts its own.
    env["WANDB_SERVICE"] = ""
    if local:  # the modules the driver imported (a user's model class, pickled by reference) import there too
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
            [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)), *_user_import_dirs()]))
        if os.environ.get("BLENDTUNE_DATA_ROOT"):  # a remote cluster's workers read their own environment
            env["BLENDTUNE_DATA_ROOT"] = absolute_root(os.environ["BLENDTUNE_DATA_ROOT"])
    return env


def _user_import_dirs() -> list[str]:
    """The driver's import path outside Python's own installation (sys.path entries a script or a
    notebook added, e.g. `sys.path.insert(0, "src")`)."""
    import sys
    installed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    return [os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)
            and not any(os.path.realpath(p).startswith(root + os.sep) or os.path.realpath(p) == root
                        for root in installed)]


def check_gpus(cfg) -> None:
    """Ray waits forever for GPUs a cluster does not have. On a local Ray (no `sweep.address` /
    $RAY_ADDRESS) this machine's GPUs are all there is: asking for more is a one-line error, before
    anything is created. A remote cluster may autoscale, so it is trusted. `sweep.gpus_per_trial` is
    reserved even for CPU trials (blendtune.sweeps.trial_resources), so it counts too."""
    reserves_gpus = wants_gpu(cfg.train.device) or (cfg.workers == 1 and cfg.sweep.gpus_per_trial is not None)
    if not reserves_gpus or cfg.sweep.address or os.environ.get("RAY_ADDRESS"):
        return
    if cfg.workers == 1 and cfg.sweep.gpus_per_trial is None:
        needed = 1.0
    else:
        needed = float(cfg.workers) if cfg.workers > 1 else cfg.sweep.gpus_per_trial
    have = torch.cuda.device_count()
    if have < needed:
        raise UserError(f"config keys 'train.device'={cfg.train.device!r}, 'workers'={cfg.workers}: a run needs "
                        f"{needed:g} GPU(s), this machine has {have}; use fewer workers, "
                        "sweep.gpus_per_trial < 1, or train.device=cpu")


def train_with_ray(cfg, run_dir: Path, resume: bool, parts=None) -> dict:
    """`blendtune train workers=N`: one Ray Train run (DDP) whose rank 0 writes the run directory."""
    import ray
    started = init_ray(cfg.sweep.address, num_cpus=max(os.cpu_count() or 1, int(cfg.workers * worker_cpus(cfg))))
    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    loop_config = {"log_dir": str(run_dir.resolve()), "local_checkpoints": True, "run_id": run_dir.name,
                   "run_name": run_dir.name, "table": True, "parts": parts}
    if resume and (run_dir / worker.CHECKPOINT).is_file():
        loop_config["resume_from"] = str((run_dir / worker.CHECKPOINT).resolve())
    try:
        result = torch_trainer(cfg, loop_config, name="ray_train", storage_path=str(run_dir.resolve()),
                               cpus_per_worker=worker_cpus(cfg, node_cpus)).fit()
        error = result.error
    except Exception as e:  # Train V2 raises the workers' failure (WorkerGroupError) from fit()
        error = e
    finally:
        if started:
            ray.shutdown()
    if error:  # the workers' traceback is in Ray's logs; the user gets its last line
        raise UserError(f"training failed on the Ray Train workers: {worker_error_line(error)} (Ray Train run in "
                        f"'{run_dir / 'ray_train'}')")
    return dict(result.metrics or {})


def worker_error_line(error: BaseException) -> str:
    """The line of a Ray worker's failure a user acts on: a blendtune error's own message, else the last
    line of the worker's traceback."""
    text = str(error).strip()
    for line in reversed(text.splitlines()):
        if "UserError: " in line or "SettingError: " in line or "OptionError: " in line:
            return line.split("Error: ", 1)[1]
    return text.splitlines()[-1] if text else type(error).__name__
