"""The Python API: blendtune's strategies, loop and sweeps on your own model and data.

    import blendtune
    result = blendtune.fit(model=MyAV(), train=train_ds, test=test_ds, strategy="ogm_ge",
                           epochs=10, alpha=0.8, lr=1e-3, optimizer="adam", run_dir="runs/ogm_ge")
    result.metrics["acc/test/fused"]; result.predict(new_data).classes; result.backbone_state_dict()
    again = blendtune.load("runs/ogm_ge", model=MyAV())          # the trained model, from its folder
    blendtune.fit(model=MyAV(), train=train_ds, resume="runs/ogm_ge", epochs=20)   # more epochs

`model` is any nn.Module whose forward takes `dict[modality, Tensor]` (a batch) and returns features per
modality `dict[modality, (B, D) Tensor]` (see blendtune.models.late_fusion for the optional
`feature_dims` and `modality_parameters(m)`), or a class / factory building one; blendtune adds a head
per modality and the fusion (`fusion="concat"`, or a module of your own). `train`, `held_out`, `test`
are map-style datasets (or sequences) of `(dict[modality, Tensor], target)`; `test` and `held_out` are
optional. Every setting of the experiment schema is a keyword: its key's last part (`epochs` is
train.epochs, `batch_size` data.batch_size, `optimizer` optim.name, `alpha` the strategy's ogm.alpha);
`config={"pmr.momentum": 0.5}` names any key in full, and `config="experiments/x.yaml"` starts from a file.

A run with `run_dir` writes what `blendtune train` writes (config.yaml, metrics.jsonl, a W&B offline
run, model.json, checkpoints), so `blendtune report`, W&B and resume work on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from blendtune.build import PYTHON_OBJECTS, UserParts, locate, model_from_recipe
from blendtune.checkpoint import load_checkpoint
from blendtune.comparisons import SweepResult
from blendtune.config import (ExperimentConfig, in_python_terms, keyword_overrides, load_config,
                              with_overrides)
from blendtune.errors import UserError
from blendtune.feeding import check_loader_options
from blendtune.loggers import read_metrics
from blendtune.loop import BEST, Trainer
from blendtune.models import FUSED, LateFusionClassifier
from blendtune.strategies import STRATEGIES, BalancingStrategy

__all__ = ["FitResult", "Predictions", "fit", "load", "sweep"]


@dataclass
class Predictions:
    """What `FitResult.predict` returns, one row per sample."""
    classes: torch.Tensor        # (N,) class indices; multi-label data: (N, C) multi-hot (probability > 0.5)
    probabilities: torch.Tensor  # (N, C): softmax (multi-label: sigmoid) of the prediction head
    head: str                    # the head that predicted: fused, ensemble or a modality (train.predict)


@dataclass
class FitResult:
    """A trained run: its metrics, its model and (with run_dir) its folder.

    `metrics` is the last epoch's row (acc/test/fused, ogr/..., gblend/w/..., ogm/coeff/...), `history`
    every epoch's. `model` is the LateFusionClassifier: your backbone as `model.encoders`, one linear
    head per modality in `model.heads`, the fusion in `model.fusion`; with keep_best it holds the best
    epoch's weights. `trainer` (runs in this process) trains further: `trainer.options.epochs += n;
    trainer.fit()`."""
    metrics: dict
    model: LateFusionClassifier
    history: list[dict] = field(default_factory=list)
    run_dir: Path | None = None
    config: ExperimentConfig | None = None
    trainer: Trainer | None = None
    collate_fn: Callable | None = None
    weights_epoch: int | None = None   # the epoch whose weights `model` holds (keep_best: the best one)

    @property
    def best_epoch(self) -> int | None:
        """The best epoch by the monitored held-out metric (None without keep_best / early stopping)."""
        return int(self.metrics["best/epoch"]) if "best/epoch" in self.metrics else None

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights of your backbone alone, under its own keys: `MyAV().load_state_dict(it)` works."""
        return {k: v.detach().cpu() for k, v in self.model.encoders.state_dict().items()}

    def prediction_head(self) -> str:
        """The head `predict` uses: the one the training loop predicted with at the epoch whose weights the
        model holds (train.predict's rule, held_out_best's choice, or a uni-modal run's one head)."""
        epoch = self.weights_epoch or (self.history[-1]["epoch"] if self.history else None)
        row = next((r for r in self.history if r.get("epoch") == epoch), self.metrics)
        chosen = [k.split("/", 1)[1] for k, v in row.items() if k.startswith("prediction/") and v == 1.0]
        if chosen:
            return chosen[0]
        return self.config.train.predict if self.config is not None and self.config.train.predict != "held_out_best" \
            else FUSED

    @torch.no_grad()
    def predict(self, data, batch_size: int = 256) -> Predictions:
        """Classes and probabilities of the prediction head for `data`: a batch (dict of tensors per
        modality), or a dataset / sequence of inputs dicts or of (inputs, target) items."""
        from torch.utils.data import DataLoader, default_collate

        model = self.model
        device = next(model.parameters()).device
        if isinstance(data, Mapping):
            batches: Iterable = [dict(data)]
        else:
            collate = self.collate_fn or default_collate
            batches = (b for b in DataLoader(_Inputs(data), batch_size=batch_size,
                                             collate_fn=lambda items: collate([(x, 0) for x in items])[0]))
        head, multilabel = self.prediction_head(), None
        probabilities = []
        was_training = model.training
        model.eval()
        try:
            for inputs in batches:
                out = model({m: torch.as_tensor(x).to(device) for m, x in inputs.items()})
                logits = {h: v.float() for h, v in out.logits.items()}
                multilabel = self._multilabel()
                squash = torch.sigmoid if multilabel else (lambda t: t.softmax(dim=1))
                if head == "ensemble":
                    probabilities.append(torch.stack([squash(v) for v in logits.values()]).mean(0).cpu())
                else:
                    probabilities.append(squash(logits[head]).cpu())
        finally:
            model.train(was_training)
        probs = torch.cat(probabilities) if probabilities else torch.zeros(0, model.heads[model.modalities[0]].out_features)
        classes = (probs > 0.5).long() if multilabel else probs.argmax(dim=1)
        return Predictions(classes, probs, head)

    def _multilabel(self) -> bool:
        return any(k.startswith("map/") for k in self.metrics)


class _Inputs(torch.utils.data.Dataset):
    """The inputs of a dataset whose items are inputs dicts or (inputs, target) pairs."""

    def __init__(self, items):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        inputs = item if isinstance(item, Mapping) else item[0]
        if not isinstance(inputs, Mapping):
            raise UserError(f"predict: item {i} is a {type(item).__name__}; expected a dict of tensors per modality "
                            "or (dict, target)")
        return {m: torch.as_tensor(x) for m, x in inputs.items()}


# ---- fit --------------------------------------------------------------------------------------------
def fit(model: Any, train: Any = None, test: Any = None, held_out: Any = None,
        strategy: str | BalancingStrategy | None = None, *, run_dir: str | Path | None = None,
        resume: str | Path | None = None, data: Callable | None = None, num_classes: int | None = None,
        collate_fn: Callable | None = None, sampler: Any = None, loader_options: Mapping[str, Any] | None = None,
        fusion: str | torch.nn.Module | Callable | None = None, callbacks: Iterable[Callable[[dict], None]] = (),
        config: str | Path | Mapping[str, Any] | None = None, **options: Any) -> FitResult:
    """Train `model` on `train` with a balancing strategy, as `blendtune train` would.

    - `strategy`: a name (`"ogm_ge"`, see blendtune.STRATEGIES) or a built strategy object; its options
      are keywords (`alpha=0.8`, `super_epoch=2`, `modality="audio"`).
    - `options`: any setting of the schema by its last part: epochs, lr, optimizer, batch_size,
      held_out_ratio (a stratified share of `train` held out when `held_out` is not given: G-Blend, OGR,
      early stopping and keep_best measure on it), patience, keep_best, monitor, amp, device, workers...
    - `data`: instead of train/held_out/test, a factory returning (train, test), (train, held_out, test)
      or a dict of them (built in each Ray worker: workers=N).
    - `collate_fn`, `sampler` (the training order; one worker), `loader_options` (more DataLoader
      arguments: pin_memory, prefetch_factor...) as PyTorch's DataLoader takes them.
    - `fusion`: "concat" | "sum" | "film" | "gated" | "shared", or your module: forward(dict of (B, D_m)
      features) -> (B, C) logits; for ogm/ogm_ge it also needs `unimodal_logits(features)` -> dict of
      (B, C) logits per modality (each modality's share of the classifier, which OGM scores).
    - `run_dir`: a new folder the run writes; `resume`: a folder an earlier fit wrote, continued with the
      same model and data objects (only epochs and how it runs/logs may change).
    - `callbacks`: called with each epoch's metrics.
    """
    caller = "fit"
    # the run builds from a copy of a model instance: each FitResult owns its model (read your trained
    # backbone from result.model.encoders or result.backbone_state_dict())
    parts = UserParts(model=model, train=train, test=test, held_out=held_out, data=data, num_classes=num_classes,
                      collate_fn=collate_fn, sampler=sampler, loader_options=check_loader_options(loader_options or {}),
                      fusion=fusion if fusion is not None and not isinstance(fusion, str) else None, copy_model=True)
    if train is None and data is None:
        raise UserError("fit(): give train= (and test=, held_out= if you have them) or data= (a factory)")
    history: list[dict] = []
    try:
        if resume is not None:
            if run_dir is not None:
                raise UserError("fit(): give run_dir= for a new run or resume= to continue one, not both")
            from blendtune.runs import resume_config, write_config
            run_dir = Path(resume)
            saved = _saved_config(run_dir)
            from blendtune.runs import lock_run
            lock = lock_run(run_dir)  # noqa: F841  (released when fit returns)
            if strategy is not None and _strategy_name(strategy) != saved.strategy:
                raise UserError(f"fit(resume=...): the run trained {saved.strategy}; a resume cannot change the strategy")
            overrides = keyword_overrides(caller, options, [saved.strategy], config=_config_dict(config))
            cfg = resume_config(run_dir, [f"{k}={_override_text(v)}" for k, v in overrides.items()], from_python=True)
            write_config(run_dir, cfg)
        else:
            cfg, parts.strategy = _new_config(caller, strategy, fusion, options, config)
            if run_dir is not None:
                from blendtune.runs import create_run_dir, lock_run, removed_unless_started
                existed = Path(run_dir).is_dir()
                run_dir = create_run_dir(cfg, at=Path(run_dir))
                lock = lock_run(run_dir)  # noqa: F841
                with removed_unless_started(run_dir, keep_folder=existed):
                    return _train(cfg, parts, run_dir, False, [history.append, *callbacks], history)
        return _train(cfg, parts, Path(run_dir) if run_dir is not None else None, resume is not None,
                      [history.append, *callbacks], history)
    except UserError as e:
        raise in_python_terms(e, caller, [_strategy_name(strategy or "naive")]) from None


def _train(cfg, parts: UserParts, run_dir: Path | None, resume: bool, callbacks: list, history: list) -> FitResult:
    from blendtune import worker
    from blendtune.launch import local_run_spec, train_with_ray

    if cfg.workers > 1:
        if run_dir is None:
            raise UserError("fit(workers=...): a run on several Ray workers needs run_dir= (rank 0 writes it)")
        if parts.sampler is not None:
            raise UserError("fit(sampler=...): a sampler of your own orders one process's batches; with several "
                            "workers each takes its shard through a DistributedSampler (leave sampler unset)")
        train_with_ray(cfg, run_dir, resume, parts)
        return load(run_dir, model=parts.model, fusion=parts.fusion, collate_fn=parts.collate_fn,
                    checkpoint="best" if cfg.train.keep_best else "last")
    built: dict = {}
    spec = local_run_spec(run_dir, resume, table=cfg.train.progress, callbacks=callbacks) if run_dir is not None \
        else worker.RunSpec(callbacks=callbacks)
    metrics = worker.run(cfg, spec, parts, on_built=lambda trainer: built.update(trainer=trainer))
    trainer = built["trainer"]
    if resume and run_dir is not None:  # the history of the whole run, not only the epochs trained now
        history[:] = read_metrics(run_dir / worker.METRICS_FILE)
    epoch = trainer.best.epoch if cfg.train.keep_best and trainer.best is not None else trainer.epoch
    return FitResult(metrics, trainer.model, history, run_dir, cfg, trainer, parts.collate_fn, epoch)


def _new_config(caller: str, strategy, fusion, options: dict, config) -> tuple[ExperimentConfig, Any]:
    """The run's validated config from keywords (and a YAML file / dict of keys), and the strategy
    object when one was given."""
    strategy_object = strategy if isinstance(strategy, BalancingStrategy) else None
    name = _strategy_name(strategy or "naive")
    base = {"strategy": name, "name": caller, "data._target_": PYTHON_OBJECTS, "model._target_": PYTHON_OBJECTS}
    if isinstance(fusion, str):
        base["model.fusion"] = fusion
    if strategy_object is not None:
        if options and set(options) & set(_option_names(name)):
            raise UserError(f"{caller}(): options {', '.join(sorted(set(options) & set(_option_names(name))))} go "
                            "with a strategy name, not a strategy object")
        if strategy_object.options is not None:  # recorded in config.yaml like any run's
            section = STRATEGIES.section(name)
            base.update({f"{section}.{k}": v for k, v in vars(strategy_object.options).items()})
    overrides = {**base, **keyword_overrides(caller, options, [name], config=_config_dict(config))}
    file = config if isinstance(config, (str, Path)) else None
    cfg = with_overrides(load_config(file), overrides)
    from blendtune.config import check_keys_are_used
    check_keys_are_used(cfg)
    return cfg, strategy_object


def _strategy_name(strategy) -> str:
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise UserError(f"strategy: unknown {strategy!r}; expected one of {', '.join(STRATEGIES.names())}")
        return strategy
    for name in STRATEGIES.names():
        if type(strategy) is STRATEGIES.get(name) and (STRATEGIES.options(name) is None
                                                      or isinstance(strategy.options, STRATEGIES.options(name))):
            return name
    raise UserError(f"strategy: {type(strategy).__name__} is not registered (STRATEGIES.register)")


def _option_names(strategy: str) -> list[str]:
    cls = STRATEGIES.options(strategy)
    return list(cls.__dataclass_fields__) if cls is not None else []


def _config_dict(config) -> dict | None:
    if config is None or isinstance(config, (str, Path)):
        return None
    if not isinstance(config, Mapping):
        raise UserError(f"config=: expected a YAML path or a dict of config keys, got {type(config).__name__}")
    return dict(config)


def _override_text(value) -> str:
    """A value as a `key=value` override reads it back (resume goes through the CLI's override path)."""
    import json
    return json.dumps(value) if not isinstance(value, str) else value


def _saved_config(run_dir: Path) -> ExperimentConfig:
    from blendtune.runs import load_run_config
    return load_run_config(run_dir)


# ---- load -------------------------------------------------------------------------------------------
def load(run_dir: str | Path, model: Any = None, fusion: Any = None, checkpoint: str = "best",
         collate_fn: Callable | None = None) -> FitResult:
    """The trained model of a run folder (from `blendtune train` or `fit(run_dir=...)`), ready to predict.

    blendtune's own encoders are rebuilt from the folder; a model of your own is passed again (`model=`
    an instance or class of your backbone, and `fusion=` if you used one of your own), and its trained
    weights are loaded into it. `checkpoint="best"` takes checkpoints/best.pt when the run kept one
    (train.keep_best), else the last checkpoint. `collate_fn` batches `predict`'s items (as in the run)."""
    import json

    from blendtune import worker
    from blendtune.build import _strategy_from

    run_dir = Path(run_dir)
    cfg = _saved_config(run_dir)
    recipe_file = run_dir / worker.MODEL_FILE
    if not recipe_file.is_file():
        raise UserError(f"'{run_dir}' has no {worker.MODEL_FILE} (made by blendtune before 0.2?): rebuild the model "
                        "with blendtune.build and load checkpoints/last.pt")
    recipe = json.loads(recipe_file.read_text())
    backbone = model
    if backbone is not None and not isinstance(backbone, torch.nn.Module) and callable(backbone):
        backbone = backbone()
    if backbone is None and cfg.model._target_ and cfg.model._target_ != PYTHON_OBJECTS:
        backbone = locate(cfg.model._target_, "model._target_")(**cfg.model.args)
    classifier = model_from_recipe(recipe, backbone, fusion)
    best = run_dir / "checkpoints" / BEST
    path = best if checkpoint == "best" and best.is_file() else run_dir / worker.CHECKPOINT
    if checkpoint not in ("best", "last"):
        raise UserError(f"load(checkpoint=...): expected 'best' or 'last', got {checkpoint!r}")
    try:
        saved = load_checkpoint(path)
        classifier.load_state_dict(saved["model"])
    except RuntimeError as e:
        raise UserError(f"load: the weights in '{path}' do not fit this model: {str(e).splitlines()[0]}") from None
    _strategy_from(cfg).prepare_inference(classifier)
    history = read_metrics(run_dir / worker.METRICS_FILE) if (run_dir / worker.METRICS_FILE).is_file() else []
    return FitResult(history[-1] if history else {}, classifier, history, run_dir, cfg, collate_fn=collate_fn,
                     weights_epoch=int(saved["epoch"]))


# ---- sweeps -----------------------------------------------------------------------------------------
def sweep(space: Mapping[str, Mapping[str, Sequence]] | str | Path | None = None, model: Any = None,
          train: Any = None, test: Any = None, held_out: Any = None, strategy: str | None = None, *,
          experiment: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] = (),
          resume: str | Path | None = None, data: Callable | None = None, num_classes: int | None = None,
          collate_fn: Callable | None = None, fusion: str | torch.nn.Module | Callable | None = None,
          **options: Any) -> SweepResult:
    """`blendtune sweep` from Python: Ray Tune over `space` (a dict like search_spaces/*.yaml, or its
    path). The run is `experiment` (YAML) with `overrides` (["key=value"] or {key: value}), or your own
    `model` and `train`/`test` objects (shipped to the trials through Ray's object store; pass a class or
    factory for `model` so each trial initialises its own weights). `options` are settings by keyword,
    the sweep's too (num_samples, search, scheduler, metric, storage_path...). Returns (sweep folder,
    Tune's ResultGrid); resume with the same objects and `resume=folder`."""
    from blendtune.comparisons import run_python_sweep
    return run_python_sweep(space=space, model=model, train=train, test=test, held_out=held_out, strategy=strategy,
                            experiment=experiment, overrides=overrides, resume=resume, data=data,
                            num_classes=num_classes, collate_fn=collate_fn, fusion=fusion, options=options)
