"""Run and sweep directories: where a run's resolved config, metrics.jsonl and checkpoints live, and what
a sweep needs to resume (its config, search space and storage path). Nothing is created before the
config it records has been validated."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path

from blendtune.build import PYTHON_OBJECTS
from blendtune.checkpoint import load_checkpoint
from blendtune.config import ExperimentConfig, check_keys_are_used, flat_keys, load_config, to_yaml
from blendtune.data import DATASETS, data_root
from blendtune import storage as storage_lib
from blendtune.errors import SettingError, UserError
from blendtune.launch import check_gpus
from blendtune.loggers import MetricsFile, wandb_online_without_key, wandb_unreachable
from blendtune.search_space import check_sweep, parse_space
from blendtune.sweeps import SWEEP_FILE, Distribution
from blendtune.worker import CHECKPOINT, METRICS_FILE

CONFIG_FILE = "config.yaml"
__all__ = ["CHECKPOINT", "CONFIG_FILE", "METRICS_FILE", "RESUME_SAFE_KEYS", "create_run_dir", "create_sweep_dir",
           "load_run_config", "load_sweep", "load_tuning", "lock_run", "removed_unless_started", "resume_config",
           "write_config"]


# What `train --resume RUN key=value` may change: how long and where it runs, how it logs. Anything else
# (strategy, data, model, optimizer...) would make the resumed run a different experiment.
RESUME_SAFE_KEYS = ("train.epochs", "train.progress", "train.checkpoint_every", "train.test_every", "train.device",
                    "data.root", "data.num_workers", "data.eval_batch_size", "wandb", "wandb_project", "wandb_entity",
                    "max_failures", "sweep.address", "sweep.cpus_per_worker")


def _make_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except OSError as e:
        raise SettingError("output_dir", f"cannot create '{run_dir}': {e.strerror or e}") from None


LOCK_FILE = ".lock"


def lock_run(run_dir: Path):
    """Holds `run_dir` for this process while it trains there: a second `train --resume` (or fit) of the
    same folder is refused in one line instead of interleaving its epochs. An OS lock (flock): a killed
    process leaves no stale lock behind. Returns the open file; the lock lasts as long as it stays open."""
    import fcntl
    path = Path(run_dir) / LOCK_FILE
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"'{run_dir}' is in use: {holder} is training in it; wait for it to finish "
                        "(or stop it) before resuming") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"blendtune process {os.getpid()}")
    handle.flush()
    return handle


def write_config(run_dir: Path, cfg: ExperimentConfig) -> None:
    """config.yaml, replaced atomically: a crash mid-write leaves the previous one."""
    tmp = run_dir / f".{CONFIG_FILE}.tmp"
    try:
        tmp.write_text(to_yaml(cfg))
        os.replace(tmp, run_dir / CONFIG_FILE)
    except OSError as e:  # e.g. "No space left on device": the previous config.yaml stays, no partial file
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write '{run_dir / CONFIG_FILE}': {e.strerror or e}") from None


def check_before_starting(cfg: ExperimentConfig) -> None:
    """What can refuse a run before a directory is made or Ray starts: a dataset read from files needs
    its root (the same one line for train, sweep and compare), the GPUs asked for must exist here, and
    W&B asked to stream must have a key."""
    if not cfg.data._target_ and getattr(DATASETS.get(cfg.data.dataset), "reads_files", True):
        data_root(cfg.data.root)
        check_catalog(cfg)
    check_gpus(cfg)
    if cfg.wandb and wandb_online_without_key():
        raise UserError("WANDB_MODE=online, but W&B has no API key (WANDB_API_KEY, or `wandb login`): set one, "
                        "or WANDB_MODE=offline to log to files and `wandb sync` them later, or wandb=false")
    unreachable = wandb_unreachable() if cfg.wandb else None
    if unreachable:
        raise UserError(f"WANDB_MODE=online, but W&B at {unreachable}: check the network (or WANDB_BASE_URL), or "
                        "set WANDB_MODE=offline to log to files and `wandb sync` them later, or wandb=false")


def check_catalog(cfg: ExperimentConfig) -> None:
    """A file layout's cheap checks (`DatasetAdapter.preflight`: its CSV or folder names, labels, splits,
    duplicated or overlapping ids, each file's header; a features folder's arrays) before anything is
    created; decoding every file is left to the run (`data check` does it)."""
    from blendtune.build import dataset_options
    DATASETS.get(cfg.data.dataset)(root=cfg.data.root, **dataset_options(cfg)).preflight(cfg.data.skip_bad)


def create_run_dir(cfg: ExperimentConfig, at: Path | None = None) -> Path:
    """A new run directory holding the config, once every check that can refuse the run has passed:
    `output_dir/<name>-<time>-<id>`, or `at` (the Python API's run_dir=), which must be new or empty."""
    check_keys_are_used(cfg)
    check_before_starting(cfg)
    if at is not None:
        run_dir = Path(at)
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            what = "a run already" if (run_dir / CONFIG_FILE).is_file() else "not empty"
            raise UserError(f"run_dir '{run_dir}' is {what}: give a new folder"
                            + (", or resume=that folder to continue it" if what == "a run already" else ""))
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"run_dir: cannot create '{run_dir}': {e.strerror or e}") from None
        write_config(run_dir, cfg)
        return run_dir
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}-{secrets.token_hex(2)}"
    _make_dir(run_dir)
    write_config(run_dir, cfg)
    return run_dir


