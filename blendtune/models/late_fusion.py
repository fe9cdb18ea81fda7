"""The late-fusion classifier: a backbone giving features per modality, k uni-modal heads and one fused
head (k + 1 heads).

The backbone is either blendtune's encoders, one per modality (`ModalityEncoders`), or the user's own
module following this protocol:

    forward(inputs: dict[str, Tensor]) -> dict[str, Tensor]   # (B, D_m) features per modality
    feature_dims: dict[str, int]          # optional: D_m per modality (else measured on one batch)
    modality_parameters(m) -> iterable    # optional: (name, parameter) pairs of modality m's encoder
                                          # (OGM modulates them); else traced with autograd on one batch
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from blendtune.functional import unimodal_ensemble_logits
from blendtune.models.encoders import build_encoder
from blendtune.models.fusion import build_fusion

FUSED = "fused"


@dataclass
class ModelOutput:
    """What the classifier returns for a batch: the backbone's features and every head's logits
    (`out.logits["fused"]` is the fused head's, `out.logits["audio"]` a modality's head)."""
    features: dict[str, torch.Tensor]   # per modality, before fusion
    logits: dict[str, torch.Tensor]     # per head: every modality and FUSED


class ModalityEncoders(nn.ModuleDict):
    """blendtune's own backbone: an encoder (with `out_dim`) per modality, applied to its input."""

    @property
    def feature_dims(self) -> dict[str, int]:
        return {m: e.out_dim for m, e in self.items()}

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: encoder(inputs[m]) for m, encoder in self.items()}

    def modality_parameters(self, modality: str) -> list[tuple[str, nn.Parameter]]:
        return list(self[modality].named_parameters())


