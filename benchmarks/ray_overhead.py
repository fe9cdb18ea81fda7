"""What Ray adds to one worker's training: the same AV-digits run without Ray, as a 1-worker Ray Train
run (`blendtune train workers=1` goes local; this calls the Ray Train path directly), and as a one-trial
Tune sweep (1 CPU, as sweeps default; and 2 CPUs).

    BLENDTUNE_DATA_ROOT=../shared/data python benchmarks/ray_overhead.py --epochs 4 --repeats 2

Per-epoch time is the median of the trainer's own `time/epoch_s` after the first epoch; start-up is
the wall time of the whole call minus the sum of its epochs (Ray start, worker / trial start, data and
model build, the epoch-0 evaluation, shutdown). Variants alternate over rounds.
Writes benchmarks/results/ray_overhead.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, median, write  # noqa: E402

from blendtune.config import TrialConfig, load_config  # noqa: E402
from blendtune.launch import train_locally, train_with_ray  # noqa: E402
from blendtune.runs import METRICS_FILE, create_run_dir, create_sweep_dir  # noqa: E402
from blendtune.sweeps import Distribution, run_sweep  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


EXPERIMENT = REPO / "experiments" / "avdigits_naive.yaml"
DEVICE: list[str] = []  # ["train.device=cuda"] from --device


def config(epochs: int, out: str, *extra: str):
    return load_config(EXPERIMENT, [f"train.epochs={epochs}", "train.progress=false", "wandb=false", f"output_dir={out}",
                                    *DEVICE, *extra])


def plain(cfg, ray_train: bool) -> tuple[float, list[float]]:
    run_dir = create_run_dir(cfg)
    began = time.perf_counter()
    (train_with_ray if ray_train else train_locally)(cfg, run_dir, resume=False)
    wall = time.perf_counter() - began
    epochs = [json.loads(line)["time/epoch_s"] for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return wall, epochs


def tune_trial(cfg) -> tuple[float, list[float]]:
    space = {"seed": Distribution("grid", (cfg.seed,))}
    run_dir = create_sweep_dir(cfg, space, None)
    began = time.perf_counter()
    results = run_sweep(cfg, space, run_dir, TrialConfig(cfg))
    wall = time.perf_counter() - began
    return wall, results[0].metrics_dataframe["time/epoch_s"].tolist()


def main() -> None:
    global EXPERIMENT
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--experiment", default=str(EXPERIMENT), help="default: AV-digits naive")
    parser.add_argument("--device", default=None, help="train.device for every variant (cuda: NCCL in Ray Train)")
    parser.add_argument("--no-tune", action="store_true", help="only no Ray against Ray Train (not the Tune trials)")
    args = parser.parse_args()
    EXPERIMENT = Path(args.experiment)
    DEVICE[:] = [f"train.device={args.device}"] if args.device else []
    tmp = tempfile.mkdtemp(prefix="ray-overhead-")
    sweep = ["sweep.search=grid", "sweep.scheduler=none", "sweep.num_samples=1"]
    variants = {
        "no Ray (blendtune train)": lambda: plain(config(args.epochs, tmp), ray_train=False),
        "Ray Train, 1 worker (CPUs split: all 2)": lambda: plain(config(args.epochs, tmp), ray_train=True),
        "Tune trial, 1 CPU": lambda: tune_trial(config(args.epochs, tmp, *sweep)),
        "Tune trial, 2 CPUs": lambda: tune_trial(config(args.epochs, tmp, *sweep, "sweep.cpus_per_worker=2")),
    }
    if args.no_tune:
        variants = {k: v for k, v in variants.items() if not k.startswith("Tune")}
    measured: dict[str, list] = {name: [] for name in variants}

    def run(name):
        wall, epochs = variants[name]()
        measured[name].append({"wall_s": wall, "epoch_s": epochs})
        return wall
    alternate({name: (lambda n=name: run(n)) for name in variants}, args.repeats)

    def summary(name):
        rows = measured[name]
        per_epoch = median([e for r in rows for e in r["epoch_s"][1:]])
        startup = median([r["wall_s"] - sum(r["epoch_s"]) for r in rows])
        return median([r["wall_s"] for r in rows]), per_epoch, startup
    base_wall, base_epoch, base_start = summary("no Ray (blendtune train)")
    table = ["| variant | wall s | per epoch s (after the 1st) | vs no Ray | start-up + teardown s | extra vs no Ray |",
             "|---|---|---|---|---|---|"]
    for name in variants:
        wall, epoch, start = summary(name)
        table.append(f"| {name} | {wall:.1f} | {epoch:.2f} | {epoch / base_epoch:.2f}x | {start:.1f} | "
                     f"{start - base_start:+.1f} |")
    write("ray_overhead", {"epochs": args.epochs, "runs": measured}, table,
          f"{EXPERIMENT.stem}, {args.epochs} epochs{', ' + DEVICE[0] if DEVICE else ''}, median of {args.repeats} "
          "alternated rounds.")


if __name__ == "__main__":
    main()
