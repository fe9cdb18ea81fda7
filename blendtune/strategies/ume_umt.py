"""UME and UMT: Uni-Modal Ensemble and Uni-Modal Teacher (Du, Teng, Li, Liu, Yuan, Wang, Yuan, Zhao,
ICML 2023, "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning"). The authors released no
code that we could find: this follows the paper (docs/strategies.md lists the sections and every choice).

UME (`strategy=ume`): every modality's encoder and its uni-modal head trained on that head's loss alone,
L = sum_m CE(head_m(z_m)); no fused loss. The encoders are disjoint, so one joint run is k separate
uni-modal trainings (same batches; see the docs for what couples them: total-norm clipping, the fp16
grad scaler). The prediction combines the uni-modal models: the "fused" head reports their ensemble
(`ume.combine`: mean of the logits, or of the softmax probabilities; `functional.unimodal_ensemble_logits`).

UMT (`strategy=umt`): epochs 1..`umt.teacher_epochs` train the uni-modal teachers (UME's loss). At the
next epoch's start their encoders are frozen as teachers, the whole model restarts from its initial
weights with a fresh optimizer state, and the student trains with the fused loss plus feature
distillation from the teachers:

    L = CE(fused) + lambda * sum_m MSE(z_m, z_m^teacher)     (`functional.feature_distillation_losses`)

Both in one file: UMT's teacher phase is UME's training, and the paper presents them as one choice
(`functional.ume_or_umt`: UME when the uni-modal ensemble is at least as good as naive fusion).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from blendtune import distributed
from blendtune.errors import OptionError, UserError
from blendtune.functional import ENSEMBLE_RULES, classification_loss, feature_distillation_losses
from blendtune.models import FUSED, LateFusionClassifier, ModelOutput
from blendtune.strategies.base import STRATEGIES, BalancingStrategy, TrainingContext


def unimodal_loss(out: ModelOutput, targets: torch.Tensor, modalities: list[str]) -> torch.Tensor:
    """sum_m CE(head_m(z_m)): each uni-modal model's own loss (disjoint parameters: separate trainings)."""
    return sum(classification_loss(out.logits[m], targets) for m in modalities)


def check_separate_encoders(model: LateFusionClassifier, strategy: str) -> None:
    """Uni-modal models are separate: a backbone parameter serving several modalities would make one
    modality's loss train another's features."""
    own = {id(p) for m in model.modalities for _, p in model.encoder_parameters(m)}
    shared = [n for n, p in model.encoders.named_parameters() if p.requires_grad and id(p) not in own]
    if shared:
        raise UserError(f"strategy {strategy} trains one uni-modal model per modality and needs a separate encoder "
                        f"per modality; the backbone's parameters {', '.join(shared[:3])}"
                        f"{' ...' if len(shared) > 3 else ''} serve several modalities")


@dataclass
class UMEOptions:
    combine: str = "logits"   # the ensemble's prediction: logits (mean of the logits) | probs (mean of the softmax)

    def validate(self) -> None:
        if self.combine not in ENSEMBLE_RULES:
            raise OptionError("combine", f"expected one of {', '.join(ENSEMBLE_RULES)}, got {self.combine!r}")


