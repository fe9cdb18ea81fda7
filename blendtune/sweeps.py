"""Ray Tune sweeps: a search space over config keys, Optuna/random/grid search, ASHA/PBT, resume.

A 1-worker trial runs the training loop directly inside its Tune trial (no Train controller: seconds
cheaper per trial, and Tune gets a checkpoint every epoch, which PBT exploits). A multi-worker trial
fits a Ray Train `TorchTrainer` (DDP) named after the trial, so a restored sweep resumes it from its
own latest checkpoint; when Tune stops such a trial early its worker placement group is removed
(ray issue 54305: otherwise the next trial's workers wait forever).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from blendtune import storage as storage_lib
from blendtune import worker
from blendtune.devices import wants_gpu
from blendtune.errors import TrainingDiverged, UserError
from blendtune.launch import (init_ray, report_with_checkpoint, restore_from_ray, torch_trainer,
                              worker_cpus)

EXPERIMENT = "tune"          # the Tune experiment's folder inside the sweep's storage path
TRAIN_RUNS = "train_runs"    # multi-worker trials' Ray Train runs (their checkpoints), beside it
SWEEP_FILE = "sweep.json"    # what a resume needs besides config.yaml: the space and the storage path
VARIANT = "variant"          # a grid entry that sets several keys at once (compare: strategy + options)


@dataclass(frozen=True)
class Distribution:
    """One key of a search space: `choice`, `grid`, `uniform`, `loguniform` or `randint` and its arguments."""
    kind: str
    args: tuple

    def examples(self) -> list[Any]:
        """Values that must all be valid for the key: every option, or both ends of a range."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        low, high = self.args
        return [low, high - 1] if self.kind == "randint" else [low, high]


def tune_domain(dist: Distribution):
    from ray import tune
    if dist.kind == "grid":
        return tune.grid_search(list(dist.args))
    if dist.kind == "choice":
        return tune.choice(list(dist.args))
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[dist.kind](*dist.args)


def param_space(space: dict[str, Distribution], variants: list[dict] | None = None) -> dict:
    from ray import tune
    params = {key: tune_domain(dist) for key, dist in space.items()}
    if variants:
        params[VARIANT] = tune.grid_search(variants)
    return params


def model_checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def trial_overrides(sample: dict) -> dict:
    """Tune's sample of the space -> the dotted config keys it sets (a variant sets several)."""
    sample = {k: v for k, v in sample.items() if not k.startswith("_")}  # bookkeeping (compare --tune's phase)
    return {**sample.pop(VARIANT, {}), **sample}


def run_trial(sample: dict, trial_config: Callable[[dict], Any], sweep_name: str, storage: str, parts=None) -> None:
    """The Tune trainable: one configuration of the space, trained to `train.epochs`.
    `trial_config` (from blendtune.config) turns the trial's overrides into a validated config.
    The trial's own files go to its folder on the sweep's storage (`storage/tune/<trial>`), next to
    what Tune writes there, wherever the trial runs. `parts`: the Python user's own model and data
    objects (blendtune.build.UserParts), shipped through Ray's object store."""
    from ray import tune

    cfg = trial_config(trial_overrides(sample))
    context = tune.get_context()
    trial_id, trial_name = context.get_trial_id(), context.get_trial_name()
    # Tune names the trial's folder on storage as it names the local one (whose parent differs between
    # the first trial of a reused worker process and later ones)
    trial_files = storage_lib.join(storage, EXPERIMENT, Path(context.get_trial_dir()).name)
    try:
        if cfg.workers > 1:
            return _run_trial_on_train_workers(cfg, trial_files, trial_id, trial_name, sweep_name, storage, parts)
        _run_trial_here(cfg, trial_files, trial_id, trial_name, sweep_name, parts)
    except TrainingDiverged as e:  # a bad corner of the space: the trial ends, the sweep goes on
        storage_lib.write_text(storage_lib.join(trial_files, "diverged.txt"), str(e) + "\n")


