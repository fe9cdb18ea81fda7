"""The same sweep on one node with local storage, on a 3-node local cluster (a head without CPUs, two
worker nodes) with a shared directory, and on that cluster with S3 storage (a local S3 API server,
moto's standalone server). Prints trials per minute, blendtune's storage seconds per trial
(`time/trial_files_s`: copying metrics and W&B files to storage) and each setting's throughput as a
ratio of the one-node baseline. Rounds alternate the settings so a slow spell of the machine hits all.

    .venv/bin/python benchmarks/cluster_sweep.py                         # 24 trials x 3 epochs, 2 rounds
    .venv/bin/python benchmarks/cluster_sweep.py --trials 8 --rounds 1   # a quick look

All settings get the same CPUs: the one node has as many as the two worker nodes together.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = ("one node, local storage", "one node, no actor reuse", "3 nodes, shared directory", "3 nodes, S3")


def start_s3() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    import boto3
    boto3.client("s3").create_bucket(Bucket="blendtune-bench")
    return server, "s3://blendtune-bench/sweeps"


def cpu_seconds(process: subprocess.Popen) -> float:
    """CPU time the S3 server has used: on this machine it shares the cores with the trials."""
    import psutil
    times = psutil.Process(process.pid).cpu_times()
    return times.user + times.system


def run_sweep(args, address: str | None, storage: str | None, out: Path, extra: list[str]) -> dict:
    # the same trials in every setting: a grid of learning rates, each point once
    space = out.parent / "space.yaml"
    lrs = [round(0.003 * 1.15 ** i, 6) for i in range(args.trials)]
    space.write_text(f"optim.lr: {{grid: {lrs}}}\n")
    command = [sys.executable, "-m", "blendtune.cli", "sweep", "experiments/synthetic_naive.yaml",
               "--space", str(space), "data.synthetic.num_train=1500",
               "data.synthetic.num_test=300", f"train.epochs={args.epochs}",
               "sweep.search=grid", "sweep.scheduler=none", "train.progress=false", f"wandb={str(args.wandb).lower()}",
               f"output_dir={out}", *extra]
    if address:
        command.append(f"sweep.address={address}")
    if storage:
        command.append(f"sweep.storage_path={storage}")
    began = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed:\n{proc.stderr[-3000:]}")
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    from blendtune import storage as storage_lib
    from blendtune.sweeps import sweep_storage
    remote = sweep_storage(run_dir)
    experiment = storage_lib.join(remote, "tune")
    files_s, trials = [], 0
    for name in storage_lib.list_names(experiment):
        rows = [json.loads(line) for line in (storage_lib.read_text(storage_lib.join(experiment, name, "result.json"))
                                               or "").splitlines() if line.strip()]
        if rows:
            trials += 1
            files_s.append(rows[-1].get("time/trial_files_s", 0.0))
    if trials != args.trials:
        raise SystemExit(f"{trials} of {args.trials} trials finished")
    return {"wall_s": wall, "trials_per_min": 60 * trials / wall, "files_s": statistics.mean(files_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the one node (each worker node gets half)")
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")

    import ray
    from ray.cluster_utils import Cluster

    s3, bucket = start_s3()  # before any cluster: its nodes inherit the S3 endpoint and keys

    def cluster(nodes: int) -> Cluster:
        """One node with all the CPUs, or a head without CPUs and `nodes` worker nodes sharing them;
        started for each sweep, so no idle cluster runs beside a measured one."""
        if nodes == 1:
            return Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus, "include_dashboard": False})
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        for _ in range(nodes):
            c.add_node(num_cpus=args.cpus // nodes)
        c.wait_for_nodes()
        return c

    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for name in (SETTINGS if r % 2 == 0 else SETTINGS[::-1]):
                    nodes, storage, extra = {SETTINGS[0]: (1, None, []), SETTINGS[1]: (1, None, ["sweep.reuse_actors=false"]),
                                             SETTINGS[2]: (2, str(Path(tmp, "shared")), []),
                                             SETTINGS[3]: (2, bucket, [])}[name]
                    c = cluster(nodes)
                    server_cpu = cpu_seconds(s3)
                    try:
                        results[name].append(run_sweep(args, c.address, storage, Path(tmp, "runs"), extra))
                        results[name][-1]["s3_server_cpu_s"] = cpu_seconds(s3) - server_cpu
                    finally:
                        ray.shutdown()
                        try:
                            c.shutdown()
                        except Exception as e:  # a node that drains slowly: its processes are killed anyway
                            print(f"cluster shutdown: {type(e).__name__}: {e}", flush=True)
                    print(f"round {r + 1}: {name}: {results[name][-1]}", flush=True)
    finally:
        s3.kill()

    lines = summary(args, results)
    print("\n" + "\n".join(lines))
    out = REPO / "benchmarks" / "results" / "cluster_sweep.md"
    out.write_text("# cluster_sweep\n\n" + f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
                   f"`{' '.join(sys.argv)}`\n\n" + "\n".join(lines) + "\n")
    with open(out.with_suffix(".json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)


def summary(args, results: dict[str, list[dict]]) -> list[str]:
    lines: list[str] = []
    print = lines.append  # the table goes to the terminal and to results/cluster_sweep.md
    base = statistics.mean(x["trials_per_min"] for x in results[SETTINGS[0]])
    print(f"{args.trials} trials x {args.epochs} epochs, {args.rounds} round(s), W&B {'on' if args.wandb else 'off'}")
    print("")
    print("| setting | trials/min | x one node | storage s/trial (blendtune's copies) | S3 server CPU s | wall s |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        tpm = statistics.mean(x["trials_per_min"] for x in runs)
        print(f"| {name} | {tpm:.1f} | {tpm / base:.2f} | {statistics.mean(x['files_s'] for x in runs):.3f} | "
              f"{statistics.mean(x['s3_server_cpu_s'] for x in runs):.1f} | "
              f"{statistics.mean(x['wall_s'] for x in runs):.0f} |")
    shared = statistics.mean(x["trials_per_min"] for x in results[SETTINGS[2]])
    s3_tpm = statistics.mean(x["trials_per_min"] for x in results[SETTINGS[3]])
    print("")
    print(f"S3 against the shared directory on the same cluster: {s3_tpm / shared:.2f}x trial throughput")
    return lines


if __name__ == "__main__":
    main()
