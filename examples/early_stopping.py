"""Early stopping and keeping the best epoch, as Lightning's EarlyStopping + ModelCheckpoint(save_top_k=1)
do, watching held-out data only; then more epochs of the same run.

    PYTHONPATH=examples .venv/bin/python examples/early_stopping.py [--epochs 40]
"""
import argparse
import tempfile
from pathlib import Path

import blendtune
from my_av import TwoStreamNet, make_data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--patience", type=int, default=3)
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp()) / "gblend"

    train, test = make_data()
    # the held-out split (20% of train, stratified) is what G-Blend weighs the heads on, what early stopping and
    # keep_best watch (monitor: the held-out loss of the fused head), never the test set
    result = blendtune.fit(TwoStreamNet, train, test, strategy="gblend", super_epoch=2, epochs=args.epochs,
                           held_out_ratio=0.2, early_stopping_patience=args.patience, keep_best=True, monitor="loss/held_out/fused",
                           lr=1e-3, optimizer="adam", progress=False, run_dir=run_dir)
    last = result.history[-1]
    stopped = "stopped early" if last.get("stopped_early") else "ran every epoch"
    print(f"{stopped} at epoch {last['epoch']}; best held-out loss at epoch {result.best_epoch}")
    print(f"best epoch's test accuracy: {result.history[result.best_epoch - 1]['acc/test/fused']:.3f}")
    print(f"the model holds the best epoch's weights: {blendtune.load(run_dir, model=TwoStreamNet).best_epoch}")


if __name__ == "__main__":
    main()
