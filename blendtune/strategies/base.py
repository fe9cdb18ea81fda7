"""The strategy interface: a few optional hooks that the one training loop (blendtune/loop.py) calls.

    for epoch:                                       # loop.Trainer.fit
        strategy.on_epoch_start(epoch, context)                    # e.g. G-Blend's paper estimate
        for batch:                                   # loop.Trainer.train_epoch
            masks = strategy.modality_masks(targets)
            out   = model(inputs, masks, detach_unimodal_heads=strategy.detach_unimodal_heads)
            for loss in strategy.step_losses(out, targets, epoch):  # one: strategy.loss(...) (MLA: one per modality)
                (+ probe losses of detached uni-modal heads, first step only)
                strategy.backward(loss, out, targets, scaler); unscale   # MMPareto: per-loss gradients
                strategy.after_backward(out, targets, epoch, step)     # gradient modulation
                clip; optimizer.step()
        evaluation = evaluate every head on train / held-out / test
        strategy.on_epoch_end(epoch, evaluation, context)          # (super-)epoch decisions
        log strategy.pop_epoch_metrics(); checkpoint strategy.state_dict()

A strategy never sees the Trainer: epoch hooks get a `TrainingContext` (evaluate a model, train one
head of a model copy with the loop's own step, the losses measured at the end of the previous epoch).
The math lives in `blendtune.functional`; a strategy only decides when to apply it.

A new strategy is one file: its options dataclass (a `validate()` raising OptionError for bad values)
and its class, registered together: `@STRATEGIES.register("name", options=NameOptions)`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol

import torch

from blendtune.errors import OptionError, SettingError, UserError
from blendtune.functional import classification_loss
from blendtune.models import FUSED, LateFusionClassifier, ModelOutput
from blendtune.registry import Registry

STRATEGIES: Registry = Registry("strategy")


class Losses(Protocol):
    """What an evaluation hands a strategy: per split ('train', 'held_out', 'test'), per head, the loss."""

    def losses(self) -> dict[str, dict[str, float]]: ...


class TrainingContext(Protocol):
    """What the loop lends a strategy's epoch hooks."""
    epoch: int                              # the last finished epoch (0 before training)
    step: int
    last_losses: dict | None                # losses measured at the end of epoch `epoch`

    def evaluate(self, model: LateFusionClassifier) -> Losses: ...

    steps_per_epoch: int                    # batches per training epoch on this rank
    train_size: int                         # training samples (all ranks)
    train_targets: torch.Tensor             # their classes (multi-label: multi-hot rows); PMR's stratified subset

    def train_head(self, model: LateFusionClassifier, head: str, epochs: int) -> None:
        """Train `model` (a copy) on head `head`'s loss alone for `epochs` epochs, with the loop's step."""

    def reset_optimizer(self) -> None:
        """Clear the run's optimizer state (momentum, moments), keeping its hyper-parameters (UMT's restart)."""

    def features(self, model: LateFusionClassifier, indices) -> Iterator[tuple[dict, torch.Tensor]]:
        """(fp32 features per modality, targets) of this rank's shard of training samples `indices`,
        eval mode, no gradients; the caller all-reduces what it sums."""


def head_losses(out: ModelOutput, targets: torch.Tensor, heads: list[str]) -> dict[str, torch.Tensor]:
    return {h: classification_loss(out.logits[h], targets) for h in heads}


def probe_loss(out: ModelOutput, targets: torch.Tensor) -> torch.Tensor:
    """Loss of the uni-modal heads when they read detached features: trains them, touches no encoder."""
    return sum(classification_loss(logits, targets) for head, logits in out.logits.items() if head != FUSED)