@STRATEGIES.register("ume", options=UMEOptions)
class UME(BalancingStrategy):
    options: UMEOptions
    detach_unimodal_heads = False  # the uni-modal heads are the models being trained
    trains_all_parameters = False  # the fusion module is not used (DDP must not wait for its gradients)

    def setup(self, model, seed, total_epochs):
        super().setup(model, seed, total_epochs)
        check_separate_encoders(model, "ume")
        self.prepare_inference(model)

    def prepare_inference(self, model: LateFusionClassifier) -> None:
        model.fused_from_heads = self.options.combine  # the "fused" head reports the uni-modal ensemble

    def loss(self, out: ModelOutput, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        return unimodal_loss(out, targets, self.model.modalities)


@dataclass
class UMTOptions:
    teacher_epochs: Optional[int] = None  # epochs 1..teacher_epochs train the uni-modal teachers, the student the
                                          # rest; unset: half of train.epochs (teachers and student alike)
    distill_weight: float = 1.0   # lambda on the summed per-modality feature MSE (the paper tunes it per dataset)

    def validate(self) -> None:
        if self.teacher_epochs is not None and self.teacher_epochs < 1:
            raise OptionError("teacher_epochs", f"expected >= 1, got {self.teacher_epochs}")
        if self.distill_weight < 0:
            raise OptionError("distill_weight", f"expected >= 0, got {self.distill_weight}")


def teacher_epochs(options: UMTOptions, total_epochs: int) -> int:
    """The teacher phase's length: the option, or half of the run's epochs (at least one)."""
    return options.teacher_epochs if options.teacher_epochs is not None else max(1, total_epochs // 2)


class _InputTap:
    """A forward pre-hook keeping the model's last inputs (the teachers encode the same batch). A copy of
    the model gets a fresh, empty tap (a deep copy would otherwise copy the batch)."""

    def __init__(self):
        self.inputs = None

    def __call__(self, module, args):
        self.inputs = args[0]

    def __deepcopy__(self, memo):
        return _InputTap()


@STRATEGIES.register("umt", options=UMTOptions)
class UMT(BalancingStrategy):
    options: UMTOptions
    trains_all_parameters = False  # teacher phase: the fusion gets no gradient
    compiles = False
    compile_refusal = "is not compiled: its teachers read each batch through a forward hook on the model"

    @property
    def detach_unimodal_heads(self) -> bool:
        # teacher phase: the uni-modal heads and encoders are the teachers being trained; student phase:
        # the heads are probes, as for the other fused-loss strategies
        return self.teacher is not None

    @classmethod
    def check_epochs(cls, options: UMTOptions, epochs: int) -> None:
        if epochs < 2:
            raise OptionError("teacher_epochs", f"UMT trains teachers, then a student: train.epochs={epochs} "
                                                "has no room for both (expected 2 or more)")
        if teacher_epochs(options, epochs) >= epochs:  # the student would never train (teachers only is `ume`)
            raise OptionError("teacher_epochs", f"the teachers' {options.teacher_epochs} epochs leave no student "
                                                f"epoch in train.epochs={epochs}: expected fewer than {epochs}")

    def setup(self, model, seed, total_epochs):
        super().setup(model, seed, total_epochs)
        self.check_epochs(self.options, total_epochs)
        check_separate_encoders(model, "umt")
        self.teacher: torch.nn.Module | None = None
        # the student restarts from these (the model's initial weights); kept until the switch
        self.initial: dict | None = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._tap = _InputTap()
        self._hook = model.register_forward_pre_hook(self._tap)
        self._distill_sum = None
        self._steps = 0

    def on_epoch_start(self, epoch: int, context: TrainingContext) -> None:
        if self.teacher is None and epoch > teacher_epochs(self.options, self.total_epochs):
            self.teacher = self._frozen_copy()
            self.model.load_state_dict(self.initial)
            self.initial = None
            context.reset_optimizer()

    def _frozen_copy(self) -> torch.nn.Module:
        teacher = copy.deepcopy(self.model.encoders).eval()
        teacher.requires_grad_(False)
        return teacher

    def loss(self, out: ModelOutput, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        if self.teacher is None:
            loss = unimodal_loss(out, targets, self.model.modalities)
            if distributed.is_distributed():
                # DDP (find_unused_parameters) needs every forward output in the loss: the unused fusion joins
                # with weight 0 (its weights are reset at the switch to the student anyway)
                loss = loss + 0.0 * out.logits[FUSED].sum()
            return loss
        inputs, self._tap.inputs = self._tap.inputs, None
        with torch.no_grad():
            teacher = self.teacher(inputs)
        distill = feature_distillation_losses({m: out.features[m] for m in self.model.modalities}, teacher)
        self._distill_sum = distill.detach() if self._distill_sum is None else self._distill_sum + distill.detach()
        self._steps += 1
        return classification_loss(out.logits[FUSED], targets) + self.options.distill_weight * distill.sum()

    def pop_epoch_metrics(self) -> dict[str, float]:
        if not self._steps:
            return {}
        mean = (distributed.all_reduce_sum_(self._distill_sum) / (self._steps * distributed.world_size())).tolist()
        self._distill_sum, self._steps = None, 0
        return {f"umt/distill/{m}": v for m, v in zip(self.model.modalities, mean)}

    def state_dict(self) -> dict:
        if self.teacher is None:
            return {"phase": "teacher", "initial": _cpu_copy(self.initial)}
        return {"phase": "student", "teacher": _cpu_copy(self.teacher.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        if state["phase"] == "teacher":
            device = next(self.model.parameters()).device
            self.teacher, self.initial = None, {k: v.to(device) for k, v in state["initial"].items()}
        else:
            self.teacher, self.initial = self._frozen_copy(), None
            self.teacher.load_state_dict(state["teacher"])


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}
