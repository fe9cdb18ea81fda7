"""blendtune on your own model and data, from Python: fit, predict, load the trained model back.

    PYTHONPATH=examples .venv/bin/python examples/own_model.py [--epochs 8] [--run-dir runs/own_model]

Then the same run from the command line and as a comparison, with nothing of blendtune edited:

    PYTHONPATH=examples .venv/bin/blendtune train examples/own_model.yaml
    PYTHONPATH=examples .venv/bin/blendtune compare examples/own_model.yaml --strategies naive,ogm_ge,gblend --seeds 2
"""
import argparse
import tempfile
from pathlib import Path

import blendtune
from my_av import TwoStreamNet, make_data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--strategy", default="ogm_ge")
    parser.add_argument("--run-dir", default=None, help="default: a temporary folder")
    args = parser.parse_args()
    run_dir = Path(args.run_dir or tempfile.mkdtemp()) / args.strategy

    train, test = make_data()
    result = blendtune.fit(TwoStreamNet, train, test, strategy=args.strategy, epochs=args.epochs, lr=1e-3,
                           optimizer="adam", held_out_ratio=0.2, seed=0, progress=False, run_dir=run_dir,
                           **({"alpha": 0.8} if args.strategy.startswith("ogm") else {}))
    m = result.metrics
    print(f"{args.strategy}: test accuracy fused {m['acc/test/fused']:.3f}, audio head {m['acc/test/audio']:.3f}, "
          f"video head {m['acc/test/video']:.3f}")
    for key in sorted(k for k in m if k.startswith(("ogm/coeff/", "gblend/w/"))):
        print(f"  {key} = {m[key]:.3f}")

    # the run's folder holds config.yaml, metrics.jsonl, a W&B offline run and checkpoints: load it back
    loaded = blendtune.load(run_dir, model=TwoStreamNet)
    predictions = loaded.predict(test)
    accuracy = (predictions.classes == test.targets).float().mean().item()
    print(f"loaded from {run_dir}: predicts with the {predictions.head} head, test accuracy {accuracy:.3f}")
    backbone = TwoStreamNet()
    backbone.load_state_dict(loaded.backbone_state_dict())  # your module, your keys
    print("backbone weights loaded into a fresh TwoStreamNet")


if __name__ == "__main__":
    main()
