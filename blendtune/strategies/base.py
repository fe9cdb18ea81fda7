"""The strategy interface: a few optional hooks that the training loop (blendtune/loop.py) calls.

    for epoch:                                       # loop.Trainer.fit
        strategy.on_epoch_start(epoch, trainer)                    # e.g. G-Blend's paper estimate
        for batch:                                   # loop.Trainer.train_epoch
            masks = strategy.modality_masks(targets)
            out   = model(inputs, masks, detach_unimodal_heads=strategy.detach_unimodal_heads)
            loss  = strategy.loss(out, targets, epoch) (+ probe losses of detached uni-modal heads)
            loss.backward(); unscale
            strategy.after_backward(out, targets, epoch, step)     # gradient modulation
            clip; optimizer.step()
        evaluation = evaluate every head on train / held-out / test
        strategy.on_epoch_end(epoch, evaluation, trainer)          # (super-)epoch decisions
        log strategy.epoch_metrics(); checkpoint strategy.state_dict()

The math lives in `blendtune.functional`; a strategy only decides when to apply it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from blendtune.functional import classification_loss

from blendtune.models import FUSED, LateFusionClassifier, ModelOutput
from blendtune.registry import Registry

if TYPE_CHECKING:
    from blendtune.loop import Evaluation, Trainer

STRATEGIES: Registry = Registry("strategy")


def head_losses(out: ModelOutput, targets: torch.Tensor, heads: list[str]) -> dict[str, torch.Tensor]:
    return {h: classification_loss(out.logits[h], targets) for h in heads}


def probe_loss(out: ModelOutput, targets: torch.Tensor) -> torch.Tensor:
    """Loss of the uni-modal heads when they read detached features: trains them, touches no encoder."""
    return sum(classification_loss(logits, targets) for head, logits in out.logits.items() if head != FUSED)


class BalancingStrategy:
    config_section: str | None = None   # which config section holds this strategy's options
    detach_unimodal_heads: bool = True  # uni-modal heads as probes unless the strategy trains through them
    trains_all_parameters: bool = True  # False: DDP must look for parameters without gradients

    def setup(self, model: LateFusionClassifier, seed: int, total_epochs: int) -> None:
        self.model = model
        self.seed = seed
        self.total_epochs = total_epochs

    def modality_masks(self, targets: torch.Tensor) -> torch.Tensor | None:
        return None

    def loss(self, out: ModelOutput, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        return classification_loss(out.logits[FUSED], targets)

    def after_backward(self, out: ModelOutput, targets: torch.Tensor, epoch: int, step: int) -> None:
        pass

    def on_epoch_start(self, epoch: int, trainer: "Trainer") -> None:
        pass

    def on_epoch_end(self, epoch: int, evaluation: "Evaluation", trainer: "Trainer") -> None:
        pass

    def epoch_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
