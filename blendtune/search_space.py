"""Search spaces: YAML mapping dotted config keys to distributions, validated against the schema.

    # blendtune sweep experiments/avdigits_gblend.yaml --space search_spaces/gblend.yaml
    gblend.super_epoch: {choice: [1, 2, 4]}
    optim.lr: {loguniform: [1.0e-4, 1.0e-2]}

Distributions: choice [values], grid [values], uniform [low, high], loguniform [low, high],
randint [low, high) - the same names as `ray.tune`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from blendtune.config import ExperimentConfig, check_keys_are_used, flat_keys, load_config
from blendtune.errors import SettingError, UserError
from blendtune.sweeps import Distribution

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


def parse_space(raw: Any, source: str) -> dict[str, Distribution]:
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{source}: a search space maps config keys to distributions, e.g. "
                        "'optim.lr: {loguniform: [1.0e-4, 1.0e-2]}'")
    space = {}
    for key, spec in raw.items():
        where = f"{source}: key '{key}'"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise UserError(f"{where}: expected one of {{{', '.join(KINDS)}: ...}}, got {spec!r}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise UserError(f"{where}: {kind} takes a non-empty list, got {args!r}")
        if kind in ("uniform", "loguniform", "randint"):
            if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
                raise UserError(f"{where}: {kind} takes [low, high] with low < high, got {args!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise UserError(f"{where}: loguniform needs low > 0, got {args[0]}")
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise UserError(f"{where}: randint takes integers, got {args!r}")
        space[str(key)] = Distribution(kind, tuple(args))
    return space


def load_search_space(path: str | Path) -> dict[str, Distribution]:
    from blendtune.shipped import resolve, spaces_dir
    path = resolve(path, spaces_dir())  # a shipped space's name (`ogm`) works too
    if not path.is_file():
        raise UserError(f"search space file not found: {path} (nor a shipped space of that name, in {spaces_dir()})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    return parse_space(raw, str(path))


def validate_space(space: dict[str, Distribution], base: ExperimentConfig | None = None,
                   source: str = "search space") -> None:
    """Every key must be a config key and every value the space can produce must type-check."""
    keys = flat_keys(base or load_config(None))
    for key, dist in space.items():
        if key not in keys:
            near = sorted(k for k in keys if k.split(".")[-1] == key.split(".")[-1])
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise UserError(f"{source}: '{key}' is not a config key{hint}")
        if dist.kind in ("uniform", "loguniform") and isinstance(keys[key], (bool, int)):
            # a continuous draw (4.37) is not a value an integer key can take, whatever its bounds are written as
            raise UserError(f"{source}: key '{key}' takes whole numbers; {dist.kind} draws fractions: use "
                            f"{{randint: [{int(dist.args[0])}, {int(dist.args[1]) + 1}]}} or {{choice: [...]}}")
        for value in dist.examples():
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{source}: key '{key}': value {value} is not finite")
            try:
                load_config(None, [f"{key}={_override_text(value)}"])
            except UserError as e:
                raise UserError(f"{source}: key '{key}': value {value!r} is not valid: {e}") from None


def _override_text(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def check_sweep(cfg: ExperimentConfig, space: dict[str, Distribution], variants: list[dict] | None = None,
                source: str = "search space") -> None:
    """Everything a sweep can check before anything is created or Ray starts."""
    validate_space(space, cfg, source)
    if cfg.sweep.metric.split("/")[1:2] == ["held_out"] and cfg.data.held_out_ratio <= 0 \
            and "data.held_out_ratio" not in space:
        raise SettingError("sweep.metric", f"{cfg.sweep.metric!r} needs a held-out split (data.held_out_ratio > 0)")
    epochs = min(_values("train.epochs", cfg.train.epochs, space, variants))
    if cfg.sweep.scheduler == "asha" and cfg.sweep.grace_period > epochs:
        raise UserError(f"config keys 'sweep.grace_period' ({cfg.sweep.grace_period}) and 'train.epochs' ({epochs}): "
                        "ASHA's grace period must be at most the epochs a trial trains")
    strategies = _values("strategy", cfg.strategy, space, variants)
    datasets = _values("data.dataset", cfg.data.dataset, space, variants)
    check_keys_are_used(cfg, strategies, datasets)


def _values(key: str, current: Any, space: dict[str, Distribution], variants: list[dict] | None) -> set:
    """Every value `key` takes in some trial: the config's, the space's, the variants'."""
    found = {current} | (set(space[key].examples()) if key in space else set())
    return found | {v[key] for v in variants or [] if key in v}