def _run_trial_here(cfg, trial_files: str, trial_id: str, trial_name: str, sweep_name: str, parts) -> None:
    import ray
    from ray import tune

    node_id = ray.get_runtime_context().get_node_id()
    checkpoint = tune.get_checkpoint()  # a resumed sweep, a retried trial, or a PBT exploit of another's weights
    restored: dict = {}

    def restore(trainer) -> None:
        restore_from_ray(checkpoint)(trainer)
        restored.update({"restored/epoch": trainer.epoch, "restored/checksum": model_checksum(trainer.model)})

    def report(metrics: dict, trainer) -> None:
        def to_tune(m: dict, checkpoint=None) -> None:
            tune.report({**m, **restored, "model/checksum": model_checksum(trainer.model), "node_id": node_id},
                        checkpoint=checkpoint)
            restored.clear()
        report_with_checkpoint(trainer, to_tune, metrics, tune.Checkpoint)

    spec = worker.RunSpec(keep_files_at=trial_files, run_id=f"{sweep_name}-{trial_id}", run_name=trial_name,
                          group=sweep_name, restore=restore if checkpoint is not None else None,
                          restored_lr_from_config=True, report=report)
    worker.run(cfg, spec, parts)


def _run_trial_on_train_workers(cfg, trial_files, trial_id, trial_name, sweep_name, storage, parts) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    loop_config = {"keep_files_at": trial_files, "run_id": f"{sweep_name}-{trial_id}", "run_name": trial_name,
                   "group": sweep_name, "parts": parts}
    # Retries belong to Tune here (its FailureConfig reruns the trial, which resumes the Train run from
    # its latest checkpoint): a Train-level retry would rebuild the worker group of a trial that Tune
    # has just stopped, in a new placement group nobody frees.
    result = torch_trainer(cfg, loop_config, name=f"train_{trial_id}", storage_path=storage_lib.join(storage, TRAIN_RUNS),
                           callbacks=[TuneReportCallback()], max_failures=0).fit()
    if result.error:
        raise result.error


STATE_BACKUP = ".blendtune-state-backup"  # last complete copy of Tune's experiment state, per session file
STATE_PREFIX = "experiment_state-"


def state_files(experiment: str) -> dict[str, tuple[int, int]]:
    """Tune's experiment state files in `experiment`: {name: (mtime ns, size)}; the newest sorts last."""
    return {name: signature for name, signature in storage_lib.list_files(experiment).items()
            if name.startswith(STATE_PREFIX) and name.endswith(".json")}


def _experiment_state_backup_callback(experiment: str):
    """Tune rewrites `experiment_state-*.json` in place; a driver killed mid-write leaves it empty and a
    resume would then forget every trial. After Tune steps, a copy that parses is kept atomically
    (on an object store at most every 2 s: each look is a request)."""
    import time

    from ray import tune

    every = 2.0 if storage_lib.is_url(experiment) else 0.0

    class BackUpExperimentState(tune.Callback):
        def __init__(self):
            self.seen = None
            self.looked = float("-inf")

        def on_step_end(self, iteration, trials, **info):
            if time.monotonic() - self.looked < every:
                return
            self.back_up()

        def back_up(self) -> None:
            """Also called once Tune has returned: it writes its final state after the last callback."""
            self.looked = time.monotonic()
            states = state_files(experiment)
            if not states:
                return
            newest = max(states)
            if (newest, states[newest]) == self.seen:
                return
            text = storage_lib.read_text(storage_lib.join(experiment, newest))
            try:
                json.loads(text or "")
            except ValueError:  # being written right now: the next step copies it
                return
            storage_lib.write_text(storage_lib.join(experiment, STATE_BACKUP, newest), text)
            self.seen = (newest, states[newest])

    return BackUpExperimentState()


def repair_experiment_state(experiment: str) -> list[str]:
    """Before a resume: an experiment state file that does not parse is replaced by its backup, or removed
    (Tune then restores from the previous session's file). Returns what was repaired."""
    repaired = []
    for name in sorted(state_files(experiment)):
        state = storage_lib.join(experiment, name)
        try:
            json.loads(storage_lib.read_text(state) or "")
            continue
        except ValueError:
            pass
        backup = storage_lib.read_text(storage_lib.join(experiment, STATE_BACKUP, name))
        if backup is not None:
            storage_lib.write_text(state, backup)
            repaired.append(f"{name}: restored from its backup")
        else:
            storage_lib.delete(state)
            repaired.append(f"{name}: unreadable, removed")
    return repaired


