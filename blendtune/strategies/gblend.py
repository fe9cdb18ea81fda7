"""Gradient Blending (Wang, Tran, Feiszli, CVPR 2020): train on sum_i w_i L_i over the k + 1 heads,
with w_i proportional to dG_i / dO_i^2 measured on a held-out split carved from the training set.

Estimators of (dG_i, dO_i) over a super-epoch of n epochs:
- `paper` (Alg. 1): from the checkpoint at the start of the super-epoch, a copy of the model per head
  trains that head's network alone on L_i for n epochs; cost (k + 1) * n extra epochs per estimate.
- `heads` (cheap): the main run's own heads, measured at the two ends of the super-epoch that was
  just trained; weights for the next super-epoch; cost: only the evaluations the loop does anyway.
Online (Alg. 3) re-estimates every super-epoch; offline (Alg. 2) estimates once. An optional warm-up
of `warmup` epochs trains with uniform weights before the first estimate.

Against late swings (a head whose held-out loss stops improving gets weight 0 and the weight jumps to
another): `ema` averages the weights across super-epochs, `floor` keeps every head at least that weight,
`patience` stops re-estimating after that many estimates in a row without a fused held-out improvement.
All three are off by default (the paper's estimator), pending a measurement that picks them.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from blendtune.errors import OptionError
from blendtune.functional import classification_loss, gblend_weights, ogr, stabilised_blend_weights
from blendtune.models import FUSED, ModelOutput
from blendtune.strategies.base import STRATEGIES, BalancingStrategy, Losses, TrainingContext, head_losses


@dataclass
class GBlendOptions:
    mode: str = "online"         # online: re-estimate every super-epoch | offline: estimate once
    super_epoch: int = 2
    warmup: int = 0              # epochs trained with uniform weights before the first estimate
    estimator: str = "heads"     # heads: the main run's own heads (cheap) | paper: k+1 copies per estimate
    eps: float = 1e-8
    ema: float = 0.0             # w <- ema * w_previous + (1 - ema) * w_estimated (0: the estimate alone)
    floor: float = 0.0           # every head's weight at least this (at most 1 / (k + 1))
    patience: int = 0            # freeze the weights after this many estimates in a row in which the
                                 # fused head's held-out loss did not improve (0: never)

    def validate(self) -> None:
        if not 0.0 <= self.ema < 1.0:
            raise OptionError("ema", f"expected 0 <= ema < 1, got {self.ema}")
        if not 0.0 <= self.floor < 0.5:
            raise OptionError("floor", f"expected 0 <= floor < 0.5 (at most 1 / heads), got {self.floor}")
        if self.patience < 0:
            raise OptionError("patience", f"expected >= 0, got {self.patience}")
        for key, allowed in (("mode", ("online", "offline")), ("estimator", ("heads", "paper"))):
            if getattr(self, key) not in allowed:
                raise OptionError(key, f"expected one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.super_epoch <= 0:
            raise OptionError("super_epoch", f"expected a positive number, got {self.super_epoch}")
        if self.warmup < 0:
            raise OptionError("warmup", f"expected >= 0, got {self.warmup}")


@STRATEGIES.register("gblend", options=GBlendOptions)
class GBlend(BalancingStrategy):
    detach_unimodal_heads = False
    needs_held_out = True

    def __init__(self, options: GBlendOptions):
        super().__init__(options)
        o = options
        self.mode, self.super_epoch, self.warmup, self.estimator, self.eps = (o.mode, o.super_epoch, o.warmup,
                                                                             o.estimator, o.eps)

    def setup(self, model, seed, total_epochs):
        super().setup(model, seed, total_epochs)
        self.heads = model.head_names
        self.weights = {h: 1.0 / len(self.heads) for h in self.heads}
        self.window_start: int | None = None      # epoch where the current super-epoch began
        self.window_losses: dict | None = None    # its train / held-out losses per head
        if self.options.floor * len(self.heads) > 1.0:
            raise OptionError("floor", f"{len(self.heads)} heads leave at most {1 / len(self.heads):.3f} each, "
                                       f"got {self.options.floor}")
        self.estimates = 0
        self.stale = 0                             # estimates in a row without a fused held-out improvement
        self.frozen = False
        self._last = {}                            # dG, dO, OGR of the latest estimate, for logging

    def loss(self, out: ModelOutput, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        losses = head_losses(out, targets, self.heads)
        blended = sum(self.weights[h] * losses[h] for h in self.heads)
        # A head at weight 0 would stop learning while the encoders under it keep changing, yet it is
        # read: a uni-modal head is the probe OGR and the next estimate measure, the fused head is the
        # prediction. It trains on detached features, so the encoders get exactly the blended gradient.
        for h in self.heads:
            if self.weights[h] == 0.0:
                blended = blended + classification_loss(self._head_on_detached(h, out.features), targets)
        return blended

    def _head_on_detached(self, head: str, features: dict[str, torch.Tensor]) -> torch.Tensor:
        if head == FUSED:
            return self.model.fusion({m: f.detach() for m, f in features.items()})
        return self.model.heads[head](features[head].detach())

    def is_boundary(self, epoch: int) -> bool:
        """Super-epochs start at 0 (when there is a warm-up), at `warmup`, then every `super_epoch`."""
        if epoch == 0:
            return True
        return epoch >= self.warmup and (epoch - self.warmup) % self.super_epoch == 0

    def _estimating(self) -> bool:
        return not self.frozen and (self.mode == "online" or self.estimates == 0)

    def on_epoch_start(self, epoch: int, context: TrainingContext) -> None:
        """Paper estimator (Alg. 3): at the start of a super-epoch, estimate from the current checkpoint."""
        boundary = epoch - 1
        if self.estimator == "paper" and self.is_boundary(boundary) and boundary >= self.warmup and self._estimating():
            start = context.last_losses
            self._set_from_window(start, self.paper_estimate(context))

    def on_epoch_end(self, epoch: int, evaluation: Losses, context: TrainingContext) -> None:
        """Heads estimator: at the end of a super-epoch, weights from what the main run's heads did in it."""
        if not self.is_boundary(epoch):
            return
        losses = evaluation.losses()
        if self.estimator == "heads" and self.window_start is not None and self._estimating():
            self._set_from_window(self.window_losses, losses)
        self.window_start, self.window_losses = epoch, losses

    def _set_from_window(self, start: dict, end: dict) -> None:
        stats = {h: ogr(start["train"][h], start["held_out"][h], end["train"][h], end["held_out"][h])
                 for h in self.heads}
        estimate = gblend_weights({h: s.delta_g for h, s in stats.items()},
                                  {h: s.delta_o for h, s in stats.items()}, previous=self.weights, eps=self.eps)
        self.weights = stabilised_blend_weights(self.weights, estimate, self.options.ema, self.options.floor)
        self.estimates += 1
        self._last = stats
        self.stale = self.stale + 1 if stats[FUSED].delta_g <= 0 else 0
        if self.options.patience and self.stale >= self.options.patience:
            self.frozen = True

    def paper_estimate(self, context: TrainingContext) -> dict:
        """GB_Estimate(checkpoint, n): per head, train a copy of the model on that head's loss alone
        for n epochs (the loop's own step: scaler, clipping, DDP) and measure its train / held-out
        losses at the end."""
        began = time.perf_counter()
        end = {"train": {}, "held_out": {}}
        for head in self.heads:
            model_copy = copy.deepcopy(self.model)
            context.train_head(model_copy, head, epochs=self.super_epoch)
            losses = context.evaluate(model_copy).losses()
            end["train"][head], end["held_out"][head] = losses["train"][head], losses["held_out"][head]
            del model_copy
        self._estimate_seconds = time.perf_counter() - began
        return end

    def pop_epoch_metrics(self) -> dict[str, float]:
        metrics = {f"gblend/w/{h}": w for h, w in self.weights.items()}
        if self.options.patience:
            metrics["gblend/frozen"] = float(self.frozen)
        for h, s in self._last.items():
            metrics[f"gblend/delta_g/{h}"] = s.delta_g
            metrics[f"gblend/delta_o/{h}"] = s.delta_o
            metrics[f"gblend/ogr/{h}"] = s.ogr
        if getattr(self, "_estimate_seconds", None) is not None:
            metrics["time/gblend_estimate_s"] = self._estimate_seconds
            self._estimate_seconds = None
        self._last = {}
        return metrics

    def state_dict(self) -> dict:
        return {"weights": dict(self.weights), "window_start": self.window_start,
                "window_losses": self.window_losses, "estimates": self.estimates, "stale": self.stale,
                "frozen": self.frozen}

    def load_state_dict(self, state: dict) -> None:
        self.weights = dict(state["weights"])
        self.window_start = state["window_start"]
        self.window_losses = state["window_losses"]
        self.estimates = state["estimates"]
        self.stale, self.frozen = state.get("stale", 0), state.get("frozen", False)
