"""Experiment configuration: a typed schema, YAML + `key=value` overrides, strict validation.

This is the only module that touches OmegaConf objects. `load_config` returns plain dataclasses
(`OmegaConf.to_object`), which is what the rest of blendtune takes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from blendtune.errors import UserError


@dataclass
class SyntheticModality:
    dim: int = 16
    signal: float = 1.0          # class separation of the part that generalizes
    noise: float = 1.0           # isotropic noise on that part
    memorize_dims: int = 0       # extra per-sample random dims: easy to memorise, useless on new samples


@dataclass
class SyntheticConfig:
    num_classes: int = 10
    num_train: int = 500
    num_test: int = 1000
    seed: int = 0                # the dataset is fixed by this seed, like a real one; `seed` varies the run
    modalities: Dict[str, SyntheticModality] = field(default_factory=lambda: {
        "clean": SyntheticModality(dim=16, signal=0.6),
        "memorizable": SyntheticModality(dim=16, signal=0.4, memorize_dims=512),
    })


@dataclass
class AVDigitsConfig:
    test_speakers: List[str] = field(default_factory=lambda: ["george", "jackson"])
    window_s: float = 1.0        # clips (0.14-2.3 s) are centre-cropped or zero-padded to this
    sample_rate: int = 8000
    n_fft: int = 256
    hop_length: int = 80
    n_mels: int = 40
    pairing_seed: int = 0        # which MNIST image goes with which clip; fixed like the dataset


@dataclass
class ClipConfig:
    """Audio window, spectrogram and video frames of a file-based audio-visual dataset."""
    sample_rate: int = 22050
    window_s: float = 3.0
    n_fft: int = 512
    hop_length: int = 353
    n_mels: int = 0              # 0: log-magnitude STFT (as OGM-GE); > 0: log-mel
    pad: str = "tile"            # a short clip is repeated (tile, as OGM-GE) or zero-padded (zero)
    num_frames: int = 1          # frames sampled per clip (random in training, evenly spaced in evaluation)
    image_size: int = 224


@dataclass
class CremaDConfig(ClipConfig):
    train_csv: str = "train.csv"
    test_csv: str = "test.csv"
    audio_dir: str = "AudioWAV"
    frames_dir: str = "Image-01-FPS"


@dataclass
class AVCSVConfig(ClipConfig):
    csv: str = "data.csv"        # header id,label,split (+ optional group)
    audio_dir: str = "audio"
    frames_dir: str = "frames"
    classes: List[str] = field(default_factory=list)  # empty: the labels found in the CSV, sorted
    multilabel: bool = False     # labels separated by label_separator; BCE loss, mAP
    label_separator: str = ";"
    sample_rate: int = 16000
    window_s: float = 10.0
    hop_length: int = 160
    num_frames: int = 3


@dataclass
class FeaturesConfig:
    modalities: List[str] = field(default_factory=list)  # empty: every <name>.npy in train/ but labels/groups


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    root: Optional[str] = None   # falls back to $BLENDTUNE_DATA_ROOT
    held_out_ratio: float = 0.1
    held_out_by_group: bool = False   # hold out whole groups (speakers) instead of stratified samples
    train_eval_size: Optional[int] = None  # evaluate train loss on a fixed subset T' of this size
    batch_size: int = 64
    eval_batch_size: int = 512
    num_workers: int = 0         # DataLoader worker processes (file-based datasets decode there)
    skip_bad: bool = False       # skip samples whose files are missing or broken (and log how many)
    spectrogram_on: str = "loader"  # loader: in the loader workers | device: batched in the training step
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    avdigits: AVDigitsConfig = field(default_factory=AVDigitsConfig)
    crema_d: CremaDConfig = field(default_factory=CremaDConfig)
    av_csv: AVCSVConfig = field(default_factory=AVCSVConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)


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


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "none"
    step_size: int = 70
    gamma: float = 0.1
    grad_clip: Optional[float] = None


@dataclass
class TrainConfig:
    epochs: int = 10
    device: str = "auto"
    amp: str = "auto"            # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16  ("off" would read as a YAML boolean)
    checkpoint_every: int = 1
    progress: bool = True


@dataclass
class GBlendConfig:
    mode: str = "online"         # online: re-estimate every super-epoch | offline: estimate once
    super_epoch: int = 2
    warmup: int = 0              # epochs trained with uniform weights before the first estimate
    estimator: str = "heads"     # heads: the main run's own heads (cheap) | paper: k+1 copies per estimate
    eps: float = 1e-8


@dataclass
class OGMConfig:
    alpha: float = 0.8
    noise_scale: float = 1.0     # GE noise std as a multiple of the unmodulated gradient's std (ogm_ge)
    modulation_start: int = 1
    modulation_end: int = 50
    params: str = "all"          # all: every encoder parameter | conv: conv weights only (official code)


@dataclass
class UnimodalConfig:
    modality: str = ""


@dataclass
class ModalityDropoutConfig:
    p: float = 0.3


@dataclass
class SweepConfig:
    num_samples: int = 4         # trials drawn from the space (grid entries multiply it)
    search: str = "optuna"       # optuna (TPE) | random | grid
    scheduler: str = "asha"      # asha | pbt | none
    metric: str = "acc/held_out/fused"  # selection never looks at test data
    mode: str = "max"
    max_concurrent: int = 0      # 0: as many trials as the cluster's resources allow
    grace_period: int = 2        # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 2    # ASHA
    perturbation_interval: int = 2  # PBT: epochs between exploit/explore steps
    cpus_per_worker: Optional[float] = None  # unset: 1 per worker in sweeps; `train workers=N` splits the CPUs
    storage_path: Optional[str] = None  # where trials and checkpoints live; s3://... or gs://... on a cluster
    address: Optional[str] = None       # Ray cluster address; unset: $RAY_ADDRESS, else a local Ray


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    strategy: str = "naive"
    output_dir: str = "runs"
    workers: int = 1             # data-parallel workers (Ray Train, DDP); data.batch_size is the global batch
    max_failures: int = 2        # a worker that dies is restarted from the last checkpoint this often
    wandb: bool = True           # log every epoch to Weights & Biases (offline unless WANDB_MODE / a key says)
    wandb_project: str = "blendtune"
    wandb_entity: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gblend: GBlendConfig = field(default_factory=GBlendConfig)
    ogm: OGMConfig = field(default_factory=OGMConfig)
    unimodal: UnimodalConfig = field(default_factory=UnimodalConfig)
    modality_dropout: ModalityDropoutConfig = field(default_factory=ModalityDropoutConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Schema <- YAML file <- `key=value` overrides, then validated. Errors name the key and source."""
    cfg = OmegaConf.structured(ExperimentConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"experiment file not found: {path}")
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
        except OmegaConfBaseException as e:
            raise UserError(f"command-line overrides: {_first_line(e)}") from None
        cfg = _merge(cfg, dotlist, "command line")
    obj = OmegaConf.to_object(cfg)
    validate(obj)
    return obj


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
            raise UserError(f"config key '{key}': {_first_line(e)}") from None
    obj = OmegaConf.to_object(cfg)
    validate(obj)
    return obj


