"""Every registered strategy trains and resumes exactly; G-Blend and OGM do what the papers say."""

import dataclasses

import pytest
import torch

from blendtune.config import load_config
from blendtune.functional import ogm_coefficients
from blendtune.build import build_trainer
from blendtune.models import FUSED
from blendtune.strategies import STRATEGIES, build_strategy
from conftest import TINY

# Settings per strategy (Composer-style table): a new strategy is covered by adding a row.
SETTINGS = {
    "naive": [],
    "unimodal": ["unimodal.modality=clean"],
    "modality_dropout": ["modality_dropout.p=0.5"],
    "gblend": ["gblend.super_epoch=1", "gblend.estimator=heads"],
    "ogm": ["ogm.alpha=0.5"],
    "ogm_ge": ["ogm.alpha=0.5", "ogm.noise_scale=0.5"],
    "mmpareto": [],
    "pmr": ["pmr.mu=0.01", "pmr.entropy_epochs=2", "pmr.momentum=0.5"],
    "mla": [],
    "agm": ["agm.modulation_end=2"],  # epoch 3 unmodulated: the resume crosses the window's end
    "ume": [],
    "umt": ["umt.teacher_epochs=1"],  # teachers in epoch 1, the student in 2-3: the resume restores the teachers
}
# Fusions a strategy can run with (default: every one)
FUSIONS_OF = {"mla": ["shared"]}
# UME predicts with the uni-modal heads' ensemble (the fusion is unused); UMT runs a teacher and a student epoch
FUSIONS_OF.update({"ume": ["concat"], "umt": ["concat"]})
VARIANTS = [(s, []) for s in SETTINGS] + [("gblend", ["gblend.estimator=paper", "gblend.super_epoch=1"]),
                                           ("gblend", ["gblend.mode=offline", "gblend.estimator=paper"]),
                                           # mixed precision resumes exactly too (fp16: the grad scaler's state)
                                           ("ogm_ge", ["train.amp=bf16"]), ("ogm", ["train.amp=fp16"]),
                                           ("gblend", ["train.amp=fp16", "gblend.estimator=paper",
                                                       "gblend.super_epoch=1"]),
                                           # G-Blend's stabilisers carry state (stale count, frozen)
                                           ("gblend", ["gblend.ema=0.5", "gblend.floor=0.05", "gblend.patience=1",
                                                       "gblend.super_epoch=1"]),
                                           ("mmpareto", ["train.amp=fp16"]), ("pmr", ["pmr.rule=paper"]),
                                           ("mla", ["train.amp=fp16"]), ("mla", ["mla.projection=none"]),
                                           # UMT: the checkpoint falls in the teacher phase (the initial weights
                                           # the student restarts from are in it)
                                           ("umt", ["umt.teacher_epochs=2"])]


def test_settings_table_covers_every_registered_strategy():
    assert set(SETTINGS) == set(STRATEGIES.names())


def _cfg(strategy, extra=(), tmp_path=None):
    out = [f"output_dir={tmp_path}"] if tmp_path else []
    return load_config(None, TINY + [f"strategy={strategy}"] + SETTINGS[strategy] + list(extra) + out)


