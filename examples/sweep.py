"""A Ray Tune sweep over a strategy's knobs from Python, on your own model and data: Optuna + ASHA by
default, selecting on held-out accuracy.

    PYTHONPATH=examples .venv/bin/python examples/sweep.py [--trials 8 --epochs 6]
"""
import argparse
import tempfile

import blendtune
from my_av import TwoStreamNet, make_data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    train, test = make_data()
    space = {"ogm.alpha": {"uniform": [0.1, 1.5]}, "optim.lr": {"loguniform": [3e-4, 3e-3]}}
    sweep = blendtune.sweep(space, model=TwoStreamNet, train=train, test=test, strategy="ogm_ge",
                            num_samples=args.trials, epochs=args.epochs, grace_period=min(2, args.epochs),
                            optimizer="adam", held_out_ratio=0.2, output_dir=tempfile.mkdtemp())
    best = sweep.best()
    print(f"best held-out accuracy {best['metrics']['acc/held_out/fused']:.3f} with {best['config']}")
    print(f"its test accuracy {best['metrics']['acc/test/fused']:.3f}; folder: {sweep.run_dir}")


if __name__ == "__main__":
    main()
