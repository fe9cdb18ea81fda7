"""Strategies compared at an equal tuning budget: a thin caller of `blendtune compare --tune` (one Ray Tune
experiment: every strategy's random-search trials over its own space, selected on held-out data, then its
choice on fresh seeds; resumable) that can move every space's learning-rate range at once (`--lr-range`,
for experiments trained with SGD instead of the spaces' Adam range) and keeps the report.

    python benchmarks/tuned_compare.py experiments/synthetic_imbalanced_naive.yaml --lr-range 0.003 0.03 \\
        --strategies naive,gblend,ogm_ge,unimodal:clean --trials 4 --seeds 10 [sweep.folds=3] [key=value ...]

Writes benchmarks/results/tuned_compare_<experiment>[_<tag>].md (the report, the command, the wall time).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

from blendtune.comparisons import SPACE_OF, comparison, default_spaces_dir, strategy_variants

RESULTS = Path(__file__).resolve().parent / "results"


def spaces_with_lr(strategies: str, lr_range: list[float] | None) -> Path | None:
    """A folder of the strategies' spaces with optim.lr's range replaced (None: the shipped spaces)."""
    if not lr_range:
        return None
    folder = Path(tempfile.mkdtemp(prefix="spaces-"))
    for name in {v["strategy"] for v in strategy_variants(strategies)}:
        file = f"{SPACE_OF.get(name, name)}.yaml"
        space = yaml.safe_load((default_spaces_dir() / file).read_text())
        space["optim.lr"] = {"loguniform": list(lr_range)}
        (folder / file).write_text(yaml.safe_dump(space))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("experiment")
    parser.add_argument("--strategies", default="naive,gblend,ogm_ge,mmpareto,pmr,mla")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--lr-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"))
    parser.add_argument("--tag", default="", help="suffix of the results file")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="finish an interrupted run")
    parser.add_argument("overrides", nargs="*", help="key=value for every trial (output_dir=..., sweep.folds=3)")
    args = parser.parse_intermixed_args()
    began = time.perf_counter()
    done = comparison(None if args.resume else args.experiment, args.overrides, args.strategies, args.seeds,
                      args.resume, tune=args.trials, spaces=spaces_with_lr(args.strategies, args.lr_range),
                      on_start=lambda d: print(f"compare dir: {d}", flush=True))
    minutes = (time.perf_counter() - began) / 60
    name = f"tuned_compare_{Path(args.experiment).stem}{'_' + args.tag if args.tag else ''}"
    command = "python benchmarks/tuned_compare.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    # a resumed run knows only its own time: say so, the earlier parts' time is the user's to add
    timing = f"{minutes:.1f} min wall time" + (" for this resumed part only" if args.resume else "")
    (RESULTS / f"{name}.md").write_text(f"`{command}`: {timing}, folder `{done.run_dir}`.\n\n" + done.report)
    print(done.report)
    print(f"{timing}; {RESULTS / name}.md")


if __name__ == "__main__":
    main()
