"""DDP correctness with 2 CPU workers (gloo): what steers gradients agrees on every rank.

Marked slow (run with `make test-slow`): about 1 run in 7, a rank hung at exit while the DDP reducer
was destroyed after the process group (stack from faulthandler). Freeing the trainer before
`destroy_process_group` passed 8 of 8 runs since, too few to be sure, so these stay out of CI until
they have run clean longer; the deadline turns a hang into a failure with the hung rank's stack.
"""
import pytest
import torch

from blendtune.config import load_config
from blendtune.build import build_trainer
from conftest import TINY
from ddp import run_ddp

pytestmark = pytest.mark.slow


def test_ogm_ge_replicas_stay_bit_identical(tmp_path):
    # Different data on each rank, yet one all-reduced coefficient and one (seed, step) noise stream.
    r0, r1 = run_ddp(tmp_path, TINY + ["strategy=ogm_ge", "ogm.alpha=0.8", "ogm.noise_scale=1.0",
                                       "data.synthetic.modalities.clean.signal=2.0", "wandb=false"])
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    h0, h1 = r0["history"][-1], r1["history"][-1]
    assert h0["ogm/coeff/clean"] == h1["ogm/coeff/clean"] < 1.0


def test_gblend_weights_agree_across_ranks(tmp_path):
    r0, r1 = run_ddp(tmp_path, TINY + ["strategy=gblend", "gblend.super_epoch=1", "train.epochs=3", "wandb=false"])
    assert r0["strategy"]["weights"] == r1["strategy"]["weights"]
    assert r0["strategy"]["estimates"] == 3  # windows ending at epochs 1, 2, 3
    assert r0["history"][-1]["acc/held_out/fused"] == r1["history"][-1]["acc/held_out/fused"]


def test_two_workers_with_half_batches_track_one_worker(tmp_path):
    # 200 training samples, no held-out split: 5 full global batches of 40, 20 per worker
    overrides = TINY + ["strategy=naive", "data.batch_size=40", "data.held_out_ratio=0", "optim.momentum=0.0",
                        "train.epochs=2", "wandb=false"]
    ddp, _ = run_ddp(tmp_path, overrides)
    single = build_trainer(load_config(None, overrides))
    single.fit()
    for name, p in single.model.state_dict().items():
        assert torch.allclose(p, ddp["params"][name], atol=1e-5, rtol=1e-4), name


def test_gblend_paper_estimate_trains_its_copies_with_ddp_and_ranks_agree(tmp_path):
    # the per-head copies go through the loop's own step (DDP buckets): every rank ends with one estimate
    # and the same weights and parameters
    r0, r1 = run_ddp(tmp_path, TINY + ["strategy=gblend", "gblend.estimator=paper", "gblend.mode=offline",
                                       "gblend.super_epoch=1", "train.epochs=2", "wandb=false"])
    assert r0["strategy"]["estimates"] == r1["strategy"]["estimates"] == 1
    assert r0["strategy"]["weights"] == r1["strategy"]["weights"]
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name


def test_ume_replicas_stay_bit_identical(tmp_path):
    # UME's fused output is the uni-modal heads' ensemble: the fusion never runs, so DDP (looking for unused
    # parameters) must skip it every step. (UMT's teacher phase, the same loss, is in test_ddp_fast.py.)
    r0, r1 = run_ddp(tmp_path, TINY + ["strategy=ume", "train.epochs=1", "data.synthetic.num_train=96",
                                       "data.synthetic.num_test=32", "data.batch_size=16"], deadline_s=120)
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    assert r0["history"][-1]["acc/test/fused"] == r1["history"][-1]["acc/test/fused"]
