"""One modality alone: its encoder and head trained on its own loss; read its head's accuracy."""
from dataclasses import dataclass

import torch

from blendtune.errors import OptionError
from blendtune.functional import classification_loss
from blendtune.models import ModelOutput
from blendtune.strategies.base import STRATEGIES, BalancingStrategy


@dataclass
class UnimodalOptions:
    modality: str = ""           # the modality to train (required)


@STRATEGIES.register("unimodal", options=UnimodalOptions)
class Unimodal(BalancingStrategy):
    options: UnimodalOptions
    detach_unimodal_heads = False
    trains_all_parameters = False  # the other encoders and the fused head get no gradient
    required_options = ("modality",)

    def setup(self, model, seed, total_epochs):
        super().setup(model, seed, total_epochs)
        if self.options.modality not in model.modalities:
            raise OptionError("modality", f"expected one of {', '.join(model.modalities)}, "
                                          f"got {self.options.modality!r}")

    @property
    def only_head(self) -> str:
        return self.options.modality

    def loss(self, out: ModelOutput, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        return classification_loss(out.logits[self.options.modality], targets)
