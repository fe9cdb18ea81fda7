"""The command line as a user runs it: a run directory with config and metrics, clear one-line errors."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blendtune.config import load_config
from blendtune.loggers import read_metrics
from conftest import (REPO, TINY, assert_wandb_matches_metrics, cli_in_process, make_tiny_avdigits, needs_data,
                      wandb_history)


@pytest.fixture
def blendtune(capsys):
    """`blendtune ARGS` run in this process (cli.main), as `python -m blendtune.cli` from the repository would:
    returncode, stdout, stderr. test_missing_data_root_is_one_clear_line runs the real `python -m` entry."""
    return lambda *args, env=None: cli_in_process(capsys, *args, env=env)


def blendtune_process(*args, env=None):
    """`python -m blendtune.cli ARGS` in a process of its own."""
    return subprocess.run([sys.executable, "-m", "blendtune.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO, timeout=600)


def test_train_writes_config_metrics_and_prints_the_run_dir(tmp_path, blendtune):
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
    # the weight moves toward the modality that generalises: every estimate ranks clean above
    # memorizable, which loses weight from the uniform start (1/3)
    for r in rows:
        assert r["gblend/w/clean"] > r["gblend/w/memorizable"], r["epoch"]
    assert rows[-1]["gblend/w/memorizable"] < 1 / 3 < rows[-1]["gblend/w/clean"]
    assert "strategy: gblend" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize("experiment", ["synthetic_ogm.yaml", "synthetic_ogm_ge.yaml"])
def test_ogm_metrics_in_the_file_slow_the_dominant_modality_only(experiment, tmp_path, blendtune):
    # clean carries a strong signal: OGM must see it dominate and slow its encoder, never the other one
    proc = blendtune("train", f"experiments/{experiment}", *TINY, "data.synthetic.modalities.clean.signal=2.0",
                     f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    first, last = read_metrics(Path(proc.stdout.strip().splitlines()[-1]) / "metrics.jsonl")
    assert {"ogm/coeff/clean", "ogm/coeff/memorizable", "ogm/rho/clean", "ogm/rho/memorizable"} <= set(last)
    # epoch 1 starts from a random model (either modality may lead a batch); clean is slowed more
    assert first["ogm/coeff/clean"] < first["ogm/coeff/memorizable"]
    # by epoch 2 clean leads every batch: rho > 1 and k < 1 for it, k == 1 exactly for the other
    assert last["ogm/rho/clean"] > 1.0 > last["ogm/rho/memorizable"]
    assert last["ogm/coeff/clean"] < 1.0 and last["ogm/coeff/memorizable"] == 1.0
    alpha = load_config(REPO / "experiments" / experiment).ogm.alpha  # k = 1 - tanh(alpha * rho), per batch
    assert last["ogm/coeff/clean"] == pytest.approx(1 - math.tanh(alpha * last["ogm/rho/clean"]), abs=0.02)


def test_resume_continues_and_extends_a_run_in_metrics_and_wandb(tmp_path, blendtune):
    proc = blendtune("train", "experiments/synthetic_ogm.yaml", *TINY, "wandb=true", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    run_dir = proc.stdout.strip().splitlines()[-1]
    proc = blendtune("train", "--resume", run_dir, "train.epochs=4")
    assert proc.returncode == 0, proc.stderr
    assert "resuming at epoch 3 of 4" in proc.stdout
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    # the offline W&B run (one session before the resume, one after) has each epoch once, with the
    # values of metrics.jsonl, OGM's series included
    sessions = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(sessions) == 2 and {f.name for f in sessions} == {f"run-{Path(run_dir).name}.wandb"}  # one W&B run
    history = wandb_history(run_dir)
    assert all(f"ogm/coeff/{m}" in h and f"ogm/rho/{m}" in h for h in history for m in ("clean", "memorizable"))
    assert_wandb_matches_metrics(history, rows)


@pytest.mark.slow  # a known bug, kept visible: 19 s of the default run for a result that cannot change
@pytest.mark.xfail(strict=True, reason="known: W&B keeps the epochs logged after the last checkpoint, and a "
                   "resume logs them again (metrics.jsonl drops and rewrites them)")
def test_wandb_after_resuming_from_an_older_checkpoint_has_each_epoch_once(tmp_path):
    # in processes of their own, as when it was written (slow: not in the default run)
    # A run that logged epoch 3 but died before checkpointing it: simulated by putting epoch 2's
    # checkpoint back after epoch 3 (a crash between the loggers and the checkpoint write).
    proc = blendtune_process("train", "experiments/synthetic_ogm.yaml", *TINY, "wandb=true", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    checkpoint = run_dir / "checkpoints" / "last.pt"
    at_epoch_2 = checkpoint.read_bytes()
    assert blendtune_process("train", "--resume", str(run_dir), "train.epochs=3").returncode == 0
    checkpoint.write_bytes(at_epoch_2)
    proc = blendtune_process("train", "--resume", str(run_dir), "train.epochs=4")
    assert proc.returncode == 0 and "resuming at epoch 3 of 4" in proc.stdout, proc.stderr
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [h["_step"] for h in wandb_history(run_dir)] == [1, 2, 3, 4]  # today: [1, 2, 3, 3, 4]


@pytest.mark.parametrize("args,expected", [
    (["train", "experiments/synthetic_naive.yaml", "optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    (["train", "experiments/synthetic_naive.yaml", "train.epochs=many"], "config key 'train.epochs'"),
    (["train", "experiments/nope.yaml"], "experiment file not found"),
    (["train", "experiments/synthetic_naive.yaml", "optim.lr=[1"], "command-line overrides"),  # YAML's own error
    (["train", "experiments/synthetic_naive.yaml", "strategy=unimodal", "unimodal.modality=smell"],
     "config key 'unimodal.modality': expected one of clean, memorizable"),
    (["train", "experiments/synthetic_naive.yaml", "data.held_out_ratio=1.5"],
     "config key 'data.held_out_ratio': expected 0 <= ratio < 1, got 1.5"),
    (["sweep", "experiments/synthetic_naive.yaml", "--space", "search_spaces/ogm.yaml", "sweep.num_samples=0"],
     "config key 'sweep.num_samples': expected a positive number, got 0"),
])
def test_user_errors_are_one_line_without_traceback(args, expected, blendtune):
    proc = blendtune(*args)
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_data_root_is_one_clear_line(tmp_path):
    # `python -m blendtune.cli` itself (exit status through sys.exit), in an environment without the variable
    env = {k: v for k, v in os.environ.items() if k != "BLENDTUNE_DATA_ROOT"}
    proc = subprocess.run([sys.executable, "-m", "blendtune.cli", "train", "experiments/avdigits_naive.yaml",
                           f"output_dir={tmp_path}"], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data root not set" in proc.stderr and "BLENDTUNE_DATA_ROOT" in proc.stderr


def test_unreadable_wav_is_one_clear_line(tmp_path, blendtune):
    root = tmp_path / "data"
    make_tiny_avdigits(root, broken="1_cid_3.wav")
    proc = blendtune("train", "experiments/avdigits_naive.yaml", "data.avdigits.test_speakers=[cid]",
                     f"output_dir={tmp_path}", env={"BLENDTUNE_DATA_ROOT": str(root)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot decode WAV file" in proc.stderr and "1_cid_3.wav" in proc.stderr


@pytest.mark.parametrize("command", ["train", "compare"])
def test_resume_of_a_directory_that_is_not_a_run_is_one_line_and_writes_nothing(command, tmp_path, blendtune):
    (tmp_path / "notes.txt").write_text("not a run\n")
    proc = blendtune(command, "--resume", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"'{tmp_path}' is not a blendtune {'run' if command == 'train' else 'sweep'} directory" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


class _Payload:
    """Unpickling it runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_a_checkpoint_with_a_pickled_payload_is_refused_without_running_it(tmp_path, blendtune):
    from blendtune.runs import write_config
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_config(run_dir, load_config(REPO / "experiments" / "synthetic_naive.yaml", TINY))
    config = (run_dir / "config.yaml").read_bytes()
    marker = tmp_path / "payload-ran"
    (run_dir / "checkpoints").mkdir()
    torch.save({"epoch": 1, "model": _Payload(marker)}, run_dir / "checkpoints" / "last.pt")  # torch's zip format
    proc = blendtune("train", "--resume", str(run_dir), "train.epochs=3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "refused checkpoint" in proc.stderr and "last.pt" in proc.stderr
    assert not marker.exists()  # weights_only refused it before anything ran
    assert (run_dir / "config.yaml").read_bytes() == config and not (run_dir / "metrics.jsonl").exists()


@needs_data
def test_avdigits_two_epochs_end_to_end(tmp_path, blendtune):
    # the shipped experiment holds out a whole training speaker (data.held_out_by_group): audio overfits
    # the speakers it trains on, the MNIST image does not
    proc = blendtune("train", "experiments/avdigits_gblend.yaml", "train.epochs=2", "gblend.warmup=0",
                     "gblend.super_epoch=1", "train.progress=false", "wandb=false", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    rows = read_metrics(Path(proc.stdout.strip().splitlines()[-1]) / "metrics.jsonl")
    assert len(rows) == 2
    # two epochs lift the fused head well above chance (10 digits) on unseen speakers
    assert rows[-1]["acc/test/fused"] > 0.3
    assert rows[-1]["gblend/w/image"] + rows[-1]["gblend/w/audio"] + rows[-1]["gblend/w/fused"] == pytest.approx(1.0)
    # every estimate (one per epoch) moves weight to the image, which generalises to the held-out speaker
    for r in rows:
        assert r["gblend/ogr/audio"] > r["gblend/ogr/image"], r["epoch"]
        assert r["gblend/w/image"] > r["gblend/w/audio"], r["epoch"]
    assert rows[-1]["gblend/w/audio"] < 1 / 3 < rows[-1]["gblend/w/image"]
