"""AGM: Adaptive Gradient Modulation (H. Li, X. Li, Hu, Lei, C. Li, Zhou, ICCV 2023, "Boosting Multi-modal Model
Performance with Adaptive Gradient Modulation"; the authors' code: lihong2303/AGM_ICCV2023 @ 5a65542,
model/CREMAD_net.py, run/CREMAD_main.py, run/URFunny_main.py).

Each step, the fusion is also run on every proper, non-empty coalition of modalities (the others' features
zeroed): from these outputs v(S), the Shapley values give each modality a mono-modal output o_m with
sum_m o_m = v(all) (`functional.shapley_outputs`). The fused loss is CE(sum_m o_m), and the gradient that
reaches o_m is scaled by c_m (`functional.scale_gradient`: the authors' backward hooks), so that modality
m's encoder (and its share of the fusion) learns at c_m times its rate:

    s_m = mean over the batch of -log max(softmax(o_m)[y], 1e-8)        (the mono-modal "score")
    r_m(s) = exp(k/(k-1) (mean_j s_j - s_m))                             (k = 2: exp(s_other - s_m))
    c_m = exp(alpha * min(r_m(s_running) - r_m(s_batch), gap_cap))
    s_running <- running mean of s over every step of the run (updated after c is computed)

A modality that is further ahead on this batch than its running mean puts it gets c_m < 1; the one
behind gets c_m > 1. With `clip_threshold` the authors' step clips the gradient norm to the threshold
whenever an entry of the fusion's weight gradient leaves [-threshold, threshold].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from blendtune import distributed
from blendtune.errors import OptionError, SettingError
from blendtune.functional import (agm_coefficients, agm_ratios, agm_score_sums, classification_loss,
                                  clip_if_any_exceeds_, scale_gradient, shapley_outputs)
from blendtune.models import FUSED, ModelOutput
from blendtune.strategies.base import STRATEGIES, BalancingStrategy


@dataclass
class AGMOptions:
    alpha: float = 1.0                      # modulation strength (the authors' --alpha, default 1.0)
    gap_cap: Optional[float] = 10.0         # min(r_running - r_batch, cap): CREMA-D 10, UR-Funny 7, unset: none (AVE, AV-MNIST)
    clip_threshold: Optional[float] = 1.0   # clip the gradient norm to it when a fusion weight gradient entry
                                            # leaves [-t, t] (CREMA-D, AV-MNIST 1; UR-Funny 5); unset: never (AVE)
    modulation_start: int = 1               # c_m in epochs [start, end] (1-based, inclusive); 1 elsewhere
    modulation_end: int = 1_000_000

    def validate(self) -> None:
        if self.alpha < 0:
            raise OptionError("alpha", f"expected >= 0, got {self.alpha}")
        for key in ("gap_cap", "clip_threshold"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise OptionError(key, f"expected > 0 (or unset: off), got {value}")


@STRATEGIES.register("agm", options=AGMOptions)
class AGM(BalancingStrategy):
    options: AGMOptions

    def setup(self, model, seed, total_epochs):
        super().setup(model, seed, total_epochs)
        k = len(model.modalities)
        if k < 2:
            raise SettingError("strategy", f"agm balances two or more modalities, the model has {k}")
        device = next(model.parameters()).device
        self.running = torch.zeros(k, dtype=torch.float64, device=device)  # the authors' train_score_*
        self.iterations = 0                                                 # steps so far (the authors' iteration)
        self.coefficients = torch.ones(k, dtype=torch.float64, device=device)
        head_params = {id(p) for p in model.heads.parameters()}
        # The authors' model has no uni-modal heads: blendtune's probes stay out of the clipped norm.
        self._clipped = [p for p in model.parameters() if p.requires_grad and id(p) not in head_params]
        self._watched = [p for p in model.fusion.parameters() if p.requires_grad and p.dim() >= 2]
        self._reset_epoch_sums()

    def _reset_epoch_sums(self) -> None:
        self._coeff_sum = self._score_sum = self._ratio_sum = None
        self._steps = 0

    def coalition_outputs(self, out: ModelOutput) -> dict[int, torch.Tensor]:
        """v(S) for every non-empty coalition S (bitmask over the modalities): the fusion on the features
        with the modalities outside S zeroed, in eval mode (the authors' padded passes); v(all) is the
        fused head's own output."""
        modalities = self.model.modalities
        full = (1 << len(modalities)) - 1
        values = {full: out.logits[FUSED]}
        fusion = self.model.fusion
        was_training = fusion.training
        fusion.eval()
        try:
            for s in range(1, full):
                values[s] = fusion({m: f if s >> i & 1 else torch.zeros_like(f)
                                    for i, (m, f) in enumerate(out.features.items())})
        finally:
            fusion.train(was_training)
        return values

    def loss(self, out: ModelOutput, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        k = len(self.model.modalities)
        values = {s: v.float() for s, v in self.coalition_outputs(out).items()}
        outputs = shapley_outputs(values, k)
        # the global batch's mean score per modality: one set of coefficients on every rank
        sums = torch.cat([agm_score_sums([o.detach() for o in outputs], targets),
                          targets.new_full((1,), len(targets), dtype=torch.float64)])  # on the device: no sync
        sums = distributed.all_reduce_sum_(sums)
        scores = sums[:k] / sums[k].clamp_min(1)
        o = self.options
        if o.modulation_start <= epoch <= o.modulation_end:
            coeff = agm_coefficients(scores, self.running, o.alpha, o.gap_cap)
        else:
            coeff = torch.ones_like(scores)
        self.iterations += 1
        t = self.iterations
        self.running = self.running * ((t - 1) / t) + scores / t
        # forward: the fused head's logits exactly; backward: sum_m c_m d o_m (the authors' CE(sum_m o_m)
        # with a backward hook scaling each o_m's gradient)
        logits = values[(1 << k) - 1].detach()
        for o_m, c_m in zip(outputs, coeff):
            logits = logits + (scale_gradient(o_m, c_m) - o_m.detach())
        self.coefficients = coeff  # this step's c_m, one per modality (stays on the device: no host sync)
        self._record(coeff, scores)
        return classification_loss(logits, targets)

    def _record(self, coeff: torch.Tensor, scores: torch.Tensor) -> None:
        ratios = agm_ratios(scores)
        if self._coeff_sum is None:
            self._coeff_sum, self._score_sum, self._ratio_sum = coeff.clone(), scores.clone(), ratios
        else:
            self._coeff_sum += coeff
            self._score_sum += scores
            self._ratio_sum += ratios
        self._steps += 1

    def after_backward(self, out: ModelOutput, targets: torch.Tensor, epoch: int, step: int) -> None:
        threshold = self.options.clip_threshold
        if threshold is None or not self._watched:
            return
        grads = [p.grad for p in self._clipped if p.grad is not None]
        watched = [p.grad for p in self._watched if p.grad is not None]
        if grads and watched:
            clip_if_any_exceeds_(grads, watched, threshold)

    def pop_epoch_metrics(self) -> dict[str, float]:
        if not self._steps:
            return {}
        coeff = (self._coeff_sum / self._steps).tolist()
        score = (self._score_sum / self._steps).tolist()
        ratio = (self._ratio_sum / self._steps).tolist()
        self._reset_epoch_sums()
        metrics = {}
        for m, c, s, r in zip(self.model.modalities, coeff, score, ratio):
            metrics[f"agm/coeff/{m}"] = c    # < 1: modality m's gradient scaled down
            metrics[f"agm/score/{m}"] = s    # mean CE of its Shapley mono-modal output
            metrics[f"agm/ratio/{m}"] = r    # > 1: ahead of the others on the batch
        return metrics

    def state_dict(self) -> dict:
        return {"running": self.running.detach().cpu().clone(), "iterations": self.iterations}

    def load_state_dict(self, state: dict) -> None:
        self.running = state["running"].to(device=self.running.device, dtype=torch.float64)
        self.iterations = state["iterations"]
