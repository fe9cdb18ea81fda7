"""Sweeps at cluster scale, with real parts started here: an S3 API server on localhost (moto's standalone
server), Ray clusters of several nodes on this machine (ray.cluster_utils.Cluster), nodes SIGKILLed."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from blendtune import storage
from blendtune.sweeps import sweep_storage
from blendtune.wandb_files import read_history
from conftest import REPO, TINY, s3_server_process

SMALL = TINY + ["data.synthetic.num_train=150", "data.synthetic.num_test=60"]


def blendtune(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "blendtune.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600, **kwargs)


def trial_folders(storage_path: str) -> list[str]:
    experiment = storage.join(storage_path, "tune")
    return [storage.join(experiment, n) for n in storage.list_names(experiment)
            if storage.read_text(storage.join(experiment, n, "params.json")) is not None]


def epochs_of(text: str | None) -> list[int]:
    return [json.loads(line)["epoch"] for line in (text or "").splitlines() if line.strip()]


def wandb_sessions(trial: str) -> dict[str, list[dict]]:
    """{file: history} of every offline W&B session a trial folder on storage holds."""
    import pyarrow.fs as pafs
    fs, path = storage.filesystem(trial)
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{path}/wandb", recursive=True, allow_not_found=True))
             if i.path.endswith(".wandb")]
    sessions = {}
    for file in files:
        with tempfile.NamedTemporaryFile(suffix=".wandb") as local:
            with fs.open_input_stream(file) as src:
                local.write(src.read())
            local.flush()
            sessions[file] = read_history(local.name)
    return sessions


def wandb_steps(trial: str) -> list[int]:
    """The steps of every offline W&B session of a trial folder on storage, in the order they ran."""
    sessions = [h for h in wandb_sessions(trial).values() if h]
    assert sessions, {f.rsplit("/", 1)[-1]: len(h) for f, h in wandb_sessions(trial).items()}
    return [row["_step"] for h in sorted(sessions, key=lambda h: h[0]["_timestamp"]) for row in h]


def assert_every_trial_kept_its_files(storage_path: str, trials: int, epochs: int) -> None:
    """Each trial folder on storage: metrics.jsonl and a W&B offline run with every epoch, and checkpoints."""
    folders = trial_folders(storage_path)
    assert len(folders) == trials, folders
    for trial in folders:
        assert epochs_of(storage.read_text(storage.join(trial, "metrics.jsonl"))) == list(range(1, epochs + 1)), trial
        assert wandb_steps(trial) == list(range(1, epochs + 1)), trial
        assert any(n.startswith("checkpoint_") for n in storage.list_names(trial)), trial


def test_compare_on_s3_keeps_every_trials_files_reports_and_resumes(tmp_path, s3_server):
    bucket = s3_server()
    args = ["compare", "experiments/synthetic_gblend.yaml", "--strategies", "naive,gblend", "--seeds", "2", *SMALL,
            "train.epochs=2", "gblend.warmup=0", "gblend.super_epoch=1", "wandb=true",
            f"sweep.storage_path={bucket}", f"output_dir={tmp_path}"]
    proc = blendtune(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    remote = sweep_storage(run_dir)
    # each sweep in its own folder of the storage path; small files written with one PUT each
    assert remote == f"{bucket}/{run_dir.name}?allow_delayed_open=true"
    assert not (run_dir / "tune").exists()       # nothing of the trials on the driver's disk
    assert_every_trial_kept_its_files(remote, trials=4, epochs=2)
    report = (run_dir / "report.md").read_text()
    assert "| naive | 2 | 2 | 2 |" in report and "| gblend | 2 | 2 | 2 |" in report

    (run_dir / "report.md").unlink()
    again = blendtune("report", str(run_dir))  # read back from the bucket
    assert again.returncode == 0, again.stderr[-2000:]
    assert (run_dir / "report.md").read_text() == report

    # a driver killed while Tune rewrites its state leaves it empty: the resume repairs it from the backup
    experiment = storage.join(remote, "tune")
    state = max(n for n in storage.list_names(experiment) if n.startswith("experiment_state-"))
    storage.write_text(storage.join(experiment, state), "")
    resumed = blendtune("compare", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{state}: restored from its backup" in resumed.stdout
    assert_every_trial_kept_its_files(remote, trials=4, epochs=2)  # nothing run again, nothing lost
    assert (run_dir / "report.md").read_text() == report

    # the storage gone since (an endpoint that does not answer): one line each, no traceback, nothing changed
    gone = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    for command in (["report", str(run_dir)], ["compare", "--resume", str(run_dir)]):
        proc = blendtune(*command, env=gone)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
        assert "sweep.storage_path" in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir / "report.md").read_text() == report


@pytest.mark.parametrize("problem", ["no such bucket", "unreachable endpoint", "wrong credentials"])
def test_unusable_storage_is_one_line_before_anything_is_created(tmp_path, s3_server, problem):
    if problem == "wrong credentials":  # a server that checks them (the shared one accepts any)
        with s3_server_process(check_credentials=True) as strict:
            url = strict()
            env = {**os.environ, "AWS_ACCESS_KEY_ID": "not-a-key-it-issued"}
            _assert_refused(tmp_path, url, env, "INVALID_ACCESS_KEY_ID")
        return
    bucket = s3_server()
    env = dict(os.environ)
    if problem == "no such bucket":
        url = "s3://blendtune-no-such-bucket/sweeps"
        _assert_refused(tmp_path, url, env, "NO_SUCH_BUCKET")
    else:
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # the discard port: nothing listens
        _assert_refused(tmp_path, bucket, env, "Could not connect")


def _assert_refused(tmp_path, url: str, env: dict, reason: str) -> None:
    proc = blendtune("sweep", "experiments/synthetic_naive.yaml", "--space", "search_spaces/balancing_knobs.yaml",
                     *SMALL, f"sweep.storage_path={url}", f"output_dir={tmp_path / 'runs'}", env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith(f"blendtune: error: config key 'sweep.storage_path': cannot write to '{url}/")
    assert reason in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()


# ---- several nodes on this machine -------------------------------------------------------------------
FAST_DETECTION = {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                  "health_check_initial_delay_ms": 0}  # a dead node is noticed in ~2 s, not ~30 s


def start_cluster(**head_args):
    from ray.cluster_utils import Cluster
    return Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_DETECTION,
                                                         "include_dashboard": False, **head_args})


def raylet_pid(node) -> int:
    from ray._private import ray_constants
    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def result_rows(trial: str) -> list[dict]:
    return [json.loads(line) for line in (storage.read_text(storage.join(trial, "result.json")) or "").splitlines()
            if line.strip()]


def _wait_for(predicate, timeout=300, every=0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(every)
    raise AssertionError("timed out waiting")


def assert_sweep_complete_after_a_failure(run_dir: Path, trials: int, epochs: int, interrupted: set[str]) -> None:
    """Every trial ran every epoch; an interrupted one went on from its last checkpoint (at most the epoch
    in flight redone, never from epoch 1 again); its metrics.jsonl has each epoch once; the report is whole."""
    remote = sweep_storage(run_dir)
    folders = trial_folders(remote)
    assert len(folders) == trials, folders
    for trial in folders:
        reported = [r["epoch"] for r in result_rows(trial)]
        assert sorted(set(reported)) == list(range(1, epochs + 1)), (trial, reported)
        assert len(reported) - epochs <= 1 and reported.count(1) == 1, (trial, reported)
        assert epochs_of(storage.read_text(storage.join(trial, "metrics.jsonl"))) == list(range(1, epochs + 1)), trial
        assert sorted(set(wandb_steps(trial))) == list(range(1, epochs + 1)), trial
    restarted = {t.rsplit("/", 1)[-1] for t in folders if len({r["pid"] for r in result_rows(t)}) > 1}
    assert interrupted <= restarted, (interrupted, restarted)
    report = (run_dir / "report.md").read_text() if (run_dir / "report.md").exists() else ""
    again = blendtune("report", str(run_dir))
    assert again.returncode == 0, again.stderr[-2000:]
    import csv
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert len(rows) == trials and all(row["epochs"] == str(epochs) for row in rows), rows
    assert not report or (run_dir / "report.md").read_text() == report


def test_sweep_on_two_worker_nodes_survives_one_killed(tmp_path, s3_server):
    """Head (no CPUs) + 2 worker nodes of 1 CPU, trials and checkpoints on S3. Both nodes get a trial;
    one node's raylet is SIGKILLed mid-trial; the sweep finishes on the other with nothing lost."""
    bucket = s3_server()
    cluster = start_cluster()
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    epochs = 5
    args = ["compare", "experiments/synthetic_naive.yaml", "--strategies", "naive", "--seeds", "2", *SMALL,
            f"train.epochs={epochs}", "data.synthetic.num_train=6000", "wandb=true", f"sweep.address={cluster.address}",
            f"sweep.storage_path={bucket}", f"output_dir={tmp_path}"]  # epochs of about a second
    driver = subprocess.Popen([sys.executable, "-m", "blendtune.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        run_dir = Path(driver.stdout.readline().split("compare dir: ")[1].strip())
        remote = sweep_storage(run_dir)

        def running_on_both_nodes():
            rows = {t: result_rows(t) for t in trial_folders(remote)}
            by_node = {r[-1]["node_id"]: t for t, r in rows.items() if r and r[-1]["epoch"] < epochs - 1}
            return by_node if len(by_node) == 2 else None
        by_node = _wait_for(running_on_both_nodes)  # both trials past their first checkpoint, one per node
        victim = nodes[0]
        # the node's raylet and the trial's worker process with it (a worker can outlive its raylet for a
        # few seconds and finish a short trial before Ray notices the node is gone)
        trial_pid = result_rows(by_node[victim.node_id])[-1]["pid"]
        os.kill(raylet_pid(victim), signal.SIGKILL)
        os.kill(trial_pid, signal.SIGKILL)
        out, err = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        cluster.shutdown()
    assert driver.returncode == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == str(run_dir)
    assert_sweep_complete_after_a_failure(run_dir, trials=2, epochs=epochs,
                                          interrupted={by_node[victim.node_id].rsplit("/", 1)[-1]})


def test_gpus_per_trial_packs_four_trials_on_a_node_with_two_gpus(tmp_path):
    """A worker node with 2 (fake) GPUs and a node without: sweep.gpus_per_trial=0.5 puts every trial on
    the GPU node, four at a time (train.device=cpu: the GPUs are only resources here). Storage is a
    directory both nodes see, as an NFS mount would be."""
    cluster = start_cluster()
    gpu_node = cluster.add_node(num_cpus=4, num_gpus=2)
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        proc = blendtune("sweep", "experiments/synthetic_naive.yaml", "--space", "search_spaces/balancing_knobs.yaml",
                         *SMALL, "train.epochs=3", "data.synthetic.num_train=3000", "sweep.num_samples=4",
                         "sweep.search=random", "sweep.scheduler=none", "sweep.gpus_per_trial=0.5",
                         "sweep.cpus_per_worker=1", "train.device=cpu", f"sweep.address={cluster.address}",
                         f"sweep.storage_path={tmp_path / 'shared'}", "wandb=true", f"output_dir={tmp_path / 'runs'}")
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    remote = sweep_storage(run_dir)
    assert remote == str(tmp_path / "shared" / run_dir.name)
    assert_every_trial_kept_its_files(remote, trials=4, epochs=3)
    trials = [result_rows(t) for t in trial_folders(remote)]
    assert len(trials) == 4 and all(len(rows) == 3 for rows in trials)
    assert {row["node_id"] for rows in trials for row in rows} == {gpu_node.node_id}
    # each trial's span, from the start of its first epoch to its last report: all four overlap
    spans = [(rows[0]["timestamp"] - rows[0]["time_this_iter_s"], rows[-1]["timestamp"]) for rows in trials]
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans


@pytest.mark.slow
def test_sweep_on_s3_resumes_after_the_driver_is_killed(tmp_path, s3_server):
    """The driver (and with it every trial) SIGKILLed mid-sweep on a 2-node cluster; `sweep --resume` against
    the same S3 storage finishes it: no trial lost, none redone from epoch 1, at most one epoch redone.
    On an object store Tune saves its state every 2 s (sweeps.state_save_seconds): epochs here take longer."""
    bucket = s3_server()
    cluster = start_cluster()
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    epochs = 5
    args = ["sweep", "experiments/synthetic_naive.yaml", "--space", "search_spaces/balancing_knobs.yaml", *SMALL,
            f"train.epochs={epochs}", "data.synthetic.num_train=16000", "sweep.num_samples=3", "sweep.scheduler=none",
            "sweep.search=random", "wandb=true", f"sweep.address={cluster.address}", f"sweep.storage_path={bucket}",
            f"output_dir={tmp_path}"]
    driver = subprocess.Popen([sys.executable, "-m", "blendtune.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        run_dir = Path(driver.stdout.readline().split("sweep dir: ")[1].strip())
        remote = sweep_storage(run_dir)
        _wait_for(lambda: any(2 <= len(result_rows(t)) < epochs for t in trial_folders(remote)))
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        resumed = blendtune("sweep", "--resume", str(run_dir))
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        cluster.shutdown()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip().splitlines()[-1] == str(run_dir)
    assert_sweep_complete_after_a_failure(run_dir, trials=3, epochs=epochs, interrupted=set())
