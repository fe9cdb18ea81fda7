"""The one way a run is made: its data, model, strategy, optimizer and schedule from an experiment config
(and, from Python, the user's own objects), handed to the Trainer. The CLI, Ray Train workers, Tune
trials and `blendtune.fit` all come through `build_trainer`; every setting is declared once in the
schema (config.py takes the loop's, loader's and optimizer's option classes as they are) and reaches
the Trainer as those objects, not copied field by field.

    build_trainer(cfg)                        # a YAML experiment's parts
    build_trainer(cfg, parts=UserParts(model=MyAV, train=train_ds, test=test_ds))   # yours (blendtune.fit)

The config arrives as a value (blendtune.config.ExperimentConfig); nothing here imports the config
module: arrows point down.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from blendtune.data import as_dataset, build_splits, make_splits
from blendtune.devices import resolve_device
from blendtune.errors import OptionError, SettingError, UserError
from blendtune.loop import Trainer
from blendtune.models import EncoderSpec, LateFusionClassifier, build_late_fusion, classifier_for, \
    encoders_for
from blendtune.optim import optimizer_and_schedule
from blendtune.strategies import STRATEGIES, BalancingStrategy, build_strategy, check_held_out, fusion_for

USER_FUSION = "<your module>"  # how model.json records a fusion module of the user's
PYTHON_OBJECTS = "python:objects"  # data._target_ / model._target_ of a run made from Python objects


@dataclass
class UserParts:
    """What a Python user hands in instead of `_target_` import paths: live objects. Shipped to Ray
    workers by Ray (pickled); a model instance is copied for each trial of a sweep, so pass a class
    or factory when seeds should also vary the initial weights."""
    model: Any = None                  # backbone nn.Module (dict -> features), a LateFusionClassifier, or a factory
    train: Any = None                  # map-style datasets (or sequences) of (dict[modality, Tensor], target)
    test: Any = None                   # optional
    held_out: Any = None               # optional: else carved from train (data.held_out_ratio)
    data: Callable | None = None       # or a factory returning (train, test), (train, held_out, test) or a dict
    num_classes: int | None = None
    collate_fn: Callable | None = None # e.g. padding variable-length audio
    sampler: Any = None                # the training order (e.g. WeightedRandomSampler); one worker only
    loader_options: Mapping[str, Any] = field(default_factory=dict)  # more DataLoader arguments
    fusion: Any = None                 # a fusion module of your own, or a factory (feature_dims, num_classes)
    strategy: BalancingStrategy | None = None  # a built strategy object instead of `strategy:` + options
    copy_model: bool = False           # build from a copy of `model` (sweeps: each trial its own)


def build_trainer(cfg, run_dir: Path | None = None, parts: UserParts | None = None, callbacks=()) -> Trainer:
    """Every part of a run, handed to the Trainer."""
    parts = parts or UserParts()
    torch.manual_seed(cfg.seed)
    splits = build_data(cfg, parts)
    strategy = parts.strategy if parts.strategy is not None else _strategy_from(cfg)
    check_held_out(type(strategy) if parts.strategy is not None else cfg.strategy, splits.held_out is not None)
    model = build_model(cfg, splits, parts, strategy)
    device = resolve_device(cfg.train.device)
    model.to(device)  # before the optimizer: a fused CUDA optimizer needs its parameters there
    optimizer, scheduler = optimizer_and_schedule(cfg.optim, model.parameters(), cfg.train.epochs,
                                                  fused=device.type == "cuda")
    with _options_named_by(STRATEGIES.section(cfg.strategy)):  # a strategy's setup checks its options too
        return Trainer(model, strategy, splits, optimizer, scheduler, cfg.train, cfg.data, seed=cfg.seed,
                       grad_clip=cfg.optim.grad_clip, sampler=parts.sampler, loader_options=parts.loader_options,
                       run_dir=run_dir, callbacks=callbacks)


def _strategy_from(cfg) -> BalancingStrategy:
    section = STRATEGIES.section(cfg.strategy)
    with _options_named_by(section):
        return build_strategy(cfg.strategy, getattr(cfg, section) if section else None)


@contextlib.contextmanager
def _options_named_by(section: str | None):
    """A strategy's OptionError names its option ('modality'); here it names the config key."""
    try:
        yield
    except OptionError as e:
        raise SettingError(f"{section}.{e.key}", e.message) from None


