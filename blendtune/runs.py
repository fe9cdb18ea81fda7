"""Run directories: where a run's resolved config, metrics.jsonl and checkpoints live."""
from __future__ import annotations

import secrets
import time
from pathlib import Path


from blendtune.config import ExperimentConfig, to_yaml
from blendtune.errors import UserError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT = Path("checkpoints") / "last.pt"


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
    from blendtune.config import load_config
    return load_config(path, overrides)
