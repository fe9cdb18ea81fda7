"""`blendtune train EXPERIMENT.yaml [key=value ...]` and `blendtune train --resume RUN_DIR`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from blendtune.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blendtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one model with a balancing strategy")
    train.add_argument("experiment", nargs="?", help="experiment YAML (see experiments/)")
    train.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. optim.lr=0.01)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    return parser


def train_command(args) -> Path:
    from blendtune.config import load_config, to_yaml
    from blendtune.runs import CONFIG_FILE, create_run_dir, load_run_config

    overrides = list(args.overrides)
    if args.resume:
        if args.experiment:  # `train --resume DIR key=value`: argparse reads the first override as experiment
            overrides.insert(0, args.experiment)
        run_dir = Path(args.resume)
        cfg = load_run_config(run_dir, overrides)
        (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))
    else:
        if not args.experiment:
            raise UserError("blendtune train: give an experiment YAML (e.g. experiments/synthetic_gblend.yaml)")
        cfg = load_config(args.experiment, overrides)
        run_dir = create_run_dir(cfg)
    print(f"run dir: {run_dir}", flush=True)

    from blendtune.launch import train_locally, train_with_ray
    final = (train_with_ray if cfg.workers > 1 else train_locally)(cfg, run_dir, resume=bool(args.resume))
    heads = [k.split("/")[-1] for k in final if k.startswith("acc/test/")]
    if final:
        print("final test accuracy: " + ", ".join(f"{h} {final[f'acc/test/{h}']:.4f}" for h in heads))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            run_dir = train_command(args)
            print(run_dir)
        return 0
    except UserError as e:
        print(f"blendtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blendtune: interrupted; resume with `blendtune train --resume RUN_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
