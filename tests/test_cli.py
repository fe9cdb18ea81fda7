"""The command line as a user runs it: a run directory with config and metrics, clear one-line errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blendtune.loggers import read_metrics
from conftest import REPO, TINY, make_tiny_avdigits, needs_data


def blendtune(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "blendtune.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd or REPO, timeout=600)


def test_train_writes_config_metrics_and_prints_the_run_dir(tmp_path):
    proc = blendtune("train", "experiments/synthetic_gblend.yaml", *TINY, "train.epochs=3",
                     "gblend.super_epoch=1", "gblend.warmup=0", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path and (run_dir / "config.yaml").is_file()
    assert "epoch" in proc.stdout and "test/fused" in proc.stdout  # the per-epoch table
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in ("acc/test/fused", "acc/held_out/clean", "loss/train/memorizable", "ogr/fused",
                "gblend/w/clean", "gblend/w/memorizable", "gblend/w/fused", "acc/test/ensemble"):
        assert key in rows[-1], key
    assert sum(rows[-1][f"gblend/w/{h}"] for h in ("clean", "memorizable", "fused")) == pytest.approx(1.0)
    assert "strategy: gblend" in (run_dir / "config.yaml").read_text()


def test_ogm_metrics_in_the_file(tmp_path):
    proc = blendtune("train", "experiments/synthetic_ogm_ge.yaml", *TINY, f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    row = read_metrics(Path(proc.stdout.strip().splitlines()[-1]) / "metrics.jsonl")[-1]
    assert {"ogm/coeff/clean", "ogm/coeff/memorizable", "ogm/rho/clean", "ogm/rho/memorizable"} <= set(row)


def test_resume_continues_and_extends_a_run(tmp_path):
    proc = blendtune("train", "experiments/synthetic_naive.yaml", *TINY, f"output_dir={tmp_path}")
    run_dir = proc.stdout.strip().splitlines()[-1]
    proc = blendtune("train", "--resume", run_dir, "train.epochs=4")
    assert proc.returncode == 0, proc.stderr
    assert "resuming at epoch 3 of 4" in proc.stdout
    assert [r["epoch"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize("args,expected", [
    (["train", "experiments/synthetic_naive.yaml", "optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    (["train", "experiments/synthetic_naive.yaml", "train.epochs=many"], "config key 'train.epochs'"),
    (["train", "experiments/nope.yaml"], "experiment file not found"),
    (["train", "experiments/synthetic_naive.yaml", "strategy=unimodal", "unimodal.modality=smell"],
     "config key 'unimodal.modality': expected one of clean, memorizable"),
])
def test_user_errors_are_one_line_without_traceback(args, expected):
    proc = blendtune(*args)
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_data_root_is_one_clear_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BLENDTUNE_DATA_ROOT"}
    proc = subprocess.run([sys.executable, "-m", "blendtune.cli", "train", "experiments/avdigits_naive.yaml",
                           f"output_dir={tmp_path}"], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data root not set" in proc.stderr and "BLENDTUNE_DATA_ROOT" in proc.stderr


def test_unreadable_wav_is_one_clear_line(tmp_path):
    root = tmp_path / "data"
    make_tiny_avdigits(root, broken="1_cid_3.wav")
    proc = blendtune("train", "experiments/avdigits_naive.yaml", "data.avdigits.test_speakers=[cid]",
                     f"output_dir={tmp_path}", env={"BLENDTUNE_DATA_ROOT": str(root)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot decode WAV file" in proc.stderr and "1_cid_3.wav" in proc.stderr


@needs_data
def test_avdigits_two_epochs_end_to_end(tmp_path):
    proc = blendtune("train", "experiments/avdigits_gblend.yaml", "train.epochs=2", "gblend.warmup=0",
                     "gblend.super_epoch=1", "train.progress=false", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    rows = read_metrics(Path(proc.stdout.strip().splitlines()[-1]) / "metrics.jsonl")
    assert len(rows) == 2
    # two epochs lift the fused head well above chance (10 digits) on unseen speakers
    assert rows[-1]["acc/test/fused"] > 0.3
    assert rows[-1]["gblend/w/image"] + rows[-1]["gblend/w/audio"] + rows[-1]["gblend/w/fused"] == pytest.approx(1.0)
