"""Run and sweep directories: where a run's resolved config, metrics.jsonl and checkpoints live, and what
a sweep needs to resume (its config, search space and storage path). Nothing is created before the
config it records has been validated."""
from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from blendtune.config import ExperimentConfig, load_config, to_yaml
from blendtune.errors import UserError
from blendtune.search_space import parse_space
from blendtune.sweeps import SWEEP_FILE, Distribution
from blendtune.worker import CHECKPOINT, METRICS_FILE

CONFIG_FILE = "config.yaml"
__all__ = ["CHECKPOINT", "CONFIG_FILE", "METRICS_FILE", "create_run_dir", "load_run_config", "create_sweep_dir",
           "load_sweep"]


def create_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}-{secrets.token_hex(2)}"
    run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))
    return run_dir


def load_run_config(run_dir: Path, overrides=()) -> ExperimentConfig:
    """The saved config of a run, with overrides (e.g. train.epochs=20 to extend it)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a blendtune run directory (no {CONFIG_FILE})")
    return load_config(path, overrides)


def create_sweep_dir(cfg: ExperimentConfig, space: dict[str, Distribution], variants: list[dict] | None,
                     kind: str = "sweep") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output_dir) / f"{cfg.name}-{kind}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))
    storage = cfg.sweep.storage_path or str(run_dir.resolve())
    (run_dir / SWEEP_FILE).write_text(json.dumps({
        "space": {k: {d.kind: list(d.args)} for k, d in space.items()}, "variants": variants,
        "storage_path": storage}, indent=1))
    return run_dir


def load_sweep(run_dir: Path) -> tuple[ExperimentConfig, dict[str, Distribution], list[dict] | None]:
    if not (run_dir / SWEEP_FILE).is_file():
        raise UserError(f"'{run_dir}' is not a blendtune sweep directory (no {SWEEP_FILE})")
    saved = json.loads((run_dir / SWEEP_FILE).read_text())
    return load_config(run_dir / CONFIG_FILE), parse_space(saved["space"], str(run_dir / SWEEP_FILE)), saved["variants"]