def dataset_options(cfg) -> dict:
    """The options section `data.<dataset>` of the chosen dataset as keyword arguments for its adapter."""
    section = getattr(cfg.data, cfg.data.dataset, None)
    return dataclasses.asdict(section) if section is not None else {}


# ---- data ---------------------------------------------------------------------------------------
def build_data(cfg, parts: UserParts | None = None):
    """The splits: the user's datasets (objects, or `data._target_`), else the named dataset's."""
    d = cfg.data
    parts = parts or UserParts()
    if parts.train is not None or parts.data is not None:
        made, source = ((parts.train, parts.held_out, parts.test) if parts.train is not None else parts.data()), "data"
    elif d._target_ == PYTHON_OBJECTS:
        raise SettingError("data._target_", "this run trained on Python objects: continue it from Python, "
                                            "blendtune.fit(resume=run_dir, model=..., train=...)")
    elif d._target_:
        made, source = locate(d._target_, "data._target_")(**d.args), d._target_
    else:
        return build_splits(d.dataset, {**dataset_options(cfg), "root": d.root}, d.held_out_ratio,
                            d.held_out_by_group, d.train_eval_size, cfg.seed, skip_bad=d.skip_bad,
                            spectrogram_on=d.spectrogram_on, frames_on=d.frames_on, use_cache=d.use_cache,
                            folds=d.held_out_folds, fold=d.held_out_fold)
    train, held_out, test = _three(made, source)
    if train is None:
        raise SettingError("data._target_", f"{source} returned no training dataset")
    train = as_dataset(train, "train", parts.num_classes, collate_fn=parts.collate_fn)
    classes = parts.num_classes or train.num_classes
    test = as_dataset(test, "test", classes, collate_fn=parts.collate_fn) if test is not None else None
    held_out = as_dataset(held_out, "held_out", classes, collate_fn=parts.collate_fn) if held_out is not None else None
    return make_splits(train, test, d.held_out_ratio if held_out is None else 0.0, d.held_out_by_group,
                       d.train_eval_size, cfg.seed, held_out=held_out, name=source, folds=d.held_out_folds,
                       fold=d.held_out_fold)


def _three(made, source: str):
    """(train, held_out, test) from what a data factory returned."""
    if isinstance(made, dict):
        unknown = sorted(set(made) - {"train", "held_out", "test"})
        if unknown:
            raise SettingError("data._target_", f"{source} returned keys {unknown}; expected train, held_out, test")
        return made.get("train"), made.get("held_out"), made.get("test")
    if isinstance(made, (tuple, list)) and len(made) in (2, 3):
        return (made[0], None, made[1]) if len(made) == 2 else tuple(made)
    raise SettingError("data._target_", f"{source} must return (train, test), (train, held_out, test) or a dict of "
                                        f"them, got {type(made).__name__}")


# ---- model --------------------------------------------------------------------------------------
def build_model(cfg, splits, parts: UserParts | None = None, strategy: BalancingStrategy | None = None):
    """blendtune's encoders for the data's input shapes, or the user's backbone (an object, or
    `model._target_`), with the uni-modal heads and the fusion. `model.recipe` records how to build it
    again without the data (blendtune.load)."""
    m, train = cfg.model, splits.train
    parts = parts or UserParts()
    fusion: Any = fusion_for(type(strategy) if parts.strategy is not None else cfg.strategy, m.fusion)
    if parts.fusion is not None:
        fusion = parts.fusion
    if parts.model is None and m._target_ == PYTHON_OBJECTS:
        raise SettingError("model._target_", "this run trained a model object: continue it from Python, "
                                             "blendtune.fit(resume=run_dir, model=..., train=...)")
    if parts.model is not None or m._target_:
        what = "model" if parts.model is not None else "model._target_"
        backbone = _user_model(parts) if parts.model is not None else locate(m._target_, "model._target_")(**m.args)
        if isinstance(backbone, LateFusionClassifier):
            backbone.recipe = {"backbone": "user", "fusion": USER_FUSION, "num_classes": splits.num_classes}
            return backbone
        if not isinstance(backbone, torch.nn.Module):
            raise SettingError(what, f"built a {type(backbone).__name__}, expected a torch.nn.Module")
        try:
            model = classifier_for(backbone, sample_batch(train), fusion, splits.num_classes)
        except ValueError as e:
            raise SettingError(what if "fusion" not in str(e) else "model.fusion", str(e)) from None
        model.recipe = {"backbone": "user", "fusion": fusion if isinstance(fusion, str) else USER_FUSION,
                        "num_classes": splits.num_classes,
                        "feature_dims": {h: model.heads[h].in_features for h in model.modalities}}
        return model
    unknown = sorted(set(m.encoders) - set(train.modalities))
    if unknown:
        raise SettingError("model.encoders", f"modalities {unknown} are not in the data (it has "
                                             f"{', '.join(train.modalities)})")
    specs = {name: EncoderSpec(e.name, e.dim, e.hidden, e.dropout) for name, e in m.encoders.items()}
    encoders = encoders_for(train.input_shapes, specs, getattr(train, "default_encoders", {}) or {})
    try:
        model = build_late_fusion(encoders, fusion, splits.num_classes)
    except ValueError as e:
        raise SettingError("model.fusion", str(e)) from None
    model.recipe = {"backbone": "blendtune", "fusion": fusion, "num_classes": splits.num_classes,
                    "input_shapes": {k: list(v) for k, v in train.input_shapes.items()},
                    "encoders": {k: dataclasses.asdict(e.spec) for k, e in encoders.items()}}
    return model