def _release_train_workers_callback():
    from ray import tune

    class ReleaseTrainWorkers(tune.Callback):
        """Frees a stopped multi-worker trial's Train placement group (ray issue 54305)."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._release(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._release(trial)

        @staticmethod
        def _release(trial) -> None:
            import ray
            from ray._raylet import PlacementGroupID
            from ray.util.placement_group import PlacementGroup

            pg = (trial.last_result or {}).get("placement_group")
            if pg:
                try:
                    ray.util.remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg))))
                except Exception:  # already removed by Train itself: nothing to free
                    pass

    return ReleaseTrainWorkers()


def _fifo():
    from ray.tune.schedulers import FIFOScheduler
    return FIFOScheduler()


def _search_and_scheduler(cfg, space: dict[str, Distribution]):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = cfg.sweep
    has_grid = any(d.kind == "grid" for d in space.values())
    search = None
    if s.search == "optuna" and s.scheduler != "pbt":
        if has_grid:
            raise UserError("config key 'sweep.search': optuna cannot sample 'grid' entries; use sweep.search=grid "
                            "or 'choice' in the space")
        from ray.tune.search.optuna import OptunaSearch
        search = OptunaSearch(seed=cfg.seed)
    if s.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=s.grace_period,
                                  reduction_factor=s.reduction_factor)
    elif s.scheduler == "pbt":
        if cfg.workers > 1:
            raise UserError("sweep.scheduler=pbt needs 1-worker trials (workers=1): PBT exploits Tune checkpoints, "
                            "which multi-worker Train trials do not hand to Tune")
        mutations = {k: tune_domain(d) for k, d in space.items() if d.kind != "grid"}
        if not mutations:
            raise UserError("sweep.scheduler=pbt needs at least one non-grid key in the space to perturb")
        scheduler = PopulationBasedTraining(time_attr="epoch", perturbation_interval=s.perturbation_interval,
                                            hyperparam_mutations=mutations)
    else:
        scheduler = FIFOScheduler()
    return search, scheduler


def _trainable(cfg, trial_config: Callable[[dict], Any], sweep_name: str, storage: str, parts=None):
    from ray import tune

    if parts is not None:  # every trial builds its model from its own copy
        parts = dataclasses.replace(parts, copy_model=True)
    trainable = tune.with_parameters(run_trial, trial_config=trial_config, sweep_name=sweep_name, storage=storage,
                                     parts=parts)
    return tune.with_resources(trainable, trial_resources(cfg))


def trial_resources(cfg) -> dict[str, float]:
    """What Tune reserves per trial. A 1-worker trial trains inside it: its CPUs and `sweep.gpus_per_trial`
    of a GPU (a fraction lets several small trials share one; Ray then packs them). Set, it is reserved
    whatever `train.device` says (a CPU trial that must land on a GPU node, or a dry run of the packing);
    unset, a trial on a GPU takes a whole one. A multi-worker trial only drives its TorchTrainer, whose
    workers hold the resources (a whole GPU each)."""
    if cfg.workers > 1:
        return {"cpu": 0.001}
    if cfg.sweep.gpus_per_trial is not None:
        gpus = cfg.sweep.gpus_per_trial
    else:
        gpus = 1.0 if wants_gpu(cfg.train.device) else 0.0
    return {"cpu": worker_cpus(cfg), "gpu": gpus}


def samples_per_point(sweep_cfg) -> int:
    """Tune's num_samples: what the user set, else each point of a grid once, else 4 draws."""
    if sweep_cfg.num_samples is not None:
        return sweep_cfg.num_samples
    return 1 if sweep_cfg.search == "grid" else 4


