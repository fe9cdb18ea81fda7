"""Strategies compared at an equal tuning budget: for each strategy, one Ray Tune sweep of `--trials`
trials over its own search space (`search_spaces/<strategy>.yaml`, which all include the learning rate),
random search (stopped early by ASHA, `--scheduler asha`, or every trial run to the end: `none`),
selected on held-out accuracy of the fused head (never test), then the chosen configuration re-run over
`--seeds` seeds with `blendtune compare`; one table of mean ± 95% CI and paired differences to tuned naive.
`unimodal:MODALITY` is tuned the same way (the naive space: the learning rate) on that modality's head.
Each strategy's comparison runs right after its sweep, so a stopped run keeps whole strategies.

    python benchmarks/tuned_compare.py experiments/synthetic_imbalanced_gblend.yaml \\
        --strategies naive mmpareto pmr mla ogm_ge gblend --trials 8 --seeds 5

Writes benchmarks/results/tuned_compare_<experiment>.{json,md} (the chosen overrides per strategy, every
trial's held-out score, the 5-seed table) and leaves each sweep and comparison directory under --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write  # noqa: E402

import yaml  # noqa: E402

import blendtune  # noqa: E402
from blendtune.comparisons import strategy_variants  # noqa: E402
from blendtune.report import mean_ci, paired_differences  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# strategies sharing a space file; a modality alone is tuned on naive's knob, the learning rate
SPACE_OF = {"ogm_ge": "ogm", "ogm": "ogm", "unimodal": "naive"}


def variant_of(strategy: str) -> dict:
    """`gblend` or `unimodal:audio` -> its config overrides, parsed and checked as `blendtune compare` does."""
    (variant,) = strategy_variants(strategy)
    return variant


def prediction_head(strategy: str) -> str:
    """The head a strategy is selected and scored on: the fused one, or `unimodal:MODALITY`'s own."""
    return variant_of(strategy).get("unimodal.modality", "fused")


def tune(strategy: str, experiment: str, trials: int, out: Path, extra: list[str],
         lr_range: tuple[float, float] | None, scheduler: str) -> tuple[dict, list[float], float]:
    """The best configuration of one strategy's sweep, by held-out accuracy of its prediction head at its
    last epoch."""
    began = time.perf_counter()
    variant = variant_of(strategy)
    metric = f"acc/held_out/{prediction_head(strategy)}"
    space_file = REPO / "search_spaces" / f"{SPACE_OF.get(variant['strategy'], variant['strategy'])}.yaml"
    space = yaml.safe_load(space_file.read_text())
    if lr_range:  # the spaces' lr range is written for AV-digits' Adam; SGD settings need their own
        space["optim.lr"] = {"loguniform": list(lr_range)}
    _, results = blendtune.sweep(space, experiment, [*(f"{k}={v}" for k, v in variant.items()),
                                                     f"sweep.num_samples={trials}",
                                                     f"sweep.scheduler={scheduler}", f"sweep.metric={metric}",
                                                     "sweep.search=random", f"output_dir={out}", "wandb=false", *extra])
    if all(r.error for r in results):  # e.g. unimodal:MODALITY naming a modality the data lacks
        first = str(results[0].error).strip().splitlines()[-1]
        sys.exit(f"{strategy}: every trial of the sweep failed (first: {first})")
    scores = [r.metrics.get(metric) for r in results if r.metrics]
    best = results.get_best_result(metric=metric, mode="max", scope="last")
    chosen = {k: v for k, v in best.config.items() if not k.startswith("_")}
    return chosen, scores, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("experiment")
    parser.add_argument("--strategies", nargs="+", default=["naive", "mmpareto", "pmr", "mla"])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default="runs/tuned_compare")
    parser.add_argument("--lr-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="replace every space's optim.lr range (loguniform), the same for every strategy")
    parser.add_argument("--scheduler", choices=["asha", "none"], default="none",
                        help="asha: early stopping on the selection metric (sweep.grace_period / reduction_factor)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the sweeps and comparisons already finished under --out (its payload.json)")
    parser.add_argument("overrides", nargs="*", help="key=value for every sweep and comparison")
    args = parser.parse_intermixed_args()
    out = Path(args.out)
    payload = {"experiment": args.experiment, "lr_range": args.lr_range, "trials": args.trials, "seeds": args.seeds,
               "scheduler": args.scheduler, "strategies": {}}
    saved = out / "payload.json"  # written after every sweep and comparison: --resume continues from it
    if args.resume and saved.is_file():
        payload = json.loads(saved.read_text())
    for strategy in args.strategies:
        if strategy not in payload["strategies"]:
            chosen, scores, seconds = tune(strategy, args.experiment, args.trials, out / "sweeps", args.overrides,
                                           args.lr_range, args.scheduler)
            payload["strategies"][strategy] = {"chosen": chosen, "held_out_scores": scores, "sweep_s": seconds}
            out.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(payload, indent=1))
            print(f"{strategy}: chose {chosen} (held-out {max(s for s in scores if s is not None):.3f}, "
                  f"{seconds:.0f} s)", flush=True)
        entry = payload["strategies"][strategy]
        if "fused" in entry:
            continue
        # compare applies the chosen overrides to every strategy it is given: one strategy per comparison.
        overrides = [f"{k}={v}" for k, v in entry["chosen"].items()]
        began = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "blendtune.cli", "compare", args.experiment, "--strategies",
                               strategy, "--seeds", str(args.seeds), f"output_dir={out / 'compare'}", "wandb=false",
                               *args.overrides, *overrides], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"compare of {strategy} failed:\n{done.stderr[-2000:]}")
        run_dir = Path(done.stdout.strip().splitlines()[-1])
        entry["compare_dir"], entry["compare_s"] = str(run_dir), time.perf_counter() - began
        with open(run_dir / "results.csv") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epochs"]) > 0]
        # "fused" holds the prediction head's score: the modality's own head for unimodal:MODALITY.
        entry["fused"] = {int(r["seed"]): float(r[f"final_acc_{prediction_head(strategy)}"]) for r in rows}
        entry["ensemble"] = {int(r["seed"]): float(r["final_acc_ensemble"]) for r in rows}
        saved.write_text(json.dumps(payload, indent=1))
        summarise(payload, args.strategies[0])
    summarise(payload, args.strategies[0])


