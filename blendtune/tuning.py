"""Strategies compared at an equal tuning budget, as one Tune experiment (`blendtune compare --tune N`).

Every arm (a strategy variant, or `unimodal:MODALITY`) gets the same budget: N trials drawn at random from
its own search space, each scored on held-out data only (the arm's prediction head: `acc/held_out/fused`,
`acc/held_out/<modality>` for a modality alone; with `sweep.folds=k`, the mean over k held-out folds, one
trial per fold). When an arm's N configurations are scored, its best runs again on fresh seeds. One
Searcher (Ray Tune's mechanism for choosing the next trial) drives both phases, so on a cluster the arms'
tuning trials and seed runs share the workers side by side, and Tune's experiment state (the searcher's
included) makes the whole comparison resumable.
"""
from __future__ import annotations

import math
import pickle
import random
from dataclasses import dataclass
from typing import Any

from blendtune.sweeps import VARIANT, Distribution

PHASE = "_phase"          # a trial's phase: "tune" (a candidate configuration) or "final" (a fresh seed)
ARM = "_arm"              # which arm the trial belongs to (its index in the comparison)
CANDIDATE = "_candidate"  # which of the arm's N candidate configurations (folds of one share it)
TUNE_SEED = 0             # the seed every tuning trial trains with: candidates differ by their settings only
FINAL_SEED_OFFSET = 1000  # final runs use seeds 1000..1000+S-1: none of them was seen while choosing


@dataclass
class Arm:
    """One row of the comparison: its variant (strategy and options), its search space and the held-out
    metric it is selected on."""
    variant: dict
    space: dict[str, Distribution]
    metric: str


def sample(space: dict[str, Distribution], rng: random.Random) -> dict[str, Any]:
    """One configuration drawn from `space` (random search: every arm is searched the same way)."""
    out = {}
    for key, dist in space.items():
        if dist.kind in ("choice", "grid"):
            out[key] = rng.choice(list(dist.args))
        elif dist.kind == "uniform":
            out[key] = rng.uniform(*dist.args)
        elif dist.kind == "loguniform":
            low, high = dist.args
            out[key] = math.exp(rng.uniform(math.log(low), math.log(high)))
        else:  # randint: [low, high)
            out[key] = rng.randrange(*dist.args)
    return out


def selection_score(scores: list[float | None]) -> float:
    """A candidate's score: the mean over its folds; a fold that failed or diverged makes it unusable."""
    if not scores or any(s is None or not math.isfinite(s) for s in scores):
        return -math.inf
    return sum(scores) / len(scores)


def make_searcher(arms: list[Arm], trials: int, seeds: int, folds: int, seed: int):
    from ray.tune.search import Searcher

    class EqualBudgetSearcher(Searcher):
        """Suggests each arm's N candidates (x folds), interleaved across arms, then, as soon as an arm's
        candidates are all scored, its best configuration on `seeds` fresh seeds."""

        def __init__(self):
            super().__init__(metric=None, mode="max")
            self.arms, self.trials, self.seeds, self.folds = arms, trials, seeds, folds
            rng = random.Random(seed)
            self.candidates = [[sample(arm.space, rng) for _ in range(trials)] for arm in arms]
            self.queue = [(a, c, f) for c in range(trials) for a in range(len(arms)) for f in range(folds)]
            self.scores: dict[tuple[int, int], list] = {}  # (arm, candidate) -> score per finished fold
            self.finals = [0] * len(arms)                   # final runs suggested per arm
            self.live: dict[str, tuple[str, int, int]] = {}  # trial id -> (phase, arm, candidate)

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True  # every arm has its own metric; the sweep's is only Tune's summary

        def suggest(self, trial_id: str):
            if self.queue:
                a, c, fold = self.queue.pop(0)
                self.live[trial_id] = ("tune", a, c)
                extra = {"data.held_out_folds": self.folds, "data.held_out_fold": fold} if self.folds > 1 else {}
                return {VARIANT: self.arms[a].variant, PHASE: "tune", ARM: a, CANDIDATE: c, "seed": TUNE_SEED,
                        **extra, **self.candidates[a][c]}
            for a in range(len(self.arms)):
                if self.finals[a] < self.seeds and self.tuned(a):
                    c = self.best(a)
                    self.live[trial_id] = ("final", a, c)
                    self.finals[a] += 1
                    return {VARIANT: self.arms[a].variant, PHASE: "final", ARM: a, CANDIDATE: c,
                            "seed": FINAL_SEED_OFFSET + self.finals[a] - 1, **self.candidates[a][c]}
            if all(n == self.seeds for n in self.finals):
                return Searcher.FINISHED
            return None  # waiting for an arm's candidates to finish

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            phase, a, c = self.live.pop(trial_id, (None, None, None))
            if phase == "tune":
                value = None if error or not result else result.get(self.arms[a].metric)
                self.scores.setdefault((a, c), []).append(value)

        def tuned(self, a: int) -> bool:
            return sum(len(self.scores.get((a, c), [])) for c in range(self.trials)) == self.trials * self.folds

        def best(self, a: int) -> int:
            scores = [selection_score(self.scores.get((a, c), [])) for c in range(self.trials)]
            return max(range(self.trials), key=lambda c: (scores[c], -c))  # ties: the earlier candidate

        def save(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "wb") as f:
                pickle.dump({k: getattr(self, k) for k in ("candidates", "queue", "scores", "finals", "live")}, f)

        def restore(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "rb") as f:
                self.__dict__.update(pickle.load(f))

    return EqualBudgetSearcher()


def total_trials(arms: int, trials: int, seeds: int, folds: int) -> int:
    return arms * (trials * folds + seeds)