def _trials_that_fit(cfg) -> int | None:
    """Multi-worker trials hold no Tune resources of their own, so Tune cannot see that a second one
    would only wait for workers: run as many as the cluster's CPUs hold now (None: Tune decides)."""
    import ray
    if cfg.workers == 1:
        return None
    resources = ray.cluster_resources()
    fit = int(resources.get("CPU", 1) * 0.99 // (cfg.workers * worker_cpus(cfg)))  # 0.99: the trials' 0.001 CPU
    if wants_gpu(cfg.train.device):
        fit = min(fit, int(resources.get("GPU", 0) // cfg.workers))
    return max(1, fit)


def sweep_storage(run_dir: Path) -> str:
    """Where a sweep's trials live (local, shared or s3://...), as its sweep.json records it."""
    return json.loads((run_dir / SWEEP_FILE).read_text())["storage_path"]


def run_sweep(cfg, space: dict[str, Distribution], run_dir: Path, trial_config: Callable[[dict], Any],
              variants: list[dict] | None = None, resume: bool = False, parts=None, searcher=None,
              num_samples: int | None = None):
    """Run (or resume) the Tune experiment of `run_dir` (made and validated by blendtune.runs);
    `trial_config(overrides)` builds each trial's config; `parts` are a Python user's own model and data
    objects (the same ones again when resuming). `searcher` (with `num_samples`) chooses every trial's
    config instead of the space (compare --tune: blendtune.tuning). Returns Tune's ResultGrid."""
    import ray

    storage = sweep_storage(run_dir)
    if resume:  # the storage may have gone since the sweep started (credentials, endpoint): one line, no Ray
        storage_lib.check_writable(storage, "sweep.storage_path")
    started = init_ray(cfg.sweep.address, log_to_driver=False)  # trials log to files, W&B and Tune's table
    try:
        with _environment(TUNE_GLOBAL_CHECKPOINT_S=state_save_seconds(storage)):
            return _fit(cfg, space, run_dir, trial_config, variants, resume, storage, parts, searcher, num_samples)
    finally:
        if started:
            ray.shutdown()


def state_save_seconds(storage: str) -> str:
    """How often Tune saves its experiment state (TUNE_GLOBAL_CHECKPOINT_S). It records each trial's latest
    checkpoint, so a resumed sweep redoes at most what happened since: every step on a local or shared
    directory (cheap). On an object store each save uploads every trial's result files again (a 24-trial
    sweep made ~10 saves a second, and S3 requests dominated its cost): every 2 s there."""
    return "2" if storage_lib.is_url(storage) else "0"


@contextlib.contextmanager
def _environment(**values: str):
    """Set environment variables the user has not set, for the duration of the block."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _fit(cfg, space, run_dir, trial_config, variants, resume, storage, parts, searcher=None, num_samples=None):
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    trainable = _trainable(cfg, trial_config, run_dir.name, storage, parts)
    experiment = storage_lib.join(storage, EXPERIMENT)
    backup = _experiment_state_backup_callback(experiment)
    # Tune's result.json is what reports read; its CSV and TensorBoard copies (off by TUNE_DISABLE_AUTO_
    # CALLBACK_LOGGERS in launch.RAY_ENV) would be uploaded again with every sync of the experiment
    callbacks = [JsonLoggerCallback(), _release_train_workers_callback(), backup]
    params = param_space(space, variants) if searcher is None else {}
    if resume:
        for line in repair_experiment_state(experiment):
            print(f"blendtune: Tune experiment state {line}", flush=True)
        if not tune.Tuner.can_restore(experiment):
            raise UserError(f"nothing to resume in '{run_dir}': no Tune experiment at {experiment}")
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=params)
    else:
        search, scheduler = _search_and_scheduler(cfg, space) if searcher is None else (searcher, _fifo())
        s = cfg.sweep
        max_concurrent = s.max_concurrent or _trials_that_fit(cfg)
        tuner = tune.Tuner(
            trainable, param_space=params,
            tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, search_alg=search, scheduler=scheduler,
                                        num_samples=num_samples or samples_per_point(s),
                                        max_concurrent_trials=max_concurrent,
                                        reuse_actors=cfg.workers == 1 and s.reuse_actors),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=storage,
                                      callbacks=callbacks,
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2 if s.scheduler != "pbt" else 8),
                                      verbose=1))
    results = tuner.fit()
    backup.back_up()
    return results
