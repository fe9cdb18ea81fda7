"""Every encoder and fusion builds, runs forward and backward, and the OGM views match the fused head."""
import pytest
import torch

from blendtune.models import ENCODERS, FUSIONS, FUSED, LateFusionClassifier, build_encoder, build_fusion

SHAPES = {"spec_cnn": [(1, 20, 30), (3, 2, 16, 16)], "resnet18": [(1, 32, 32), (2, 3, 32, 32)],
          "mlp": [(12,), (5, 12)]}


@pytest.mark.parametrize("name", ENCODERS.names())
def test_encoder_outputs_features(name):
    for shape in SHAPES[name]:
        enc = build_encoder(name, shape, dim=24, hidden=8, dropout=0.0)
        feats = enc(torch.randn(3, *shape))
        assert feats.shape == (3, 24) == (3, enc.out_dim)


def test_resnet18_is_torchvisions_with_a_one_channel_stem():
    enc = build_encoder("resnet18", (1, 64, 64), dim=512, hidden=0, dropout=0.0)
    assert enc.net.conv1.in_channels == 1 and type(enc.net).__module__.startswith("torchvision")


def _model(fusion):
    dims = {"a": 8, "v": 8 if fusion == "shared" else 10}  # one shared classifier needs one feature size
    encoders = {m: build_encoder("mlp", (shape,), dims[m], 16, 0.0) for m, shape in (("a", 6), ("v", 4))}
    return LateFusionClassifier(encoders, build_fusion(fusion, dims, 3), 3)


def test_shared_fusion_refuses_unequal_feature_sizes():
    with pytest.raises(ValueError, match="feature sizes must be equal"):
        build_fusion("shared", {"a": 8, "v": 10}, 3)


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_every_fusion_trains(fusion):
    torch.manual_seed(0)
    model = _model(fusion)
    inputs, y = {"a": torch.randn(16, 6), "v": torch.randn(16, 4)}, torch.randint(3, (16,))
    out = model(inputs)
    assert set(out.logits) == {"a", "v", FUSED} and out.logits[FUSED].shape == (16, 3)
    torch.nn.functional.cross_entropy(out.logits[FUSED], y).backward()
    for m in ("a", "v"):  # the fused loss reaches both encoders through every fusion
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders[m].parameters())


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_ogm_unimodal_logits_add_up_to_the_fused_logits(fusion):
    model = _model(fusion)
    out = model({"a": torch.randn(5, 6), "v": torch.randn(5, 4)})
    parts = model.fusion.unimodal_logits(out.features)
    assert torch.allclose(parts["a"] + parts["v"], out.logits[FUSED], atol=1e-6)


def test_detached_heads_send_no_gradient_to_encoders():
    model = _model("concat")
    out = model({"a": torch.randn(5, 6), "v": torch.randn(5, 4)}, detach_unimodal_heads=True)
    out.logits["a"].sum().backward()
    assert all(p.grad is None for p in model.encoders["a"].parameters())
    assert model.heads["a"].weight.grad is not None


def test_modality_masks_zero_features_before_fusion():
    model = _model("concat")
    inputs = {"a": torch.randn(4, 6), "v": torch.randn(4, 4)}
    masks = torch.tensor([[1, 0]] * 4, dtype=torch.bool)
    out = model(inputs, modality_masks=masks)
    only_a = model.fusion.unimodal_logits(out.features)["a"] + model.fusion.fc.bias / 2
    assert torch.allclose(out.logits[FUSED], only_a, atol=1e-6)


def test_film_and_gated_reject_three_modalities():
    for name in ("film", "gated"):
        with pytest.raises(ValueError, match="exactly 2"):
            build_fusion(name, {"a": 4, "b": 4, "c": 4}, 3)
