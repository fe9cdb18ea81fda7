"""MMPareto, PMR and MLA: their math against hand-computed values (docs/strategies.md gives each formula
and the line of the authors' code it comes from), and their steps through the real training loop against
direct re-implementations of the authors' code."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY, SharedTrunk, gradients_at_step
from blendtune.config import load_config
from blendtune.errors import UserError
from blendtune.functional import (class_means, class_quotas, entropy_fusion_weights, mean_entropy, mmpareto_gradients,
                                  owm_projector_update, pareto_weight, pmr_coefficients, prototype_logits)
from blendtune.models import FUSED
from blendtune.build import build_trainer


def _trainer(strategy, extra=()):
    return build_trainer(load_config(None, TINY + [f"strategy={strategy}", "train.epochs=1", *extra]))


# ---- MMPareto -----------------------------------------------------------------------------------
@pytest.mark.parametrize("g_fused,g_uni,cos,w_fused,expected", [
    # conflict: min-norm weight (|g_u|^2 - g_m.g_u) / |g_m - g_u|^2 = (2 + 1) / 5; h = 2(0.6 g_m + 0.4 g_u)
    # = [0.4, 0.8], |g_m + g_u| / |h| = 1 / 0.894 > 1 -> 1.5 * 1.118 * h
    ([1.0, 0.0], [-1.0, 1.0], -0.707107, 0.6, [0.670820, 1.341641]),
    # agreement: 1/2 each, h = g_m + g_u, never rescaled: 1.5 (g_m + g_u)
    ([1.0, 1.0], [1.0, 0.0], 0.707107, 0.5, [3.0, 1.5]),
    # orthogonal (cos = 0) counts as a conflict in the authors' code (`if cos > 0`)
    ([1.0, 0.0], [0.0, 2.0], 0.0, 0.8, [3.0, 1.5]),
])
def test_mmpareto_weights_and_magnitude_by_hand(g_fused, g_uni, cos, w_fused, expected):
    grads, c, w = mmpareto_gradients([torch.tensor(g_fused)], [torch.tensor(g_uni)], multiplier=1.5)
    assert c.item() == pytest.approx(cos, abs=1e-6)
    assert w.item() == pytest.approx(w_fused, abs=1e-6)
    assert grads[0].tolist() == pytest.approx(expected, abs=1e-5)


def test_mmpareto_weight_is_per_encoder_and_rescale_per_tensor():
    # Two tensors: concatenated cos = -0.7715, w = 31/49. Tensor 1 is rescaled (|g_m + g_u| / |h| = 1.85),
    # tensor 2 is not (0.56 < 1): 1.5 h only. (Numbers from the authors' rule, MMPareto.py 149-207.)
    grads, c, w = mmpareto_gradients([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])],
                                     [torch.tensor([-2.0, 1.0]), torch.tensor([0.0, -0.5])])
    assert c.item() == pytest.approx(-0.771517, abs=1e-6) and w.item() == pytest.approx(31 / 49, abs=1e-6)
    assert grads[0].tolist() == pytest.approx([-0.567758, 2.043930], abs=1e-5)
    assert grads[1].tolist() == pytest.approx([0.0, 1.346939], abs=1e-5)
    # the min-norm point has equal inner products with both gradients (first-order: neither loss worsens)
    a, b = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([-2.0, 1.0, 0.0, -0.5])
    _, w = pareto_weight(a, b)
    d = w * a + (1 - w) * b
    assert d.dot(a).item() == pytest.approx(d.dot(b).item(), abs=1e-6) and d.dot(a) > 0


def _authors_mmpareto(model, out_fn, targets, multiplier=1.5):
    """The authors' step (code/MMPareto.py 99-207): one backward per loss with retain_graph, grads
    cloned per encoder, then 0.5/0.5 or MinNormSolver, the per-tensor magnitude rule, heads plain."""
    out = out_fn(model)
    losses = {h: F.cross_entropy(lg, targets) for h, lg in out.logits.items()}
    grads = {}
    for name in losses:
        model.zero_grad(set_to_none=True)
        losses[name].backward(retain_graph=True)
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    result = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for m in model.modalities:
        names = [n for n, _ in model.named_parameters() if n.startswith(f"encoders.{m}.")]
        g_mm = torch.cat([grads[FUSED][n].flatten() for n in names])
        g_u = torch.cat([grads[m][n].flatten() for n in names])
        if F.cosine_similarity(g_mm, g_u, dim=0) > 0:
            k = 0.5
        else:
            v1v1, v1v2, v2v2 = g_mm.dot(g_mm), g_mm.dot(g_u), g_u.dot(g_u)
            k = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
        for n in names:
            new_grad = 2 * k * grads[FUSED][n] + 2 * (1 - k) * grads[m][n]
            diff = torch.norm(result[n]) / torch.norm(new_grad)
            result[n] = diff * new_grad * multiplier if diff > 1 else new_grad * multiplier
    return result


def _step(trainer, batch):
    """The loop's own step (every turn) on one batch."""
    trainer.train_steps(trainer.train_model, [batch], trainer.optimizer, trainer.scaler, trainer.strategy, 1, True)