@contextlib.contextmanager
def removed_unless_started(run_dir: Path, keep_folder: bool = False):
    """Around the first start of a run in the folder `create_run_dir` just made: if it fails before its
    first epoch is recorded (the data or model refused while building, a NaN on the first batches), what
    it wrote goes again (the folder too, unless `keep_folder`: the user's own empty one), so a failed
    start leaves nothing behind and the same command can simply be rerun."""
    try:
        yield
    except Exception:
        run_dir = Path(run_dir)
        if not (run_dir / METRICS_FILE).exists() and not (run_dir / CHECKPOINT).exists():
            for path in run_dir.iterdir() if keep_folder else [run_dir]:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise


def resume_config(run_dir: Path, overrides=(), from_python: bool = False) -> ExperimentConfig:
    """The config a resume of `run_dir` runs with, after every check that can refuse it: only
    RESUME_SAFE_KEYS may change, the checkpoint must load, and `train.epochs` must lie beyond it; a run
    made of Python objects resumes from Python only. Nothing is written here; the caller writes
    config.yaml once this returns."""
    saved = load_run_config(run_dir)
    if PYTHON_OBJECTS in (saved.data._target_, saved.model._target_) and not from_python:
        raise UserError(f"--resume {run_dir}: this run trained on Python objects (a model and data of yours); "
                        "continue it from Python: blendtune.fit(resume=run_dir, model=..., train=...)")
    cfg = load_run_config(run_dir, overrides)
    before, after = flat_keys(saved), flat_keys(cfg)
    unsafe = sorted(k for k in after if after[k] != before.get(k) and k not in RESUME_SAFE_KEYS)
    if unsafe:
        raise UserError(f"--resume {run_dir}: {', '.join(unsafe)} cannot change when resuming (a resume may change "
                        f"only {', '.join(RESUME_SAFE_KEYS)}); start a new run for a different experiment")
    epoch = int(load_checkpoint(Path(run_dir) / CHECKPOINT)["epoch"])
    if (Path(run_dir) / METRICS_FILE).is_file():  # damage before its last line refuses the resume: before config.yaml changes
        MetricsFile.records(Path(run_dir) / METRICS_FILE, quiet=True)
    if cfg.train.epochs <= epoch:
        raise UserError(f"--resume {run_dir}: its checkpoint is at epoch {epoch}, so train.epochs={cfg.train.epochs} "
                        f"leaves nothing to train; give train.epochs={epoch + 1} or more to extend it")
    return cfg


def load_run_config(run_dir: Path, overrides=()) -> ExperimentConfig:
    """The saved config of a run, with overrides (e.g. train.epochs=20 to extend it)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a blendtune run directory (no {CONFIG_FILE})")
    return load_config(path, overrides)


def create_sweep_dir(cfg: ExperimentConfig, space: dict[str, Distribution], variants: list[dict] | None,
                     kind: str = "sweep", source: str = "search space", tuning: dict | None = None) -> Path:
    """A new sweep directory, once the sweep has passed every check (`source` names the space's file).
    `tuning`: a comparison tuned at an equal budget (compare --tune) records its arms here."""
    check_sweep(cfg, space, variants, source)
    check_before_starting(cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output_dir) / f"{cfg.name}-{kind}-{stamp}"
    if cfg.sweep.storage_path:  # shared storage (s3://..., an NFS mount): reachable and writable, or one line
        storage = storage_lib.with_single_put_writes(
            storage_lib.join(storage_lib.absolute(cfg.sweep.storage_path), run_dir.name))
        storage_lib.check_writable(storage, "sweep.storage_path")
    else:
        storage = str(run_dir.resolve())
    _make_dir(run_dir)
    write_config(run_dir, cfg)
    (run_dir / SWEEP_FILE).write_text(json.dumps({
        "space": {k: {d.kind: list(d.args)} for k, d in space.items()}, "variants": variants,
        "storage_path": storage, **({"tuning": tuning} if tuning else {})}, indent=1))
    return run_dir


def load_tuning(run_dir: Path) -> dict | None:
    """What `compare --tune` recorded (trials, seeds, folds, each arm's variant, space and metric), or None."""
    path = Path(run_dir) / SWEEP_FILE
    return json.loads(path.read_text()).get("tuning") if path.is_file() else None


def load_sweep(run_dir: Path) -> tuple[ExperimentConfig, dict[str, Distribution], list[dict] | None]:
    if not (run_dir / SWEEP_FILE).is_file():
        raise UserError(f"'{run_dir}' is not a blendtune sweep directory (no {SWEEP_FILE})")
    saved = json.loads((run_dir / SWEEP_FILE).read_text())
    # a tuned comparison has no space of its own (its arms' spaces are in "tuning")
    space = parse_space(saved["space"], str(run_dir / SWEEP_FILE)) if saved["space"] else {}
    return load_config(run_dir / CONFIG_FILE), space, saved["variants"]
