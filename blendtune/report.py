"""`compare` / `report`: per-strategy tables (mean ± std over seeds), results.csv, plots, report.md.

Reads what Tune wrote for each trial (`params.json`, `result.json`), so it rebuilds the report of a
finished or resumed sweep without Ray. Epochs that a resumed trial reported twice count once (the last).
"""
from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

from blendtune.config import ExperimentConfig, with_overrides
from blendtune.errors import UserError
from blendtune.evaluation import score_name
from blendtune.runs import load_sweep
from blendtune.sweeps import EXPERIMENT, SWEEP_FILE, trial_overrides


def strategy_label(cfg: ExperimentConfig) -> str:
    return f"unimodal:{cfg.unimodal.modality}" if cfg.strategy == "unimodal" else cfg.strategy


def tune_trial_ids(experiment: Path) -> set[str] | None:
    """The trials in Tune's newest experiment state (None if there is none)."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return None
    data = json.loads(states[-1].read_text())
    return {json.loads(entry[0] if isinstance(entry, list) else entry)["trial_id"] for entry in data["trial_data"]}


def load_trials(run_dir: Path) -> list[dict]:
    base, _, _ = load_sweep(run_dir)
    storage = Path(json.loads((run_dir / SWEEP_FILE).read_text())["storage_path"])
    experiment = storage / EXPERIMENT
    if not experiment.is_dir():
        raise UserError(f"no Tune results at '{experiment}' (reports read local storage)")
    trials = []
    known = tune_trial_ids(experiment)
    for params in sorted(experiment.glob("*/params.json")):
        if known is not None and not any(f"_{trial_id}_" in params.parent.name for trial_id in known):
            continue  # started after Tune's last state save, then the driver died: resumed as a new trial
        sample = json.loads(params.read_text())
        cfg = with_overrides(base, trial_overrides(sample))
        by_epoch = {}
        results = params.parent / "result.json"
        if results.is_file():
            for line in results.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if "epoch" in row:
                        by_epoch[row["epoch"]] = row
        history = [by_epoch[e] for e in sorted(by_epoch)]
        trials.append({"trial": params.parent.name, "label": strategy_label(cfg), "seed": cfg.seed,
                       "strategy": cfg.strategy, "epochs_planned": cfg.train.epochs, "history": history,
                       "prediction_head": cfg.unimodal.modality if cfg.strategy == "unimodal" else "fused"})
    if not trials:
        raise UserError(f"no trials in '{experiment}'")
    return trials


def score_of(trials: list[dict]) -> str:
    """acc for single-label data, map (mean average precision) for multi-label."""
    return score_name(k for t in trials for row in t["history"][-1:] for k in row)


def heads_of(trials: list[dict], score: str = "acc") -> list[str]:
    keys = {k for t in trials for row in t["history"] for k in row if k.startswith(f"{score}/test/")}
    heads = sorted(k.split("/")[-1] for k in keys)
    return [h for h in heads if h not in ("fused", "ensemble")] + [h for h in ("fused", "ensemble") if h in heads]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def write_report(run_dir: Path) -> Path:
    trials = load_trials(run_dir)
    score = score_of(trials)
    heads = heads_of(trials, score)
    with (run_dir / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "strategy", "seed", "epochs"] + [f"final_{score}_{h}" for h in heads]
                        + [f"best_{score}_{h}" for h in heads])
        for t in trials:
            h = t["history"]
            final = [h[-1].get(f"{score}/test/{x}", "") if h else "" for x in heads]
            best = [max((r.get(f"{score}/test/{x}", 0.0) for r in h), default="") for x in heads]
            writer.writerow([t["trial"], t["label"], t["seed"], len(h)] + final + best)

    groups: dict[str, list[dict]] = defaultdict(list)
    for t in trials:
        groups[t["label"]].append(t)
    what = "Test accuracy (%)" if score == "acc" else "Test mAP (%)"
    lines = [f"# {run_dir.name}", "", f"{what} of the last epoch, mean ± std over seeds. `prediction` is the "
             "fused head, or the trained modality's head for `unimodal:`.", "",
             "| strategy | trials | epochs | prediction | " + " | ".join(heads) + " |",
             "|---|---|---|---|" + "---|" * len(heads)]
    for label, ts in groups.items():
        done = [t for t in ts if t["history"]]
        pred = [t["history"][-1][f"{score}/test/{t['prediction_head']}"] for t in done]
        cells = [_mean_std([t["history"][-1][f"{score}/test/{h}"] for t in done if f"{score}/test/{h}" in t["history"][-1]])
                 for h in heads]
        epochs = "/".join(sorted({str(len(t["history"])) for t in ts}))
        lines.append(f"| {label} | {len(ts)} | {epochs} | {_mean_std(pred)} | " + " | ".join(cells) + " |")
    plots = _plots(run_dir, groups, heads)
    lines += ["", "Fewer epochs than planned means the scheduler stopped the trial early.", ""]
    lines += [f"![{name}]({name})" for name in plots]
    lines += ["", "Per-trial numbers: [results.csv](results.csv)."]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _series(ts: list[dict], key: str) -> tuple[list[int], list[float]]:
    by_epoch = defaultdict(list)
    for t in ts:
        for row in t["history"]:
            if row.get(key) is not None:
                by_epoch[row["epoch"]].append(row[key])
    epochs = sorted(by_epoch)
    return epochs, [statistics.mean(by_epoch[e]) for e in epochs]


def _plots(run_dir: Path, groups: dict[str, list[dict]], heads: list[str]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_heads = [h for h in heads if h != "ensemble"]
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=90)
        plt.close(fig)
        written.append(name)

    blended = {label: ts for label, ts in groups.items() if any("gblend/w/fused" in r for t in ts for r in t["history"])}
    if blended:
        fig, axes = plt.subplots(1, len(blended), figsize=(5 * len(blended), 3.5), squeeze=False)
        for ax, (label, ts) in zip(axes[0], blended.items()):
            for h in model_heads:
                ax.plot(*_series(ts, f"gblend/w/{h}"), marker="o", label=h)
            ax.set(title=f"blend weights: {label}", xlabel="epoch", ylim=(0, 1))
            ax.legend()
        save(fig, "blend_weights.png")

    for name, title, keys in (("ogr.png", "OGR over the last epoch", [("ogr/{h}", "-")]),
                              ("losses.png", "loss: train (solid), held-out (dashed)",
                               [("loss/train/{h}", "-"), ("loss/held_out/{h}", "--")])):
        fig, axes = plt.subplots(1, len(model_heads), figsize=(4.5 * len(model_heads), 3.5), squeeze=False)
        for ax, h in zip(axes[0], model_heads):
            for i, (label, ts) in enumerate(groups.items()):
                for key, style in keys:
                    epochs, values = _series(ts, key.format(h=h))
                    ax.plot(epochs, values, style, color=f"C{i}", label=label if style == "-" else None)
            ax.set(title=f"{title}: {h}", xlabel="epoch")
            if name == "ogr.png":
                ax.set_yscale("symlog", linthresh=0.1)
        axes[0][0].legend(fontsize=7)
        save(fig, name)
    return written