_MISSING = object()


def dataset_options(config: ExperimentConfig) -> dict:
    """The options section `data.<dataset>` of the chosen dataset as keyword arguments for its adapter."""
    section = getattr(config.data, config.data.dataset, None)
    return asdict(section) if section is not None else {}


def to_yaml(config: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: ExperimentConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def flat_keys(config: ExperimentConfig) -> dict[str, object]:
    """{'optim.lr': 0.01, ...}: the dotted keys that overrides and sweep spaces use."""
    out: dict[str, object] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node
    walk("", to_dict(config))
    return out


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
    "train.amp": ("auto", "fp32", "bf16", "fp16"),
    "data.spectrogram_on": ("loader", "device"),
    "data.crema_d.pad": ("tile", "zero"),
    "data.av_csv.pad": ("tile", "zero"),
    "optim.name": ("sgd", "adam", "adamw"),
    "optim.schedule": ("none", "cosine", "step"),
    "gblend.mode": ("online", "offline"),
    "gblend.estimator": ("heads", "paper"),
    "ogm.params": ("all", "conv"),
    "sweep.search": ("optuna", "random", "grid"),
    "sweep.scheduler": ("asha", "pbt", "none"),
    "sweep.mode": ("max", "min"),
}


def validate(cfg: ExperimentConfig) -> None:
    """Checks the schema cannot express: choices, ranges, registry names."""
    from blendtune.data import DATASETS
    from blendtune.models import ENCODERS, FUSIONS
    from blendtune.strategies import STRATEGIES

    flat = flat_keys(cfg)
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            raise UserError(f"config key '{key}': expected one of {', '.join(allowed)}, got {flat[key]!r}")
    for key, registry in (("strategy", STRATEGIES), ("data.dataset", DATASETS), ("model.fusion", FUSIONS)):
        if flat[key] not in registry:
            raise UserError(f"config key '{key}': expected one of {', '.join(registry.names())}, got {flat[key]!r}")
    for modality, enc in cfg.model.encoders.items():
        if enc.name not in ENCODERS:
            raise UserError(f"config key 'model.encoders.{modality}.name': expected one of "
                            f"{', '.join(ENCODERS.names())}, got {enc.name!r}")
    positive = ["workers", "sweep.num_samples", "sweep.grace_period", "sweep.perturbation_interval",
                "sweep.reduction_factor", "train.epochs", "data.batch_size", "data.eval_batch_size", "gblend.super_epoch",
                "train.checkpoint_every", "optim.step_size",
                "data.crema_d.num_frames", "data.av_csv.num_frames", "data.crema_d.image_size", "data.av_csv.image_size"]
    for key in positive:
        if flat[key] <= 0:
            raise UserError(f"config key '{key}': expected a positive number, got {flat[key]}")
    if not 0.0 <= cfg.data.held_out_ratio < 1.0:
        raise UserError(f"config key 'data.held_out_ratio': expected 0 <= ratio < 1, got {cfg.data.held_out_ratio}")
    if cfg.strategy == "gblend" and cfg.data.held_out_ratio <= 0.0:
        raise UserError("config key 'data.held_out_ratio': gblend needs a held-out split (ratio > 0)")
    if not 0.0 <= cfg.modality_dropout.p < 1.0:
        raise UserError(f"config key 'modality_dropout.p': expected 0 <= p < 1, got {cfg.modality_dropout.p}")
    if cfg.optim.lr <= 0:
        raise UserError(f"config key 'optim.lr': expected a positive learning rate, got {cfg.optim.lr}")
    if cfg.ogm.noise_scale < 0 or cfg.ogm.alpha < 0:
        raise UserError("config keys 'ogm.alpha' and 'ogm.noise_scale' must be >= 0")
    if cfg.sweep.cpus_per_worker is not None and cfg.sweep.cpus_per_worker <= 0:
        raise UserError(f"config key 'sweep.cpus_per_worker': expected > 0, got {cfg.sweep.cpus_per_worker}")
    if cfg.gblend.warmup < 0:
        raise UserError(f"config key 'gblend.warmup': expected >= 0, got {cfg.gblend.warmup}")
    if cfg.strategy == "unimodal" and not cfg.unimodal.modality:
        raise UserError("config key 'unimodal.modality': the unimodal strategy needs the modality to train")
