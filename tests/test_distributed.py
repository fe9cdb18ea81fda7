"""DDP correctness with 2 CPU workers (gloo): what steers gradients agrees on every rank.

Marked slow (run with `make test-slow`): about 1 run in 7, a rank hung at exit while the DDP reducer
was destroyed after the process group (stack from faulthandler). Freeing the trainer before
`destroy_process_group` passed 8 of 8 runs since, too few to be sure, so these stay out of CI until
they have run clean longer; the deadline turns a hang into a failure with the hung rank's stack.
"""
import faulthandler
import gc
import socket
import time
from datetime import timedelta

import pytest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blendtune.config import load_config
from blendtune.worker import build_trainer
from conftest import TINY

pytestmark = pytest.mark.slow


def _worker(rank, world, address, overrides, out):
    trace = open(f"{out}/stack{rank}.txt", "w")
    faulthandler.dump_traceback_later(120, exit=True, file=trace)  # where a hung rank is stuck
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))  # a collective mismatch fails instead of hanging
    try:
        torch.set_num_threads(1)
        trainer = build_trainer(load_config(None, overrides))
        history = []
        trainer.callbacks = [history.append]
        trainer.fit()
        torch.save({"params": {k: v.clone() for k, v in trainer.model.state_dict().items()},
                    "strategy": trainer.strategy.state_dict(), "history": history}, f"{out}/rank{rank}.pt")
        dist.barrier()
        del trainer  # free the DDP reducer while the process group still exists
        gc.collect()
    finally:
        dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(tmp_path, overrides, world=2, deadline_s=300):
    address = f"tcp://127.0.0.1:{_free_port()}"
    context = mp.start_processes(_worker, args=(world, address, overrides, str(tmp_path)), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.time() + deadline_s
    while not context.join(timeout=5):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            stacks = "\n".join(p.read_text() for p in tmp_path.glob("stack*.txt"))
            pytest.fail(f"DDP workers did not finish in {deadline_s} s; stacks:\n{stacks}")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


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
