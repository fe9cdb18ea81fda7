"""Experiment configuration: a typed schema, YAML + `key=value` overrides, strict validation.

This is the only module that touches OmegaConf objects. `load_config` returns plain dataclasses
(`OmegaConf.to_object`), which is what the rest of blendtune takes. The schema is assembled from the
registries: each strategy's options dataclass is a top-level section (`gblend`, `ogm`, ...), each
dataset's a section of `data` (`data.avdigits`, ...), and their `validate()` checks their values.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from blendtune.data import DATASETS
from blendtune.data.base import absolute_root
from blendtune.build import PYTHON_OBJECTS  # noqa: F401  (re-exported for the API)
from blendtune.errors import OptionError, SettingError, UserError
from blendtune.feeding import LoaderOptions
from blendtune.loggers import flat_dict
from blendtune.loop import TrainOptions
from blendtune.models import ENCODERS, FUSIONS
from blendtune.optim import OptimOptions
from blendtune.strategies import STRATEGIES, check_held_out, check_required_options


@dataclass
class DataFields(LoaderOptions):
    """The data keys every dataset shares (the loader's own: blendtune.feeding.LoaderOptions); each
    dataset's options join as `data.<name>` (registry)."""
    dataset: str = "synthetic"
    _target_: Optional[str] = None  # or your own: an import path to a callable returning (train, test) or
    args: Dict[str, Any] = field(default_factory=dict)  # (train, held_out, test) datasets; `args` its kwargs
    root: Optional[str] = None   # falls back to $BLENDTUNE_DATA_ROOT
    held_out_ratio: float = 0.1
    held_out_by_group: bool = False   # hold out whole groups (speakers) instead of stratified samples
    held_out_folds: int = 0      # k >= 2: hold out fold `held_out_fold` of a k-fold partition (by class, or by
    held_out_fold: int = 0       # group) instead of held_out_ratio; compare --tune sets them (sweep.folds)
    train_eval_size: Optional[int] = None  # evaluate train loss on a fixed subset T' of this size
    spectrogram_on: str = "loader"  # loader: in the loader workers | device: batched in the training step
    frames_on: str = "loader"    # JPEG decode + crop/resize: loader workers | device (nvjpeg, batched in the step)
    use_cache: bool = True       # read the cache `blendtune data prepare` wrote, when it is fresh

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.held_out_ratio < 1.0:
            raise SettingError("data.held_out_ratio", f"expected 0 <= ratio < 1, got {self.held_out_ratio}")
        if self.held_out_folds == 1 or self.held_out_folds < 0:
            raise SettingError("data.held_out_folds", f"expected 0 (use held_out_ratio) or k >= 2, got {self.held_out_folds}")
        if self.held_out_folds and not 0 <= self.held_out_fold < self.held_out_folds:
            raise SettingError("data.held_out_fold", f"expected 0 <= fold < {self.held_out_folds}, got {self.held_out_fold}")


@dataclass
class EncoderConfig:
    name: str = "mlp"
    dim: int = 128               # feature size the encoder outputs
    hidden: int = 256            # mlp hidden width / cnn base width
    dropout: float = 0.0


@dataclass
class ModelConfig:
    fusion: str = "concat"
    encoders: Dict[str, EncoderConfig] = field(default_factory=dict)  # empty: the dataset's defaults
    _target_: Optional[str] = None   # your own backbone: import path of an nn.Module (dict in -> features per
    args: Dict[str, Any] = field(default_factory=dict)  # modality out); `args` its keyword arguments


# The optimizer's and the loop's settings are declared beside the code that reads them; the schema
# takes them as they are (one declaration, no copies).
OptimConfig = OptimOptions
TrainConfig = TrainOptions


@dataclass
class SweepConfig:
    num_samples: Optional[int] = None  # trials drawn from the space; unset: 4, or 1 with search=grid (each
                                       # point once). Set with a grid, it repeats every point that often
    search: str = "optuna"       # optuna (TPE) | random | grid
    scheduler: str = "asha"      # asha | pbt | none
    metric: str = "acc/held_out/fused"  # selection never looks at test data
    mode: str = "max"
    max_concurrent: int = 0      # 0: as many trials as the cluster's resources allow
    grace_period: int = 2        # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 2    # ASHA
    perturbation_interval: int = 2  # PBT: epochs between exploit/explore steps
    cpus_per_worker: Optional[float] = None  # unset: 1 per worker in sweeps; `train workers=N` splits the CPUs
    gpus_per_trial: Optional[float] = None  # 1-worker trials on a GPU: a fraction (0.25) lets 4 share one; unset: 1
    storage_path: Optional[str] = None  # where trials and checkpoints live; s3://... or gs://... on a cluster
    address: Optional[str] = None       # Ray cluster address; unset: $RAY_ADDRESS, else a local Ray
    folds: int = 1               # compare --tune: score each candidate on k held-out folds (one trial each)
    reuse_actors: bool = True    # 1-worker trials start in the process of a finished one (Tune's reuse_actors):
                                 # no re-import of torch and re-build per trial (measured in the README)


@dataclass
class ExperimentFields:
    """The keys every experiment has; each strategy's options join as a section (registry)."""
    name: str = "experiment"
    seed: int = 0
    strategy: str = "naive"
    output_dir: str = "runs"
    workers: int = 1             # data-parallel workers (Ray Train, DDP); data.batch_size is the global batch
    max_failures: int = 2        # a worker that dies is restarted from the last checkpoint this often
    wandb: bool = True           # log every epoch to Weights & Biases (offline unless WANDB_MODE / a key says)
    wandb_project: str = "blendtune"
    wandb_entity: Optional[str] = None
    data: DataFields = field(default_factory=DataFields)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def _assemble(name: str, base: type, sections: dict[str, type], extra: list | None = None) -> type:
    """`base` plus one field per registered options section: the schema grows with the registries.
    The class lives in this module under `name`, so configs pickle (Ray) and compare like any dataclass."""
    fields = list(extra or []) + [(section, cls, field(default_factory=cls)) for section, cls in sections.items()]
    cls = make_dataclass(name, fields, bases=(base,))
    cls.__module__, cls.__qualname__ = __name__, name
    globals()[name] = cls
    return cls


def assemble_schema() -> type:
    """(Re)build DataConfig and ExperimentConfig from the dataset and strategy registries (a strategy
    registered after import joins the schema when this runs again)."""
    data_cls = _assemble("DataConfig", DataFields, DATASETS.sections())
    return _assemble("ExperimentConfig", ExperimentFields, STRATEGIES.sections(),
                     extra=[("data", data_cls, field(default_factory=data_cls))])


ExperimentConfig = assemble_schema()


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Schema <- YAML file <- `key=value` overrides, then validated. Errors name the key and source."""
    cfg = OmegaConf.structured(ExperimentConfig)
    if path is not None:
        from blendtune.shipped import experiments_dir, resolve
        path = resolve(path, experiments_dir())  # a shipped experiment's name (`synthetic_naive`) works too
        if not path.is_file():
            raise UserError(f"experiment file not found: {path} (nor a shipped experiment of that name, "
                            f"in {experiments_dir()})")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as e:  # yaml errors come in several types
            raise UserError(f"{path}: not valid YAML: {e}") from None
        cfg = _merge(cfg, file_cfg, str(path))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value, e.g. optim.lr=0.01")
    if overrides:
        try:
            dotlist = OmegaConf.from_dotlist(list(overrides))
        except (OmegaConfBaseException, yaml.YAMLError) as e:  # `key=[1` fails in OmegaConf's YAML parser
            raise UserError(f"command-line overrides: {_first_line(e)}") from None
        cfg = _merge(cfg, dotlist, "command line")
    obj = OmegaConf.to_object(cfg)
    if obj.data.root:  # relative to where the user typed it: Ray runs trials in their own directories
        obj.data.root = absolute_root(obj.data.root)
    validate(obj)
    return obj


def override_value(text: str, source: str):
    """One `key=value` override's value as the command line reads it (OmegaConf's grammar: `1e-3` is a
    float, `true` a bool, `'1'` a string), for overrides written inside another argument."""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]
    except (OmegaConfBaseException, yaml.YAMLError) as e:  # `[1` fails in OmegaConf's YAML parser
        raise UserError(f"{source}: {_first_line(e)}") from None


def config_from_dict(data: dict) -> ExperimentConfig:
    """A plain nested dict (e.g. a saved config) -> validated ExperimentConfig."""
    obj = OmegaConf.to_object(_merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(data), "config"))
    validate(obj)
    return obj


def with_overrides(config: ExperimentConfig, overrides: dict[str, object]) -> ExperimentConfig:
    """A copy of `config` with dotted keys set to (typed) values, e.g. a sweep trial's sample."""
    cfg = OmegaConf.structured(config)
    for key, value in overrides.items():
        if OmegaConf.select(cfg, key, throw_on_missing=False, default=_MISSING) is _MISSING:
            raise UserError(f"'{key}' is not a config key")
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as e:
            raise SettingError(key, f"{_first_line(e)}") from None
    obj = OmegaConf.to_object(cfg)
    validate(obj)
    return obj


