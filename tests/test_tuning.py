"""compare --tune (issue 23): every strategy tuned at the same budget, selected on held-out data only
(here the mean over 2 held-out folds), then its choice on fresh seeds; one Tune experiment, one report."""
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from blendtune.data.base import held_out_indices
from blendtune.report import load_trials
from blendtune.runs import load_tuning
from blendtune.tuning import FINAL_SEED_OFFSET, TUNE_SEED, selection_score
from conftest import REPO, TINY, cli_in_process


def test_held_out_folds_partition_the_training_data():
    targets = np.repeat(np.arange(3), 20)
    held = [held_out_indices(targets, 0.0, 0, folds=4, fold=f)[1] for f in range(4)]
    assert sorted(np.concatenate(held).tolist()) == list(range(60))  # disjoint and covering
    assert all(np.bincount(targets[h], minlength=3).tolist() == [5, 5, 5] for h in held)  # stratified
    groups = [f"speaker{i % 6}" for i in range(60)]
    for f in range(3):
        train, held_out = held_out_indices(targets, 0.0, 0, groups, folds=3, fold=f)
        assert len({groups[i] for i in held_out}) == 2 and not {groups[i] for i in held_out} & {groups[i] for i in train}


def test_tuned_compare_selects_on_held_out_folds_and_runs_the_choice_on_fresh_seeds(tmp_path, capsys):
    spaces = tmp_path / "spaces"  # ranges where 2 epochs learn something, so candidates differ
    spaces.mkdir()
    (spaces / "naive.yaml").write_text("optim.lr: {loguniform: [1.0e-3, 0.3]}\n")
    (spaces / "ogm.yaml").write_text("ogm.alpha: {uniform: [0.1, 1.5]}\noptim.lr: {loguniform: [1.0e-3, 0.3]}\n")
    proc = subprocess.run([sys.executable, "-m", "blendtune.cli", "compare", "experiments/synthetic_naive.yaml",
                           "--strategies", "naive,unimodal:clean", "--tune", "2", "--seeds", "2", "--spaces", str(spaces), *TINY,
                           "train.epochs=1", "sweep.folds=2", f"output_dir={tmp_path}"], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    tuning = load_tuning(run_dir)
    trials = load_trials(run_dir)
    assert len(trials) == 2 * (2 * 2 + 2)  # per strategy: 2 candidates x 2 folds, then 2 seeds
    report = (run_dir / "report.md").read_text()
    for arm in tuning["arms"]:
        label, metric = arm["label"], arm["metric"]
        # the arm's judge is held-out data, of the head it predicts with
        assert metric == ("acc/held_out/clean" if label == "unimodal:clean" else "acc/held_out/fused")
        tuned = [t for t in trials if t["label"] == label and t["phase"] == "tune"]
        finals = [t for t in trials if t["label"] == label and t["phase"] == "final"]
        assert {t["seed"] for t in tuned} == {TUNE_SEED} and sorted(t["seed"] for t in finals) == \
            [FINAL_SEED_OFFSET, FINAL_SEED_OFFSET + 1]
        folds = defaultdict(list)
        for t in tuned:
            folds[t["candidate"]].append(t["history"][-1][metric])
        assert all(len(v) == 2 for v in folds.values()) and len(folds) == 2
        held_out = {c: selection_score(v) for c, v in folds.items()}
        chosen = max(held_out, key=lambda c: (held_out[c], -c))
        chosen_settings = next(t["settings"] for t in tuned if t["candidate"] == chosen)
        assert all(t["settings"] == chosen_settings for t in finals)  # the seed runs use the held-out choice
        # the report shows the score the choice was made on: the held-out mean, not a test score
        row = next(line for line in report.splitlines() if line.startswith(f"| {label} | `{metric}`"))
        assert f"| {100 * held_out[chosen]:.1f} |" in row
    # the table's rows are the seed runs only, tuning trials are listed in their own section
    assert "| naive | 2 | 2 | 1 |" in report and "## Tuning: 2 random-search trials per strategy x 2 held-out folds" in report
    # a leaderboard of it, against the report's own numbers (the folder given twice is one experiment: one column)
    board = cli_in_process(capsys, "leaderboard", run_dir, run_dir, "--out", tmp_path / "board.md")  # no Ray
    assert board.returncode == 0, board.stderr[-2000:]
    assert (tmp_path / "board.md").read_text() == board.stdout.rstrip("\n") + "\n"
    naive_cell = next(line for line in report.splitlines() if line.startswith("| naive | 2 |")).split(" | ")[4]
    rows = {line.split(" | ")[0][2:]: line for line in board.stdout.splitlines()  # the first table's rows
            if line.startswith("| ") and line.count(" | ") == 2}
    assert rows["naive"].count(f"{naive_cell} (2)") == 1 and "left out" not in board.stdout
    means = {label: float(rows[label].split(" | ")[1].split(" ")[0]) for label in ("naive", "unimodal:clean")}
    rank = 1 + sum(m > means["naive"] for m in means.values())
    assert rows["naive"].endswith(f"| {rank:.2f} |")
    assert any(line.startswith("| naive | synthetic_naive") and "(unimodal:clean)" in line
               for line in board.stdout.splitlines())
    # and the paired difference to naive as the report prints it (one rounding for both)
    in_report = next(line for line in report.splitlines()
                     if line.startswith("| unimodal:clean | 2 | ") and line.count(" | ") == 3).split(" | ")[2]
    assert any(line.startswith("| unimodal:clean | synthetic_naive") and line.split(" | ")[2] == in_report
               for line in board.stdout.splitlines())


def test_leaderboard_joins_comparisons_of_one_experiment_at_one_budget_into_one_column():
    from blendtune.leaderboard import _merged
    config = {"name": "avdigits", "train": {"epochs": 12}}
    first = {"name": "avdigits", "dir": Path("/runs/a"), "score": "acc", "budget": (4, 1), "config": config,
             "cells": {"naive": {1000: 0.60, 1001: 0.62}, "unimodal:image": {1000: 0.70, 1001: 0.71}}}
    later = {**first, "dir": Path("/runs/b"),  # newer strategies, and image alone drew other candidates
             "cells": {"naive": {1000: 0.60, 1001: 0.62}, "ume": {1000: 0.66, 1001: 0.65},
                       "unimodal:image": {1000: 0.69, 1001: 0.70}}}
    other_budget = {**later, "dir": Path("/runs/c"), "budget": (8, 1)}
    other_data = {**later, "dir": Path("/runs/d"), "config": {**config, "train": {"epochs": 24}}}
    untuned = {**later, "dir": Path("/runs/e"), "budget": None}
    merged = _merged([first, later, other_budget, other_data, untuned])
    assert [e["dirs"] for e in merged] == [[Path("/runs/a"), Path("/runs/b")], [Path("/runs/c")], [Path("/runs/d")],
                                           [Path("/runs/e")]]
    joined = merged[0]
    assert joined["cells"] == {"naive": {1000: 0.60, 1001: 0.62}, "unimodal:image": {1000: 0.70, 1001: 0.71},
                               "ume": {1000: 0.66, 1001: 0.65}}  # a strategy in both: the first folder's
    assert joined["notes"] == ["ume from `/runs/b`",
                               "unimodal:image in `/runs/b` (69.5 ± 6.4) left out: the first folder's is shown"]
    assert first["cells"] == {"naive": {1000: 0.60, 1001: 0.62}, "unimodal:image": {1000: 0.70, 1001: 0.71}}


def test_tune_refuses_a_strategy_without_a_space_before_starting_ray(tmp_path, capsys):
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "naive.yaml").write_text("# blendtune sweep\noptim.lr: {loguniform: [1.0e-3, 1.0e-1]}\n")
    proc = cli_in_process(capsys, "compare", "experiments/synthetic_naive.yaml", "--strategies", "naive,gblend",
                          "--tune", "2", "--spaces", spaces, *TINY, f"output_dir={tmp_path / 'runs'}")
    assert proc.returncode == 2 and "--tune: no search space for gblend" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_the_searcher_chooses_by_the_held_out_score_even_when_test_disagrees():
    from blendtune.sweeps import Distribution
    from blendtune.tuning import ARM, CANDIDATE, PHASE, Arm, make_searcher
    arms = [Arm({"strategy": "naive"}, {"optim.lr": Distribution("loguniform", (1e-3, 1e-1))}, "acc/held_out/fused"),
            Arm({"strategy": "unimodal", "unimodal.modality": "a"}, {"optim.lr": Distribution("uniform", (0.01, 0.1))},
                "acc/held_out/a")]
    searcher = make_searcher(arms, trials=3, seeds=2, folds=2, seed=0)
    tuning = {f"t{i}": searcher.suggest(f"t{i}") for i in range(12)}  # 2 arms x 3 candidates x 2 folds
    assert all(c[PHASE] == "tune" for c in tuning.values()) and searcher.suggest("early") is None  # still scoring
    held_out_best = {0: 2, 1: 0}  # per arm, the candidate the held-out data prefers; test prefers another
    for trial_id, config in tuning.items():
        arm, candidate = config[ARM], config[CANDIDATE]
        metric = arms[arm].metric
        held = 0.9 if candidate == held_out_best[arm] else 0.5 + 0.1 * config["data.held_out_fold"]
        test = 0.99 if candidate != held_out_best[arm] else 0.1
        searcher.on_trial_complete(trial_id, {metric: held, metric.replace("held_out", "test"): test})
    finals = [searcher.suggest(f"f{i}") for i in range(4)]
    assert searcher.suggest("done") == "FINISHED"
    for config in finals:
        assert config[PHASE] == "final" and config[CANDIDATE] == held_out_best[config[ARM]]
        assert config["optim.lr"] == searcher.candidates[config[ARM]][held_out_best[config[ARM]]]["optim.lr"]
    assert sorted(c["seed"] for c in finals) == [1000, 1000, 1001, 1001]