class BalancingStrategy:
    detach_unimodal_heads: bool = True  # uni-modal heads as probes unless the strategy trains through them
    trains_all_parameters: bool = True  # False: DDP must look for parameters without gradients
    needs_held_out: bool = False        # True: the run must carve a held-out split (G-Blend's V)
    ignored_options: tuple[str, ...] = ()  # keys of its (shared) options section this strategy never reads
    required_options: tuple[str, ...] = ()  # options that must be set (non-empty) to run it
    syncs_gradients: bool = False       # True: under DDP its `backward` all-reduces the gradients itself
    fusion: str | None = None           # the fusion the method is defined with (MLA: shared); None: any
    compiles: bool = True               # False: its step cannot run through torch.compile (train.compile)
    compile_refusal: str = ("takes several backward passes or optimizer steps per forward, which a compiled graph "
                            "does not allow")  # why not, in the train.compile error

    def __init__(self, options: Any = None):
        self.options = options

    @classmethod
    def check_epochs(cls, options: Any, epochs: int) -> None:
        """Options that depend on the run's length (UMT's teacher phase): an OptionError if they cannot work
        in `epochs` epochs. Config validation calls it, before anything starts."""

    def setup(self, model: LateFusionClassifier, seed: int, total_epochs: int) -> None:
        self.model = model
        self.seed = seed
        self.total_epochs = total_epochs

    @property
    def only_head(self) -> str | None:
        """The one head this strategy trains, which then predicts whatever `train.predict` says (unimodal:
        its modality; the others are untrained); None: every head trains and `train.predict` chooses."""
        return None

    def prepare_inference(self, model: LateFusionClassifier) -> None:
        """Set up a trained model for prediction as the method defines it (MLA: entropy-weighted fusion);
        `setup` calls it, and so does blendtune.load on a model rebuilt from its run directory."""

    def modality_masks(self, targets: torch.Tensor) -> torch.Tensor | None:
        return None

    def loss(self, out: ModelOutput, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        return classification_loss(out.logits[FUSED], targets)

    def step_losses(self, out: ModelOutput, targets: torch.Tensor, epoch: int) -> Iterator[torch.Tensor]:
        """The loss of each optimizer step taken on this batch's forward: one by default. A generator, so a
        later loss is computed after the earlier steps (MLA: one step per modality through a shared head)."""
        yield self.loss(out, targets, epoch)

    def backward(self, loss: torch.Tensor, out: ModelOutput, targets: torch.Tensor,
                 scaler: torch.amp.GradScaler) -> None:
        """Fill the parameters' .grad (scaled by `scaler`; the loop unscales next). A strategy that needs
        per-loss gradients (MMPareto) overrides it; with `syncs_gradients` it also all-reduces them."""
        scaler.scale(loss).backward()

    def after_backward(self, out: ModelOutput, targets: torch.Tensor, epoch: int, step: int) -> None:
        pass

    def on_epoch_start(self, epoch: int, context: TrainingContext) -> None:
        pass

    def on_epoch_end(self, epoch: int, evaluation: Losses, context: TrainingContext) -> None:
        pass

    def pop_epoch_metrics(self) -> dict[str, float]:
        """This epoch's strategy metrics (logged), then the per-epoch accumulators start again."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class HeadLoss(BalancingStrategy):
    """One head's loss and no hooks: how the loop trains a model copy for `TrainingContext.train_head`."""
    detach_unimodal_heads = False
    trains_all_parameters = False

    def __init__(self, head: str, touch_every_output: bool = False):
        super().__init__()
        self.head = head
        # Under DDP every forward output must reach the loss, or the reducer waits for gradients of the
        # other heads that never come: they join with weight 0 (no effect on the head being estimated,
        # whose loss depends on its own encoder(s) and head only).
        self.touch_every_output = touch_every_output
        self.trains_all_parameters = touch_every_output

    def loss(self, out: ModelOutput, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        loss = classification_loss(out.logits[self.head], targets)
        if self.touch_every_output:
            loss = loss + 0.0 * sum(logits.sum() for head, logits in out.logits.items() if head != self.head)
        return loss


def fusion_for(strategy: str | type[BalancingStrategy] | BalancingStrategy, requested: str,
               default: str = "concat") -> str:
    """The fusion to build: the strategy's own where it has one (MLA trains one shared head), unless the
    user asked for another one (then one clear error)."""
    cls = STRATEGIES.get(strategy) if isinstance(strategy, str) else strategy
    wanted = getattr(cls, "fusion", None)
    if wanted is None or requested == wanted:
        return requested
    if requested != default:
        name = strategy if isinstance(strategy, str) else type(strategy).__name__
        raise SettingError("model.fusion", f"strategy {name} is defined with fusion {wanted!r} "
                        f"(one classifier shared by every modality), got {requested!r}")
    return wanted


def check_held_out(strategy: str | type[BalancingStrategy] | BalancingStrategy, has_held_out: bool) -> None:
    """G-Blend's weights (and OGR) are measured on held-out data: a run of such a strategy needs a split V."""
    cls = STRATEGIES.get(strategy) if isinstance(strategy, str) else strategy
    if getattr(cls, "needs_held_out", False) and not has_held_out:
        name = strategy if isinstance(strategy, str) else getattr(cls, "__name__", type(cls).__name__)
        raise SettingError("data.held_out_ratio", f"{name} needs a held-out split: data.held_out_ratio > 0 or "
                                                  "held-out data of your own")


def strategy_options(name: str, **options):
    """The validated options dataclass of strategy `name` from keyword options (the Python API)."""
    cls = STRATEGIES.options(name)
    if cls is None:
        if options:
            raise UserError(f"strategy {name!r} takes no options, got {', '.join(sorted(options))}")
        return None
    try:
        opts = cls(**options)
    except TypeError:
        valid = ", ".join(cls.__dataclass_fields__)
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        raise UserError(f"strategy {name!r}: unknown option(s) {', '.join(unknown)}; it takes {valid}") from None
    validate_options(opts)
    return opts


def validate_options(options: Any) -> None:
    check: Callable[[], None] | None = getattr(options, "validate", None)
    if check is not None:
        check()


def check_required_options(name: str, options: Any) -> None:
    """The options strategy `name` cannot run without (unimodal's modality): set, or an OptionError."""
    for key in STRATEGIES.get(name).required_options:
        if not getattr(options, key):
            raise OptionError(key, f"the {name} strategy needs it")


def build_strategy(name: str, options: Any = None, **keyword_options) -> BalancingStrategy:
    """`build_strategy("ogm_ge", alpha=0.5)` or `build_strategy("ogm_ge", OGMOptions(...))`."""
    cls = STRATEGIES.get(name)
    if options is None:
        options = strategy_options(name, **keyword_options)
    elif keyword_options:
        raise TypeError("give the options dataclass or keyword options, not both")
    else:
        validate_options(options)
    check_required_options(name, options)
    return cls(options) if STRATEGIES.options(name) is not None else cls()
