"""Test accuracy of every head per balancing strategy on AV-digits (speaker split), several seeds.

    BLENDTUNE_DATA_ROOT=../shared/data python benchmarks/avdigits_strategies.py --seeds 0 1 2 --epochs 12

Writes benchmarks/results/avdigits_strategies.{json,md}. Every strategy runs the same epochs and
model; audio-only / image-only are the `unimodal` strategy reading that modality's head.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from blendtune.config import load_config
from blendtune.build import build_trainer

RUNS = {  # label: (experiment, overrides, head that is the prediction)
    "audio only": ("avdigits_unimodal_audio", [], "audio"),
    "image only": ("avdigits_unimodal_image", [], "image"),
    "naive": ("avdigits_naive", [], "fused"),
    "G-Blend online, heads estimator": ("avdigits_gblend", [], "fused"),
    "G-Blend online, paper estimator": ("avdigits_gblend_paper", [], "fused"),
    "OGM-GE": ("avdigits_ogm_ge", [], "fused"),
}
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "avdigits_strategies"))
    args = parser.parse_args()
    out = Path(args.out)
    results = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    for label, (experiment, overrides, head) in RUNS.items():
        if args.only and label not in args.only:
            continue
        for seed in args.seeds:
            key = f"{label}|{seed}"
            if key in results:
                continue
            cfg = load_config(REPO / "experiments" / f"{experiment}.yaml",
                              overrides + [f"seed={seed}", f"train.epochs={args.epochs}", "train.progress=false"])
            began = time.perf_counter()
            trainer = build_trainer(cfg)
            history: list[dict] = []
            trainer.callbacks = [history.append]
            last = trainer.fit()
            results[key] = {
                "label": label, "seed": seed, "head": head, "wall_s": time.perf_counter() - began,
                "test_acc": {h: last[f"acc/test/{h}"] for h in ("audio", "image", "fused", "ensemble")},
                "weights": {k.split("/")[-1]: v for k, v in last.items() if k.startswith("gblend/w/")},
                "weights_history": [{k.split("/")[-1]: round(v, 3) for k, v in m.items() if k.startswith("gblend/w/")}
                                    for m in history],
            }
            print(key, json.dumps(results[key]["test_acc"]), f"{results[key]['wall_s']:.0f}s",
                  results[key]["weights"], flush=True)
            out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(table(results, args.epochs))
    print(table(results, args.epochs))


def table(results: dict, epochs: int) -> str:
    def ms(values):
        return f"{100 * statistics.mean(values):.1f} ± {100 * (statistics.stdev(values) if len(values) > 1 else 0):.1f}"
    lines = [f"AV-digits, test speakers george + jackson, {epochs} epochs, mean ± std over seeds (test accuracy %)", "",
             "| strategy | seeds | prediction | audio head | image head | fused head | ensemble | blend weights (a/i/f) | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, (_, _, head) in RUNS.items():
        rows = [r for r in results.values() if r["label"] == label]
        if not rows:
            continue
        acc = {h: [r["test_acc"][h] for r in rows] for h in ("audio", "image", "fused", "ensemble")}
        w = ""
        if rows[0]["weights"]:
            w = "; ".join("/".join(f"{r['weights'][h]:.2f}" for h in ("audio", "image", "fused")) for r in rows)
        lines.append(f"| {label} | {len(rows)} | {ms(acc[head])} | {ms(acc['audio'])} | {ms(acc['image'])} | "
                     f"{ms(acc['fused'])} | {ms(acc['ensemble'])} | {w} | {statistics.mean(r['wall_s'] for r in rows):.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
