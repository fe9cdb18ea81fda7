"""Ray Tune sweeps and Ray Train workers on a local Ray: schedulers, PBT exploits, resume, failures."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from blendtune.config import load_config
from blendtune.report import load_trials
from blendtune.loggers import read_metrics
from blendtune.config import TrialConfig
from blendtune.runs import create_sweep_dir
from blendtune.search_space import parse_space
from blendtune.sweeps import run_sweep
from blendtune.wandb_files import read_history
from conftest import REPO, TINY, assert_wandb_matches_metrics, wandb_history

SMALL = TINY + ["data.synthetic.num_train=150", "data.synthetic.num_test=60"]


@pytest.fixture(scope="module", autouse=True)
def _one_local_ray_for_the_in_process_sweeps():
    """The sweeps run in this process share one local Ray (started by the first, as `run_sweep` would
    start it): a Ray start and stop per test is seconds of CI time. Commands run as subprocesses start
    their own."""
    yield
    import ray
    if ray.is_initialized():
        ray.shutdown()


def sweep(tmp_path, overrides, space, variants=None):
    from blendtune.launch import init_ray
    cfg = load_config(None, SMALL + [f"output_dir={tmp_path}"] + overrides)
    space = parse_space(space, "test")
    run_dir = create_sweep_dir(cfg, space, variants)
    init_ray(cfg.sweep.address, log_to_driver=False)  # run_sweep leaves a Ray it did not start running
    return run_dir, run_sweep(cfg, space, run_dir, TrialConfig(cfg), variants)


def result_rows(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


def blendtune(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "blendtune.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600, **kwargs)


def test_every_trial_keeps_its_files_when_tune_reuses_worker_processes(tmp_path):
    # 8 trials on 2 CPUs: Tune runs later trials in the processes of earlier ones (reuse_actors), and ASHA
    # stops some mid-way. Each trial's folder in the sweep's storage has its own files, every epoch it ran.
    # Learning rates from good to hopeless: the late ones reach ASHA's first rung below the median recorded
    # there, whatever the timing (random draws in random order let a loaded machine's ordering stop none).
    run_dir, results = sweep(tmp_path, ["wandb=true", "train.epochs=3", "sweep.search=grid",
                                        "sweep.scheduler=asha", "sweep.grace_period=1", "sweep.reduction_factor=2"],
                             {"optim.lr": {"grid": [0.05, 0.03, 0.1, 0.02, 1e-5, 2e-5, 3e-5, 1e-6]}})
    assert not [r for r in results if r.error]
    trials = [d for d in (run_dir / "tune").iterdir() if (d / "params.json").is_file()]
    assert len(trials) == 8
    processes = {row["pid"] for d in trials for row in result_rows(d)}
    assert len(processes) < len(trials), processes  # processes were reused
    stopped = 0
    for trial in trials:
        epochs = [row["epoch"] for row in result_rows(trial)]
        stopped += len(epochs) < 3
        metrics = read_metrics(trial / "metrics.jsonl")
        assert [m["epoch"] for m in metrics] == epochs == list(range(1, len(epochs) + 1)), trial.name
        assert_wandb_matches_metrics(wandb_history(trial), metrics)
        assert list(trial.glob("checkpoint_*/last.pt")), trial.name
    assert stopped, "ASHA stopped no trial"


def test_asha_with_optuna_stops_trials_early_and_the_sweep_finishes(tmp_path):
    # lr spans 4 decades: the slow learners fall behind and ASHA stops them after the grace period.
    run_dir, results = sweep(tmp_path, ["train.epochs=4", "sweep.num_samples=6", "sweep.grace_period=1",
                                        "sweep.reduction_factor=2", "sweep.search=optuna", "sweep.scheduler=asha"],
                             {"optim.lr": {"loguniform": [1e-4, 1.0]}})
    assert not [r for r in results if r.error]
    epochs = sorted(len(t["history"]) for t in load_trials(run_dir))
    assert len(epochs) == 6
    assert epochs[0] < 4 and epochs[-1] == 4, epochs  # some stopped early, the best ran to the end


def test_asha_with_multi_worker_train_trials_releases_their_workers(tmp_path):
    # Each trial is a 2-worker DDP TorchTrainer. Without freeing a stopped trial's placement group the
    # next trial's workers would wait forever (ray issue 54305); the sweep must finish.
    run_dir, results = sweep(tmp_path, ["workers=2", "sweep.cpus_per_worker=0.5", "train.epochs=3",
                                        "sweep.num_samples=1", "sweep.grace_period=1", "sweep.reduction_factor=2",
                                        "sweep.search=grid"],
                             {"optim.lr": {"grid": [0.5, 1e-4]}})  # a good trial first, then one it beats
    assert not [r for r in results if r.error]
    trials = load_trials(run_dir)
    assert len(trials) == 2 and all(t["history"] for t in trials)
    assert min(len(t["history"]) for t in trials) < 3  # ASHA stopped at least one
    for t in trials:  # rank 0 of each trial's Train run kept its metrics in the trial's folder, every epoch
        epochs = [m["epoch"] for m in read_metrics(run_dir / "tune" / t["trial"] / "metrics.jsonl")]
        # Train workers do not wait for Tune: a trial Tune stopped may have trained epochs Tune never heard of
        assert epochs[:len(t["history"])] == [row["epoch"] for row in t["history"]], t["trial"]
        assert epochs == list(range(1, len(epochs) + 1)), t["trial"]


def test_pbt_exploit_restores_the_donor_trials_weights(tmp_path):
    # All four trials at once (half a CPU each), with epochs long enough (2000 samples) for PBT's decisions to
    # reach a trial before its next epoch ends: a trial reports and trains on without waiting for the
    # scheduler, so on a fast idle machine tiny trials finished before any exploit reached them.
    run_dir, results = sweep(tmp_path, ["train.epochs=4", "sweep.num_samples=4", "sweep.scheduler=pbt",
                                        "sweep.search=random", "sweep.perturbation_interval=1",
                                        "sweep.cpus_per_worker=0.5", "data.synthetic.num_train=2000"],
                             {"optim.lr": {"loguniform": [1e-4, 0.3]}})
    assert not [r for r in results if r.error]
    rows = {d.name: result_rows(d) for d in (run_dir / "tune").iterdir() if (d / "result.json").is_file()}
    reported = {(row["epoch"], round(row["model/checksum"], 6)): name for name, rs in rows.items() for row in rs}
    exploits = [(name, row) for name, rs in rows.items() for row in rs if "restored/checksum" in row]
    from_others = [(name, row) for name, row in exploits
                   if reported.get((row["restored/epoch"], round(row["restored/checksum"], 6)), name) != name]
    assert from_others, "no trial continued from another trial's checkpoint"
    name, row = from_others[0]
    assert row["epoch"] == row["restored/epoch"] + 1  # it continued training from the donor's epoch


def test_wandb_offline_run_has_ogr_and_blend_weight_series(tmp_path):
    run_dir, results = sweep(tmp_path, ["wandb=true", "strategy=gblend", "gblend.super_epoch=1",
                                        "train.epochs=3", "sweep.num_samples=1", "sweep.scheduler=none",
                                        "sweep.search=random"], {"optim.lr": {"choice": [0.01]}})
    files = list((run_dir / "tune").glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history = read_history(files[0])
    assert [row["_step"] for row in history] == [1, 2, 3]  # epoch is the step
    for head in ("clean", "memorizable", "fused"):
        assert all(f"gblend/w/{head}" in row and f"ogr/{head}" in row for row in history)
    for row in history:
        assert sum(row[f"gblend/w/{h}"] for h in ("clean", "memorizable", "fused")) == pytest.approx(1.0)
        # every estimate moves weight toward the modality that generalises
        assert row["gblend/w/memorizable"] < row["gblend/w/clean"], row["_step"]
    assert history[-1]["gblend/w/memorizable"] < 1 / 3 < history[-1]["gblend/w/clean"]  # from uniform
    # the W&B series are the trial's metrics.jsonl, value for value
    assert_wandb_matches_metrics(history, read_metrics(files[0].parents[2] / "metrics.jsonl"))


def test_compare_writes_table_csv_plots_and_report_rebuilds(tmp_path):
    proc = blendtune("compare", "experiments/synthetic_gblend.yaml", "--strategies", "naive,gblend:ema=0.5,unimodal:clean",
                     "--seeds", "2", *SMALL, "train.epochs=2", "gblend.warmup=0", "gblend.super_epoch=1",
                     f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    rows = (run_dir / "results.csv").read_text().splitlines()
    assert rows[0].startswith("trial,strategy,seed,epochs,final_acc_clean") and len(rows) == 1 + 6
    report = (run_dir / "report.md").read_text()
    for label in ("| naive | 2 |", "| gblend:ema=0.5 | 2 |", "| unimodal:clean | 2 |"):  # a variant as written
        assert label in report
    for png in ("blend_weights.png", "ogr.png", "losses.png"):
        assert (run_dir / png).stat().st_size > 1000 and f"]({png})" in report
    (run_dir / "report.md").unlink()
    again = blendtune("report", str(run_dir))
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == str(run_dir)
    assert (run_dir / "report.md").read_text() == report
    # (resuming a finished comparison runs nothing again: test_cluster.py's compare on S3 checks it)


def test_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    validate_config(config)
    assert config["available_node_types"]["gpu_worker"]["max_workers"] >= 1
    assert any("blendtune" in c for c in config["setup_commands"])
    assert any("ray[tune,train]==2.60.0" in c for c in config["setup_commands"])


def _wait_for(predicate, timeout=300, every=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def test_sweep_resumes_after_the_driver_is_killed_without_losing_or_redoing_trials(tmp_path):
    args = ["sweep", "experiments/synthetic_naive.yaml", "--space", "search_spaces/balancing_knobs.yaml", *SMALL,
            "train.epochs=6", "sweep.num_samples=2", "sweep.scheduler=none", "sweep.search=random",
            "data.synthetic.num_train=8000", f"output_dir={tmp_path}"]  # epochs of about a second
    driver = subprocess.Popen([sys.executable, "-m", "blendtune.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        run_dir = Path(driver.stdout.readline().split("sweep dir: ")[1].strip())
        # kill mid-trial: once a trial has checkpointed an epoch, before any trial is done
        assert _wait_for(lambda: any(len(result_rows(p.parent)) >= 2 for p in (run_dir / "tune").glob("*/result.json")),
                         every=0.1)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
    finally:
        driver.wait()
    before = {p.parent.name: [r["epoch"] for r in result_rows(p.parent)] for p in (run_dir / "tune").glob("*/result.json")}
    assert all(len(e) < 6 for e in before.values())
    # a kill while Tune rewrites its state leaves the file empty (seen in CI): the resume must survive it
    sorted((run_dir / "tune").glob("experiment_state-*.json"))[-1].write_text("")

    proc = blendtune("sweep", "--resume", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(run_dir)
    from blendtune.report import tune_trial_ids
    known = tune_trial_ids(run_dir / "tune")
    # a trial Tune started after its last state save is restarted as a new trial: only Tune's count
    trials = sorted(p for p in (run_dir / "tune").glob("*/result.json") if any(f"_{t}_" in p.parent.name for t in known))
    assert len(trials) == 2  # no trial lost, none duplicated
    for path in trials:
        epochs = [r["epoch"] for r in result_rows(path.parent)]
        assert sorted(set(epochs)) == [1, 2, 3, 4, 5, 6]
        done_before = before.get(path.parent.name, [])
        # continued from its last checkpoint: at most the epoch in flight is redone, never from epoch 1
        assert len(epochs) - 6 <= 1, epochs
        if len(done_before) >= 2:
            assert epochs.count(1) == 1


def test_a_killed_train_worker_is_restarted_from_the_last_checkpoint(tmp_path):
    import psutil
    args = ["train", "experiments/synthetic_naive.yaml", *SMALL, "workers=2", "sweep.cpus_per_worker=0.5",
            "train.epochs=8", "data.synthetic.num_train=1500", f"output_dir={tmp_path}"]
    driver = subprocess.Popen([sys.executable, "-m", "blendtune.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        run_dir = Path(driver.stdout.readline().split("run dir: ")[1].strip())
        metrics = run_dir / "metrics.jsonl"
        assert _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2)
        workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
        assert workers
        workers[-1].kill()
        out, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0
    epochs = [m["epoch"] for m in read_metrics(metrics)]
    assert epochs == list(range(1, 9))  # the file is rewritten from the checkpoint: no gap, no duplicate
    assert out.strip().splitlines()[-1] == str(run_dir)


def test_a_grid_runs_each_point_once_and_the_report_never_counts_a_repeated_seed(tmp_path):
    import blendtune
    from blendtune.report import write_report
    space = {"strategy": {"grid": ["naive", "modality_dropout"]}, "seed": {"grid": [0, 1]}}
    base = {**{o.split("=")[0]: o.split("=", 1)[1] for o in SMALL}, "train.epochs": 1, "sweep.search": "grid",
            "sweep.scheduler": "none", "output_dir": str(tmp_path)}
    run_dir, results = blendtune.sweep(space=space, overrides=base)
    assert len(results) == 4  # each point once: sweep.num_samples is unset
    report = write_report(run_dir).read_text()
    assert "| naive | 2 | 2 | 1 |" in report and "†" not in report
    assert "| modality_dropout | 2 |" in report and "Difference to naive" in report

    run_dir, results = blendtune.sweep(space=space, overrides={**base, "sweep.num_samples": 2})
    assert len(results) == 8  # asked for: every point twice
    report = write_report(run_dir).read_text()
    # 4 trials of naive over 2 seeds: no interval, no paired difference, and the reason given
    assert "| naive | 4 | 2 | 1 |" in report and "naive: 4 trials" in report
    row = next(line for line in report.splitlines() if line.startswith("| naive |"))
    assert "±" not in row and "†" in row
    assert "Difference to naive" not in report