def _overflowing_next_step(trainer):
    """A loss scale under which the next step's fp16 gradients overflow to inf/NaN, as a GradScaler whose
    scale grew too far: the scaler skips the optimizer step (and halves the scale)."""
    trainer.scaler.update(new_scale=2.0 ** 100)


@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_mmpareto_step_equals_the_authors_four_backward_passes(fusion):
    trainer = _trainer("mmpareto", [f"model.fusion={fusion}", "data.synthetic.modalities.memorizable.signal=0.0"])
    reference = copy.deepcopy(trainer.model)
    batch = next(iter(trainer.train_loader))
    inputs, targets = trainer.feed.to_device(batch)
    seen = gradients_at_step(trainer, batch)
    expected = _authors_mmpareto(reference, lambda model: model(inputs), targets)
    assert seen.keys() == expected.keys()
    for name, want in expected.items():
        assert torch.allclose(seen[name], want, rtol=1e-4, atol=1e-7), name
    metrics = trainer.strategy.pop_epoch_metrics()
    assert set(metrics) >= {"mmpareto/cos/clean", "mmpareto/conflict/memorizable", "mmpareto/weight_fused/clean"}


def test_mmpareto_under_fp16_sees_the_same_gradients_as_fp32():
    # Its combination runs on loss-scaled gradients (it is homogeneous of degree 1) before the loop
    # unscales: the gradients must match an fp32 step (up to fp16 rounding of the forward).
    batch = None
    grads = {}
    for amp in ("fp32", "fp16"):
        trainer = _trainer("mmpareto", [f"train.amp={amp}"])
        assert trainer.scaler.is_enabled() == (amp == "fp16")
        batch = batch or next(iter(trainer.train_loader))
        grads[amp] = gradients_at_step(trainer, batch)
    for name, want in grads["fp32"].items():
        assert (grads["fp16"][name] - want).norm() <= 0.05 * want.norm() + 1e-6, name  # unscaled: 65536x


def test_mmpareto_leaves_a_step_the_scaler_skips_out_of_the_epoch_statistics():
    # Its cos and w are NaN on inf/NaN gradients: summed in, they made the epoch's metrics NaN (and
    # `cos <= 0` counted the step as no conflict). Two steps, the second skipped, report the first alone.
    batch, metrics = None, {}
    for skipped in (False, True):
        trainer = _trainer("mmpareto", ["train.amp=fp16"])
        batch = batch or next(iter(trainer.train_loader))
        _step(trainer, batch)
        if skipped:
            _overflowing_next_step(trainer)
            params = [p.detach().clone() for p in trainer.model.parameters()]
            _step(trainer, batch)
            assert trainer.scaler.get_scale() == 2.0 ** 99  # the scaler skipped it: nothing moved
            assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), params))
        metrics[skipped] = trainer.strategy.pop_epoch_metrics()
    assert all(math.isfinite(v) for v in metrics[True].values()), metrics[True]
    assert metrics[True] == metrics[False]


