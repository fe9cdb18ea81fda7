"""The fast 2-rank DDP check that runs in every `make test` (the longer ones are in test_distributed.py,
marked slow): different batches on each rank, yet OGM-GE's coefficient is all-reduced and its noise drawn
from one (seed, step) stream, so both replicas end bit-identical after real steps."""
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
