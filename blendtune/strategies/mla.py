"""MLA: Multimodal Learning with Alternating unimodal adaptation (Zhang, Yoon, Bansal, Yao, CVPR 2024;
the authors' code: Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation, main.py and
utils/utils.py).

One classifier is shared by every modality (`model.fusion=shared`). Each batch is encoded once; then
the modalities take turns, one optimizer step each (audio, then visual, ...): modality m's loss is the
cross-entropy of the shared head on m's features, so each step trains one encoder and the head, and no
modality's gradient can crowd out another's. Between turns the shared head's weight gradient is
projected orthogonally to the features it has already learned from (OWM: a projector P updated with
each turn's batch-mean feature, `functional.owm_projector_update`), so one modality's step does not
undo the last. At test time the fused prediction weighs each modality's shared-head logits per sample
by its certainty: w_m = softmax_m(-entropy_m) (`functional.entropy_fusion_weights`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from blendtune import distributed
from blendtune.errors import OptionError, SettingError, UserError
from blendtune.functional import all_finite, classification_loss, owm_projector_update
from blendtune.models import ModelOutput
from blendtune.models.fusion import SharedHeadFusion
from blendtune.strategies.base import STRATEGIES, BalancingStrategy, TrainingContext


@dataclass
class MLAOptions:
    projection: str = "owm"       # owm: project the shared head's weight gradient (the paper) | none (see docs)
    test_fusion: str = "entropy"  # entropy: per-sample uncertainty weights | mean: equal weights

    def validate(self) -> None:
        for key, allowed in (("projection", ("owm", "none")), ("test_fusion", ("entropy", "mean"))):
            if getattr(self, key) not in allowed:
                raise OptionError(key, f"expected one of {', '.join(allowed)}, got {getattr(self, key)!r}")


@STRATEGIES.register("mla", options=MLAOptions)
class MLA(BalancingStrategy):
    options: MLAOptions
    syncs_gradients = True  # one forward, k backward passes and optimizer steps: all-reduced here
    fusion = "shared"       # the model is built with the shared head (model.fusion=shared)
    compiles = False        # turn 1's backward frees the compiled forward's saved tensors turn 2 needs

    def prepare_inference(self, model) -> None:
        model.fusion.weighting = self.options.test_fusion  # MLA's test-time uncertainty fusion

    def setup(self, model, seed, total_epochs):
        super().setup(model, seed, total_epochs)
        if not isinstance(model.fusion, SharedHeadFusion):
            raise SettingError("model.fusion", "strategy mla trains one classifier shared by every modality; "
                            f"set model.fusion=shared (got {type(model.fusion).__name__})")
        self.head = head = model.fusion.fc
        own = {id(p) for m in model.modalities for _, p in model.encoder_parameters(m)}
        shared = [n for n, p in model.encoders.named_parameters() if p.requires_grad and id(p) not in own]
        if shared:  # one modality's step would change what the next turn's features were computed with
            raise UserError(f"strategy mla needs a separate encoder per modality; the backbone's parameters "
                            f"{', '.join(shared[:3])}{' ...' if len(shared) > 3 else ''} serve several modalities")
        self.prepare_inference(model)
        dim = head.in_features
        self.projector = torch.eye(dim, device=head.weight.device, dtype=torch.float32)
        self.projections = 0  # the first turn of the run learns freely (the authors' exp_count)
        self._epoch_first_step = 0
        self._steps_per_epoch = 1
        self._turn = 0
        self._losses_sum = None
        self._turns = 0

    def on_epoch_start(self, epoch: int, context: TrainingContext) -> None:
        self._epoch_first_step = context.step
        self._steps_per_epoch = max(1, context.steps_per_epoch)

    def step_losses(self, out: ModelOutput, targets: torch.Tensor, epoch: int):
        # Lazily: modality m's logits are computed after the previous modality's step changed the head.
        for i, m in enumerate(self.model.modalities):
            self._turn = i
            loss = classification_loss(self.head(out.features[m]), targets)
            self._record(i, loss)
            yield loss

    def _record(self, i: int, loss: torch.Tensor) -> None:
        if self._losses_sum is None:
            self._losses_sum = torch.zeros(len(self.model.modalities), device=loss.device)
        self._losses_sum[i] += loss.detach().float()
        self._turns += 1

    def backward(self, loss, out, targets, scaler) -> None:
        scaler.scale(loss).backward()
        if distributed.is_distributed():
            distributed.all_reduce_mean_([p.grad for p in self.model.parameters() if p.grad is not None])

    def after_backward(self, out: ModelOutput, targets: torch.Tensor, epoch: int, step: int) -> None:
        if self.options.projection != "owm":
            return
        if self.projections > 0 and self.head.weight.grad is not None:
            features = out.features[self.model.modalities[self._turn]].detach().float()
            total = distributed.all_reduce_sum_(torch.cat([features.sum(0), features.new_tensor([len(features)])]))
            mean_feature = total[:-1] / total[-1].clamp_min(1)  # the global batch's mean feature
            batch_index = step - self._epoch_first_step
            alpha = 0.1 ** (1 + batch_index / self._steps_per_epoch)  # 0.1 -> 0.01 over each epoch (authors)
            # P learns only from turns whose optimizer step runs: the grad scaler skips a step with an inf/NaN
            # gradient (fp16 overflow; the loop unscaled them already), leaving the parameters, so P as well.
            stepped = all_finite([p.grad for p in self.model.parameters() if p.grad is not None])
            self.projector = torch.where(stepped, owm_projector_update(self.projector, mean_feature, alpha), self.projector)
            grad = self.head.weight.grad
            grad.copy_((grad.float() @ self.projector.T).to(grad.dtype))
        self.projections += 1

    def pop_epoch_metrics(self) -> dict[str, float]:
        if not self._turns:
            return {}
        batches = self._turns / len(self.model.modalities)
        per_turn = (distributed.all_reduce_sum_(self._losses_sum) / (batches * distributed.world_size())).tolist()
        self._losses_sum, self._turns = None, 0
        return {f"mla/loss/{m}": v for m, v in zip(self.model.modalities, per_turn)}

    def state_dict(self) -> dict:
        return {"projector": self.projector.detach().cpu().clone(), "projections": self.projections}

    def load_state_dict(self, state: dict) -> None:
        self.projector = state["projector"].to(self.head.weight.device)
        self.projections = state["projections"]