def summarise(payload: dict, baseline: str) -> None:
    """The table of every strategy whose comparison finished (the others are listed as unfinished)."""
    table = ["| strategy | chosen (held-out) | test acc % (fused; unimodal: its head) | ensemble % | vs tuned naive | wins | sweep + compare s |",
             "|---|---|---|---|---|---|---|"]
    finished = {name: entry for name, entry in payload["strategies"].items() if "fused" in entry}
    scores = {name: {int(k): v for k, v in entry["fused"].items()} for name, entry in finished.items()}
    differences = {d.label: d for d in paired_differences(scores, baseline=baseline)}
    for strategy, entry in finished.items():
        fused, fused_ci = mean_ci([100 * v for v in entry["fused"].values()])
        ens, ens_ci = mean_ci([100 * v for v in entry["ensemble"].values()])
        d = differences.get(strategy)
        diff = "" if d is None else (f"**{100 * d.mean:+.1f} ± {100 * d.half_width:.1f}**"
                                     if abs(d.mean) > d.half_width else f"{100 * d.mean:+.1f} ± {100 * d.half_width:.1f}")
        chosen = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry["chosen"].items())
        table.append(f"| {strategy} | {chosen} ({100 * max(x for x in entry['held_out_scores'] if x is not None):.1f}) "
                     f"| {fused:.1f} ± {fused_ci:.1f} | {ens:.1f} ± {ens_ci:.1f} | {diff} | "
                     f"{'' if d is None else f'{d.wins}/{d.seeds}'} | {entry['sweep_s'] + entry['compare_s']:.0f} |")
    unfinished = [name for name in payload["strategies"] if name not in finished]
    write(f"tuned_compare_{Path(payload['experiment']).stem}", payload, table,
          f"Experiment {payload['experiment']}; {payload['trials']} random-search trials per strategy over its search "
          f"space ({'ASHA early stopping' if payload.get('scheduler') == 'asha' else 'no early stopping'}) "
          f"(selected on held-out accuracy of the fused head; unimodal: of its modality's head), then {payload['seeds']} seeds; mean ± 95% CI; difference to tuned "
          f"{baseline} paired by seed (bold: the CI excludes 0)."
          + (f" Sweeps whose comparison did not finish: {', '.join(unfinished)}." if unfinished else ""))

if __name__ == "__main__":
    main()
