"""The balancing math against values computed by hand from the formulas in docs/algorithms.md."""
import math

import pytest
import torch

import blendtune
from blendtune.functional import gradient_stds, modulate_gradients_, ogm_coefficients_from_scores, ogm_scores


def test_ogr_hand_computed():
    # held-out 2.0 -> 1.5 (dG = 0.5); gap (V - T) 2.0-1.8=0.2 -> 1.5-1.0=0.5 (dO = 0.3); OGR = 0.6
    r = blendtune.ogr(train_loss_start=1.8, heldout_loss_start=2.0, train_loss_end=1.0, heldout_loss_end=1.5)
    assert r.delta_g == pytest.approx(0.5)
    assert r.delta_o == pytest.approx(0.3)
    assert r.ogr == pytest.approx(0.6)


def test_ogr_is_absolute_and_handles_no_generalization():
    worse = blendtune.ogr(1.0, 1.0, 0.5, 1.2)  # held-out got worse: dG = -0.2, dO = 0.7 - 0 = 0.7
    assert worse.delta_g == pytest.approx(-0.2)
    assert worse.ogr == pytest.approx(3.5)
    assert blendtune.ogr(1.0, 1.0, 0.8, 1.0).ogr == math.inf  # dG == 0, dO == 0.2
    assert blendtune.ogr(1.0, 1.0, 1.0, 1.0).ogr == 0.0


def test_gblend_weights_proportional_to_dg_over_do_squared():
    w = blendtune.gblend_weights({"a": 0.5, "v": 0.2, "fused": 0.4}, {"a": 0.5, "v": 0.1, "fused": 0.2})
    raw = {"a": 0.5 / 0.25, "v": 0.2 / 0.01, "fused": 0.4 / 0.04}  # 2, 20, 10
    assert w == pytest.approx({k: v / 32 for k, v in raw.items()})
    assert sum(w.values()) == pytest.approx(1.0)


def test_gblend_weights_zero_for_heads_that_did_not_generalize():
    # dG <= 0 gives weight 0 (|dG| would reward a head whose held-out loss got worse)
    w = blendtune.gblend_weights({"a": -0.3, "v": 0.2, "fused": 0.0}, {"a": 0.1, "v": 0.1, "fused": 0.1})
    assert w == pytest.approx({"a": 0.0, "v": 1.0, "fused": 0.0})


def test_gblend_weights_floor_on_do_and_fallbacks():
    w = blendtune.gblend_weights({"a": 1.0, "v": 1.0}, {"a": 0.0, "v": 1.0}, eps=1e-4)
    assert w["a"] == pytest.approx(1e4 / (1e4 + 1))
    assert blendtune.gblend_weights({"a": -1.0, "v": 0.0}, {"a": 1.0, "v": 1.0}) == {"a": 0.5, "v": 0.5}
    prev = {"a": 0.9, "v": 0.1}
    assert blendtune.gblend_weights({"a": -1.0, "v": -2.0}, {"a": 1.0, "v": 1.0}, previous=prev) == prev


def test_ogm_coefficients_two_modalities_by_hand():
    # batch of 2: audio gives the target prob 0.9 and 0.7 (s_a = 1.6), visual 0.5 and 0.3 (s_v = 0.8)
    targets = torch.tensor([0, 1])
    logits_a = torch.log(torch.tensor([[0.9, 0.1], [0.3, 0.7]]))
    logits_v = torch.log(torch.tensor([[0.5, 0.5], [0.7, 0.3]]))
    coeff = blendtune.ogm_coefficients({"audio": logits_a, "visual": logits_v}, targets, alpha=0.8)
    rho_a = 1.6 / 0.8
    assert coeff["audio"] == pytest.approx(1 - math.tanh(0.8 * rho_a), rel=1e-5)
    assert coeff["visual"] == 1.0  # rho_v = 0.5 <= 1: the weaker modality is never slowed
    rho = blendtune.ogm_rho({"audio": logits_a, "visual": logits_v}, targets)
    assert rho["audio"] == pytest.approx(2.0, rel=1e-5) and rho["visual"] == pytest.approx(0.5, rel=1e-5)


def test_ogm_coefficient_is_one_when_rho_at_most_one():
    scores = torch.tensor([3.0, 3.0])  # rho = 1 exactly: no modulation
    rho, coeff = ogm_coefficients_from_scores(scores, alpha=1.0)
    assert rho.tolist() == [1.0, 1.0] and coeff.tolist() == [1.0, 1.0]


def test_ogm_k_modalities_one_vs_mean_of_others():
    scores = torch.tensor([4.0, 2.0, 1.0])
    rho, coeff = ogm_coefficients_from_scores(scores, alpha=0.5)
    assert rho.tolist() == pytest.approx([4 / 1.5, 2 / 2.5, 1 / 3.0])
    assert coeff.tolist() == pytest.approx([1 - math.tanh(0.5 * 4 / 1.5), 1.0, 1.0])


def test_ogm_scores_sum_target_probabilities():
    logits = {"a": torch.zeros(4, 5)}
    assert ogm_scores(logits, torch.tensor([0, 1, 2, 3])).item() == pytest.approx(4 * 0.2)


def test_ge_noise_std_relative_to_unmodulated_gradient():
    torch.manual_seed(0)
    g = torch.randn(200_000) * 3.0
    unmodulated_std = g.std().item()
    grads = [g.clone()]
    gen = torch.Generator().manual_seed(1)
    modulate_gradients_(grads, torch.tensor(0.25), noise_scale=0.5, generator=gen)
    noise = grads[0] - 0.25 * g
    # noise std = noise_scale * std(unmodulated g) = 1.5 (not 0.5 * std of the modulated gradient = 0.375)
    assert noise.std().item() == pytest.approx(0.5 * unmodulated_std, rel=0.02)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.02)


def test_ogm_without_noise_only_scales():
    grads = [torch.ones(3, 3), torch.full((2,), 2.0)]
    modulate_gradients_(grads, 0.5)
    assert torch.equal(grads[0], torch.full((3, 3), 0.5)) and torch.equal(grads[1], torch.ones(2))


def test_ge_noise_identical_for_identical_generator_seeds():
    a, b = [torch.ones(10, 10)], [torch.ones(10, 10)]
    a[0][0, 0] = b[0][0, 0] = 5.0
    modulate_gradients_(a, 0.3, 1.0, torch.Generator().manual_seed(42))
    modulate_gradients_(b, 0.3, 1.0, torch.Generator().manual_seed(42))
    assert torch.equal(a[0], b[0])


def test_gradient_stds_single_element_is_zero():
    assert gradient_stds([torch.tensor([3.0])])[0].item() == 0.0


def test_ge_noise_from_chunked_generators_is_deterministic_and_standard_normal():
    def draw():
        grads = [torch.ones(300, 300) * 2.0, torch.ones(7) * 2.0]
        grads[0][0, 0] = 0.0  # a nonzero std
        gens = [torch.Generator().manual_seed(10 + i) for i in range(4)]
        modulate_gradients_(grads, 1.0, 1.0, gens, workspace=torch.empty(300 * 300 + 7))
        return grads
    a, b = draw(), draw()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    std = torch.tensor([[2.0] * 300] * 300)
    std[0, 0] = 0.0
    noise = (a[0] - std) / std.std()
    assert abs(noise.mean().item()) < 0.01 and noise.std().item() == pytest.approx(1.0, rel=0.02)