def test_the_searcher_state_survives_a_save_and_restore_mid_comparison(tmp_path):
    """What Tune does on `compare --resume`: the searcher is restored from its last saved state and goes on."""
    from blendtune.sweeps import Distribution
    from blendtune.tuning import CANDIDATE, Arm, make_searcher
    arms = [Arm({"strategy": "naive"}, {"optim.lr": Distribution("loguniform", (1e-3, 1e-1))}, "acc/held_out/fused")]
    first = make_searcher(arms, trials=2, seeds=2, folds=1, seed=3)
    a, b = first.suggest("a"), first.suggest("b")
    first.on_trial_complete("a", {"acc/held_out/fused": 0.4})
    first.save(str(tmp_path / "searcher.pkl"))
    resumed = make_searcher(arms, trials=2, seeds=2, folds=1, seed=99)  # a fresh object, as after a crash
    resumed.restore(str(tmp_path / "searcher.pkl"))
    assert resumed.suggest("wait") is None  # trial b is still running: no final run before it is scored
    resumed.on_trial_complete("b", {"acc/held_out/fused": 0.7})
    finals = [resumed.suggest("f0"), resumed.suggest("f1")]
    assert [f[CANDIDATE] for f in finals] == [1, 1] and finals[0]["optim.lr"] == b["optim.lr"] != a["optim.lr"]


