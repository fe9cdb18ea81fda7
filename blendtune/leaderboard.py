"""One table of strategies x experiments from several comparisons (`blendtune leaderboard RUN_DIR...`):
per cell the prediction head's test score, mean ± 95% CI over seeds; per strategy its paired difference
to naive and to the best single modality of that experiment, its wins, and its average rank across the
experiments (BalanceBench's table, with intervals). Only seed runs count (a tuned comparison's tuning
trials chose the settings; they are not scored here).

Several comparisons of one experiment (the same config but for where it wrote and the strategies, and the
same tuning budget) make one column, so that strategies compared in a later run join the earlier ones:
paired differences stay paired because seed runs are numbered alike. A strategy in two of them is taken
from the first folder given; the board says which.
"""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from blendtune.errors import UserError
from blendtune.report import difference_text, load_trials, mean_ci_text, paired_differences, score_of
from blendtune.runs import load_run_config, load_tuning
from blendtune.strategies import STRATEGIES


def _run(run_dir: Path) -> dict:
    """One comparison: its experiment's name, `cells` (label -> seed -> final test score of its prediction
    head), the score's name, the tuning `budget` (trials, folds; None: not tuned) and the `config` every
    arm shares."""
    trials = [t for t in load_trials(run_dir) if t["phase"] != "tune" and t["history"]
              and len(t["history"]) == t["epochs_planned"]]
    if not trials:
        raise UserError(f"'{run_dir}': no finished seed runs to put on a leaderboard")
    score = score_of(trials)
    cells: dict[str, dict[int, float]] = {}
    for t in trials:
        value = t["history"][-1].get(f"{score}/test/{t['prediction_head']}")
        if value is not None:
            cells.setdefault(t["label"], {})[t["seed"]] = value
    cfg = dataclasses.asdict(load_run_config(run_dir))
    # what every arm shares: less where it wrote, and less the strategy and its options, which vary by arm
    for key in ("output_dir", "strategy", *STRATEGIES.sections()):
        cfg.pop(key, None)
    cfg["sweep"].pop("storage_path")
    tuning = load_tuning(run_dir)
    budget = (tuning["trials"], tuning.get("folds", 1)) if tuning is not None else None
    return {"name": cfg["name"], "dir": run_dir, "cells": cells, "score": score, "budget": budget, "config": cfg}


def _merged(runs: list[dict]) -> list[dict]:
    """One experiment per config: the runs of one config become one column, each strategy from the first
    run that has it; `notes` says where a strategy came from and which other results of it were left out."""
    experiments: list[dict] = []
    for run in runs:
        same = next((e for e in experiments if (e["config"], e["score"], e["budget"])
                     == (run["config"], run["score"], run["budget"])), None)
        if same is None:
            experiments.append({**run, "dirs": [run["dir"]], "cells": dict(run["cells"]), "notes": []})
            continue
        same["dirs"].append(run["dir"])
        joined, left_out = [], []
        for label, seeds in sorted(run["cells"].items()):
            if label not in same["cells"]:
                same["cells"][label] = seeds
                joined.append(label)
            elif seeds != same["cells"][label]:
                left_out.append(f"{label} in `{run['dir']}` ({mean_ci_text(list(seeds.values()))}) left out: "
                                "the first folder's is shown")
        same["notes"] += ([f"{', '.join(joined)} from `{run['dir']}`"] if joined else []) + left_out
    return experiments


def _difference(d) -> str:
    return difference_text(d) if d is not None else "-"


def leaderboard(run_dirs: list[Path]) -> str:
    """The leaderboard's markdown."""
    if not run_dirs:
        raise UserError("leaderboard: give at least one comparison folder")
    experiments = _merged([_run(Path(run_dir)) for run_dir in run_dirs])
    names = [e["name"] for e in experiments]
    if len(set(names)) < len(names):  # one experiment name, different configs: tell them apart by folder
        for e in experiments:
            e["name"] = f"{e['name']} ({e['dir'].name})"
    labels = sorted({label for e in experiments for label in e["cells"]},
                    key=lambda l: (l != "naive", l.startswith("unimodal:"), l))
    ranks: dict[str, list[int]] = {label: [] for label in labels}
    for e in experiments:
        means = {label: statistics.mean(seeds.values()) for label, seeds in e["cells"].items()}
        ordered = sorted(means, key=lambda l: -means[l])
        for label in means:
            ranks[label].append(1 + sum(means[o] > means[label] for o in ordered))  # ties share a rank
        single = [l for l in means if l.startswith("unimodal:")]
        e["best_single"] = max(single, key=lambda l: means[l]) if single else None
        e["vs_naive"] = {d.label: d for d in paired_differences(e["cells"], baseline="naive")} \
            if "naive" in e["cells"] else {}
        e["vs_single"] = {d.label: d for d in paired_differences(e["cells"], baseline=e["best_single"])} \
            if e["best_single"] else {}

    what = {"acc": "test accuracy (%)", "map": "test mAP (%)"}
    scores = {what.get(e["score"], e["score"]) for e in experiments}
    lines = ["# Leaderboard", "",
             f"Per experiment: {' / '.join(sorted(scores))} of the prediction head at the last epoch, mean ± the "
             "half-width of its 95% CI over seeds (seeds in brackets). Rank: 1 = the highest mean in that "
             "experiment; the average is over the experiments a strategy ran in.", "",
             "| strategy | " + " | ".join(e["name"] for e in experiments) + " | average rank |",
             "|---|" + "---|" * (len(experiments) + 1)]
    for label in labels:
        cells = [f"{mean_ci_text(list(e['cells'][label].values()))} ({len(e['cells'][label])})" if label in e["cells"] else "-"
                 for e in experiments]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {statistics.mean(ranks[label]):.2f} |")
    lines += ["", "Paired differences by seed (points; 95% CI; **bold**: the CI excludes 0) and wins over seeds, "
              "to naive and to the best single modality of each experiment:", "",
              "| strategy | experiment | vs naive | wins | vs best single modality | wins |", "|---|---|---|---|---|---|"]
    for label in labels:
        for e in experiments:
            if label not in e["cells"] or label == "naive" and not e["best_single"]:
                continue
            n, s = e["vs_naive"].get(label), e["vs_single"].get(label)
            single = f"{_difference(s)} ({e['best_single']})" if s is not None else "-"
            lines.append(f"| {label} | {e['name']} | {_difference(n)} | {f'{n.wins}/{n.seeds}' if n else '-'} | "
                         f"{single} | {f'{s.wins}/{s.seeds}' if s else '-'} |")
    lines += ["", "Comparisons: " + ", ".join(f"{e['name']}: " + " + ".join(f"`{d}`" for d in e["dirs"])
                                              + (f" (tuned at an equal budget: {e['budget'][0]} trials"
                                                 + (f" x {e['budget'][1]} folds" if e["budget"][1] > 1 else "")
                                                 + " per strategy)" if e["budget"] else "")
                                              for e in experiments)]
    lines += [f"- {e['name']}: {note}" for e in experiments for note in e["notes"]]
    return "\n".join(lines) + "\n"