# ---- PMR ----------------------------------------------------------------------------------------
def test_pmr_prototypes_distances_and_losses_by_hand():
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    labels = torch.tensor([0, 0, 1, 1])
    sums = torch.zeros(2, 2).index_add_(0, labels, features)
    protos = class_means(sums, torch.tensor([2.0, 2.0]))
    assert protos.tolist() == [[2.0, 0.0], [0.0, 3.0]]
    z, y = torch.tensor([[1.0, 1.0], [0.0, 2.0]]), torch.tensor([0, 1])
    logits = prototype_logits(z, protos)  # -Euclidean distance: [[-sqrt 2, -sqrt 5], [-sqrt 8, -1]]
    assert torch.allclose(logits, torch.tensor([[-1.414214, -2.236068], [-2.828427, -1.0]]), atol=1e-6)
    assert F.cross_entropy(logits, y).item() == pytest.approx(0.256685, abs=1e-6)  # squared: 0.024749
    assert mean_entropy(logits).item() == pytest.approx(0.508721, abs=1e-6)
    # an empty class keeps its previous prototype (the authors' code would divide by 0)
    kept = class_means(torch.tensor([[4.0, 0.0], [0.0, 0.0]]), torch.tensor([2.0, 0.0]), previous=protos)
    assert kept.tolist() == [[2.0, 0.0], [0.0, 3.0]]


@pytest.mark.parametrize("s0,s1,paper,code", [
    ([0.7, 0.5], [0.6, 0.4], [0.0, 0.2], [0.0, 1.0]),                       # rho = 1.2: modality 1 behind
    ([0.4, 0.4], [0.5, 0.5], [0.25, 0.0], [1.0, 0.0]),                      # rho = 0.8: 1/rho - 1 = 0.25
    ([0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.3, 0.2], [0.0, 1.0], [0.0, 1.0]),   # rho = 2.14: clipped to 1
    ([0.5, 0.5], [0.4, 0.6], [0.0, 0.0], [0.0, 0.0]),                       # a tie: neither
])
def test_pmr_coefficients_by_hand(s0, s1, paper, code):
    scores = torch.tensor([sum(s0), sum(s1)])
    assert pmr_coefficients(scores, "paper").tolist() == pytest.approx(paper, abs=1e-6)
    assert pmr_coefficients(scores, "code").tolist() == code


def test_pmr_prototypes_are_class_means_of_its_training_subset():
    trainer = _trainer("pmr")
    strategy = trainer.strategy
    strategy.on_epoch_start(1, trainer.context)
    subset = trainer.splits.train.subset(strategy._subset(trainer.context.train_targets))
    model = trainer.model.eval()
    with torch.no_grad():
        feats = model.encoders(subset.inputs)
    for m, f in feats.items():
        for c in range(trainer.splits.num_classes):
            members = f[subset.targets == c]
            if len(members):
                assert torch.allclose(strategy.prototypes[m][c], members.mean(0), atol=1e-5), (m, c)


def _prototypes_by_epoch(trainer):
    """Train; at each epoch start: the subset PMR read, its prototypes, and each class's mean feature over
    that subset from the model as it is then (by hand; NaN for a class with no sample in the subset)."""
    seen = []
    features, start = trainer.context.features, trainer.strategy.on_epoch_start

    def read(model, indices):
        seen.append({"indices": np.asarray(indices)})
        return features(model, indices)

    def on_epoch_start(epoch, context):
        start(epoch, context)
        subset = trainer.splits.train.subset(seen[-1]["indices"])
        model, was_training = trainer.model, trainer.model.training
        with torch.no_grad():
            feats = model.eval().encoders(subset.inputs)
        model.train(was_training)
        seen[-1]["prototypes"] = {m: p.clone() for m, p in trainer.strategy.prototypes.items()}
        seen[-1]["means"] = {m: torch.stack([f[subset.targets == c].mean(0) for c in range(trainer.splits.num_classes)])
                             for m, f in feats.items()}
    trainer.context.features, trainer.strategy.on_epoch_start = read, on_epoch_start
    trainer.fit()
    return seen


