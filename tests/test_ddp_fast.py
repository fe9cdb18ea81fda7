"""The fast 2-rank DDP check that runs in every `make test` (the longer ones are in test_distributed.py,
marked slow): different batches on each rank, yet OGM-GE's coefficient is all-reduced and its noise drawn
from one (seed, step) stream, so both replicas end bit-identical after real steps."""
import pytest
import torch

from conftest import TINY
from ddp import run_ddp


def test_two_ranks_stay_bit_identical_under_ogm_ge(tmp_path):
    r0, r1 = run_ddp(tmp_path, TINY + ["strategy=ogm_ge", "ogm.alpha=0.8", "ogm.noise_scale=1.0", "train.epochs=1",
                                       "data.synthetic.num_train=96", "data.synthetic.num_test=32", "data.batch_size=16",
                                       "data.synthetic.modalities.clean.signal=2.0"], deadline_s=120)
    steps = r0["history"][-1]["step"]
    assert steps == r1["history"][-1]["step"] >= 3  # (96 - held out) / 16 steps, 8 samples per rank each
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    assert r0["history"][-1]["ogm/coeff/clean"] == r1["history"][-1]["ogm/coeff/clean"] < 1.0


@pytest.mark.parametrize("strategy", ["mmpareto", "pmr", "mla", "agm"])
def test_two_ranks_stay_bit_identical_under_the_newer_strategies(strategy, tmp_path):
    # MMPareto and MLA sync gradients themselves (several backward passes / steps per forward: DDP's
    # reducer is bypassed); PMR all-reduces its prototypes' sums and its batch scores.
    extra = {"pmr": ["pmr.rule=paper", "pmr.mu=0.01", "pmr.entropy_epochs=1"]}.get(strategy, [])
    r0, r1 = run_ddp(tmp_path, TINY + [f"strategy={strategy}", "train.epochs=1", "data.synthetic.num_train=96",
                                       "data.synthetic.num_test=32", "data.batch_size=16", *extra], deadline_s=120)
    assert r0["history"][-1]["step"] == r1["history"][-1]["step"] >= 3
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    for key, value in r0["strategy"].items():
        other = r1["strategy"][key]
        if isinstance(value, dict):
            assert all(torch.equal(v, other[k]) for k, v in value.items()), key
        else:
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
    metrics = {k: v for k, v in r0["history"][-1].items() if k.startswith(strategy + "/")}
    assert metrics and metrics == {k: v for k, v in r1["history"][-1].items() if k.startswith(strategy + "/")}


@pytest.mark.parametrize("strategy", ["mmpareto"])
def test_two_ranks_agree_on_batchnorm_statistics(strategy, tmp_path, monkeypatch):
    # BatchNorm running statistics are buffers, not gradients: DDP broadcasts rank 0's before a synced
    # forward only (never under no_sync(), which MMPareto and MLA use), and the last step's update stays
    # per rank. The loop shares rank 0's at the end of every epoch, before evaluation and the checkpoint.
    from conftest import make_tiny_avdigits
    make_tiny_avdigits(tmp_path / "data")
    monkeypatch.setenv("BLENDTUNE_DATA_ROOT", str(tmp_path / "data"))
    r0, r1 = run_ddp(tmp_path, [
        "data.dataset=avdigits", "data.avdigits.test_speakers=[cid]", "data.avdigits.sample_rate=8000",
        "data.avdigits.window_s=0.5", "data.avdigits.n_fft=128", "data.avdigits.hop_length=64",
        "model.encoders.audio.name=spec_cnn", "model.encoders.audio.hidden=8", "model.encoders.image.name=spec_cnn",
        "model.encoders.image.hidden=8", "data.batch_size=4", "data.eval_batch_size=4", "train.epochs=1",
        "train.progress=false", "wandb=false", "data.held_out_ratio=0.0", f"strategy={strategy}"], deadline_s=120)
    running = [k for k in r0["params"] if "running" in k]
    assert running  # the spec-CNN encoders have BatchNorm
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    assert r0["history"][-1]["acc/test/fused"] == r1["history"][-1]["acc/test/fused"]


def test_two_ranks_stay_bit_identical_under_ume_and_umt(tmp_path):
    # UMT: teachers in epoch 1 (uni-modal losses; the unused fusion makes DDP look for parameters without
    # gradients), then the student restarts from the initial weights and distils from the frozen teachers,
    # whose copies must agree on both ranks. (UME is UMT's teacher phase plus the ensemble prediction.)
    r0, r1 = run_ddp(tmp_path, TINY + ["strategy=umt", "umt.teacher_epochs=1", "train.epochs=2",
                                       "data.synthetic.num_train=96", "data.synthetic.num_test=32", "data.batch_size=16"],
                     deadline_s=120)
    assert r0["history"][-1]["step"] == r1["history"][-1]["step"] >= 6
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    assert r0["strategy"]["phase"] == r1["strategy"]["phase"] == "student"
    for name, p in r0["strategy"]["teacher"].items():
        assert torch.equal(p, r1["strategy"]["teacher"][name]), name
    metrics = {k: v for k, v in r0["history"][-1].items() if k.startswith("umt/")}
    assert metrics and metrics == {k: v for k, v in r1["history"][-1].items() if k.startswith("umt/")}
    assert r0["history"][-1]["acc/test/fused"] == r1["history"][-1]["acc/test/fused"]
