"""One modality alone: its encoder and head trained on its own loss; read its head's accuracy."""
import torch

from blendtune.functional import classification_loss

from blendtune.errors import UserError
from blendtune.models import ModelOutput
from blendtune.strategies.base import STRATEGIES, BalancingStrategy


@STRATEGIES.register("unimodal")
class Unimodal(BalancingStrategy):
    config_section = "unimodal"
    detach_unimodal_heads = False
    trains_all_parameters = False  # the other encoders and the fused head get no gradient

    def __init__(self, modality: str):
        self.modality = modality

    def setup(self, model, seed, total_epochs):
        super().setup(model, seed, total_epochs)
        if self.modality not in model.modalities:
            raise UserError(f"config key 'unimodal.modality': expected one of {', '.join(model.modalities)}, "
                            f"got {self.modality!r}")

    def loss(self, out: ModelOutput, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        return classification_loss(out.logits[self.modality], targets)