_MISSING = object()


def to_yaml(config: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: ExperimentConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def flat_keys(config: ExperimentConfig) -> dict[str, object]:
    """{'optim.lr': 0.01, ...}: the dotted keys that overrides and sweep spaces use."""
    return flat_dict(to_dict(config))


def _merge(base, other, source: str):
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or "?"
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        valid = _valid_keys(parent)
        hint = f"; valid keys{' under ' + repr(parent) if parent else ''}: {', '.join(valid)}" if valid else ""
        raise UserError(f"{source}: unknown config key '{key}'{hint}") from None
    except ValidationError as e:
        key = getattr(e, "full_key", None) or "?"
        raise UserError(f"{source}: config key '{key}': {_first_line(e)}") from None
    except OmegaConfBaseException as e:
        raise UserError(f"{source}: {_first_line(e)}") from None


def _valid_keys(parent: str) -> list[str]:
    node = OmegaConf.structured(ExperimentConfig)
    for part in filter(None, parent.split(".")):
        try:
            node = node[part]
        except Exception:
            return []
    return list(node.keys()) if OmegaConf.is_dict(node) else []


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


_CHOICES = {
    "data.spectrogram_on": ("loader", "device"),
    "data.frames_on": ("loader", "device"),
    "sweep.search": ("optuna", "random", "grid"),
    "sweep.scheduler": ("asha", "pbt", "none"),
    "sweep.mode": ("max", "min"),
}


def validate(cfg: ExperimentConfig) -> None:
    """Checks the schema cannot express: choices, ranges, registry names, every options section's values."""
    flat = flat_keys(cfg)
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            raise SettingError(key, f"expected one of {', '.join(allowed)}, got {flat[key]!r}")
    registries = [("strategy", STRATEGIES), ("model.fusion", FUSIONS)]
    if not cfg.data._target_:
        registries.append(("data.dataset", DATASETS))
    for key, registry in registries:
        if flat[key] not in registry:
            raise SettingError(key, f"expected one of {', '.join(registry.names())}, got {flat[key]!r}")
    for modality, enc in cfg.model.encoders.items():
        if enc.name not in ENCODERS:
            raise UserError(f"config key 'model.encoders.{modality}.name': expected one of "
                            f"{', '.join(ENCODERS.names())}, got {enc.name!r}")
    positive = ["workers", "sweep.num_samples", "sweep.grace_period", "sweep.perturbation_interval",
                "sweep.reduction_factor", "sweep.folds"]
    for key in positive:
        if flat[key] is not None and flat[key] <= 0:
            raise SettingError(key, f"expected a positive number, got {flat[key]}")
    for options in (cfg.train, cfg.data, cfg.optim):  # each section's own rules (SettingError names the key)
        options.validate()
    # a dataset of the user's own may bring its held-out split; that one is checked once it is built
    check_held_out(cfg.strategy, cfg.data.held_out_ratio > 0.0 or cfg.data.held_out_folds > 1 or bool(cfg.data._target_))
    if cfg.sweep.gpus_per_trial is not None and not 0 < cfg.sweep.gpus_per_trial:
        raise SettingError("sweep.gpus_per_trial", f"expected > 0, got {cfg.sweep.gpus_per_trial}")
    if cfg.sweep.cpus_per_worker is not None and cfg.sweep.cpus_per_worker <= 0:
        raise SettingError("sweep.cpus_per_worker", f"expected > 0, got {cfg.sweep.cpus_per_worker}")
    for prefix, node, sections in (("", cfg, STRATEGIES.sections()), ("data.", cfg.data, DATASETS.sections())):
        for section in sections:
            _validate_section(f"{prefix}{section}", getattr(node, section))
    section = STRATEGIES.section(cfg.strategy)
    if section:
        try:
            check_required_options(cfg.strategy, getattr(cfg, section))
            STRATEGIES.get(cfg.strategy).check_epochs(getattr(cfg, section), cfg.train.epochs)
        except OptionError as e:
            raise SettingError(f"{section}.{e.key}", e.message) from None


def _validate_section(where: str, options: Any) -> None:
    check = getattr(options, "validate", None)
    if check is None:
        return
    try:
        check()
    except OptionError as e:
        raise SettingError(f"{where}.{e.key}", f"{e.message}") from None


def unused_keys(cfg: ExperimentConfig, strategies: Iterable[str] = (), datasets: Iterable[str] = ()) -> list[str]:
    """Keys set (to a value other than the default) in options sections that no strategy / dataset of
    the run reads: `ogm.alpha=0.3` on a gblend run would otherwise do nothing, silently. `strategies`
    and `datasets` default to the config's own; a sweep passes every one its trials can use."""
    strategies = set(strategies) or {cfg.strategy}
    datasets = set(datasets) or ({cfg.data.dataset} if not cfg.data._target_ else set())
    found = []
    for prefix, node, registry, used in (("", cfg, STRATEGIES, strategies), ("data.", cfg.data, DATASETS, datasets)):
        for section, cls in registry.sections().items():
            readers = [n for n in used if n in registry and registry.section(n) == section]
            ignored = set.intersection(*[set(getattr(registry.get(n), "ignored_options", ())) for n in readers]) \
                if readers else None
            current, default = getattr(node, section), cls()
            for f in fields(cls):
                if getattr(current, f.name) != getattr(default, f.name) and (ignored is None or f.name in ignored):
                    found.append(f"{prefix}{section}.{f.name}")
    return sorted(found)


def check_keys_are_used(cfg: ExperimentConfig, strategies: Iterable[str] = (), datasets: Iterable[str] = ()) -> None:
    unused = unused_keys(cfg, strategies, datasets)
    if unused:
        runs = ", ".join(sorted(set(strategies) or {cfg.strategy}))
        raise UserError(f"config key(s) {', '.join(unused)} set, but no strategy or dataset of this run reads them "
                        f"(strategy: {runs}; dataset: {cfg.data.dataset}); remove them or set the strategy that uses them")


class TrialConfig:
    """A sweep's base config; called with a trial's overrides, that trial's validated config. Handed to
    Tune (picklable), so trials build their config without the sweep code importing this module."""

    def __init__(self, base: ExperimentConfig):
        self.base = to_dict(base)

    def __call__(self, overrides: dict[str, object]) -> ExperimentConfig:
        return with_overrides(config_from_dict(self.base), overrides)


# ---- the Python API's names for config keys ---------------------------------------------------------
# `blendtune.fit(epochs=3, lr=1e-3, batch_size=32, alpha=0.8)`: a setting's keyword is its key's last part,
# taken from the schema (nothing listed by hand but these): the optimizer's name reads `optimizer=`; the
# keys that name blendtune's own datasets have no keyword (the caller passes objects), nor output_dir in a fit
# (its folder is run_dir=).
PYTHON_RENAMED = {"optim.name": "optimizer", "model.fusion": "fusion", "data._target_": "train",
                  "model._target_": "model"}
_NOT_KEYWORDS = {"strategy", "output_dir", "data.dataset", "data._target_", "data.args", "data.root"}


def python_keywords(strategies: Iterable[str] = (), sweeps: bool = False) -> dict[str, list[str]]:
    """keyword -> the config key(s) it can mean, for a run of `strategies` (their option sections join)
    and, with `sweeps`, the sweep section. A keyword meaning two keys (PMR's `momentum` and the
    optimizer's) is refused when used; the caller then names the key (`config={"pmr.momentum": 0.5}`)."""
    sections = {"train", "optim", "data"} | ({"sweep"} if sweeps else set())
    sections |= {STRATEGIES.section(s) for s in strategies if STRATEGIES.section(s)}
    names: dict[str, list[str]] = {}
    for key in flat_keys(ExperimentConfig()):
        parts = key.split(".")
        if (key in _NOT_KEYWORDS and not (sweeps and key == "output_dir")) or len(parts) > 2 or (len(parts) == 2 and parts[0] not in sections):
            continue
        if len(parts) == 1 and isinstance(getattr(ExperimentConfig(), key), dict):
            continue
        names.setdefault(PYTHON_RENAMED.get(key, parts[-1]), []).append(key)
    return names


def keyword_overrides(caller: str, options: dict, strategies: Iterable[str] = (), sweeps: bool = False,
                      config: dict | None = None) -> dict[str, object]:
    """{config key: value} from a Python call's keywords (and `config`, a dict of config keys)."""
    names = python_keywords(strategies, sweeps)
    unknown = sorted(k for k in options if k not in names)
    if unknown:
        raise UserError(f"{caller}: unknown option(s) {', '.join(unknown)}; options of this run: "
                        f"{', '.join(sorted(names))} (or config={{'section.key': value}})")
    overrides = {}
    for name, value in options.items():
        if len(names[name]) > 1:
            raise UserError(f"{caller}: {name}= could mean {' or '.join(names[name])}; pass "
                            f"config={{'{names[name][0]}': {value!r}}} instead")
        overrides[names[name][0]] = value
    for key, value in (config or {}).items():
        if key in overrides:
            raise UserError(f"{caller}: {key} is given twice (as a keyword and in config=)")
        overrides[key] = value
    return overrides


# The command line's flags in its messages, as a Python caller names them.
_FLAGS = {"resume with --resume": "resume with resume=FOLDER", "--resume ": "resume=", "--strategies": "strategies",
          "--seeds": "seeds", "--tune": "tune", "--spaces": "spaces"}


def in_python_terms(error: UserError, caller: str, strategies: Iterable[str] = (), sweeps: bool = False) -> UserError:
    """An error said to a Python caller: `fit(batch_size=...)` instead of "config key 'data.batch_size'",
    the config keys and command-line flags its message names as keywords too."""
    keyword = {keys[0]: name for name, keys in python_keywords(strategies, sweeps).items() if len(keys) == 1}
    keyword.update(PYTHON_RENAMED)

    def say(key: str) -> str:
        return f"{keyword[key]}=" if key in keyword else key

    message = error.message if isinstance(error, SettingError) else str(error)
    for key in sorted((k for k in keyword if "." in k), key=len, reverse=True):  # a bare word is prose
        message = message.replace(f"{key} ", f"{say(key)} ").replace(f"{key}=", f"{keyword[key]}=")
    for flag, name in _FLAGS.items():
        message = message.replace(flag, name)
    if isinstance(error, SettingError):
        return UserError(f"{caller}({say(error.key).rstrip('=')}=...): {message}")
    if message.startswith(f"{caller}(") or message.startswith(f"{caller}:"):
        return UserError(message)
    return UserError(f"{caller}(): {message}")
