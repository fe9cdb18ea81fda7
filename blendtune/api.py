"""The Python API: blendtune's strategies, loop and sweeps on your own model and data.

    import blendtune
    result = blendtune.fit(model=MyAV(), train=train_ds, held_out=val_ds, test=test_ds,
                           strategy="ogm_ge", epochs=10, alpha=0.8, lr=1e-3, optimizer="adam")
    result.metrics["acc/test/fused"], result.model

`model` is any nn.Module whose forward takes `dict[modality, Tensor]` (a batch) and returns per-modality
features `dict[modality, (B, D) Tensor]` (optional: `feature_dims`, `modality_parameters(m)`; see
blendtune.models.late_fusion); blendtune adds a head per modality and the fusion. `train`, `held_out`,
`test` are map-style datasets (or sequences) of `(dict[modality, Tensor], target)`.

The same run is sweepable from YAML: `model._target_: my_pkg.MyAV` and `data._target_: my_pkg.make_data`
(see examples/), with `blendtune sweep` / `compare` or `blendtune.sweep(...)` below.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from blendtune.data import as_dataset, make_splits
from blendtune.errors import UserError
from blendtune.loop import Trainer, TrainOptions
from blendtune.models import LateFusionClassifier, classifier_for
from blendtune.optim import build_optimizer, build_scheduler
from blendtune.strategies import BalancingStrategy, build_strategy, fusion_for
from blendtune.worker import sample_batch


@dataclass
class FitResult:
    metrics: dict                      # the last epoch's metrics (acc/test/fused, ogr/..., gblend/w/...)
    model: LateFusionClassifier        # the trained model: your backbone, its heads and the fusion
    history: list[dict] = field(default_factory=list)  # every epoch's metrics
    trainer: Trainer | None = None     # for more epochs (trainer.options.epochs += n; trainer.fit())


def fit(model: torch.nn.Module, train, test, held_out=None, strategy: str | BalancingStrategy = "naive", *,
        epochs: int = 10, lr: float = 0.01, optimizer: str = "sgd", momentum: float = 0.9,
        weight_decay: float = 1e-4, schedule: str = "none", batch_size: int = 64, eval_batch_size: int = 512,
        device: str = "auto", amp: str = "auto", seed: int = 0, fusion: str = "concat",
        held_out_ratio: float = 0.1, num_classes: int | None = None, grad_clip: float | None = None,
        num_workers: int = 0, run_dir: str | Path | None = None, progress: bool = False,
        callbacks: Iterable[Callable[[dict], None]] = (), **strategy_options: Any) -> FitResult:
    """Train `model` with a balancing strategy; keyword options beyond the common ones are the
    strategy's own (`alpha=0.8` for ogm/ogm_ge, `super_epoch=2` for gblend, `modality="audio"` for
    unimodal...). Without `held_out`, a stratified `held_out_ratio` of `train` is held out (G-Blend and
    OGR measure on it; selection should too). `run_dir` writes checkpoints there."""
    torch.manual_seed(seed)
    train = as_dataset(train, "train", num_classes)
    test = as_dataset(test, "test", num_classes or train.num_classes)
    held_out = as_dataset(held_out, "held_out", num_classes or train.num_classes) if held_out is not None else None
    splits = make_splits(train, test, held_out_ratio if held_out is None else 0.0, seed=seed, held_out=held_out,
                         name="fit(train=...)")
    if isinstance(strategy, str):
        strategy = build_strategy(strategy, **strategy_options)
    elif strategy_options:
        raise UserError(f"fit(): options {', '.join(sorted(strategy_options))} go with a strategy name, "
                        "not a strategy object")
    if strategy.needs_held_out and splits.held_out is None:
        raise UserError(f"fit(): {type(strategy).__name__} needs held-out data: pass held_out= or held_out_ratio > 0")
    classifier = model if isinstance(model, LateFusionClassifier) else \
        classifier_for(model, sample_batch(splits.train), fusion_for(strategy, fusion), num_classes or splits.num_classes)
    options = TrainOptions(epochs=epochs, batch_size=batch_size, eval_batch_size=eval_batch_size,
                           num_workers=num_workers, device=device, amp=amp, grad_clip=grad_clip, progress=progress,
                           seed=seed)
    opt = build_optimizer(optimizer, classifier.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    history: list[dict] = []
    trainer = Trainer(classifier, strategy, splits, opt, build_scheduler(schedule, opt, epochs), options,
                      run_dir=run_dir, callbacks=[history.append, *callbacks])
    metrics = trainer.fit()
    return FitResult(metrics, trainer.model, history, trainer)


def sweep(space: Mapping[str, Mapping[str, Sequence]] | str | Path, experiment: str | Path | None = None,
          overrides: Sequence[str] | Mapping[str, Any] = (), resume: str | Path | None = None):
    """`blendtune sweep` from Python: Ray Tune over `space` (a dict like search_spaces/*.yaml, or its
    path) on `experiment` (YAML) with `overrides` (["key=value", ...] or {key: value}). Your own parts
    join through `model._target_` / `data._target_` (import paths the Ray workers can import).
    Returns (sweep directory, Tune's ResultGrid)."""
    from blendtune.config import TrialConfig, load_config
    from blendtune.runs import create_sweep_dir, load_sweep
    from blendtune.search_space import load_search_space, parse_space
    from blendtune.sweeps import run_sweep

    if resume is not None:
        run_dir = Path(resume)
        cfg, parsed, variants = load_sweep(run_dir)
    else:
        if isinstance(overrides, Mapping):
            overrides = [f"{k}={v}" for k, v in overrides.items()]
        cfg = load_config(experiment, list(overrides))
        parsed = load_search_space(space) if isinstance(space, (str, Path)) else parse_space(dict(space), "space")
        variants = None
        run_dir = create_sweep_dir(cfg, parsed, None)  # after every check, as the CLI
    results = run_sweep(cfg, parsed, run_dir, TrialConfig(cfg), variants, resume=resume is not None)
    return run_dir, results
