"""`compare` / `report`: per-strategy tables (mean ± std over seeds), results.csv, plots, report.md.

Reads what Tune wrote for each trial (`params.json`, `result.json`), so it rebuilds the report of a
finished or resumed sweep without Ray. Epochs that a resumed trial reported twice count once (the last).
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
import sys
from pathlib import Path

from blendtune.config import ExperimentConfig, with_overrides
from blendtune import storage
from blendtune.errors import UserError
from blendtune.evaluation import PREDICTION, score_name
from blendtune.strategies import STRATEGIES
from blendtune.loggers import read_metrics
from blendtune.runs import METRICS_FILE, load_run_config, load_sweep, load_tuning
from blendtune.sweeps import EXPERIMENT, SWEEP_FILE, VARIANT, state_files, sweep_storage, trial_overrides
from blendtune.tuning import CANDIDATE, PHASE, selection_score

PLOTS_MISSING = "matplotlib is not installed (an optional part): pip install 'blendtune[plots]'"


def strategy_label(cfg: ExperimentConfig, variant: dict | None = None) -> str:
    """`naive`, `unimodal:audio`, or a compare variant with its options: `gblend:ema=0.5` (the
    strategy's own keys without their section). A run without a variant is labelled by its strategy."""
    if variant is None:
        variant = {"strategy": cfg.strategy, **({"unimodal.modality": cfg.unimodal.modality}
                                                if cfg.strategy == "unimodal" else {})}
    name = variant.get("strategy", cfg.strategy)
    section = STRATEGIES.section(name) if name in STRATEGIES else None
    parts = [name]
    for key, value in variant.items():
        if key == "strategy":
            continue
        if key == "unimodal.modality":
            parts.append(str(value))
        else:  # the strategy's own keys bare (ogm_ge's live in the ogm section), any other key in full
            parts.append(f"{key.removeprefix((section or name) + '.')}={value}")
    return ":".join(parts)


def tune_trial_ids(experiment: str | Path) -> set[str] | None:
    """The trials in Tune's newest experiment state (None if there is none)."""
    states = state_files(str(experiment))
    if not states:
        return None
    data = json.loads(storage.read_text(storage.join(experiment, max(states))))
    return {json.loads(entry[0] if isinstance(entry, list) else entry)["trial_id"] for entry in data["trial_data"]}


def load_trials(run_dir: Path) -> list[dict]:
    if not (Path(run_dir) / SWEEP_FILE).is_file() and (Path(run_dir) / METRICS_FILE).is_file():
        return [_run_as_trial(Path(run_dir))]  # one run (`blendtune train`, `blendtune.fit(run_dir=...)`)
    experiment = storage.join(sweep_storage(run_dir), EXPERIMENT)
    try:
        return _load_trials(run_dir, experiment)
    except OSError as e:  # pyarrow's S3 and HTTP errors: an endpoint, a bucket or credentials gone
        reason = " ".join(str(e).split())
        raise UserError(f"cannot read the sweep's trials at '{experiment}' (sweep.storage_path): {reason[:300]}") from None


def _run_as_trial(run_dir: Path) -> dict:
    """A single run's folder read as a sweep's trial: its report is one row (no interval over one seed)."""
    cfg = load_run_config(run_dir)
    history = read_metrics(run_dir / METRICS_FILE)
    if not history:
        raise UserError(f"'{run_dir}' has no finished epoch in {METRICS_FILE}")
    return {"trial": run_dir.name, "label": strategy_label(cfg), "seed": cfg.seed, "strategy": cfg.strategy,
            "epochs_planned": cfg.train.epochs, "history": history,
            "prediction_head": _prediction_head(cfg, history), "phase": "final", "candidate": None, "settings": {}}


def _prediction_head(cfg, history: list[dict]) -> str:
    if cfg.strategy == "unimodal":
        return cfg.unimodal.modality
    return PREDICTION if any(f"/test/{PREDICTION}" in k for row in history[-1:] for k in row) else "fused"


def _load_trials(run_dir: Path, experiment: str) -> list[dict]:
    base, _, _ = load_sweep(run_dir)
    if not storage.is_dir(experiment):
        raise UserError(f"no Tune results at '{experiment}' (the sweep's storage path)")
    trials = []
    known = tune_trial_ids(experiment)
    for name in storage.list_names(experiment):
        params = storage.read_text(storage.join(experiment, name, "params.json"))
        if params is None:
            continue
        if known is not None and not any(f"_{trial_id}_" in name for trial_id in known):
            continue  # started after Tune's last state save, then the driver died: resumed as a new trial
        sample = json.loads(params)
        cfg = with_overrides(base, trial_overrides(sample))
        by_epoch = {}
        for line in (storage.read_text(storage.join(experiment, name, "result.json")) or "").splitlines():
            if line.strip():
                row = json.loads(line)
                if "epoch" in row:
                    by_epoch[row["epoch"]] = row
        history = [by_epoch[e] for e in sorted(by_epoch)]
        variant = sample.get(VARIANT) or {}
        settings = {k: v for k, v in trial_overrides(sample).items() if k not in variant and k != "seed"
                    and not k.startswith("data.held_out_fold")}
        trials.append({"trial": name, "label": strategy_label(cfg, sample.get(VARIANT)), "seed": cfg.seed,
                       "strategy": cfg.strategy, "epochs_planned": cfg.train.epochs, "history": history,
                       "prediction_head": _prediction_head(cfg, history), "phase": sample.get(PHASE, "final"),
                       "candidate": sample.get(CANDIDATE), "settings": settings})
    if not trials:
        raise UserError(f"no trials in '{experiment}'")
    return trials


def score_of(trials: list[dict]) -> str:
    """acc for single-label data, map (mean average precision) for multi-label."""
    return score_name(k for t in trials for row in t["history"][-1:] for k in row)


def heads_of(trials: list[dict], score: str = "acc") -> list[str]:
    keys = {k for t in trials for row in t["history"] for k in row if k.startswith(f"{score}/test/")}
    heads = sorted(k.split("/")[-1] for k in keys if k.split("/")[-1] != PREDICTION)
    return [h for h in heads if h not in ("fused", "ensemble")] + [h for h in ("fused", "ensemble") if h in heads]


# Student's t, 97.5th percentile, by degrees of freedom (a 95% two-sided interval); 1.96 beyond 30.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (t distribution; inf for one value)."""
    n = len(values)
    mean = statistics.mean(values)
    if n < 2:
        return mean, float("inf")
    t = _T975[n - 2] if n - 2 < len(_T975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(n)


def mean_ci_text(values: list[float]) -> str:
    """Scores in [0, 1] as points, `mean ± half-width of the 95% CI`: the one text the report and the
    leaderboard print, so that both round a mean the same way."""
    if not values:
        return "-"
    mean, half = mean_ci(values)
    return f"{100 * mean:.1f} ± {100 * half:.1f}" if math.isfinite(half) else f"{100 * mean:.1f}"


def _mean_text(values: list[float]) -> str:
    """The mean alone, marked †: trials that share seeds, over which no interval is computed."""
    return f"{100 * statistics.mean(values):.1f}†" if values else "-"


@dataclass
class PairedDifference:
    label: str
    seeds: int          # seeds both runs finished
    mean: float         # mean of (strategy - baseline) on the prediction head, same seed
    half_width: float   # 95% CI half-width of that mean
    wins: int           # seeds where the strategy scored higher

    @property
    def excludes_zero(self) -> bool:
        return math.isfinite(self.half_width) and abs(self.mean) > self.half_width


def difference_text(d: PairedDifference) -> str:
    """`+2.9 ± 4.5` points, in bold where the 95% CI excludes 0."""
    text = f"{100 * d.mean:+.1f} ± {100 * d.half_width:.1f}" if math.isfinite(d.half_width) else f"{100 * d.mean:+.1f}"
    return f"**{text}**" if d.excludes_zero else text


def paired_differences(final_scores: dict[str, dict[int, float]], baseline: str = "naive") -> list[PairedDifference]:
    """Each strategy's difference to `baseline` over the seeds both ran (paired by seed):
    `final_scores[label][seed]` is the prediction head's final test score."""
    base = final_scores.get(baseline, {})
    out = []
    for label, by_seed in final_scores.items():
        seeds = sorted(set(by_seed) & set(base))
        if label == baseline or not seeds:
            continue
        diffs = [by_seed[s] - base[s] for s in seeds]
        mean, half = mean_ci(diffs)
        out.append(PairedDifference(label, len(seeds), mean, half, sum(d > 0 for d in diffs)))
    return out


def write_report(run_dir: Path) -> Path:
    every = load_trials(run_dir)
    tuning = load_tuning(run_dir)
    trials = [t for t in every if t["phase"] != "tune"]  # a tuned comparison's seed runs: the table's rows
    score = score_of(every)
    heads = heads_of(every, score)
    if not heads:
        raise UserError(f"'{run_dir}': no test metrics to report (its runs had no test data)")
    with (run_dir / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "strategy", "seed", "epochs"] + [f"final_{score}_{h}" for h in heads]
                        + [f"best_{score}_{h}" for h in heads] + ["phase"])
        for t in every:
            h = t["history"]
            final = [h[-1].get(f"{score}/test/{x}", "") if h else "" for x in heads]
            best = [max((r.get(f"{score}/test/{x}", 0.0) for r in h), default="") for x in heads]
            writer.writerow([t["trial"], t["label"], t["seed"], len(h)] + final + best + [t["phase"]])
    tuned_lines = _tuning_section(tuning, every, score) if tuning else []
    if not trials:  # still tuning: what has been scored so far
        report = run_dir / "report.md"
        report.write_text("\n".join([f"# {run_dir.name}", "", *tuned_lines]) + "\n")
        return report

    groups: dict[str, list[dict]] = defaultdict(list)
    for t in trials:
        groups[t["label"]].append(t)
    what = "Test accuracy (%)" if score == "acc" else "Test mAP (%)"
    lines = [f"# {run_dir.name}", "", f"{what} of the last epoch: mean ± the half-width of its 95% confidence "
             "interval over seeds (t distribution). `prediction` is the head the run predicts with (`train.predict`: "
             "fused, ensemble, or the best on held-out data), or the trained modality's head for `unimodal:`.", "",
             "| strategy | trials | seeds | epochs | prediction | " + " | ".join(heads) + " |",
             "|---|---|---|---|---|" + "---|" * len(heads)]
    shared_seeds = {}  # label -> trials that share a seed with another trial of the label
    for label, ts in groups.items():
        done = [t for t in ts if t["history"]]
        seeds = {t["seed"] for t in ts}
        if len(seeds) < len(ts):
            shared_seeds[label] = len(ts)
        interval = label not in shared_seeds  # repeats of a seed are not more seeds: no interval over them

        def cell(values: list[float]) -> str:
            return mean_ci_text(values) if interval else _mean_text(values)
        pred = [t["history"][-1][f"{score}/test/{t['prediction_head']}"] for t in done]
        cells = [cell([t["history"][-1][f"{score}/test/{h}"] for t in done if f"{score}/test/{h}" in t["history"][-1]])
                 for h in heads]
        epochs = "/".join(sorted({str(len(t["history"])) for t in ts}))
        lines.append(f"| {label} | {len(ts)} | {len(seeds)} | {epochs} | {cell(pred)} | " + " | ".join(cells) + " |")
    if shared_seeds:
        lines += ["", "† " + ", ".join(f"{label}: {n} trials" for label, n in shared_seeds.items()) +
                  " over fewer seeds (a grid repeated with sweep.num_samples, or settings the sweep varied): the mean of "
                  "the trials, with no interval, and no paired difference; an interval needs one trial per seed."]
    final = {label: {t["seed"]: t["history"][-1][f"{score}/test/{t['prediction_head']}"] for t in ts
                     if t["history"] and len(t["history"]) == t["epochs_planned"]}
             for label, ts in groups.items() if label not in shared_seeds}
    differences = paired_differences(final)
    if differences:
        lines += ["", "Difference to naive on the prediction head, paired by seed (points; 95% CI; **bold**: the CI "
                  "excludes 0). Only trials that ran all their epochs count.", "",
                  "| strategy | seeds | difference | wins |", "|---|---|---|---|"]
        for d in differences:
            lines.append(f"| {d.label} | {d.seeds} | {difference_text(d)} | {d.wins}/{d.seeds} |")
    lines += tuned_lines
    plots = _plots(run_dir, groups, heads)
    lines += ["", "Fewer epochs than planned means the scheduler stopped the trial early.", ""]
    lines += [f"![{name}]({name})" for name in plots] if plots is not None else [f"No plots: {PLOTS_MISSING}."]
    lines += ["", "Per-trial numbers: [results.csv](results.csv)."]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _tuning_section(tuning: dict, trials: list[dict], score: str) -> list[str]:
    """What each arm's equal tuning budget found: every candidate's held-out selection score, the chosen
    settings, and the chosen configuration's held-out score against its seed runs' test score (the gap
    says how far the held-out judge was from the data it never saw)."""
    folds = tuning["folds"]
    lines = ["", f"## Tuning: {tuning['trials']} random-search trials per strategy"
             + (f" x {folds} held-out folds" if folds > 1 else "")
             + f", selected on held-out data only; the choice then ran on {tuning['seeds']} fresh seeds", "",
             "Selection metric per strategy in the table; a candidate's score is its last epoch's value"
             + (" (the mean over its folds)" if folds > 1 else "") + ". Test scores are of the seed runs.", "",
             "| strategy | metric | chosen settings | selection score | seed runs' test | held-out − test | "
             "every candidate's score |", "|---|---|---|---|---|---|---|"]
    for arm in tuning["arms"]:
        label, metric = arm["label"], arm["metric"]
        tuned = [t for t in trials if t["phase"] == "tune" and t["label"] == label]
        per_candidate: dict[int, list] = defaultdict(list)
        settings: dict[int, dict] = {}
        for t in tuned:
            per_candidate[t["candidate"]].append(t["history"][-1].get(metric) if t["history"] else None)
            settings[t["candidate"]] = t["settings"]
        scores = {c: selection_score(v) for c, v in per_candidate.items() if len(v) == folds}
        finals = [t for t in trials if t["phase"] != "tune" and t["label"] == label and t["history"]]
        if not scores:
            lines.append(f"| {label} | {metric} | (tuning) | | | | |")
            continue
        chosen = max(scores, key=lambda c: (scores[c], -c))
        head = metric.split("/")[-1]
        test = [t["history"][-1].get(f"{score}/test/{head}") for t in finals]
        test = [v for v in test if v is not None]
        test_text = mean_ci_text(test) if test else "-"
        gap = f"{100 * (scores[chosen] - statistics.mean(test)):+.1f}" if test and math.isfinite(scores[chosen]) else "-"
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings[chosen].items())
        every = ", ".join(f"{100 * v:.1f}" if math.isfinite(v) else "failed" for v in sorted(scores.values(), reverse=True))
        lines.append(f"| {label} | `{metric}` | {shown} | {100 * scores[chosen]:.1f} | {test_text} | {gap} | {every} |")
    return lines


def _series(ts: list[dict], key: str) -> tuple[list[int], list[float]]:
    by_epoch = defaultdict(list)
    for t in ts:
        for row in t["history"]:
            if row.get(key) is not None:
                by_epoch[row["epoch"]].append(row[key])
    epochs = sorted(by_epoch)
    return epochs, [statistics.mean(by_epoch[e]) for e in epochs]


def _plots(run_dir: Path, groups: dict[str, list[dict]], heads: list[str]) -> list[str] | None:
    """The figures written, or None without matplotlib."""
    try:
        import matplotlib
    except ModuleNotFoundError:  # an optional part: the tables are the report
        print(f"blendtune: {run_dir / 'report.md'} has no plots: {PLOTS_MISSING}", file=sys.stderr, flush=True)
        return None
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
