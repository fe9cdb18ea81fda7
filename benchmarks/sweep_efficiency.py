"""Sweep efficiency: ASHA + Optuna vs random search, same trial budget, same space, on AV-digits.

    BLENDTUNE_DATA_ROOT=../shared/data python benchmarks/sweep_efficiency.py --trials 12 --epochs 8
    ... --space search_spaces/ogm.yaml --seed 1 --name sweep_efficiency_ogm_seed1   (held-out set fixed)

Both sweeps run `experiments/avdigits_ogm_ge.yaml` over `--space` (default
`search_spaces/balancing_knobs.yaml`: OGM alpha / noise, held-out ratio, lr, batch size). The target is the best held-out fused accuracy
either sweep found (the metric the sweeps select on); for each sweep: trial-epochs spent, in the order
Tune received them, until some trial came within 1 point of it, and trial-epochs spent in all.
Writes benchmarks/results/sweep_efficiency.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METRIC = "acc/held_out/fused"


def run_sweep(name: str, out: Path, trials: int, epochs: int, seed: int, extra: list[str], space: str) -> Path:
    args = [sys.executable, "-m", "blendtune.cli", "sweep", "experiments/avdigits_ogm_ge.yaml", "--space", space, f"sweep.num_samples={trials}", f"train.epochs={epochs}",
            f"seed={seed}", "wandb=false", f"output_dir={out / name}", *extra]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} sweep failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def reported_rows(run_dir: Path) -> list[dict]:
    """Every epoch any trial reported, in the order Tune received them."""
    rows = []
    for path in (run_dir / "tune").glob("*/result.json"):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows.append({"trial": path.parent.name.split("_")[3], "epoch": row["epoch"], "acc": row[METRIC],
                             "test": row["acc/test/fused"], "at": row["timestamp"]})
    return sorted(rows, key=lambda r: (r["at"], r["epoch"]))  # Tune's timestamps are whole seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--space", default="search_spaces/balancing_knobs.yaml")
    parser.add_argument("--name", default="sweep_efficiency", help="results/<name>.{json,md}")
    parser.add_argument("--from-json", help="only rebuild the table from results/sweep_efficiency.json")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="sweep-efficiency-")) if not args.from_json else None
    sweeps = {
        "ASHA + Optuna": ["sweep.search=optuna", "sweep.scheduler=asha", "sweep.grace_period=2",
                          "sweep.reduction_factor=2"],
        "random, no early stopping": ["sweep.search=random", "sweep.scheduler=none"],
    }
    if args.from_json:  # rebuild the table from a previous run's rows
        saved = json.loads(Path(args.from_json).read_text())
        rows = {name: sweep["rows"] for name, sweep in saved["sweeps"].items()}
    else:
        rows = {name: reported_rows(run_sweep(name.split(",")[0].replace(" + ", "_").replace(" ", "_"), out,
                                              args.trials, args.epochs, args.seed, extra, args.space))
                for name, extra in sweeps.items()}
    best = max(r["acc"] for rs in rows.values() for r in rs)
    budget = min(len(rs) for rs in rows.values())  # the smaller sweep's trial-epochs: an equal budget
    table = [f"Target: within 1 point of the best held-out fused accuracy either sweep found ({best * 100:.1f}%).", "",
             f"| search | trial-epochs to the target | trial-epochs in all | best held-out acc (its test acc) "
             f"after {budget} trial-epochs | best held-out acc (its test acc) at the end |",
             "|---|---|---|---|---|"]
    payload = {"trials": args.trials, "epochs": args.epochs, "best_held_out": best, "sweeps": {}}
    for name, rs in rows.items():
        reached = next((i + 1 for i, r in enumerate(rs) if r["acc"] >= best - 0.01), None)
        top = max(rs, key=lambda r: r["acc"])
        early = max(rs[:budget], key=lambda r: r["acc"])
        payload["sweeps"][name] = {"epochs_to_target": reached, "epochs_total": len(rs), "best": top, "rows": rs}
        table.append(f"| {name} | {reached if reached else 'not reached'} | {len(rs)} | "
                     f"{early['acc'] * 100:.1f} ({early['test'] * 100:.1f}) | {top['acc'] * 100:.1f} ({top['test'] * 100:.1f}) |")
    payload["space"], payload["seed"] = args.space, args.seed
    write(args.name, payload, table,
          f"{args.trials} trials of up to {args.epochs} epochs each, experiments/avdigits_ogm_ge.yaml over "
          f"{args.space}, sweep seed {args.seed}; 1 CPU per trial.")


if __name__ == "__main__":
    main()
