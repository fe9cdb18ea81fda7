"""The Python API and `_target_` parts: a researcher's own backbone and datasets, no blendtune edits."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blendtune
from blendtune.errors import UserError
from blendtune.loggers import read_metrics
from conftest import REPO

sys.path.insert(0, str(REPO / "examples"))
from my_av import TwoStreamNet, make_data  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return make_data(num_train=400, num_test=200)


def test_fit_ogm_ge_on_a_users_backbone_slows_the_dominant_stream(data):
    train, test = data
    result = blendtune.fit(model=TwoStreamNet(), train=train, test=test, strategy="ogm_ge", epochs=3, lr=1e-3,
                           optimizer="adam", alpha=0.8, noise_scale=0.5, held_out_ratio=0.2)
    m = result.metrics
    assert m["acc/test/fused"] > 0.6  # 4 classes: chance is 0.25
    # video is the dominant stream: its coefficient < 1, audio's untouched
    assert m["ogm/coeff/video"] < 1.0 and m["ogm/rho/video"] > 1.0 and m["ogm/coeff/audio"] == 1.0
    # the backbone has no modality_parameters(): each stream's parameters were traced, none shared
    names = {m: {n for n, _ in result.model.encoder_parameters(m)} for m in ("audio", "video")}
    assert names["audio"] and all(n.startswith("audio.") for n in names["audio"])
    assert names["video"] and all(n.startswith("video.") for n in names["video"])
    assert [h["epoch"] for h in result.history] == [1, 2, 3]


def test_fit_gblend_gives_the_uninformative_stream_less_weight():
    torch.manual_seed(0)
    train, test = make_data(num_train=400, num_test=200)
    train.audio = torch.randn_like(train.audio)  # audio now carries nothing: its held-out loss cannot improve
    result = blendtune.fit(model=TwoStreamNet(), train=list(train), test=test, strategy="gblend", epochs=2,
                           super_epoch=1, lr=1e-3, optimizer="adam", held_out_ratio=0.25)
    w = result.trainer.strategy.weights
    assert w["audio"] < w["video"] and w["audio"] < 1 / 3  # moved away from uniform, toward video


def test_fit_takes_explicit_held_out_data_and_a_strategy_object(data):
    train, test = data
    strategy = blendtune.build_strategy("modality_dropout", p=0.4)
    result = blendtune.fit(model=TwoStreamNet(), train=train, held_out=test, test=test, strategy=strategy,
                           epochs=1, lr=1e-3, optimizer="adam")
    assert len(result.trainer.splits.train) == len(train) and "acc/held_out/fused" in result.metrics


def test_fit_errors_name_the_option(data):
    train, test = data
    with pytest.raises(UserError, match=r"unknown option\(s\) alphaa"):
        blendtune.fit(model=TwoStreamNet(), train=train, test=test, strategy="ogm", alphaa=0.3)
    with pytest.raises(UserError, match=r"fit\(p=\.\.\.\): expected 0 <= p < 1"):
        blendtune.fit(model=TwoStreamNet(), train=train, test=test, strategy="modality_dropout", p=1.5)
    with pytest.raises(UserError, match=r"expected an item \(dict\[modality, Tensor\], target\)"):
        blendtune.fit(model=TwoStreamNet(), train=[(1, 2)] * 8, test=test)


def _cli(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO / "examples")}
    return subprocess.run([sys.executable, "-m", "blendtune.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)



def test_target_parts_train_from_the_cli(tmp_path):
    proc = _cli("train", "examples/own_model.yaml", "train.epochs=2", "wandb=false", "train.progress=false",
                f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_metrics(Path(proc.stdout.strip().splitlines()[-1]) / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["acc/test/fused"] > 0.5
    assert rows[-1]["ogm/coeff/video"] < 1.0


@pytest.mark.slow  # compare's default-run tests: test_sweep.py (CLI), test_python_api.py (your objects on Ray workers)
def test_target_parts_compare_as_a_sweep(tmp_path):
    proc = _cli("compare", "examples/own_model.yaml", "--strategies", "naive,ogm_ge", "--seeds", "1",
                "train.epochs=2", "wandb=false", "data.args={num_train: 200, num_test: 100}", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (Path(proc.stdout.strip().splitlines()[-1]) / "report.md").read_text()
    assert "| naive | 1 |" in report and "| ogm_ge | 1 |" in report


def test_a_bad_target_is_one_line():
    proc = _cli("train", "examples/own_model.yaml", "model._target_=my_av.NoSuchNet", "wandb=false")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "config key 'model._target_': cannot import 'my_av.NoSuchNet'" in proc.stderr
