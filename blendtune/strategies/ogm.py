"""OGM: On-the-fly Gradient Modulation (Peng et al., CVPR 2022). Only the fused loss trains the
encoders; after backward, the dominant modality's encoder gradients are scaled by k_u < 1."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from blendtune.distributed import all_reduce_sum_
from blendtune.errors import SettingError, OptionError
from blendtune.functional import modulate_gradients_, ogm_coefficients_from_scores, ogm_scores
from blendtune.models import ModelOutput
from blendtune.strategies.base import STRATEGIES, BalancingStrategy


@dataclass
class OGMOptions:
    """Shared by ogm and ogm_ge (config section `ogm`); ogm ignores `noise_scale`."""
    alpha: float = 0.8
    noise_scale: float = 1.0     # GE noise std as a multiple of the unmodulated gradient's std (ogm_ge)
    modulation_start: int = 1
    modulation_end: int = 50
    params: str = "all"          # all: every encoder parameter | conv: conv weights only (official code)

    def validate(self) -> None:
        for key in ("alpha", "noise_scale"):
            if getattr(self, key) < 0:
                raise OptionError(key, f"expected >= 0, got {getattr(self, key)}")
        if self.params not in ("all", "conv"):
            raise OptionError("params", f"expected one of all, conv, got {self.params!r}")


@STRATEGIES.register("ogm", options=OGMOptions)
class OGM(BalancingStrategy):
    use_noise = False  # OGM-GE sets this
    ignored_options = ("noise_scale",)

    def __init__(self, options: OGMOptions):
        super().__init__(options)
        self.alpha = options.alpha
        self.noise_scale = options.noise_scale if self.use_noise else 0.0
        self.modulation_start = options.modulation_start
        self.modulation_end = options.modulation_end
        self.params = options.params

    def setup(self, model, seed, total_epochs):
        super().setup(model, seed, total_epochs)
        fusion = model.fusion
        if not hasattr(fusion, "unimodal_logits") and not getattr(fusion, "ogm_scores_from_heads", False):
            raise SettingError("model.fusion", f"OGM scores each modality through its share of the fused classifier: "
                               f"fusion {type(fusion).__name__} needs unimodal_logits(features) -> dict of (batch, "
                               "classes) logits per modality (or ogm_scores_from_heads = True to score the "
                               "uni-modal heads)")
        # Which gradients each modality's coefficient scales: all encoder parameters, or (as the
        # official code does) only the conv weights.
        self.modulated = {
            m: [p for _, p in model.encoder_parameters(m) if p.requires_grad and (self.params == "all" or p.dim() == 4)]
            for m in model.modalities
        }
        self.generator = None
        self._workspaces: dict[str, torch.Tensor] = {}
        self._reset_epoch_sums()

    def _reset_epoch_sums(self) -> None:
        self._rho_sum = self._coeff_sum = None
        self._steps = 0

    def unimodal_logits(self, out: ModelOutput) -> dict[str, torch.Tensor]:
        """The paper scores each modality through its share of the fused classifier (concat: W_u, b/k;
        sum: its own branch). Fusions without such a share (film, gated) use the uni-modal heads."""
        # Features come out of autocast in bf16/fp16; scored here, outside it, against fp32 weights: in fp32.
        feats = {m: f.detach().float() for m, f in out.features.items()}
        with torch.no_grad():
            if hasattr(self.model.fusion, "unimodal_logits"):
                return self.model.fusion.unimodal_logits(feats)
            return {m: out.logits[m].detach() for m in self.model.modalities}

    def after_backward(self, out: ModelOutput, targets: torch.Tensor, epoch: int, step: int) -> None:
        scores = all_reduce_sum_(ogm_scores(self.unimodal_logits(out), targets))  # one coefficient on all ranks
        rho, coeff = ogm_coefficients_from_scores(scores, self.alpha)
        if self.modulation_start <= epoch <= self.modulation_end:
            generator = self._noise_generator(coeff.device, step) if self.noise_scale > 0 else None
            for i, m in enumerate(self.model.modalities):
                grads = [p.grad for p in self.modulated[m] if p.grad is not None]
                modulate_gradients_(grads, coeff[i], self.noise_scale, generator, self._workspace(m, grads))
        else:
            coeff = torch.ones_like(coeff)
        self._rho_sum = rho if self._rho_sum is None else self._rho_sum + rho
        self._coeff_sum = coeff if self._coeff_sum is None else self._coeff_sum + coeff
        self._steps += 1

    def _workspace(self, modality: str, grads: list[torch.Tensor]) -> torch.Tensor | None:
        """A noise buffer per modality, reused every step (allocating tens of MB per step costs ~25%)."""
        if not self.noise_scale or not grads:
            return None
        total = sum(g.numel() for g in grads)
        buf = self._workspaces.get(modality)
        if buf is None or buf.numel() != total or buf.device != grads[0].device or buf.dtype != grads[0].dtype:
            buf = self._workspaces[modality] = torch.empty(total, device=grads[0].device, dtype=grads[0].dtype)
        return buf

    NOISE_CHUNKS_ON_CPU = 4  # fixed (not the thread count), so every rank draws the same noise

    def _noise_generator(self, device: torch.device, step: int) -> list[torch.Generator]:
        # Seeded by (seed, step) alone, so every rank draws the same noise and replicas stay identical.
        # On CPU the noise is drawn in parallel chunks, one generator each; one suffices on a GPU.
        chunks = 1 if device.type == "cuda" else self.NOISE_CHUNKS_ON_CPU
        if self.generator is None or self.generator[0].device != device:
            self.generator = [torch.Generator(device=device) for _ in range(chunks)]
        base = (self.seed * 1_000_003 + step) * chunks
        return [g.manual_seed(base + i) for i, g in enumerate(self.generator)]

    def pop_epoch_metrics(self) -> dict[str, float]:
        if not self._steps:
            return {}
        rho = (self._rho_sum / self._steps).tolist()
        coeff = (self._coeff_sum / self._steps).tolist()
        self._reset_epoch_sums()
        metrics = {}
        for m, r, c in zip(self.model.modalities, rho, coeff):
            metrics[f"ogm/rho/{m}"] = r
            metrics[f"ogm/coeff/{m}"] = c
        return metrics
