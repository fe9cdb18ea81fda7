"""UME and UMT (Du et al., ICML 2023): their math against hand-computed values, UMT's student step
through the real loop against a direct transcription of the paper's objective, the teacher -> student
switch, and what a user checks: UME's uni-modal models learn exactly as if each were trained alone."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, SharedTrunk
from blendtune.build import build_trainer
from blendtune.config import load_config
from blendtune.errors import UserError
from blendtune.functional import feature_distillation_losses, ume_or_umt, unimodal_ensemble_logits
from blendtune.models import FUSED

SMALL = ["train.epochs=2", "data.synthetic.num_train=96", "data.synthetic.num_test=32"]


def _trainer(strategy, extra=()):
    return build_trainer(load_config(None, TINY + [f"strategy={strategy}", *SMALL, *extra]))


def _step(trainer, batch, epoch=1):
    """The loop's own step on one batch."""
    trainer.train_steps(trainer.train_model, [batch], trainer.optimizer, trainer.scaler, trainer.strategy, epoch, True)


# ---- the math -----------------------------------------------------------------------------------
def test_ensemble_and_distillation_by_hand():
    a, b = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert unimodal_ensemble_logits([a, b], "logits").tolist() == [[1.0, 1.0], [0.5, 1.0]]
    # softmax [0.8808, 0.1192] and [0.1192, 0.8808] average to [0.5, 0.5]; [0.2689, 0.7311] and
    # [0.5, 0.5] to [0.3845, 0.6155]: log of the mean probabilities
    probs = unimodal_ensemble_logits([a, b], "probs")
    assert probs.flatten().tolist() == pytest.approx([-0.693147, -0.693147, -0.955888, -0.485273], abs=1e-5)
    with pytest.raises(ValueError, match="combine"):
        unimodal_ensemble_logits([a, b], "vote")
    # per modality: mean over batch and feature dims of (z - z_teacher)^2: (0 + 4 + 4 + 0) / 4 and 1 / 1
    student = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True), "b": torch.tensor([[0.5]])}
    teacher = {"a": torch.tensor([[1.0, 0.0], [1.0, 4.0]], requires_grad=True), "b": torch.tensor([[1.5]])}
    losses = feature_distillation_losses(student, teacher)
    assert losses.tolist() == [2.0, 1.0]
    losses.sum().backward()
    assert student["a"].grad.tolist() == [[0.0, 1.0], [1.0, 0.0]]  # 2 (z - t) / 4
    assert teacher["a"].grad is None  # the teacher is a fixed target
    # the paper's guide: UME when the uni-modal ensemble is at least as good as naive fusion
    assert ume_or_umt(0.71, 0.70) == "ume" and ume_or_umt(0.70, 0.70) == "ume" and ume_or_umt(0.69, 0.70) == "umt"


# ---- UME ----------------------------------------------------------------------------------------
def test_ume_trains_each_modality_exactly_as_alone_and_predicts_with_their_ensemble():
    # On the synthetic data the 'memorizable' modality is the weak one: under naive fusion its encoder
    # gets little of the fused gradient. Under UME each encoder + head learns from its own loss only, so
    # it must end bit for bit where training that modality alone (strategy=unimodal) ends.
    ume = _trainer("ume", ["train.epochs=1"])
    last = ume.fit()
    for m in ("clean", "memorizable"):
        alone = _trainer("unimodal", [f"unimodal.modality={m}", "train.epochs=1"])
        alone_last = alone.fit()
        mine = {n: p for n, p in ume.model.state_dict().items() if n.startswith((f"encoders.{m}.", f"heads.{m}."))}
        theirs = alone.model.state_dict()
        assert mine and all(torch.equal(p, theirs[n]) for n, p in mine.items()), m
        assert last[f"acc/test/{m}"] == alone_last[f"acc/test/{m}"]
    fusion = {n: p for n, p in ume.model.state_dict().items() if n.startswith("fusion.")}
    untouched = _trainer("ume").model.state_dict()
    assert all(torch.equal(p, untouched[n]) for n, p in fusion.items())  # the fusion is not part of UME
    inputs, _ = ume.feed.to_device(next(iter(ume.train_loader)))
    with torch.no_grad():
        out = ume.model.eval()(inputs)
    assert torch.allclose(out.logits[FUSED], (out.logits["clean"] + out.logits["memorizable"]) / 2)


def test_ume_refuses_a_backbone_shared_by_the_modalities():
    import blendtune

    data = SharedTrunk.data()
    for strategy in ("ume", "umt"):
        with pytest.raises(UserError, match=rf"strategy {strategy} trains one uni-modal model per modality.*trunk"):
            blendtune.fit(SharedTrunk(), data, data, strategy=strategy, epochs=2)


