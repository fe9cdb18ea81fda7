"""PMR: Prototypical Modal Rebalance (Fan, Xu, Wei, Hu et al., CVPR 2023; the authors' code:
fanyunfeng-bit/Modal-Imbalance-PMR, main_Prototype_grad.py).

Each modality's encoder features get class prototypes: per-class means over a fixed fraction of the
training set (stratified: every class is in it), recomputed at the start of every epoch without
gradients (optionally, from epoch 3 on, an EMA of the old ones, as in the authors' code). The prototype
classifier's probabilities p_u = softmax(-|z_u - c_k|) measure how far each modality has learned:
rho_u = sum_batch p_u[y] / mean of the other modalities'. The modality behind (rho_u < 1) gets its
prototypical cross-entropy added to the fused loss, which accelerates its encoder without touching
the others:

    L = CE_fused + alpha * sum_u beta_u * PCE_u  -  mu * sum_u (sum_{w != u} beta_w) * H(p_u)   [epoch <= entropy_epochs]

beta_u: `rule=code` 1 for the modality behind (the authors' code), `rule=paper` clip(1/rho_u - 1, 0, 1)
(Eq. 11). The entropy term (PER, Eq. 13: the dominant modality's prototype predictions are pushed
towards uncertainty) is not in the public code; it is on when mu > 0 and entropy_epochs > 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from blendtune import distributed
from blendtune.errors import OptionError
from blendtune.functional import (class_means, class_quotas, classification_loss, discrepancy_ratios, mean_entropy,
                                  pmr_coefficients, prototype_logits)
from blendtune.models import FUSED, ModelOutput
from blendtune.strategies.base import STRATEGIES, BalancingStrategy, TrainingContext


@dataclass
class PMROptions:
    alpha: float = 1.0               # prototype loss strength (the authors: 1.0 CG-MNIST, 2.0 CREMA-D/AVE)
    rule: str = "code"               # code: the weaker modality's weight is alpha | paper: alpha * clip(1/rho - 1, 0, 1)
    mu: float = 0.0                  # PER: entropy regularisation of the dominant modality (paper: 1e-2 / 1e-3)
    entropy_epochs: int = 0          # PER in epochs [1, entropy_epochs] (the paper's E_r, no value given)
    momentum: float = 0.0            # c <- momentum * c_old + (1 - momentum) * c_new, from epoch 3 (authors' runs: 0)
    # Of the training set, fixed per run, for the prototypes; stratified: every class at least one sample,
    # as evenly as the class sizes allow (a fraction giving fewer samples than classes grows to one per class).
    prototype_fraction: float = 0.1
    modulation_start: int = 1        # the prototype loss in epochs [start, end] (1-based, inclusive)
    modulation_end: int = 1_000_000

    def validate(self) -> None:
        if self.alpha < 0 or self.mu < 0:
            raise OptionError("alpha" if self.alpha < 0 else "mu", "expected >= 0")
        if self.rule not in ("code", "paper"):
            raise OptionError("rule", f"expected one of code, paper, got {self.rule!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise OptionError("momentum", f"expected 0 <= momentum < 1, got {self.momentum}")
        if not 0.0 < self.prototype_fraction <= 1.0:
            raise OptionError("prototype_fraction", f"expected 0 < fraction <= 1, got {self.prototype_fraction}")
        if self.entropy_epochs < 0:
            raise OptionError("entropy_epochs", f"expected >= 0, got {self.entropy_epochs}")


@STRATEGIES.register("pmr", options=PMROptions)
class PMR(BalancingStrategy):
    options: PMROptions

    def setup(self, model, seed, total_epochs):
        super().setup(model, seed, total_epochs)
        self.prototypes: dict[str, torch.Tensor] | None = None
        self._reset_epoch_sums()

    def _reset_epoch_sums(self) -> None:
        self._rho_sum = self._beta_sum = None
        self._steps = 0

    def _subset(self, targets: torch.Tensor) -> np.ndarray:
        """The same samples every epoch and on every rank (seeded by the run's seed alone), stratified by
        class: a class missing from the subset would have no prototype of its own and keep the untrained
        model's (class_means' fallback) for the whole run. At least one sample per class of the training
        set, as evenly as the class sizes allow (`functional.class_quotas`)."""
        targets = torch.as_tensor(targets)  # a user's dataset may hold them as a list or an array
        if targets.is_floating_point():
            raise ValueError("pmr: prototypes need single-label classes (targets are multi-hot)")
        labels = targets.cpu().numpy()
        counts = np.bincount(labels)
        size = max(round(self.options.prototype_fraction * len(labels)), int((counts > 0).sum()))
        members = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])  # per class, in index order
        rng = np.random.default_rng(self.seed + 104_729)
        return np.sort(np.concatenate([rng.choice(idx, quota, replace=False)
                                       for idx, quota in zip(members, class_quotas(counts.tolist(), size))]))

    def on_epoch_start(self, epoch: int, context: TrainingContext) -> None:
        sums, counts = None, None
        for feats, targets in context.features(self.model, self._subset(context.train_targets)):
            if sums is None:
                k = self._num_classes()
                sums = {m: f.new_zeros(k, f.shape[1], dtype=torch.float64) for m, f in feats.items()}
                counts = targets.new_zeros(k, dtype=torch.float64)
            counts.index_add_(0, targets, torch.ones_like(targets, dtype=torch.float64))
            for m, f in feats.items():
                sums[m].index_add_(0, targets, f.double())
        if sums is None:  # this rank's shard was empty: join the all-reduce with zeros
            device = next(self.model.parameters()).device
            k = self._num_classes()
            sums = {m: torch.zeros(k, d, dtype=torch.float64, device=device) for m, d in self._dims().items()}
            counts = torch.zeros(k, dtype=torch.float64, device=device)
        distributed.all_reduce_sum_(counts)
        previous = self.prototypes or {}
        # The EMA starts at epoch 3, blending in epoch 2's prototypes: the untrained model's (epoch 1's)
        # never enter it. The authors' calculate_prototype skips the EMA for `epoch <= 0`, and they call it
        # with epoch 0 before training and again after the first epoch (main_Prototype_grad.py 435-440, 532-557).
        blend = epoch >= 3
        momentum = self.options.momentum
        fresh = {}
        for m in self.model.modalities:
            distributed.all_reduce_sum_(sums[m])
            old = previous.get(m)
            new = class_means(sums[m], counts, old.double() if old is not None else None).float()
            fresh[m] = momentum * old + (1 - momentum) * new if blend and old is not None else new
        self.prototypes = fresh

    def _num_classes(self) -> int:
        return self.model.heads[self.model.modalities[0]].out_features

    def _dims(self) -> dict[str, int]:
        return {m: self.model.heads[m].in_features for m in self.model.modalities}

    def loss(self, out: ModelOutput, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        loss = classification_loss(out.logits[FUSED], targets)
        o = self.options
        if not o.modulation_start <= epoch <= o.modulation_end or self.prototypes is None:
            return loss
        logits = {m: prototype_logits(out.features[m], self.prototypes[m]) for m in self.model.modalities}
        # s_u: summed true-class prototype probability over the global batch (one decision on all ranks)
        scores = torch.stack([torch.softmax(lg.detach(), 1).gather(1, targets.view(-1, 1)).sum() for lg in logits.values()])
        beta = pmr_coefficients(distributed.all_reduce_sum_(scores), o.rule)
        for i, m in enumerate(self.model.modalities):
            loss = loss + o.alpha * beta[i] * classification_loss(logits[m], targets)
        if o.mu > 0 and epoch <= o.entropy_epochs:
            for i, m in enumerate(self.model.modalities):
                loss = loss - o.mu * (beta.sum() - beta[i]) * mean_entropy(logits[m])
        rho = discrepancy_ratios(scores)
        self._rho_sum = rho if self._rho_sum is None else self._rho_sum + rho
        self._beta_sum = beta if self._beta_sum is None else self._beta_sum + beta
        self._steps += 1
        return loss

    def pop_epoch_metrics(self) -> dict[str, float]:
        if not self._steps:
            return {}
        rho, beta = (self._rho_sum / self._steps).tolist(), (self._beta_sum / self._steps).tolist()
        self._reset_epoch_sums()
        metrics = {}
        for m, r, b in zip(self.model.modalities, rho, beta):
            metrics[f"pmr/rho/{m}"] = r      # > 1: ahead on the prototype classifier
            metrics[f"pmr/beta/{m}"] = b     # mean prototype-loss coefficient (times alpha)
        return metrics

    def state_dict(self) -> dict:
        if self.prototypes is None:
            return {"prototypes": None}
        return {"prototypes": {m: p.detach().cpu().clone() for m, p in self.prototypes.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("prototypes")
        device = next(self.model.parameters()).device
        self.prototypes = None if saved is None else {m: torch.as_tensor(p, dtype=torch.float32, device=device)
                                                     for m, p in saved.items()}
