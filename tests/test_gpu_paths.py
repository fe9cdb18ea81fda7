"""The GPU-minded paths, tested on CPU: data held on the device, channels_last, torch.compile, fused
optimizers, GPU resources for Ray (fractional per trial; a one-line error instead of a hang)."""
import os
import subprocess
import sys

import pytest
import torch

from blendtune.config import load_config
from blendtune.build import build_trainer
from conftest import REPO, TINY


def _fit(overrides):
    trainer = build_trainer(load_config(None, TINY + overrides))
    metrics = trainer.fit()
    return trainer, metrics


@pytest.mark.parametrize("strategy", [["strategy=ogm_ge"], ["strategy=gblend", "gblend.estimator=paper",
                                                             "gblend.super_epoch=1"]])
def test_data_on_device_gives_the_dataloaders_batches_bit_for_bit(strategy):
    loader, m1 = _fit(strategy + ["data.on_device=false"])
    on_device, m2 = _fit(strategy + ["data.on_device=true"])
    assert type(on_device.train_loader).__name__ == "DeviceBatches" and type(loader.train_loader).__name__ == "DataLoader"
    assert len(on_device.train_loader) == len(loader.train_loader)
    for name, p in loader.model.state_dict().items():
        assert torch.equal(p, on_device.model.state_dict()[name]), name
    assert m1["acc/test/fused"] == m2["acc/test/fused"] and m1["loss/objective"] == m2["loss/objective"]


def test_on_device_is_refused_for_file_datasets(tmp_path):
    from blendtune.errors import UserError
    from conftest import CREMA_TINY, make_crema_d
    root = make_crema_d(tmp_path / "crema", per_class=1)
    with pytest.raises(UserError, match="data.on_device"):
        build_trainer(load_config(None, CREMA_TINY + [f"data.root={root}", "data.on_device=true"]))


def _conv_trainer(channels_last: bool):
    from blendtune.data import MultimodalDataset, make_splits
    from blendtune.feeding import LoaderOptions
    from blendtune.loop import Trainer, TrainOptions
    from blendtune.models import build_encoder, build_late_fusion
    from blendtune.strategies import build_strategy
    g = torch.Generator().manual_seed(0)
    y = torch.randint(3, (48,), generator=g)
    images = torch.randn(48, 2, 12, 12, generator=g) + y.view(-1, 1, 1, 1).float()  # C > 1: NCHW != NHWC
    ds = MultimodalDataset({"a": images, "b": torch.randn(48, 4, generator=g)}, y, 3)
    torch.manual_seed(0)
    model = build_late_fusion({"a": build_encoder("spec_cnn", (2, 12, 12), 16, 4, 0.0),
                               "b": build_encoder("mlp", (4,), 16, 16, 0.0)}, "concat", 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return Trainer(model, build_strategy("ogm", alpha=0.5), make_splits(ds, ds, 0.25, seed=0), opt,
                   options=TrainOptions(epochs=2, channels_last=channels_last, progress=False),
                   loader=LoaderOptions(batch_size=16))


def test_channels_last_puts_conv_weights_and_image_batches_in_nhwc_and_trains_alike():
    nhwc, nchw = _conv_trainer(True), _conv_trainer(False)
    assert nhwc.model.encoders["a"].features[0].weight.is_contiguous(memory_format=torch.channels_last)
    inputs, _ = nhwc.feed.to_device(next(iter(nhwc.train_loader)))
    assert inputs["a"].is_contiguous(memory_format=torch.channels_last)
    assert not nchw.feed.to_device(next(iter(nchw.train_loader)))[0]["a"].is_contiguous(memory_format=torch.channels_last)
    m1, m2 = nchw.fit(), nhwc.fit()
    assert m2["loss/objective"] == pytest.approx(m1["loss/objective"], rel=1e-4)
    assert m2["acc/test/fused"] == pytest.approx(m1["acc/test/fused"], abs=0.05)


def test_compile_wraps_the_training_step_not_the_checkpointed_model():
    trainer = build_trainer(load_config(None, TINY + ["train.compile=true"]))
    assert type(trainer.train_model).__name__ == "OptimizedModule"
    assert trainer.model is trainer.train_model._orig_mod
    assert not any(k.startswith("_orig_mod") for k in trainer.state_dict()["model"])


@pytest.mark.slow
def test_compiled_training_matches_eager():
    eager, m1 = _fit(["strategy=naive"])
    compiled, m2 = _fit(["strategy=naive", "train.compile=true"])
    assert m2["loss/objective"] == pytest.approx(m1["loss/objective"], rel=1e-4)


def test_fused_optimizer_is_asked_for_on_cuda_only():
    from blendtune.optim import build_optimizer
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert build_optimizer("adam", params, lr=0.1, fused=True).defaults["fused"] is True
    assert not build_optimizer("adam", params, lr=0.1).defaults.get("fused")
    trainer = build_trainer(load_config(None, TINY))
    assert not trainer.optimizer.defaults.get("fused")  # CPU here


def test_sweep_trials_share_a_gpu_with_gpus_per_trial():
    from blendtune.sweeps import trial_resources
    cfg = load_config(None, ["train.device=cuda", "sweep.gpus_per_trial=0.25", "sweep.cpus_per_worker=2"])
    assert trial_resources(cfg) == {"cpu": 2, "gpu": 0.25}         # four trials per GPU
    assert trial_resources(load_config(None, ["train.device=cuda"]))["gpu"] == 1.0
    assert trial_resources(load_config(None, ["train.device=cpu"]))["gpu"] == 0.0
    # set, it is reserved even for CPU trials: they land on (and pack onto) GPU nodes
    assert trial_resources(load_config(None, ["train.device=cpu", "sweep.gpus_per_trial=0.5"]))["gpu"] == 0.5
    assert trial_resources(load_config(None, ["train.device=cuda", "workers=2"])) == {"cpu": 0.001}


def test_more_gpus_than_the_machine_has_is_one_line_not_a_hang(tmp_path):
    have = torch.cuda.device_count()
    proc = subprocess.run([sys.executable, "-m", "blendtune.cli", "train", "experiments/synthetic_naive.yaml", *TINY,
                           "train.device=cuda", f"workers={have + 2}", "sweep.cpus_per_worker=0.5",
                           f"output_dir={tmp_path}"], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ), timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"needs {have + 2} GPU(s), this machine has {have}" in proc.stderr and "Traceback" not in proc.stderr
