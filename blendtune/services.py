"""What the loop lends strategies' epoch hooks (`strategies.TrainingContext`): evaluate a model, train
one head of a model copy with the loop's own step (G-Blend's per-head estimate), features of training
samples (PMR's prototypes). A strategy never sees the Trainer itself."""
from __future__ import annotations

import weakref
from typing import Iterator

import torch

from blendtune import distributed
from blendtune.errors import UserError
from blendtune.evaluation import Evaluation
from blendtune.models import LateFusionClassifier
from blendtune.strategies import HeadLoss


class StrategyServices:
    """The narrow view of the loop that strategies' epoch hooks get."""

    def __init__(self, trainer):  # the loop's Trainer (above this module: not imported)
        # A weak reference: a Trainer <-> services cycle would leave the Trainer to the cycle collector, which
        # closes the DataLoader's queues before its workers are joined (a 5 s wait per worker).
        self._trainer = weakref.proxy(trainer)

    epoch = property(lambda self: self._trainer.epoch)
    step = property(lambda self: self._trainer.step)
    last_losses = property(lambda self: self._trainer.last_losses)
    steps_per_epoch = property(lambda self: len(self._trainer.feed.train_loader))
    train_size = property(lambda self: len(self._trainer.splits.train))
    train_targets = property(lambda self: self._trainer.splits.train.targets)

    def evaluate(self, model: LateFusionClassifier) -> Evaluation:
        return self._trainer.evaluate(model)

    def train_head(self, model: LateFusionClassifier, head: str, epochs: int) -> None:
        """Train `model` (a copy of the run's model) on head `head`'s loss alone for `epochs` epochs with
        the loop's own step: a fresh optimizer like the run's at its current learning rate, its own grad
        scaler, the same clipping, DDP's bucketed all-reduce. Its batches come from their own seeded
        order, so the main run's data order is not disturbed."""
        trainer = self._trainer
        optimizer = fresh_optimizer_like(trainer.optimizer, model.parameters())
        strategy = HeadLoss(head, touch_every_output=distributed.is_distributed())
        strategy.setup(model, trainer.seed, epochs)
        train_model = trainer.wrap_for_training(model, strategy.trains_all_parameters)
        feed = trainer.feed
        sampler = feed.sampler(trainer.seed + 7919)
        loader = feed.loader(trainer.splits.train, feed.batch_size, sampler)
        scaler = trainer.grad_scaler()
        for e in range(epochs):
            feed.set_epoch(sampler, trainer.epoch * 1000 + e)
            trainer.train_steps(train_model, loader, optimizer, scaler, strategy, trainer.epoch + 1 + e, main=False)

    def reset_optimizer(self) -> None:
        """Forget the run's optimizer state (momentum, Adam's moments and step counts), keeping its
        hyper-parameters and learning rate: a model restarted from its initial weights (UMT's student)
        starts like a new training."""
        self._trainer.optimizer.state.clear()

    @torch.no_grad()
    def features(self, model: LateFusionClassifier, indices) -> Iterator[tuple[dict, torch.Tensor]]:
        """(fp32 features per modality, targets) of this rank's shard of the training samples `indices`,
        in eval mode without gradients (PMR's prototypes); sum and all-reduce what you need of them."""
        trainer = self._trainer
        subset = trainer.splits.train.subset(indices).for_evaluation()
        loader = trainer.feed.eval_loader(subset)
        was_training = model.training
        model.eval()
        try:
            for batch in loader:
                inputs, targets = trainer.feed.to_device(batch)
                if len(targets):
                    with trainer.autocast():
                        out = model(inputs)
                    yield {m: f.float() for m, f in out.features.items()}, targets
        finally:
            model.train(was_training)


def fresh_optimizer_like(optimizer: torch.optim.Optimizer, params) -> torch.optim.Optimizer:
    """A new optimizer of the same class and hyper-parameters (no state), at the current learning rate."""
    defaults = {**optimizer.defaults, "lr": optimizer.param_groups[0]["lr"]}
    try:
        return type(optimizer)(params, **defaults)
    except TypeError as e:
        raise UserError(f"cannot build a fresh {type(optimizer).__name__} for G-Blend's per-head estimate from "
                        f"its defaults: {e}") from None