# ---- UMT ----------------------------------------------------------------------------------------
def _paper_umt_step(student, teacher_encoders, inputs, targets, distill_weight):
    """The paper's student objective, written out: CE of the fused head plus lambda times the summed
    per-modality MSE between the student's and the frozen teacher's encoder features; blendtune's
    probe heads (detached features) add their own CE, which reaches the heads only."""
    out = student(inputs)
    with torch.no_grad():
        target = teacher_encoders(inputs)
    loss = F.cross_entropy(out.logits[FUSED], targets)
    loss = loss + distill_weight * sum(F.mse_loss(out.features[m], target[m]) for m in student.modalities)
    loss = loss + sum(F.cross_entropy(student.heads[m](out.features[m].detach()), targets) for m in student.modalities)
    loss.backward()
    return {n: p.grad for n, p in student.named_parameters() if p.grad is not None}


def test_umt_switches_to_a_restarted_student_distilled_from_the_frozen_teachers():
    trainer = _trainer("umt", ["umt.teacher_epochs=1", "umt.distill_weight=2.0"])
    strategy, model = trainer.strategy, trainer.model
    initial = copy.deepcopy(model.state_dict())
    batches = iter(trainer.train_loader)
    # a checkpoint of the teacher phase carries the initial weights: a resumed run whose fresh model was
    # initialised differently (an unseeded model factory) still restarts the student from the original ones
    state = strategy.state_dict()
    strategy.initial = {k: v + 1 if v.is_floating_point() else v for k, v in strategy.initial.items()}
    strategy.load_state_dict(state)
    assert state["phase"] == "teacher" and all(torch.equal(strategy.initial[n], p) for n, p in initial.items())
    # teacher phase: uni-modal losses through the encoders; the fusion gets no gradient
    assert strategy.detach_unimodal_heads is False
    _step(trainer, next(batches))
    after = model.state_dict()
    assert all(torch.equal(after[n], initial[n]) for n in initial if n.startswith("fusion."))
    assert not torch.equal(after["heads.clean.weight"], initial["heads.clean.weight"])
    assert not torch.equal(after["encoders.memorizable.net.0.weight"], initial["encoders.memorizable.net.0.weight"])
    teachers = {n: p.clone() for n, p in model.encoders.state_dict().items()}
    assert trainer.optimizer.state  # SGD momentum from the teacher step
    # the switch: teachers frozen, the whole model back at its initial weights, optimizer state cleared
    strategy.on_epoch_start(2, trainer.context)
    assert all(torch.equal(p, initial[n]) for n, p in model.state_dict().items())
    assert not trainer.optimizer.state
    assert all(torch.equal(p, teachers[n]) for n, p in strategy.teacher.state_dict().items())
    assert not strategy.teacher.training and not any(p.requires_grad for p in strategy.teacher.parameters())
    assert strategy.detach_unimodal_heads is True
    # a student step is the paper's objective (checked on the gradients the optimizer receives)
    reference, teacher = copy.deepcopy(model), copy.deepcopy(strategy.teacher)
    batch = next(batches)
    inputs, targets = trainer.feed.to_device(batch)
    seen = {}
    step = trainer.optimizer.step

    def capture(*args, **kwargs):
        seen.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)
    trainer.optimizer.step = capture
    _step(trainer, batch, epoch=2)
    expected = _paper_umt_step(reference, teacher, inputs, targets, 2.0)
    assert seen.keys() == expected.keys()
    for name, want in expected.items():
        assert torch.allclose(seen[name], want, rtol=1e-5, atol=1e-7), name
    metrics = strategy.pop_epoch_metrics()
    assert set(metrics) == {"umt/distill/clean", "umt/distill/memorizable"} and metrics["umt/distill/clean"] > 0


def test_umt_teacher_phase_defaults_to_half_the_run_and_leaves_the_student_an_epoch():
    # (its student under bf16 and fp16: tests/test_strategies.py's precision matrix runs a teacher and a student epoch)
    trainer = _trainer("umt", ["train.epochs=4"])
    logged = []
    trainer.callbacks = [logged.append]
    trainer.fit()
    assert ["umt/distill/clean" in r for r in logged] == [False, False, True, True]
    with pytest.raises(UserError, match=r"config key 'umt.teacher_epochs': the teachers' 4 epochs leave no student "
                                        r"epoch in train.epochs=4: expected fewer than 4"):
        load_config(None, TINY + ["strategy=umt", "train.epochs=4", "umt.teacher_epochs=4"])
    with pytest.raises(UserError, match=r"config key 'umt.teacher_epochs': UMT trains teachers, then a student"):
        load_config(None, TINY + ["strategy=umt", "train.epochs=1"])
    with pytest.raises(UserError, match=r"config key 'train.compile': strategy UMT is not compiled: its teachers read"):
        _trainer("umt", ["train.compile=true"])