@pytest.mark.parametrize("strategy,extra", VARIANTS, ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_every_strategy_trains_and_resumes_exactly(strategy, extra, tmp_path):
    cfg = _cfg(strategy, ["train.epochs=3", *extra])
    straight = build_trainer(cfg, tmp_path / "straight")
    logged = []
    straight.callbacks = [logged.append]
    last = straight.fit()
    assert [m["epoch"] for m in logged] == [1, 2, 3]
    for head in ("clean", "memorizable", FUSED):
        assert 0.0 <= last[f"acc/test/{head}"] <= 1.0 and f"ogr/{head}" in last
    assert last["loss/objective"] == last["loss/objective"]  # not NaN

    # The same 3-epoch run stopped after its second epoch's checkpoint (as a killed run stops), resumed from
    # that checkpoint in a fresh Trainer, finishes epoch 3.
    first = build_trainer(cfg, tmp_path / "split")
    first.options = dataclasses.replace(first.options, epochs=2)
    first.fit()
    resumed = build_trainer(cfg, tmp_path / "split")
    resumed.load(tmp_path / "split" / "checkpoints" / "last.pt")
    assert resumed.epoch == 2
    resumed_last = resumed.fit()
    for name, p in straight.model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name
    assert resumed_last["acc/test/fused"] == last["acc/test/fused"]
    assert_same_state(resumed.strategy.state_dict(), straight.strategy.state_dict())


def assert_same_state(a, b, where="state"):
    """Equal, tensors included (bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, where


def test_gblend_moves_weight_away_from_the_memorizable_modality():
    # 'memorizable' has a weak signal and 512 per-sample random dims: its head fits the training labels
    # (train loss falls) while its held-out loss rises, so its OGR is poor and its weight must drop.
    cfg = load_config(None, ["strategy=gblend", "gblend.super_epoch=2", "gblend.estimator=heads", "train.epochs=8",
                             "data.held_out_ratio=0.2", "train.progress=false"])
    trainer = build_trainer(cfg)
    history = []
    trainer.callbacks = [history.append]
    trainer.fit()
    w = trainer.strategy.weights
    assert w["memorizable"] < 0.05 < w["clean"]
    assert w["memorizable"] < 1 / 3  # started uniform
    first = history[1]  # the first estimate, at the end of super-epoch 1 (epoch 2)
    assert first["gblend/ogr/memorizable"] > 10 * first["gblend/ogr/clean"]
    assert first["gblend/w/memorizable"] < first["gblend/w/clean"]
    assert history[0]["gblend/w/memorizable"] == pytest.approx(1 / 3)  # uniform before any estimate


def test_gblend_paper_estimator_agrees_on_direction():
    cfg = load_config(None, ["strategy=gblend", "gblend.super_epoch=2", "gblend.estimator=paper",
                             "gblend.mode=offline", "train.epochs=2", "data.held_out_ratio=0.2", "train.progress=false"])
    trainer = build_trainer(cfg)
    trainer.fit()
    w = trainer.strategy.weights
    assert w["clean"] > w["memorizable"] and trainer.strategy.estimates == 1


def _dominant_batch():
    """A model after a few naive epochs on data where 'clean' dominates, and one batch."""
    cfg = load_config(None, TINY + ["strategy=naive", "train.epochs=3",
                                    "data.synthetic.modalities.clean.signal=2.0"])
    trainer = build_trainer(cfg)
    trainer.fit()
    inputs, targets = trainer.feed.to_device(next(iter(trainer.train_loader)))
    return trainer, inputs, targets


def _encoder_grad_norms(strategy_name, trainer, inputs, targets, alpha=0.8, noise=0.0):
    strategy = build_strategy(strategy_name, alpha=alpha, noise_scale=noise, modulation_start=1, modulation_end=10)
    strategy.setup(trainer.model, seed=0, total_epochs=10)
    trainer.model.zero_grad()
    out = trainer.model(inputs)
    torch.nn.functional.cross_entropy(out.logits[FUSED], targets).backward()
    before = {m: torch.norm(torch.stack([p.grad.norm() for p in trainer.model.encoders[m].parameters()])).item()
              for m in trainer.model.modalities}
    strategy.after_backward(out, targets, epoch=1, step=0)
    after = {m: torch.norm(torch.stack([p.grad.norm() for p in trainer.model.encoders[m].parameters()])).item()
             for m in trainer.model.modalities}
    return strategy, out, before, after


def test_ogm_lowers_the_dominant_encoders_gradient_norm_only():
    trainer, inputs, targets = _dominant_batch()
    strategy, out, before, after = _encoder_grad_norms("ogm", trainer, inputs, targets)
    coeff = ogm_coefficients(strategy.unimodal_logits(out), targets, alpha=0.8)
    assert coeff["clean"] < 1.0 and coeff["memorizable"] == 1.0
    assert after["clean"] == pytest.approx(coeff["clean"] * before["clean"], rel=1e-4)
    assert after["memorizable"] == pytest.approx(before["memorizable"], rel=1e-6)
    metrics = strategy.pop_epoch_metrics()
    assert metrics["ogm/coeff/clean"] == pytest.approx(coeff["clean"], rel=1e-5)
    assert metrics["ogm/rho/clean"] > 1.0


def test_ogm_ge_adds_noise_to_both_encoders_reproducibly():
    trainer, inputs, targets = _dominant_batch()
    _, _, before, plain = _encoder_grad_norms("ogm", trainer, inputs, targets)
    _, _, _, noisy1 = _encoder_grad_norms("ogm_ge", trainer, inputs, targets, noise=1.0)
    grads1 = [p.grad.clone() for p in trainer.model.encoders["memorizable"].parameters()]
    _, _, _, noisy2 = _encoder_grad_norms("ogm_ge", trainer, inputs, targets, noise=1.0)
    grads2 = [p.grad.clone() for p in trainer.model.encoders["memorizable"].parameters()]
    assert noisy1["memorizable"] != pytest.approx(plain["memorizable"], rel=1e-3)  # noise on the weak one too
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))  # same (seed, step) -> same noise


def test_ogm_modulates_only_inside_its_epoch_window():
    trainer, inputs, targets = _dominant_batch()
    model = trainer.model
    strategy = build_strategy("ogm", alpha=0.8, noise_scale=0.0, modulation_start=5, modulation_end=7)
    strategy.setup(model, 0, 10)
    # before, first epoch (inclusive), inside, last epoch (inclusive), after
    for epoch, inside in ((4, False), (5, True), (6, True), (7, True), (8, False)):
        model.zero_grad()
        out = model(inputs)
        torch.nn.functional.cross_entropy(out.logits[FUSED], targets).backward()
        coeff = ogm_coefficients(strategy.unimodal_logits(out), targets, alpha=0.8)
        assert coeff["clean"] < 0.5 and coeff["memorizable"] == 1.0  # clean dominates this batch
        before = {m: [p.grad.clone() for p in model.encoders[m].parameters()] for m in model.modalities}
        strategy.after_backward(out, targets, epoch=epoch, step=0)
        for m in model.modalities:
            k = coeff[m] if inside else 1.0
            for a, p in zip(before[m], model.encoders[m].parameters()):
                if k == 1.0:
                    assert torch.equal(p.grad, a), (epoch, m)
                else:
                    torch.testing.assert_close(p.grad, k * a, rtol=1e-5, atol=0.0)
        logged = strategy.pop_epoch_metrics()  # an epoch outside the window logs k = 1: nothing modulated
        assert logged["ogm/coeff/clean"] == pytest.approx(coeff["clean"] if inside else 1.0, rel=1e-5), epoch
        assert logged["ogm/rho/clean"] > 1.0


def test_ogm_conv_option_leaves_linear_layers_alone():
    from blendtune.models import LateFusionClassifier, build_encoder, build_fusion
    torch.manual_seed(0)
    enc = {"a": build_encoder("spec_cnn", (1, 8, 8), 8, 4, 0.0), "b": build_encoder("spec_cnn", (1, 8, 8), 8, 4, 0.0)}
    model = LateFusionClassifier(enc, build_fusion("concat", {"a": 8, "b": 8}, 3), 3)
    strategy = build_strategy("ogm", alpha=0.8, noise_scale=0.0, modulation_start=1, modulation_end=2, params="conv")
    strategy.setup(model, 0, 2)
    assert strategy.modulated["a"] and all(p.dim() == 4 for p in strategy.modulated["a"])
    # one step: conv weights' gradients are scaled by k, every other gradient (BN, linear) stays bit-identical
    inputs = {"a": torch.randn(16, 1, 8, 8), "b": torch.randn(16, 1, 8, 8)}
    targets = torch.arange(16) % 3
    out = model(inputs)
    torch.nn.functional.cross_entropy(out.logits[FUSED], targets).backward()
    coeff = ogm_coefficients(strategy.unimodal_logits(out), targets, alpha=0.8)
    assert min(coeff.values()) < 0.5  # one of the two leads, so one of them is modulated
    before = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    strategy.after_backward(out, targets, epoch=1, step=0)
    scaled = untouched = 0
    for m in ("a", "b"):
        for name, p in model.encoders[m].named_parameters():
            full = f"encoders.{m}.{name}"
            if p.dim() == 4 and coeff[m] < 1.0:
                torch.testing.assert_close(p.grad, coeff[m] * before[full], rtol=1e-5, atol=0.0)
                scaled += 1
            else:
                assert torch.equal(p.grad, before[full]), full
                untouched += p.dim() != 4
    assert scaled == 4 and untouched >= 9  # 4 conv weights of the led encoder; its BN and linear stay
    for name, p in model.named_parameters():
        if not name.startswith("encoders.") and p.grad is not None:
            assert torch.equal(p.grad, before[name]), name  # the fusion: never modulated


def test_nan_loss_is_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    from blendtune.errors import TrainingDiverged
    cfg = load_config(None, TINY + ["strategy=naive", "train.epochs=3", "optim.momentum=0.0"])
    trainer = build_trainer(cfg, tmp_path)
    at_epoch_1 = {}
    trainer.callbacks = [lambda m: at_epoch_1.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
                         if m["epoch"] == 1 else None]
    # epoch 1 trains normally and is checkpointed; epoch 2 starts with a learning rate that blows the loss up
    start = trainer.strategy.on_epoch_start

    def on_epoch_start(epoch, context):
        if epoch == 2:
            for group in trainer.optimizer.param_groups:
                group["lr"] = 1e30
        start(epoch, context)
    trainer.strategy.on_epoch_start = on_epoch_start
    checkpoint = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf|-inf) in epoch 2 ") as raised:
        trainer.fit()
    assert f"the last good checkpoint is '{checkpoint}'" in str(raised.value)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["epoch"] == 1
    tensors = list(state["model"].values()) + [v for s in state["optimizer"]["state"].values() for v in s.values()
                                               if torch.is_tensor(v)]
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    assert state["model"].keys() == at_epoch_1.keys()
    assert all(torch.equal(state["model"][k], at_epoch_1[k]) for k in at_epoch_1)  # epoch 1's weights, kept
    assert state["optimizer"]["param_groups"][0]["lr"] == cfg.optim.lr
    assert not all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the live model did diverge


def test_ogm_ge_noise_is_the_same_whatever_the_torch_thread_count():
    # Ranks (and reruns) with different core counts must add the same noise: the strategy seeds a fixed
    # number of CPU generators from (seed, step), not one per thread.
    from blendtune.functional import modulate_gradients_
    from blendtune.models import build_late_fusion, encoders_for
    model = build_late_fusion(encoders_for({"a": (8,), "b": (8,)}, {}, {}), "concat", 3)
    strategy = build_strategy("ogm_ge", alpha=0.8, noise_scale=1.0, modulation_start=1, modulation_end=10)
    strategy.setup(model, seed=3, total_epochs=10)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4099, generator=gen), torch.randn(64, 300, generator=gen), torch.randn(7, generator=gen)]
    threads = torch.get_num_threads()
    noisy = {}
    try:
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            for step in (0, 1):
                out = [g.clone() for g in grads]
                modulate_gradients_(out, 0.5, 1.0, strategy._noise_generator(torch.device("cpu"), step))
                noisy[n, step] = out
    finally:
        torch.set_num_threads(threads)
    for (n, step), out in noisy.items():
        assert all(torch.equal(a, b) for a, b in zip(out, noisy[1, step])), (n, step)
    noise = [o - 0.5 * g for o, g in zip(noisy[1, 0], grads)]
    for e, g in zip(noise[:2], grads):  # GE noise: std = noise_scale * std(g) per tensor (the large ones)
        assert e.std().item() == pytest.approx(g.std().item(), rel=0.05)
    assert not torch.equal(noisy[1, 0][0], noisy[1, 1][0])  # a new step draws new noise


def test_fp16_gradients_are_unscaled_before_ogm_modulates_them():
    # With train.amp=fp16 the loss is multiplied by the grad scaler's scale (65536 at first) before
    # backward; OGM must see (and scale, and measure its GE noise on) the true gradients.
    import copy
    from blendtune.strategies import probe_loss
    cfg = _cfg("ogm_ge", ["train.amp=fp16", "train.epochs=1"])
    trainer = build_trainer(cfg)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() >= 2 ** 10
    reference = copy.deepcopy(trainer.model)
    batch = next(iter(trainer.train_loader))
    seen = {}
    modulate = trainer.strategy.after_backward

    def after_backward(out, targets, epoch, step):
        seen.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        modulate(out, targets, epoch, step)
    trainer.strategy.after_backward = after_backward
    trainer.train_steps(trainer.train_model, [batch], trainer.optimizer, trainer.scaler, trainer.strategy, 1, main=True)
    # the same step in fp32, without a scaler
    inputs, targets = batch
    out = reference(inputs, modality_masks=None, detach_unimodal_heads=trainer.strategy.detach_unimodal_heads)
    (trainer.strategy.loss(out, targets, 1) + probe_loss(out, targets)).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert seen.keys() == expected.keys()
    for m in trainer.model.modalities:  # per encoder: the gradient OGM modulates
        names = [n for n in expected if n.startswith(f"encoders.{m}.")]
        got, want = torch.cat([seen[n].flatten() for n in names]), torch.cat([expected[n].flatten() for n in names])
        assert (got - want).norm() <= 0.02 * want.norm(), (m, (got.norm() / want.norm()).item())


@pytest.mark.parametrize("amp", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("strategy,fusion", [(s, f) for s in sorted(SETTINGS)
                                             for f in FUSIONS_OF.get(s, ["concat", "sum", "film", "gated", "shared"])])
def test_every_strategy_and_fusion_trains_under_each_precision(strategy, fusion, amp):
    # CPU autocast (bf16 and fp16) catches the dtype bugs a GPU would hit: OGM once scored bf16
    # features against fp32 weights and crashed at its first step.
    epochs = 2 if strategy == "umt" else 1  # UMT: a teacher epoch, then a student epoch
    cfg = _cfg(strategy, [f"train.amp={amp}", f"model.fusion={fusion}", f"train.epochs={epochs}",
                          "data.synthetic.num_train=96", "data.synthetic.num_test=32"])
    trainer = build_trainer(cfg)
    metrics = trainer.fit()
    assert trainer.amp_dtype == {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert torch.isfinite(torch.tensor(metrics["loss/objective"]))
    assert 0.0 <= metrics["acc/test/fused"] <= 1.0