def test_pmr_subset_holds_every_class_so_every_prototype_is_its_own_and_moves():
    # The shipped example: 399 training samples of 10 classes, a 40-sample subset. Drawn at random it left
    # class 9 out, whose prototype then stayed the untrained model's all-sample mean for the whole run.
    overrides = ["train.epochs=2", "train.progress=false", "wandb=false"]
    trainer = build_trainer(load_config(REPO / "experiments" / "synthetic_pmr.yaml", overrides))
    first, second = _prototypes_by_epoch(trainer)
    labels = trainer.splits.train.targets[first["indices"]]
    assert torch.bincount(labels, minlength=10).tolist() == [4] * 10  # stratified: 40 / 10 classes
    for m in trainer.model.modalities:
        for epoch in (first, second):  # every class's prototype is the mean of its own samples
            assert torch.allclose(epoch["prototypes"][m], epoch["means"][m], atol=1e-5), m
        moved = (second["prototypes"][m] - first["prototypes"][m]).norm(dim=1)
        assert (moved > 1e-3).all(), (m, moved.tolist())


def test_pmr_subset_is_even_across_classes_and_grows_to_one_per_class():
    assert class_quotas([50] * 10, 40) == [4] * 10
    assert class_quotas([1, 100, 100], 10) == [1, 5, 4]  # a small class gives what it has
    assert class_quotas([0, 3, 5], 3) == [0, 2, 1]       # a class the training set lacks takes nothing
    assert class_quotas([2, 2], 10) == [2, 2]
    trainer = _trainer("pmr", ["pmr.prototype_fraction=0.01"])  # 0.01 x 160 samples: 2 < 10 classes
    subset = trainer.strategy._subset(trainer.context.train_targets)
    assert torch.bincount(trainer.splits.train.targets[subset]).tolist() == [1] * 10


def test_pmr_prototype_ema_starts_at_epoch_3_as_the_authors():
    # The authors' calculate_prototype skips the EMA for epoch <= 0 and is called with epoch 0 before
    # training and after the first epoch (main_Prototype_grad.py 435-440, 532-557): the prototypes are plain
    # class means at epochs 1 and 2, then c <- 0.2 c_old + 0.8 c_new. (The whole training set as subset.)
    trainer = _trainer("pmr", ["train.epochs=3", "pmr.momentum=0.2", "pmr.prototype_fraction=1.0"])
    seen = _prototypes_by_epoch(trainer)
    raw = [epoch["means"] for epoch in seen]  # class means of the model at the start of epochs 1, 2, 3
    for m in trainer.model.modalities:
        expected = [raw[0][m], raw[1][m], 0.2 * raw[1][m] + 0.8 * raw[2][m]]
        for epoch, (got, want) in enumerate(zip(seen, expected), start=1):
            assert torch.allclose(got["prototypes"][m], want, atol=1e-5), (m, epoch)
        blended_from_epoch_2 = 0.2 * (0.2 * raw[0][m] + 0.8 * raw[1][m]) + 0.8 * raw[2][m]
        assert not torch.allclose(seen[2]["prototypes"][m], blended_from_epoch_2, atol=1e-4)


