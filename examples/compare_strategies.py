"""Strategies x seeds from Python, on your own model and data: one Ray Tune sweep on a local Ray (or
RAY_ADDRESS's cluster), then the report `blendtune compare` prints: per strategy and head, the mean and
95% CI over seeds, and each strategy's paired difference to naive.

    PYTHONPATH=examples .venv/bin/python examples/compare_strategies.py [--seeds 5 --epochs 8]
"""
import argparse
import tempfile

import blendtune
from my_av import TwoStreamNet, make_data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--num-train", type=int, default=600)
    args = parser.parse_args()
    train, test = make_data(num_train=args.num_train, num_test=args.num_train // 2)
    # a class, not an instance: every seed initialises its own weights
    table = blendtune.compare(model=TwoStreamNet, train=train, test=test, seeds=args.seeds, epochs=args.epochs,
                              strategies=["naive", "ogm_ge:alpha=0.8", "gblend:super_epoch=2", "unimodal:video"],
                              lr=1e-3, optimizer="adam", held_out_ratio=0.2, output_dir=tempfile.mkdtemp())
    print(table.report)
    print(f"{len(table.rows)} trials; folder: {table.run_dir}")


if __name__ == "__main__":
    main()
