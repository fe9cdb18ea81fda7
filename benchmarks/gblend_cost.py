"""What online G-Blend costs: whole runs of naive, G-Blend with the cheap (`heads`) estimator and with the
paper's estimator (k+1 model copies per super-epoch), same epochs; and how close the cheap weights are
to the paper's when both are estimated for the same super-epochs from the same checkpoints.

    BLENDTUNE_DATA_ROOT=../shared/data python benchmarks/gblend_cost.py --epochs 8 --repeats 3

Wall times: naive and heads alternate for `--repeats` rounds, paper runs `--paper-repeats` times
(it is ~3x longer). Weights: one extra heads run in which, at every super-epoch start, the paper's
estimate is also computed from that checkpoint (RNG saved and restored, so the main run is unchanged).
Writes benchmarks/results/gblend_cost.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, median, write  # noqa: E402

from blendtune.checkpoint import rng_state, set_rng_state  # noqa: E402
from blendtune.config import load_config  # noqa: E402
from blendtune.functional import gblend_weights, ogr  # noqa: E402
from blendtune.loop import Trainer  # noqa: E402
from blendtune.strategies import STRATEGIES  # noqa: E402
from blendtune.strategies.gblend import GBlend, GBlendOptions  # noqa: E402
from blendtune.build import build_trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@STRATEGIES.register("gblend_side_by_side", options=GBlendOptions, section="gblend")
class SideBySide(GBlend):
    """The heads estimator drives training; the paper's estimate for the same window is recorded beside it."""

    def setup(self, model, seed, total_epochs):
        super().setup(model, seed, total_epochs)
        self.paper_weights, self.heads_weights = {}, {}

    def on_epoch_start(self, epoch, context):
        boundary = epoch - 1
        if self.is_boundary(boundary) and boundary >= self.warmup:
            saved = rng_state()
            start = context.last_losses
            end = self.paper_estimate(context)
            set_rng_state(saved)
            stats = {h: ogr(start["train"][h], start["held_out"][h], end["train"][h], end["held_out"][h])
                     for h in self.heads}
            self.paper_weights[boundary] = gblend_weights({h: s.delta_g for h, s in stats.items()},
                                                          {h: s.delta_o for h, s in stats.items()},
                                                          previous=self.weights, eps=self.eps)

    def on_epoch_end(self, epoch, evaluation, context):
        window = self.window_start
        super().on_epoch_end(epoch, evaluation, context)
        if self.is_boundary(epoch) and window is not None and window >= self.warmup:
            self.heads_weights[window] = dict(self.weights)


def run(experiment: str, overrides: list[str]) -> tuple[float, dict, Trainer]:
    began = time.perf_counter()
    trainer = build_trainer(load_config(REPO / "experiments" / f"{experiment}.yaml", overrides))
    last = trainer.fit()
    return time.perf_counter() - began, last, trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paper-repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    common = [f"train.epochs={args.epochs}", "train.progress=false", "wandb=false", f"seed={args.seed}"]
    runs = {"naive": ("avdigits_naive", common), "gblend heads": ("avdigits_gblend", common),
            "gblend paper": ("avdigits_gblend_paper", common)}
    finals: dict[str, list[dict]] = {name: [] for name in runs}

    def timed_run(name):
        seconds, last, _ = run(*runs[name])
        finals[name].append({k: v for k, v in last.items() if k.startswith(("acc/test/", "gblend/w/"))})
        return seconds
    walls = alternate({n: (lambda n=n: timed_run(n)) for n in ("naive", "gblend heads")}, args.repeats)
    walls["gblend paper"] = [timed_run("gblend paper") for _ in range(args.paper_repeats)]

    _, _, side = run("avdigits_gblend", [*common, "strategy=gblend_side_by_side"])
    strategy = side.strategy
    windows = sorted(set(strategy.heads_weights) & set(strategy.paper_weights))
    diffs = {w: max(abs(strategy.heads_weights[w][h] - strategy.paper_weights[w][h]) for h in strategy.heads)
             for w in windows}

    naive = median(walls["naive"])
    table = ["| run | wall s (median) | vs naive | test acc fused (last run) |", "|---|---|---|---|"]
    for name, xs in walls.items():
        table.append(f"| {name} | {median(xs):.1f} ({len(xs)} runs) | {median(xs) / naive:.2f}x | "
                     f"{finals[name][-1]['acc/test/fused'] * 100:.1f} |")
    table += ["", "| super-epoch from epoch | cheap (heads) weights | paper weights | max abs difference |",
              "|---|---|---|---|"]
    fmt = lambda w: " / ".join(f"{h} {v:.2f}" for h, v in w.items())  # noqa: E731
    for w in windows:
        table.append(f"| {w} | {fmt(strategy.heads_weights[w])} | {fmt(strategy.paper_weights[w])} | {diffs[w]:.3f} |")
    write("gblend_cost", {"epochs": args.epochs, "walls_s": walls, "finals": finals,
                          "heads_weights": strategy.heads_weights, "paper_weights": strategy.paper_weights,
                          "max_abs_diff": diffs}, table,
          f"AV-digits, {args.epochs} epochs, G-Blend super-epoch 2 after 2 warm-up epochs, seed {args.seed}.")


if __name__ == "__main__":
    main()