def test_pmr_loss_adds_the_prototype_loss_of_the_modality_behind_only():
    trainer = _trainer("pmr", ["pmr.alpha=2.0", "pmr.rule=paper", "pmr.mu=0.01", "pmr.entropy_epochs=1"])
    s = trainer.strategy
    s.on_epoch_start(1, trainer.context)
    inputs, targets = trainer.feed.to_device(next(iter(trainer.train_loader)))
    out = trainer.model(inputs, detach_unimodal_heads=True)
    logits = {m: -torch.cdist(out.features[m], s.prototypes[m]) for m in ("clean", "memorizable")}
    score = {m: lg.softmax(1).gather(1, targets[:, None]).sum() for m, lg in logits.items()}
    rho = score["clean"] / score["memorizable"]
    beta = {"clean": (1 / rho - 1).clamp(0, 1) if rho < 1 else 0.0,                # Eq. 11
            "memorizable": (rho - 1).clamp(0, 1) if rho >= 1 else 0.0}
    assert (beta["clean"] > 0) != (beta["memorizable"] > 0)  # exactly one is behind here
    entropy = {m: -(lg.log_softmax(1).exp() * lg.log_softmax(1)).sum(1).mean() for m, lg in logits.items()}
    expected = (F.cross_entropy(out.logits[FUSED], targets)
                + 2.0 * sum(beta[m] * F.cross_entropy(logits[m], targets) for m in logits)
                - 0.01 * (beta["memorizable"] * entropy["clean"] + beta["clean"] * entropy["memorizable"]))
    assert s.loss(out, targets, epoch=1).detach().item() == pytest.approx(float(expected), rel=1e-5)
    # outside the entropy window the PER term is gone; outside the modulation window only CE is left
    s.options.modulation_end = 0
    assert s.loss(out, targets, epoch=2).detach().item() == pytest.approx(F.cross_entropy(out.logits[FUSED], targets).item())


# ---- MLA ----------------------------------------------------------------------------------------
def test_mla_projector_update_by_hand():
    # r = mean([0,2,1], [2,2,3]) = [1,2,2], alpha = 0.1: P = I - r^T r / (0.1 + 9), then / |P|_F
    p = owm_projector_update(torch.eye(3), torch.tensor([1.0, 2.0, 2.0]), alpha=0.1)
    assert p.diagonal().tolist() == pytest.approx([0.629384, 0.396279, 0.396279], abs=1e-5)
    assert p[0, 1].item() == pytest.approx(-0.155403, abs=1e-5) and p[1, 2].item() == pytest.approx(-0.310807, abs=1e-5)
    grad = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]])
    assert torch.allclose(grad @ p.T, torch.tensor([[0.473980, -0.466210, 0.240875], [0.0, 0.707085, -0.707085]]),
                          atol=1e-5)


def test_mla_entropy_fusion_weights_by_hand():
    w = entropy_fusion_weights([torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
                                torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 1.0]])])
    assert w[:, 0].tolist() == pytest.approx([0.587050, 0.389108], abs=1e-5)  # per sample: the surer modality
    assert w.sum(1).tolist() == pytest.approx([1.0, 1.0])


def test_mla_steps_once_per_modality_through_the_shared_head_and_projects_its_gradient():
    trainer = _trainer("mla")
    assert type(trainer.model.fusion).__name__ == "SharedHeadFusion"  # built for it (strategy.fusion)
    head = trainer.model.fusion.fc
    raw, stepped, projectors = [], [], []
    head.weight.register_hook(lambda g: raw.append(g.clone()))
    step = trainer.optimizer.step

    def capture(*args, **kwargs):
        stepped.append(head.weight.grad.clone())
        projectors.append(trainer.strategy.projector.clone())
        return step(*args, **kwargs)
    trainer.optimizer.step = capture
    trainer.fit()
    batches = len(trainer.train_loader)
    assert len(stepped) == 2 * batches  # one optimizer step per modality per batch
    assert torch.equal(stepped[0], raw[0])  # the run's first turn learns freely
    for g, r, p in zip(stepped[1:], raw[1:], projectors[1:]):
        assert torch.allclose(g, r @ p.T, atol=1e-6)
    assert not torch.allclose(stepped[1], raw[1], atol=1e-4)


def test_mla_projector_learns_nothing_from_steps_the_scaler_skips():
    # P is updated between turns from the features alone; under fp16 a turn whose gradients overflow is
    # skipped by the grad scaler (parameters unchanged), so P must stay as it was too, bit for bit.
    trainer = _trainer("mla", ["train.amp=fp16"])
    batches = iter(trainer.train_loader)
    _step(trainer, next(batches))  # past the run's free first turn: the next turns would update P
    projector = trainer.strategy.projector.clone()
    params = [p.detach().clone() for p in trainer.model.parameters()]
    _overflowing_next_step(trainer)
    _step(trainer, next(batches))
    assert trainer.scaler.get_scale() == 2.0 ** 98  # both turns skipped
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), params))
    assert torch.equal(trainer.strategy.projector, projector)
    trainer.scaler.update(new_scale=2.0 ** 16)
    _step(trainer, next(batches))  # steps that run update P again
    assert not torch.equal(trainer.strategy.projector, projector)


