"""MMPareto (Wei & Hu, ICML 2024, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal
Assistance"; the authors' code: GeWu-Lab/MMPareto_ICML2024, code/MMPareto.py).

The fused loss and every uni-modal loss train together (L_fused + sum_u L_u, each uni-modal head on its
own encoder). Each encoder u receives two gradients, g_m from L_fused and g_u from L_u. Where they agree
(cos > 0) it gets their sum; where they conflict, the min-norm combination of the two (the Pareto
direction, no loss gets worse to first order), re-scaled never to be shorter than the plain sum, and
every encoder gradient times `multiplier` (1.5 in the authors' code). Heads keep the plain gradient.
The math is `functional.mmpareto_gradients`.

Cost: two backward passes per step (the fused loss, then all uni-modal losses at once: modality u's
loss reaches only encoder u, so one pass gives every g_u); the authors' code takes four.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from blendtune import distributed
from blendtune.errors import OptionError
from blendtune.functional import mmpareto_gradients
from blendtune.models import FUSED, ModelOutput
from blendtune.strategies.base import STRATEGIES, BalancingStrategy, head_losses


@dataclass
class MMParetoOptions:
    multiplier: float = 1.5      # every encoder gradient times this (the authors' hard-coded `gamma=1.5`)

    def validate(self) -> None:
        if self.multiplier <= 0:
            raise OptionError("multiplier", f"expected > 0, got {self.multiplier}")


@STRATEGIES.register("mmpareto", options=MMParetoOptions)
class MMPareto(BalancingStrategy):
    detach_unimodal_heads = False  # the uni-modal losses train the encoders too
    syncs_gradients = True         # two backward passes per forward: all-reduced here, not by DDP's reducer

    def setup(self, model, seed, total_epochs):
        super().setup(model, seed, total_epochs)
        self.encoder_params = {m: [p for _, p in model.encoder_parameters(m) if p.requires_grad]
                               for m in model.modalities}
        self._losses: dict[str, torch.Tensor] = {}
        self._reset_epoch_sums()

    def _reset_epoch_sums(self) -> None:
        self._cos_sum = self._weight_sum = self._conflicts = self._steps = None

    def loss(self, out: ModelOutput, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        self._losses = head_losses(out, targets, self.model.head_names)
        return sum(self._losses.values())

    def backward(self, loss, out, targets, scaler) -> None:
        modalities = self.model.modalities
        scaler.scale(self._losses[FUSED]).backward(retain_graph=True)
        # g_m of every encoder: taken out of .grad, so the next pass writes g_u there afresh.
        fused_grads = {}
        for m in modalities:
            fused_grads[m] = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.encoder_params[m]]
            for p in self.encoder_params[m]:
                p.grad = None
        scaler.scale(sum(self._losses[m] for m in modalities)).backward()
        for m in modalities:  # an encoder parameter no loss reached (unused) still gets a gradient tensor
            for p in self.encoder_params[m]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        if distributed.is_distributed():  # the global batch's gradients, before any statistic of them
            distributed.all_reduce_mean_([p.grad for p in self.model.parameters() if p.grad is not None]
                                         + [g for m in modalities for g in fused_grads[m]])
        cos, weights = [], []
        for m in modalities:
            params = self.encoder_params[m]
            combined, c, w = mmpareto_gradients(fused_grads[m], [p.grad for p in params], self.options.multiplier)
            for p, g in zip(params, combined):
                p.grad = g
            cos.append(c)
            weights.append(w)
        cos, weights = torch.stack(cos), torch.stack(weights)
        # A step with an inf/NaN gradient (fp16 overflow: the grad scaler skips it) has NaN cos and w: it is
        # left out of the epoch's statistics, for every modality, without a host sync.
        counted = (cos.isfinite() & weights.isfinite()).all()
        cos, weights = (torch.where(counted, t, torch.zeros_like(t)) for t in (cos, weights))
        conflicts = (counted & (cos <= 0)).float()
        counted = counted.float()
        self._cos_sum = cos if self._cos_sum is None else self._cos_sum + cos
        self._weight_sum = weights if self._weight_sum is None else self._weight_sum + weights
        self._conflicts = conflicts if self._conflicts is None else self._conflicts + conflicts
        self._steps = counted if self._steps is None else self._steps + counted
        self._losses = {}

    def pop_epoch_metrics(self) -> dict[str, float]:
        n = 0.0 if self._steps is None else self._steps.item()  # steps with finite gradients
        sums = self._cos_sum, self._weight_sum, self._conflicts
        self._reset_epoch_sums()
        if not n:
            return {}
        cos, weight, conflicts = ((t / n).tolist() for t in sums)
        metrics = {}
        for i, m in enumerate(self.model.modalities):
            metrics[f"mmpareto/cos/{m}"] = cos[i]                # mean cosine of g_fused and g_m on encoder m
            metrics[f"mmpareto/conflict/{m}"] = conflicts[i]     # share of steps with cos <= 0 (finite gradients)
            metrics[f"mmpareto/weight_fused/{m}"] = weight[i]    # mean weight on the fused loss's gradient
        return metrics
