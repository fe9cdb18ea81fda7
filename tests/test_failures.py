"""Resume and failure paths as a user meets them: one clear line, exit 2, nothing lost or overwritten."""
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from blendtune.config import load_config
from blendtune.loggers import read_metrics
from conftest import CREMA_TINY, REPO, TINY, cli_in_process, make_crema_d


@pytest.fixture
def cli(capfd):
    """`blendtune ARGS` in this process (cli.main), as `python -m blendtune.cli` from the repository would run;
    the Ctrl-C and lock tests below start processes of their own."""
    return lambda *args, env=None: cli_in_process(capfd, *args, env=env)


def one_line_error(proc, *expected):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for text in expected:
        assert text in proc.stderr, (text, proc.stderr)


def finished_run(cli, tmp_path, *extra):
    proc = cli("train", "experiments/synthetic_gblend.yaml", *TINY, "train.epochs=3", "gblend.warmup=0",
               "gblend.super_epoch=1", f"output_dir={tmp_path}", *extra)
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    return run_dir, {p.name: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "metrics.jsonl")}


def untouched(run_dir, files):
    return all((run_dir / name).read_bytes() == data for name, data in files.items())


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_resume_refusals_change_nothing_and_safe_keys_resume(tmp_path, cli):
    run_dir, files = finished_run(cli, tmp_path)
    # fewer epochs than the checkpoint, or none left to train
    one_line_error(cli("train", "--resume", run_dir, "train.epochs=2"), "checkpoint is at epoch 3",
                   "train.epochs=4 or more")
    one_line_error(cli("train", "--resume", run_dir), "leaves nothing to train")
    # a key that would make it another experiment
    one_line_error(cli("train", "--resume", run_dir, "strategy=ogm", "train.epochs=4"),
                   "strategy cannot change when resuming", "train.epochs", "data.root")
    one_line_error(cli("train", "--resume", run_dir, "optim.lr=0.5", "train.epochs=4"), "optim.lr cannot change")
    assert untouched(run_dir, files)
    ok = cli("train", "--resume", run_dir, "train.epochs=4", "train.checkpoint_every=2")  # safe keys
    assert ok.returncode == 0, ok.stderr
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    assert load_config(run_dir / "config.yaml").train.epochs == 4
    # a checkpoint weights_only refuses: one line, never a hint to disable it, config.yaml untouched
    files = {p.name: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "metrics.jsonl")}
    with open(run_dir / "checkpoints" / "last.pt", "wb") as f:
        pickle.dump({"epoch": 4, "model": _Payload()}, f)
    proc = cli("train", "--resume", run_dir, "train.epochs=6")
    one_line_error(proc, "refused checkpoint", "last.pt", "weights_only=True")
    assert "weights_only=False" not in proc.stderr
    assert untouched(run_dir, files)


def test_divergence_before_any_checkpoint_does_not_name_one(tmp_path, cli):
    proc = cli("train", "experiments/synthetic_naive.yaml", *TINY, "optim.lr=1e30", "optim.momentum=0.0",
               f"output_dir={tmp_path}")
    one_line_error(proc, "loss became", "in epoch 1", "no checkpoint was written before it")
    assert "checkpoints'" not in proc.stderr


def test_sweep_config_errors_come_before_ray_and_create_nothing(tmp_path, cli):
    out = tmp_path / "runs"
    one_line_error(cli("sweep", "experiments/synthetic_naive.yaml", "--space", "search_spaces/balancing_knobs.yaml",
                       *TINY, "train.epochs=1", f"output_dir={out}"),
                   "'sweep.grace_period' (2)", "'train.epochs' (1)")
    bad_space = tmp_path / "space.yaml"
    bad_space.write_text("# blendtune sweep\noptim.learning_rate: {uniform: [0.1, 0.2]}\n")
    one_line_error(cli("sweep", "experiments/synthetic_naive.yaml", "--space", bad_space, *TINY, f"output_dir={out}"),
                   str(bad_space), "'optim.learning_rate' is not a config key")
    assert not out.exists()


def test_a_missing_data_root_is_the_same_line_for_train_sweep_and_compare(tmp_path, cli):
    out = tmp_path / "runs"
    missing = tmp_path / "nowhere"
    env = {"BLENDTUNE_DATA_ROOT": str(missing)}
    lines = []
    for args in (["train", "experiments/avdigits_naive.yaml"],
                 ["sweep", "experiments/avdigits_naive.yaml", "--space", "search_spaces/ogm.yaml", "strategy=ogm"],
                 ["compare", "experiments/avdigits_naive.yaml", "--strategies", "naive", "--seeds", "1"]):
        began = time.time()
        proc = cli(*args, f"output_dir={out}", env=env)
        one_line_error(proc, str(missing), "is not a directory")
        assert time.time() - began < 30  # no Ray started
        lines.append(proc.stderr)
    assert len(set(lines)) == 1 and not out.exists()