class LateFusionClassifier(nn.Module):
    """A backbone (`encoders`: features per modality), one linear head per modality (`heads`) and the
    fusion (`fusion`: features -> fused logits). Its forward returns a ModelOutput with k + 1 heads."""

    def __init__(self, encoders: Mapping[str, nn.Module] | nn.Module, fusion: nn.Module, num_classes: int,
                 feature_dims: Mapping[str, int] | None = None):
        super().__init__()
        backbone = encoders if isinstance(encoders, nn.Module) else ModalityEncoders(dict(encoders))
        dims = feature_dims or getattr(backbone, "feature_dims", None)
        if not dims:
            raise ValueError("the backbone needs `feature_dims` (dict modality -> feature size), or pass feature_dims")
        self.modalities = list(dims)
        self.encoders = backbone
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})
        self.fusion = fusion
        self._traced: dict[str, list[str]] | None = None  # parameter names per modality, if traced
        # logits | probs: the fused output is the ensemble of the uni-modal heads (UME), not the fusion's; set
        # by the ume strategy's prepare_inference (a plain attribute, not state: state_dict stays tensors only)
        self.fused_from_heads: str | None = None

    @property
    def head_names(self) -> list[str]:
        return self.modalities + [FUSED]

    def forward(self, inputs: dict[str, torch.Tensor], modality_masks: torch.Tensor | None = None,
                detach_unimodal_heads: bool = False) -> ModelOutput:
        """`modality_masks` (B, k) zeroes modalities' features before fusion (modality dropout).
        With `detach_unimodal_heads` the uni-modal heads read detached features: they are then probes
        that measure each encoder without sending it gradient."""
        feats = self.encoders(inputs)
        missing = [m for m in self.modalities if m not in feats]
        if missing:
            raise ValueError(f"the backbone returned no features for {missing} (it returned {sorted(feats)})")
        feats = {m: feats[m] for m in self.modalities}
        logits = {m: self.heads[m](f.detach() if detach_unimodal_heads else f) for m, f in feats.items()}
        if self.fused_from_heads is not None:
            logits[FUSED] = unimodal_ensemble_logits([logits[m] for m in self.modalities], self.fused_from_heads)
            return ModelOutput(feats, logits)
        fusion_in = feats
        if modality_masks is not None:
            fusion_in = {m: f * modality_masks[:, i:i + 1].to(f.dtype) for i, (m, f) in enumerate(feats.items())}
        logits[FUSED] = self.fusion(fusion_in)
        return ModelOutput(feats, logits)

    def encoder_parameters(self, modality: str) -> list[tuple[str, nn.Parameter]]:
        """The parameters of modality `modality`'s encoder (what OGM modulates)."""
        if hasattr(self.encoders, "modality_parameters"):
            return list(self.encoders.modality_parameters(modality))
        if self._traced is None:
            raise RuntimeError("the backbone has no `modality_parameters(m)`: call trace_modality_parameters first")
        named = dict(self.encoders.named_parameters())
        return [(n, named[n]) for n in self._traced[modality]]

    def trace_modality_parameters(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
        """For a backbone without `modality_parameters`: the parameters that each modality's features
        depend on, found by autograd on one batch. A parameter feeding several modalities (a shared
        layer) belongs to none: OGM leaves it unmodulated."""
        if hasattr(self.encoders, "modality_parameters"):
            return {m: [n for n, _ in self.encoder_parameters(m)] for m in self.modalities}
        named = [(n, p) for n, p in self.encoders.named_parameters() if p.requires_grad]
        was_training = self.training
        self.eval()
        try:
            with torch.enable_grad():
                feats = self.encoders(dict(inputs))
                reached = {}
                for m in self.modalities:
                    grads = torch.autograd.grad(feats[m].float().sum(), [p for _, p in named], retain_graph=True,
                                                allow_unused=True)
                    reached[m] = {n for (n, _), g in zip(named, grads) if g is not None}
        finally:
            self.train(was_training)
        self._traced = {m: [n for n, _ in named if n in reached[m]
                            and not any(n in reached[o] for o in self.modalities if o != m)]
                        for m in self.modalities}
        return self._traced


def feature_dims_of(backbone: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """D_m per modality: the backbone's `feature_dims`, else measured on one batch (eval mode, no grad)."""
    dims = getattr(backbone, "feature_dims", None)
    if dims:
        return dict(dims)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            feats = backbone(dict(inputs))
    except Exception as e:  # a dtype or shape the model does not take: say what the data gave it
        given = ", ".join(f"{m} {str(x.dtype).replace('torch.', '')} {tuple(x.shape)}" for m, x in inputs.items())
        raise ValueError(f"its forward failed on the first training items (inputs: {given}): {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        backbone.train(was_training)
    if not isinstance(feats, Mapping):
        raise ValueError(f"the model must return a dict of features per modality, got {type(feats).__name__}")
    bad = {m: tuple(f.shape) for m, f in feats.items() if f.dim() != 2}
    if bad:
        raise ValueError(f"the model must return (batch, features) per modality, got shapes {bad}")
    return {m: int(f.shape[1]) for m, f in feats.items()}


@dataclass
class EncoderSpec:
    name: str = "mlp"
    dim: int = 128
    hidden: int = 256
    dropout: float = 0.0


def default_encoder_spec(name: str) -> EncoderSpec:
    return EncoderSpec(name, 128, 32 if name == "spec_cnn" else 256, 0.0)


def encoders_for(input_shapes: Mapping[str, tuple[int, ...]], specs: Mapping[str, EncoderSpec],
                 default_names: Mapping[str, str]) -> dict[str, nn.Module]:
    """blendtune's encoders for these input shapes: `specs` where given, the dataset's defaults elsewhere."""
    encoders = {}
    for m, shape in input_shapes.items():
        spec = specs.get(m) or default_encoder_spec(default_names.get(m) or default_encoder_name(shape))
        encoders[m] = build_encoder(spec.name, shape, dim=spec.dim, hidden=spec.hidden, dropout=spec.dropout)
        encoders[m].spec = spec  # what built it (a run's model.json records it: blendtune.load)
    return encoders


def default_encoder_name(shape: tuple[int, ...]) -> str:
    """mlp for vectors (D,) and sequences (T, D); spec_cnn for images / spectrograms and frame stacks."""
    return "mlp" if len(shape) <= 2 else "spec_cnn"


def build_late_fusion(encoders: Mapping[str, nn.Module], fusion: str, num_classes: int) -> LateFusionClassifier:
    """blendtune's encoders (one per modality, each with `out_dim`), their heads and the named fusion."""
    backbone = ModalityEncoders(dict(encoders))
    return LateFusionClassifier(backbone, build_fusion(fusion, backbone.feature_dims, num_classes), num_classes)




def make_fusion(fusion: "str | nn.Module | Callable[[dict[str, int], int], nn.Module]", dims: dict[str, int],
                num_classes: int) -> nn.Module:
    """blendtune's fusion by name, or the user's: a module (forward(dict of (B, D_m) features) -> (B, C)
    logits) or a factory called with (feature_dims, num_classes)."""
    if isinstance(fusion, str):
        return build_fusion(fusion, dims, num_classes)
    if not isinstance(fusion, nn.Module) and callable(fusion):
        fusion = fusion(dict(dims), num_classes)
    if not isinstance(fusion, nn.Module):
        raise ValueError(f"fusion: expected a name, an nn.Module or a factory (feature_dims, num_classes) -> "
                         f"nn.Module, got {type(fusion).__name__}")
    return fusion


def classifier_for(backbone: nn.Module, sample_inputs: Mapping[str, torch.Tensor],
                   fusion: "str | nn.Module | Callable", num_classes: int) -> LateFusionClassifier:
    """The user's backbone (dict of inputs -> dict of features) with blendtune's uni-modal heads and
    a fusion (blendtune's by name, or the user's own module); feature sizes and (without
    `modality_parameters`) each modality's parameters are found on `sample_inputs`, a small batch."""
    dims = feature_dims_of(backbone, sample_inputs)
    model = LateFusionClassifier(backbone, make_fusion(fusion, dims, num_classes), num_classes, dims)
    if not isinstance(fusion, str):
        check_fusion_output(model, sample_inputs, num_classes)
    if not hasattr(backbone, "modality_parameters"):
        model.trace_modality_parameters(sample_inputs)
    return model


def check_fusion_output(model: LateFusionClassifier, sample_inputs: Mapping[str, torch.Tensor],
                        num_classes: int) -> None:
    """A fusion of the user's must map the features to (batch, num_classes) logits: said in one line."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            feats = model.encoders(dict(sample_inputs))
            try:
                out = model.fusion({m: feats[m] for m in model.modalities})
            except Exception as e:
                raise ValueError(f"fusion {type(model.fusion).__name__}: forward(dict of (batch, D) features per "
                                 f"modality) failed: {type(e).__name__}: {e}") from None
    finally:
        model.train(was_training)
    batch = next(iter(feats.values())).shape[0]
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (batch, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"fusion {type(model.fusion).__name__}: expected (batch, num_classes) = "
                         f"{(batch, num_classes)} logits from forward(features), got {got}")
