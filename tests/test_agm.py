"""AGM (Li et al., ICCV 2023): its math against hand-computed values (docs/strategies.md gives each formula
and the line of the authors' code it comes from), the loop's own step against a transcription of the
authors' module and step (lihong2303/AGM_ICCV2023 @ 5a65542), and what a user would check: the dominant
modality's gradient is scaled down."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import TINY, gradients_at_step
from blendtune.build import build_trainer
from blendtune.config import load_config
from blendtune.functional import (agm_coefficients, agm_ratios, agm_score_sums, clip_if_any_exceeds_, scale_gradient,
                                  shapley_outputs)
from blendtune.models import FUSED
from blendtune.strategies import build_strategy


def _trainer(extra=()):
    return build_trainer(load_config(None, TINY + ["strategy=agm", "train.epochs=1", *extra]))


# ---- the math by hand ---------------------------------------------------------------------------
def test_agm_shapley_outputs_by_hand_for_two_and_three_modalities():
    # k = 2 (bit 1: audio, bit 2: visual): the authors' 0.5 (total - pad_audio + pad_visual) = 0.5 (6 - 1 + 3)
    o = shapley_outputs({1: torch.tensor(3.0), 2: torch.tensor(1.0), 3: torch.tensor(6.0)}, 2)
    assert [x.item() for x in o] == pytest.approx([4.0, 2.0])
    # k = 3 (a = 1, v = 2, t = 4), the authors' Modality_Audio (URFunny_net.py 15-22):
    # (12 - v(vt) + v(a)) / 3 + (v(at) - v(v) + v(av) - v(t)) / 6 = (12 - 8 + 1)/3 + (7 - 2 + 5 - 4)/6 = 8/3
    v = {1: 1.0, 2: 2.0, 4: 4.0, 3: 5.0, 5: 7.0, 6: 8.0, 7: 12.0}
    o = shapley_outputs({s: torch.tensor(x) for s, x in v.items()}, 3)
    assert [x.item() for x in o] == pytest.approx([8 / 3, 11 / 3, 17 / 3])  # sums to v(avt) = 12 (efficiency)


def test_agm_scores_ratios_and_coefficients_by_hand():
    # -log softmax[y]: log(1 + e^-2) = 0.126928 and log 2; a probability below 1e-8 counts as 1e-8 (18.420681)
    sums = agm_score_sums([torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[-30.0, 0.0], [0.0, 0.0]])],
                          torch.tensor([0, 1]))
    assert sums.dtype == torch.float64
    assert sums.tolist() == pytest.approx([0.820075, 18.420681 + 0.693147], abs=1e-6)
    # two modalities: r_a = exp(s_v - s_a) = e, r_v = 1/e; running (1.0, 1.2): exp(0.2), exp(-0.2)
    s, run = torch.tensor([0.5, 1.5], dtype=torch.float64), torch.tensor([1.0, 1.2], dtype=torch.float64)
    assert agm_ratios(s).tolist() == pytest.approx([math.e, 1 / math.e])
    c = agm_coefficients(s, run, alpha=1.0)
    assert c.tolist() == pytest.approx([math.exp(math.exp(0.2) - math.e), math.exp(math.exp(-0.2) - 1 / math.e)])
    assert c.tolist() == pytest.approx([0.223828, 1.569648], abs=1e-6)  # the one ahead slows, the other speeds up
    # the cap (CREMA-D 10, UR-Funny 7) bounds the gap from above; alpha scales it
    assert agm_coefficients(s, run, alpha=2.0, gap_cap=0.3).tolist() == pytest.approx([0.223828 ** 2, math.exp(0.6)],
                                                                                       abs=1e-6)
    # three modalities (URFunny_main.py 117-126): exp((mean - s_m) * 3/2)
    assert agm_ratios(torch.tensor([1.0, 2.0, 3.0])).tolist() == pytest.approx([math.exp(1.5), 1.0, math.exp(-1.5)])


def test_scale_gradient_and_conditional_clip_by_hand():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = scale_gradient(x, torch.tensor(0.25, dtype=torch.float64))
    assert torch.equal(y, x.detach())
    (y * torch.tensor([3.0, 4.0])).sum().backward()
    assert x.grad.tolist() == [0.75, 1.0]
    # |0.5| <= 1: untouched; |3| > 1: the total norm (|(3, 4)| = 5) clipped to 1 as clip_grad_norm_
    g = [torch.tensor([3.0]), torch.tensor([4.0])]
    clip_if_any_exceeds_(g, [torch.tensor([[0.5]])], 1.0)
    assert [t.item() for t in g] == [3.0, 4.0]
    clip_if_any_exceeds_(g, [torch.tensor([[-3.0]])], 1.0)
    assert [t.item() for t in g] == pytest.approx([0.6, 0.8], abs=1e-6)


# ---- what a user would check --------------------------------------------------------------------
def test_agm_scales_each_encoders_gradient_by_its_coefficient_and_slows_the_dominant_one():
    # With concat fusion, o_m = W_m z_m + b / k: modality m's encoder and W_m get exactly c_m times the
    # naive fused-loss gradient. After a naive epoch on data where 'clean' dominates, clean is ahead
    # of its running mean (which starts the run at 0 for both): c_clean < 1 < c_memorizable.
    trainer = _trainer(["data.synthetic.modalities.clean.signal=2.0", "agm.clip_threshold=null"])
    s, model = trainer.strategy, trainer.model
    plain_fusion = build_strategy("naive")
    plain_fusion.setup(model, 0, 1)
    trainer.train_steps(trainer.train_model, trainer.train_loader, trainer.optimizer, trainer.scaler, plain_fusion, 1,
                        False)
    inputs, targets = trainer.feed.to_device(next(iter(trainer.train_loader)))
    out = model(inputs, detach_unimodal_heads=True)
    params = {n: p for n, p in model.named_parameters() if not n.startswith("heads.")}
    got = dict(zip(params, torch.autograd.grad(s.loss(out, targets, epoch=1), list(params.values()), retain_graph=True)))
    naive = dict(zip(params, torch.autograd.grad(F.cross_entropy(out.logits[FUSED], targets), list(params.values()),
                                                retain_graph=True)))
    coeff = dict(zip(model.modalities, s.coefficients.tolist()))  # this step's c_m
    assert coeff["clean"] < 1.0 < coeff["memorizable"]
    start = 0
    for m in model.modalities:
        for n in params:
            if n.startswith(f"encoders.{m}."):
                assert torch.allclose(got[n], coeff[m] * naive[n], rtol=1e-4, atol=1e-7), n
        d = model.fusion.dims[m]
        block = slice(start, start + d)
        assert torch.allclose(got["fusion.fc.weight"][:, block], coeff[m] * naive["fusion.fc.weight"][:, block],
                              rtol=1e-4, atol=1e-7)
        start += d
    assert torch.allclose(got["fusion.fc.bias"], sum(coeff.values()) / 2 * naive["fusion.fc.bias"], rtol=1e-4, atol=1e-7)
    # the loss value is the fused head's cross-entropy; outside the modulation window c_m = 1: the naive gradient
    s.options.modulation_end = 1
    s.running = s.running.new_tensor([3.0, 1.0])  # inside the window this would give c far from 1
    loss = s.loss(out, targets, epoch=2)
    assert loss.item() == pytest.approx(F.cross_entropy(out.logits[FUSED], targets).item(), rel=1e-6)
    assert s.coefficients.tolist() == [1.0, 1.0]
    plain = torch.autograd.grad(loss, list(params.values()))
    assert all(torch.allclose(g, naive[n], rtol=1e-4, atol=1e-7) for n, g in zip(params, plain))


# ---- the loop's step against the authors' ---------------------------------------------------------
# Transcribed from lihong2303/AGM_ICCV2023 @ 5a65542: model/CREMAD_net.py 7-72 (Modality_*, GradMod) and
# run/CREMAD_main.py 127-166, 233-243 (the step). The one change is in `_AuthorsNet`, their AVClassifier
# (CREMAD_net.py 75-122) around blendtune's encoders and concat fusion: a padded modality's *features* are
# zeroed (blendtune's missing modality) where the authors zero its input (docs/strategies.md, AGM).
class Modality_Visual(nn.Module):
    def forward(self, total_out, pad_visual_out, pad_audio_out):
        return 0.5 * (total_out - pad_visual_out + pad_audio_out)


class Modality_Audio(nn.Module):
    def forward(self, total_out, pad_visual_out, pad_audio_out):
        return 0.5 * (total_out - pad_audio_out + pad_visual_out)


class Modality_out(nn.Module):
    def forward(self, x):
        return x


class GradMod(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.mode = "train"
        self.net = net
        self.m_v = Modality_Visual()
        self.m_a = Modality_Audio()
        self.m_v_o = Modality_out()
        self.m_a_o = Modality_out()
        self.scale_a = 1.0
        self.scale_v = 1.0
        self.m_a_o.register_full_backward_hook(self.hooka)
        self.m_v_o.register_full_backward_hook(self.hookv)

    def hooka(self, m, ginp, gout):
        gnew = ginp[0].clone()
        return gnew * self.scale_a,

    def hookv(self, m, ginp, gout):
        gnew = ginp[0].clone()
        return gnew * self.scale_v,

    def update_scale(self, coeff_a, coeff_v):
        self.scale_a = coeff_a
        self.scale_v = coeff_v

    def forward(self, audio, visual):
        self.net.mode = "feature"
        total_out, encoded_feature = self.net(audio, visual, pad_audio=False, pad_visual=False)
        self.net.mode = "classify"
        self.net.eval()
        pad_visual_out = self.net(audio, visual, pad_audio=False, pad_visual=True)
        pad_audio_out = self.net(audio, visual, pad_audio=True, pad_visual=False)
        zero_padding_out = self.net(audio, visual, pad_audio=True, pad_visual=True)
        if self.mode == "train":
            self.net.train()
        m_a = self.m_a_o(self.m_a(total_out, pad_visual_out, pad_audio_out))
        m_v = self.m_v_o(self.m_v(total_out, pad_visual_out, pad_audio_out))
        return total_out, pad_visual_out, pad_audio_out, zero_padding_out, m_a + m_v


class _AuthorsNet(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.mode = "classify"
        self.model = model  # audio = 'clean', visual = 'memorizable'

    def forward(self, audio, visual, pad_audio=False, pad_visual=False):
        f = self.model.encoders({"clean": audio, "memorizable": visual})
        a, v = f["clean"], f["memorizable"]
        if pad_audio:
            a = torch.zeros_like(a)
        if pad_visual:
            v = torch.zeros_like(v)
        out = self.model.fusion({"clean": a, "memorizable": v})
        return (out, torch.cat([a, v], 1)) if self.mode == "feature" else out


def _authors_step(model, spec, image, label, train_score_a, train_score_v, iteration, alpha, clip):
    """run/CREMAD_main.py 127-166 and 233-243 (AGM, late fusion); `clip` is their 1 (UR-Funny: 5)."""
    softmax = nn.Softmax(dim=1)
    criterion = nn.CrossEntropyLoss()
    total_out, pad_visual_out, pad_audio_out, zero_padding_out, out = model(spec, image)
    out_a = 0.5 * (total_out - pad_audio_out + pad_visual_out)
    out_v = 0.5 * (total_out - pad_visual_out + pad_audio_out)
    loss = criterion(out, label)
    model.zero_grad()
    score_audio = 0.
    score_visual = 0.
    for k in range(out_a.size(0)):
        if torch.isinf(torch.log(softmax(out_a)[k][label[k]])) or softmax(out_a)[k][label[k]] < 1e-8:
            score_audio += - torch.log(torch.tensor(1e-8, dtype=out_a.dtype, device=out_a.device))
        else:
            score_audio += - torch.log(softmax(out_a)[k][label[k]])
        if torch.isinf(torch.log(softmax(out_v)[k][label[k]])) or softmax(out_v)[k][label[k]] < 1e-8:
            score_visual += - torch.log(torch.tensor(1e-8, dtype=out_v.dtype, device=out_v.device))
        else:
            score_visual += - torch.log(softmax(out_v)[k][label[k]])
    score_audio = score_audio / out_a.size(0)
    score_visual = score_visual / out_v.size(0)
    ratio_a = math.exp(score_visual.item() - score_audio.item())
    ratio_v = math.exp(score_audio.item() - score_visual.item())
    optimal_ratio_a = math.exp(train_score_v - train_score_a)
    optimal_ratio_v = math.exp(train_score_a - train_score_v)
    coeff_a = math.exp(alpha * (min(optimal_ratio_a - ratio_a, 10)))
    coeff_v = math.exp(alpha * (min(optimal_ratio_v - ratio_v, 10)))
    train_score_a = train_score_a * (iteration - 1) / iteration + score_audio.item() / iteration
    train_score_v = train_score_v * (iteration - 1) / iteration + score_visual.item() / iteration
    model.update_scale(coeff_a, coeff_v)
    loss.backward()
    grad_max = torch.max(model.net.model.fusion.fc.weight.grad)
    grad_min = torch.min(model.net.model.fusion.fc.weight.grad)
    clipped = bool(grad_max > clip or grad_min < -clip)
    if clipped:
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip)
    grads = {n: p.grad.clone() for n, p in model.net.model.named_parameters() if p.grad is not None}
    return grads, (coeff_a, coeff_v), train_score_a, train_score_v, clipped


def test_agm_loop_steps_equal_the_authors_steps():
    # Two steps from a run 10 steps in (running scores 2.0 and 1.5: c_m far from 1), the first under the
    # authors' clip threshold 1 (not reached), the second under 0.05 (reached): the gradients the optimizer
    # receives, the coefficients and the running scores match the authors' step on the same weights.
    trainer = _trainer(["agm.alpha=2.0", "data.synthetic.modalities.clean.signal=2.0"])
    s = trainer.strategy
    score_a, score_v = 2.0, 1.5
    s.running = torch.tensor([score_a, score_v], dtype=torch.float64)
    s.iterations = 10
    batches = iter(trainer.train_loader)
    clipped = []
    for iteration, clip in ((11, 1.0), (12, 0.05)):
        s.options.clip_threshold = clip
        batch = next(batches)
        inputs, targets = trainer.feed.to_device(batch)
        reference = GradMod(_AuthorsNet(copy.deepcopy(trainer.model)))
        want, coeff, score_a, score_v, was_clipped = _authors_step(
            reference, inputs["clean"], inputs["memorizable"], targets, score_a, score_v, iteration, 2.0, clip)
        clipped.append(was_clipped)
        seen = gradients_at_step(trainer, batch)
        assert s.coefficients.tolist() == pytest.approx(list(coeff), rel=1e-5)
        assert s.running.tolist() == pytest.approx([score_a, score_v], rel=1e-6)
        assert coeff[0] < 0.7 and coeff[1] > 2.0
        names = [n for n in want if not n.startswith("heads.")]  # blendtune's probes: not in the authors' model
        assert names and set(names) == {n for n in seen if not n.startswith("heads.")}
        for n in names:
            assert torch.allclose(seen[n], want[n], rtol=1e-4, atol=1e-6), (iteration, n)
    assert clipped == [False, True]  # both branches of their clip rule
