"""Run a blendtune training on N gloo ranks in spawned processes, with a deadline that turns a hang into
a test failure showing the hung ranks' stacks."""
import faulthandler
import gc
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blendtune.config import load_config
from blendtune.build import build_trainer


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
    trace.close()
    # Results are on disk: leave without the interpreter's teardown of torch's threads, where a rank
    # once hung (about 1 run in 7) after everything the test checks had finished.
    os._exit(0)


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