def _user_model(parts: UserParts):
    model = parts.model
    if isinstance(model, torch.nn.Module):
        return copy.deepcopy(model) if parts.copy_model else model
    if callable(model):  # a class or factory: built after the seed is set, so seeds vary the initial weights
        return model()
    raise SettingError("model", f"expected an nn.Module or a factory returning one, got {type(model).__name__}")


def model_from_recipe(recipe: Mapping[str, Any], backbone: torch.nn.Module | None = None,
                      fusion: Any = None) -> LateFusionClassifier:
    """A run's model rebuilt without its data (weights not loaded): blendtune's encoders from the
    recorded input shapes and specs, or the user's `backbone` (and fusion) when the run had its own."""
    num_classes = int(recipe["num_classes"])
    if recipe["backbone"] == "blendtune":
        shapes = {m: tuple(s) for m, s in recipe["input_shapes"].items()}
        specs = {m: EncoderSpec(**s) for m, s in recipe.get("encoders", {}).items()}
        return build_late_fusion(encoders_for(shapes, specs, {}), recipe["fusion"], num_classes)
    if backbone is None:
        raise UserError("this run trained a model of your own: pass it, e.g. blendtune.load(run_dir, model=MyAV())")
    if isinstance(backbone, LateFusionClassifier):
        return backbone
    dims = {m: int(d) for m, d in recipe["feature_dims"].items()}
    if recipe["fusion"] == USER_FUSION:
        if fusion is None:
            raise UserError("this run used a fusion module of your own: pass it too, e.g. "
                            "blendtune.load(run_dir, model=MyAV(), fusion=MyFusion)")
    else:
        fusion = recipe["fusion"]
    from blendtune.models import make_fusion
    return LateFusionClassifier(backbone, make_fusion(fusion, dims, num_classes), num_classes, dims)


def sample_batch(dataset, size: int = 2) -> dict[str, torch.Tensor]:
    """The inputs of a small batch of `dataset` (to measure a backbone's features)."""
    indices = list(range(min(size, len(dataset))))
    if hasattr(dataset, "__getitems__"):  # in-memory datasets index a whole batch at once
        return dataset.__getitems__(indices)[0]
    items = [dataset[i] for i in indices]
    collate = getattr(dataset, "collate_fn", None)
    if collate is None:
        from torch.utils.data import default_collate as collate
    try:
        return collate([item for item in items if item is not None])[0]
    except RuntimeError as e:
        if "equal size" not in str(e):
            raise
        shapes = {m: [tuple(torch.as_tensor(item[0][m]).shape) for item in items] for m in items[0][0]}
        raise UserError(f"train: items have inputs of different shapes ({shapes}), which torch's default collate "
                        "cannot stack; pass collate_fn= (e.g. one padding each batch to its longest item)") from None


def locate(path: str, key: str) -> Callable:
    """`my_pkg.models.MyModel` -> the object (like torchtune's `_component_`, Hydra's `_target_`)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise SettingError(key, f"expected an import path like my_pkg.MyModel, got {path!r}")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SettingError(key, f"cannot import {path!r}: {e}") from None
    if not callable(obj):
        raise SettingError(key, f"{path!r} is not callable")
    return obj
