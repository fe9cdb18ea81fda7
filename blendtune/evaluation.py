"""Evaluation of every head on every split, and the metrics made from it (accuracy, macro-F1, mAP, OGR).

The loop hands in batches already on the device; nothing here knows about loaders or configs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from blendtune import distributed
from blendtune.errors import UserError
from blendtune.functional import average_precision, classification_loss, ogr
from blendtune.models import LateFusionClassifier

ENSEMBLE = "ensemble"  # mean of the k + 1 heads' probabilities, reported beside each head


@dataclass
class HeadStats:
    loss: float
    acc: float | None = None   # single-label
    f1: float | None = None    # macro-F1, single-label
    map: float | None = None   # mean average precision over classes, multi-label


class Evaluation:
    """Per split ('train' = T or T', 'held_out' = V, 'test'), per head: loss, accuracy, macro-F1 (or mAP)."""

    def __init__(self, splits: dict[str, dict[str, HeadStats]]):
        self.splits = splits

    def losses(self) -> dict[str, dict[str, float]]:
        return {s: {h: st.loss for h, st in heads.items() if h != ENSEMBLE} for s, heads in self.splits.items()}

    def metrics(self) -> dict[str, float]:
        out = {}
        for split, heads in self.splits.items():
            for head, st in heads.items():
                for name in ("acc", "f1", "map"):
                    if getattr(st, name) is not None:
                        out[f"{name}/{split}/{head}"] = getattr(st, name)
                if head != ENSEMBLE:
                    out[f"loss/{split}/{head}"] = st.loss
        return out


PREDICTION = "prediction"  # the head a run predicts with (train.predict), reported beside the others
PREDICT_RULES = ("fused", "ensemble", "held_out_best")


def prediction_head(evaluation: Evaluation, rule: str, modalities: list[str]) -> str:
    """Which head predicts: `fused`, `ensemble` (mean of the k + 1 heads' probabilities), or
    `held_out_best` — the one of fused, ensemble and the uni-modal heads scoring best on the held-out
    split (never on test)."""
    if rule != "held_out_best":
        return rule
    held = evaluation.splits["held_out"]
    score = "map" if held["fused"].map is not None else "acc"
    candidates = ["fused", ENSEMBLE, *modalities]
    return max(candidates, key=lambda h: (getattr(held[h], score), -candidates.index(h)))  # ties: the earlier


def prediction_metrics(evaluation: Evaluation, head: str, modalities: list[str]) -> dict[str, float]:
    """`acc/<split>/prediction` (or map/...) = the chosen head's, plus `prediction/<head>` = 1 for it."""
    out = {}
    for split, heads in evaluation.splits.items():
        for name in ("acc", "f1", "map"):
            value = getattr(heads[head], name)
            if value is not None:
                out[f"{name}/{split}/{PREDICTION}"] = value
    out.update({f"{PREDICTION}/{h}": float(h == head) for h in ["fused", ENSEMBLE, *modalities]})
    return out


def score_name(metrics: Mapping[str, object] | Iterable[str]) -> str:
    """The headline score of a run's metrics: 'acc' (single-label) or 'map' (multi-label data)."""
    return "map" if any(str(k).startswith("map/") for k in metrics) else "acc"


class ShardSampler(Sampler):
    """Every rank evaluates a disjoint slice; no padding, so summed counts are exact."""

    def __init__(self, n: int):
        self.indices = list(range(distributed.rank(), n, distributed.world_size()))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


@torch.no_grad()
def evaluate_heads(model: LateFusionClassifier, batches: Iterable[tuple[dict, torch.Tensor]], num_classes: int,
                   multilabel: bool, device: torch.device,
                   autocast: Callable[[], ContextManager] = contextlib.nullcontext, split: str = "data") -> dict[str, HeadStats]:
    """Loss and accuracy / macro-F1 (mAP when multi-label) of every head and the ensemble over `batches`
    (this rank's shard), summed over ranks. Outputs that are NaN or inf (NaN in the `split`'s inputs) are
    a UserError: their argmax would be counted as a prediction of class 0."""
    was_training = model.training
    model.eval()
    heads = model.head_names + [ENSEMBLE]
    c = num_classes
    loss_sum = torch.zeros(len(heads), device=device, dtype=torch.float64)
    confusion = torch.zeros(len(heads), c * c, device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    nonfinite = torch.zeros((), device=device, dtype=torch.float64)
    scores, labels = [], []  # multi-label: every score, for average precision
    for inputs, targets in batches:
        if len(targets) == 0:
            continue
        with autocast():
            out = model(inputs)
        logits = [out.logits[h].float() for h in model.head_names]
        count += len(targets)
        nonfinite += (~torch.stack([lg.isfinite().all(dim=1) for lg in logits]).all(dim=0)).sum()
        for i, lg in enumerate(logits):
            loss_sum[i] += classification_loss(lg, targets, reduction="sum")
        if multilabel:
            probs = torch.stack([lg.sigmoid() for lg in logits])
            ensemble = probs.mean(dim=0)
            loss_sum[-1] += F.binary_cross_entropy(ensemble, targets, reduction="none").mean(1).sum()
            scores.append(torch.cat([probs, ensemble[None]]).cpu())
            labels.append(targets.cpu())
            continue
        probs = torch.stack([lg.softmax(dim=1) for lg in logits]).mean(dim=0)
        for i, lg in enumerate(logits):
            confusion[i] += torch.bincount(targets * c + lg.argmax(1), minlength=c * c)
        loss_sum[-1] += F.nll_loss(probs.clamp_min(1e-12).log(), targets, reduction="sum")
        confusion[-1] += torch.bincount(targets * c + probs.argmax(1), minlength=c * c)
    distributed.all_reduce_sum_(loss_sum)
    distributed.all_reduce_sum_(confusion)
    distributed.all_reduce_sum_(count)
    distributed.all_reduce_sum_(nonfinite)
    model.train(was_training)
    if nonfinite > 0:
        raise UserError(f"{split}: the model's outputs are NaN or inf for {int(nonfinite)} of {int(count)} items: NaN "
                        "or inf in their inputs? (`blendtune data check` finds them in files; torch.isfinite in tensors)")
    n = count.clamp_min(1)
    if multilabel:
        scores, labels = distributed.gather_cat(scores, dim=1), distributed.gather_cat(labels, dim=0)
        aps = [average_precision(scores[i], labels).nanmean() for i in range(len(heads))]
        return {h: HeadStats(loss=float(loss_sum[i] / n), map=float(aps[i])) for i, h in enumerate(heads)}
    confusion = confusion.view(len(heads), c, c)
    tp = confusion.diagonal(dim1=1, dim2=2)
    f1 = (2 * tp / (confusion.sum(1) + confusion.sum(2)).clamp_min(1)).mean(1)
    acc = tp.sum(1) / n
    return {h: HeadStats(loss=float(loss_sum[i] / n), acc=float(acc[i]), f1=float(f1[i]))
            for i, h in enumerate(heads)}


def ogr_metrics(before: dict | None, after: dict) -> dict[str, float]:
    """Each head's OGR over the last epoch from two `Evaluation.losses()` (reported for every strategy)."""
    if before is None or "held_out" not in after or "held_out" not in before:
        return {}
    out = {}
    for head in after["train"]:
        s = ogr(before["train"][head], before["held_out"][head], after["train"][head], after["held_out"][head])
        out[f"ogr/{head}"], out[f"ogr/delta_g/{head}"], out[f"ogr/delta_o/{head}"] = s.ogr, s.delta_g, s.delta_o
    return out


def monitored_metric(monitor: str | None, multilabel: bool) -> str:
    """The metric early stopping and keep-best watch: `monitor`, or the prediction head's held-out score."""
    return monitor or f"{'map' if multilabel else 'acc'}/held_out/{PREDICTION}"


class BestEpoch:
    """Tracks the best epoch by a held-out metric (lower is better for losses, higher otherwise) and how
    many epochs have passed without improving on it: early stopping and keep-best read it. Its state
    goes into checkpoints, so a resumed run stops where the uninterrupted one would."""

    def __init__(self, metric: str):
        self.metric = metric
        self.lower_is_better = metric.startswith("loss/")
        self.best: float | None = None
        self.epoch = 0
        self.epochs_without_improvement = 0

    def update(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        """Records epoch `epoch`; True if it is the best so far."""
        if self.metric not in metrics:
            raise KeyError(self.metric)
        value = float(metrics[self.metric])
        better = self.best is None or (value < self.best if self.lower_is_better else value > self.best)
        if better:
            self.best, self.epoch, self.epochs_without_improvement = value, epoch, 0
        else:
            self.epochs_without_improvement += 1
        return better

    def state_dict(self) -> dict:
        return {"best": self.best, "epoch": self.epoch, "epochs_without_improvement": self.epochs_without_improvement}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.epoch = state["best"], state["epoch"]
        self.epochs_without_improvement = state["epochs_without_improvement"]