def test_mla_later_turns_see_the_head_after_the_earlier_step():
    trainer = _trainer("mla")
    inputs, targets = trainer.feed.to_device(next(iter(trainer.train_loader)))
    out = trainer.model(inputs, detach_unimodal_heads=True)
    turns = trainer.strategy.step_losses(out, targets, 1)
    first = next(turns)
    head = trainer.model.fusion.fc
    assert first.item() == pytest.approx(F.cross_entropy(head(out.features["clean"]), targets).item())
    with torch.no_grad():
        head.weight.mul_(0.5)  # as if the first step had changed the head
    second = next(turns)
    assert second.item() == pytest.approx(F.cross_entropy(head(out.features["memorizable"]), targets).item())
    assert next(turns, None) is None


def test_mla_predicts_with_per_sample_entropy_weights():
    trainer = _trainer("mla")
    trainer.fit()
    inputs, _ = trainer.feed.to_device(next(iter(trainer.train_loader)))
    model = trainer.model.eval()
    with torch.no_grad():
        out = model(inputs)
        per_modality = [model.fusion.fc(out.features[m]) for m in model.modalities]
    w = entropy_fusion_weights(per_modality)
    assert torch.allclose(out.logits[FUSED], w[:, :1] * per_modality[0] + w[:, 1:] * per_modality[1], atol=1e-6)
    assert w.std(0).max() > 1e-3  # weights differ between samples


def test_mla_refuses_another_fusion_in_one_line():
    with pytest.raises(UserError, match=r"config key 'model.fusion': strategy mla .* 'shared'.*got 'sum'"):
        _trainer("mla", ["model.fusion=sum"])
    with pytest.raises(UserError, match=r"model.fusion.*feature sizes must be equal"):
        _trainer("naive", ["model.fusion=shared", "model.encoders.clean.dim=16"])


def test_mmpareto_keeps_the_other_gradient_when_one_is_zero():
    # cos = 0 takes the min-norm branch, where the authors' solver clamps w to 0.999 / 0.001
    # (min_norm_solvers.py 17-24): the encoder keeps 1.5 x the non-zero gradient, not 0.
    g = torch.tensor([1.0, 2.0])
    for fused, uni, w in ((g, torch.zeros(2), 0.001), (torch.zeros(2), g, 0.999)):
        grads, _, weight = mmpareto_gradients([fused], [uni])
        assert weight.item() == pytest.approx(w) and grads[0].tolist() == pytest.approx([1.5, 3.0], rel=1e-5)


def test_mmpareto_commutes_with_the_loss_scale():
    # The loop combines fp16's loss-scaled gradients and unscales after: exact for a power-of-two scale.
    gen = torch.Generator().manual_seed(0)
    fused = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    uni = [-f + 0.3 * torch.randn(f.shape, generator=gen) for f in fused]  # conflicting
    plain, cos, _ = mmpareto_gradients(fused, uni)
    scaled, _, _ = mmpareto_gradients([2.0 ** 16 * g for g in fused], [2.0 ** 16 * g for g in uni])
    assert cos < 0
    for p, s in zip(plain, scaled):
        assert torch.equal(s / 2.0 ** 16, p)


def test_mla_refuses_compile_and_backbones_that_share_parameters():
    with pytest.raises(UserError, match=r"config key 'train.compile': strategy MLA"):
        _trainer("mla", ["train.compile=true"])
    import blendtune

    data = SharedTrunk.data()
    with pytest.raises(UserError, match=r"strategy mla needs a separate encoder per modality.*trunk.weight"):
        blendtune.fit(SharedTrunk(), data, data, strategy="mla", epochs=1)
