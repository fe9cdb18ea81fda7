"""G-Blend's stabilisers: EMA across super-epochs, a floor per head, freezing after a patience."""
import pytest

from blendtune.config import load_config
from blendtune.errors import UserError
from blendtune.functional import stabilised_blend_weights
from blendtune.build import build_trainer
from conftest import TINY


def test_ema_and_floor_by_hand():
    previous = {"a": 1 / 3, "b": 1 / 3, "fused": 1 / 3}
    swing = {"a": 0.0, "b": 0.0, "fused": 1.0}  # everything jumps to one head
    assert stabilised_blend_weights(previous, swing) == swing  # off: the estimate as it is
    ema = stabilised_blend_weights(previous, swing, ema=0.5)
    assert ema == pytest.approx({"a": 1 / 6, "b": 1 / 6, "fused": 2 / 3})
    floored = stabilised_blend_weights(previous, swing, floor=0.1)
    assert floored == pytest.approx({"a": 0.1, "b": 0.1, "fused": 0.8}) and sum(floored.values()) == pytest.approx(1)
    both = stabilised_blend_weights(previous, swing, ema=0.5, floor=0.2)
    # mix (1/6, 1/6, 2/3), then 0.2 + 0.4 * share
    assert both == pytest.approx({"a": 0.2 + 0.4 / 6, "b": 0.2 + 0.4 / 6, "fused": 0.2 + 0.4 * 2 / 3})
    with pytest.raises(ValueError):
        stabilised_blend_weights(previous, swing, floor=0.4)  # 3 heads x 0.4 > 1


# The default synthetic set: 'memorizable' has 512 per-sample random dims, so its held-out loss soon stops
# improving and the paper's estimator drops it to (near) 0.
SETTING = ["strategy=gblend", "gblend.super_epoch=1", "data.held_out_ratio=0.2", "data.synthetic.num_test=200",
           "train.progress=false", "wandb=false"]


def _gblend(*extra, epochs=6):
    trainer = build_trainer(load_config(None, SETTING + [f"train.epochs={epochs}", *extra]))
    history = []
    trainer.callbacks = [history.append]
    trainer.fit()
    return trainer, history


def test_floor_keeps_every_head_in_the_blend_and_ema_moves_less():
    _, plain = _gblend()
    _, floored = _gblend("gblend.floor=0.1")
    heads = ("clean", "memorizable", "fused")
    assert min(row[f"gblend/w/{h}"] for row in plain for h in heads) < 0.1  # without it a head drops out
    assert all(row[f"gblend/w/{h}"] >= 0.1 - 1e-9 for row in floored for h in heads)
    _, smooth = _gblend("gblend.ema=0.7")

    def largest_step(history):
        return max(abs(b[f"gblend/w/{h}"] - a[f"gblend/w/{h}"]) for a, b in zip(history, history[1:]) for h in heads)
    assert largest_step(smooth) < largest_step(plain)
    # still the paper's direction: away from the memorizable modality
    assert smooth[-1]["gblend/w/memorizable"] < smooth[-1]["gblend/w/clean"]


def test_patience_freezes_the_weights_once_fused_stops_improving():
    # a learning rate that overfits fast: the fused held-out loss stops improving within a few epochs
    trainer, history = _gblend("gblend.patience=1", "optim.lr=0.2", epochs=8)
    frozen_at = next((row["epoch"] for row in history if row["gblend/frozen"] == 1.0), None)
    assert frozen_at is not None and trainer.strategy.frozen
    after = [row for row in history if row["epoch"] >= frozen_at]
    assert all(row["gblend/w/fused"] == after[0]["gblend/w/fused"] for row in after)  # no estimate since
    assert trainer.strategy.estimates == frozen_at  # one estimate per epoch (super_epoch=1) until then


def test_stabiliser_options_are_validated():
    for bad, key in (("gblend.ema=1.0", "gblend.ema"), ("gblend.floor=0.6", "gblend.floor"),
                     ("gblend.patience=-1", "gblend.patience")):
        with pytest.raises(UserError, match=f"config key '{key}'"):
            load_config(None, [bad])
    with pytest.raises(UserError, match="config key 'gblend.floor'"):
        build_trainer(load_config(None, TINY + ["strategy=gblend", "gblend.floor=0.4"]))  # 3 heads x 0.4 > 1


def _blended_backward(weights: dict):
    """One batch of the setting's G-Blend loss backward with these head weights, and a function that runs
    the same batch's `reference` loss (from the model's logits) backward after zeroing the gradients."""
    trainer = build_trainer(load_config(None, SETTING + ["train.epochs=1"]))
    strategy, model = trainer.strategy, trainer.model
    strategy.weights = weights
    inputs, targets = trainer.feed.to_device(next(iter(trainer.train_loader)))
    model.zero_grad()
    strategy.loss(model(inputs), targets, epoch=1).backward()

    def backward_reference(reference):
        model.zero_grad()
        reference(model(inputs).logits, targets).backward()
    return model, backward_reference


def test_a_unimodal_head_at_weight_zero_keeps_learning_as_a_probe_only():
    import torch
    from blendtune.models import FUSED
    model, backward_reference = _blended_backward({"clean": 0.5, "memorizable": 0.0, FUSED: 0.5})
    assert model.heads["memorizable"].weight.grad.abs().sum() > 0           # the head learns
    # ...but its encoder gets only the fused head's gradient: compare with the fused loss alone
    grads = [p.grad.clone() for p in model.encoders["memorizable"].parameters()]
    backward_reference(lambda logits, y: 0.5 * torch.nn.functional.cross_entropy(logits[FUSED], y))
    for g, p in zip(grads, model.encoders["memorizable"].parameters()):
        torch.testing.assert_close(g, p.grad)


def test_the_fused_head_at_weight_zero_keeps_learning_and_sends_its_encoders_nothing():
    # Three-speaker AV-digits: once the fused head's weight swung to 0 it stopped training while the
    # encoders under it moved on, and the prediction decayed (73.5% vs the image head's 94.3%).
    import torch
    from blendtune.models import FUSED
    model, backward_reference = _blended_backward({"clean": 0.5, "memorizable": 0.5, FUSED: 0.0})
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fusion.parameters())
    grads = {n: p.grad.clone() for n, p in model.encoders.named_parameters()}
    ce = torch.nn.functional.cross_entropy
    backward_reference(lambda logits, y: 0.5 * ce(logits["clean"], y) + 0.5 * ce(logits["memorizable"], y))
    for n, p in model.encoders.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