def test_an_output_dir_that_cannot_be_made_is_one_line(tmp_path, cli):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    one_line_error(cli("train", "experiments/synthetic_naive.yaml", *TINY, f"output_dir={blocker}/runs"),
                   "config key 'output_dir': cannot create", str(blocker))


def test_short_clips_are_flagged_by_data_check_and_counted_in_training(tmp_path, cli):
    root = make_crema_d(tmp_path / "crema", per_class=1)
    short = root / "AudioWAV" / "1001_T0_NEU_XX.wav"
    soundfile.write(short, np.zeros(78, dtype=np.float32), 8000)  # a valid header, 10 ms
    check = cli("data", "check", "crema_d", "--root", root)
    assert check.returncode == 1 and "short clip" in check.stdout and "1001_T0_NEU_XX.wav" in check.stdout
    proc = cli("train", "experiments/crema_d_naive.yaml", *CREMA_TINY, f"data.root={root}", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 clip(s) shorter than 0.1 s" in proc.stderr and "1001_T0_NEU_XX.wav" in proc.stderr


def test_more_loader_workers_than_cpus_are_capped_with_one_note(capsys):
    from blendtune.feeding import available_cpus
    from blendtune.build import build_trainer
    trainer = build_trainer(load_config(None, TINY + [f"data.num_workers={available_cpus() + 6}"]))
    assert trainer.feed.workers == available_cpus() and trainer.train_loader.num_workers == available_cpus()
    err = capsys.readouterr().err
    assert err.count("capped to the") == 1


def test_ctrl_c_names_the_run_to_resume(tmp_path):
    args = ["train", "experiments/synthetic_naive.yaml", *TINY, "train.epochs=50", "data.synthetic.num_train=20000",
            f"output_dir={tmp_path}"]
    # A shell's background job (`make test &`, nohup) ignores SIGINT, and Python then installs no Ctrl-C
    # handler in the child: give it the default disposition a terminal would.
    proc = subprocess.Popen([sys.executable, "-m", "blendtune.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run_dir = proc.stdout.readline().split("run dir: ")[1].strip()
    deadline = time.time() + 120
    while not (Path(run_dir) / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert f"resume with `blendtune train --resume {run_dir}`" in err
    assert torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)["epoch"] >= 1


def test_a_worker_restarted_before_its_first_checkpoint_rewrites_the_metrics_file(tmp_path):
    # A Ray Train worker killed before its first checkpoint was registered restarts at epoch 0 in the same
    # directory: the epochs its first attempt logged must go, not be followed by a second epoch 1.
    import json
    from blendtune.worker import RunSpec, run
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2)))
    run(load_config(None, TINY + ["train.epochs=2", "wandb=false", "train.progress=false"]), RunSpec(log_dir=tmp_path))
    epochs = [m["epoch"] for m in read_metrics(tmp_path / "metrics.jsonl")]
    assert epochs == [1, 2] and "acc/test/fused" in read_metrics(tmp_path / "metrics.jsonl")[0]


def test_wandb_online_without_a_key_is_one_line_before_anything_is_created(tmp_path, cli):
    env = dict(WANDB_API_KEY=None, WANDB_MODE="online", HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"))
    out = tmp_path / "runs"
    proc = cli("train", "experiments/synthetic_naive.yaml", *TINY, "wandb=true", f"output_dir={out}", env=env)
    one_line_error(proc, "WANDB_MODE=online, but W&B has no API key", "WANDB_MODE=offline")
    assert not out.exists()


def test_a_run_folder_is_locked_while_a_process_trains_in_it(tmp_path, cli):
    # the lock is held by a process of its own (killed below); the resumes that meet it run in this one
    first = subprocess.Popen([sys.executable, "-m", "blendtune.cli", "train", "experiments/synthetic_naive.yaml", *TINY,
                              "train.epochs=200", f"output_dir={tmp_path}"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        run_dir = Path(first.stdout.readline().split("run dir: ")[1].strip())
        deadline = time.time() + 120
        while time.time() < deadline and not (run_dir / "checkpoints" / "last.pt").is_file():
            time.sleep(0.1)
        config = (run_dir / "config.yaml").read_text()
        second = cli("train", "--resume", run_dir, "train.epochs=300")
        one_line_error(second, f"'{run_dir}' is in use: blendtune process {first.pid} is training in it")
        assert (run_dir / "config.yaml").read_text() == config and first.poll() is None  # the first one goes on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the killed process left no stale lock: the run resumes
    resumed = cli("train", "--resume", run_dir, "train.epochs=2")
    assert resumed.returncode in (0, 2) and "is in use" not in resumed.stderr, resumed.stderr[-1500:]