@pytest.mark.slow
def test_a_tuned_comparison_resumes_after_the_driver_is_killed(tmp_path):
    import os
    import signal
    import time
    from blendtune.report import tune_trial_ids
    args = ["compare", "experiments/synthetic_naive.yaml", "--strategies", "naive,ogm_ge", "--tune", "2", "--seeds",
            "2", *TINY, "train.epochs=3", "data.synthetic.num_train=3000", f"output_dir={tmp_path}"]
    driver = subprocess.Popen([sys.executable, "-m", "blendtune.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        run_dir = Path(driver.stdout.readline().split("compare dir: ")[1].strip())
        deadline = time.time() + 300
        while time.time() < deadline and sum(1 for p in (run_dir / "tune").glob("*/result.json")
                                             if len(p.read_text().splitlines()) >= 3) < 3:
            time.sleep(0.2)
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        driver.wait()
    proc = subprocess.run([sys.executable, "-m", "blendtune.cli", "compare", "--resume", str(run_dir)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    known = tune_trial_ids(run_dir / "tune")
    trials = [t for t in load_trials(run_dir) if any(f"_{k}_" in t["trial"] for k in known)]
    assert len(trials) == 2 * (2 + 2) and all(len(t["history"]) == 3 for t in trials)  # none lost, none twice
    for label in ("naive", "ogm_ge"):
        finals = [t for t in trials if t["label"] == label and t["phase"] == "final"]
        assert sorted(t["seed"] for t in finals) == [1000, 1001]
