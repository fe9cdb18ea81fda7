"""Weights & Biases: one run per training run / sweep trial, `epoch` as the step, grouped by sweep.

Offline by default (no key needed; `wandb sync DIR` uploads later). Set WANDB_MODE=online (or log in
with a key) to stream. `wandb=false` in the config turns it off.
"""
from __future__ import annotations

import os
from pathlib import Path


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbLogger:
    def __init__(self, directory: Path, config: dict, run_id: str, name: str, project: str,
                 group: str | None = None, entity: str | None = None):
        import wandb  # imported here: runs without W&B never pay for it

        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, entity=entity, group=group, name=name, id=run_id, config=config,
                              dir=str(directory), mode=wandb_mode(), resume="allow", reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))

    def __call__(self, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if k != "epoch"}, step=int(metrics["epoch"]))

    def close(self) -> None:
        self.run.finish()
