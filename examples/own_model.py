"""blendtune on your own model and data, from Python.

    PYTHONPATH=examples .venv/bin/python examples/own_model.py [--epochs 8]

Then the same run from the command line and as a sweep, with nothing of blendtune edited:

    PYTHONPATH=examples .venv/bin/blendtune train examples/own_model.yaml
    PYTHONPATH=examples .venv/bin/blendtune compare examples/own_model.yaml --strategies naive,ogm_ge,gblend --seeds 2
"""
import argparse

import blendtune
from my_av import TwoStreamNet, make_data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--strategy", default="ogm_ge")
    args = parser.parse_args()

    train, test = make_data()
    result = blendtune.fit(model=TwoStreamNet(), train=train, test=test, strategy=args.strategy,
                           epochs=args.epochs, lr=1e-3, optimizer="adam", held_out_ratio=0.2, seed=0,
                           **({"alpha": 0.8} if args.strategy.startswith("ogm") else {}))
    m = result.metrics
    print(f"{args.strategy}: test accuracy fused {m['acc/test/fused']:.3f}, audio head {m['acc/test/audio']:.3f}, "
          f"video head {m['acc/test/video']:.3f}")
    for key in sorted(k for k in m if k.startswith(("ogm/coeff/", "gblend/w/"))):
        print(f"  {key} = {m[key]:.3f}")


if __name__ == "__main__":
    main()
