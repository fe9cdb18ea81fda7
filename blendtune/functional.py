"""The balancing math as small pure functions: OGR, G-Blend weights, OGM coefficients, GE noise.

Strategies call these; tests call them directly with hand-computed values. The spec is
`docs/algorithms.md` (the project's copy of the shared reference); names follow it.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class OGR(NamedTuple):
    delta_g: float  # generalization gained: held-out loss decrease over the window
    delta_o: float  # overfitting gained: growth of (held-out - train) loss gap
    ogr: float      # |delta_o / delta_g|; small means learning that generalizes


def ogr(train_loss_start: float, heldout_loss_start: float,
        train_loss_end: float, heldout_loss_end: float) -> OGR:
    """Overfitting-to-generalization ratio over one window (Wang et al., CVPR 2020)."""
    delta_g = heldout_loss_start - heldout_loss_end
    delta_o = (heldout_loss_end - train_loss_end) - (heldout_loss_start - train_loss_start)
    if delta_g == 0.0:
        ratio = 0.0 if delta_o == 0.0 else math.inf
    else:
        ratio = abs(delta_o / delta_g)
    return OGR(delta_g, delta_o, ratio)


def gblend_weights(delta_g: Mapping[str, float], delta_o: Mapping[str, float],
                   previous: Mapping[str, float] | None = None, eps: float = 1e-8) -> dict[str, float]:
    """Optimal blend weights w_i proportional to dG_i / dO_i^2 (Prop. 1), on the simplex.

    A head whose held-out loss did not improve (dG <= 0) gets weight 0; dO^2 is floored at `eps`;
    if every weight is 0 the previous weights are kept (uniform when there are none).
    """
    if set(delta_g) != set(delta_o):
        raise ValueError(f"delta_g and delta_o name different heads: {sorted(delta_g)} vs {sorted(delta_o)}")
    raw = {h: (max(delta_g[h], 0.0) / max(delta_o[h] ** 2, eps)) for h in delta_g}
    total = sum(raw.values())
    if total <= 0.0 or not math.isfinite(total):
        if previous is not None:
            return dict(previous)
        return {h: 1.0 / len(raw) for h in raw}
    return {h: v / total for h, v in raw.items()}


def stabilised_blend_weights(previous: Mapping[str, float], estimate: Mapping[str, float], ema: float = 0.0,
                             floor: float = 0.0) -> dict[str, float]:
    """G-Blend weights that do not swing: `w <- ema * w_prev + (1 - ema) * w_est` (an exponential moving
    average across super-epochs), then every head at least `floor` (renormalised onto the simplex).
    ema = floor = 0 returns the estimate as it is (the paper)."""
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {ema}")
    if floor < 0.0 or floor * len(estimate) > 1.0:
        raise ValueError(f"floor must be in [0, 1/{len(estimate)}], got {floor}")
    mixed = {h: ema * previous[h] + (1.0 - ema) * estimate[h] for h in estimate}
    if floor == 0.0:
        return mixed
    # floor + (1 - k * floor) * share: every head >= floor, the rest shared in proportion to the mix
    total = sum(mixed.values())
    return {h: floor + (1.0 - floor * len(mixed)) * w / total for h, w in mixed.items()}


def classification_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy for class indices; for multi-hot float targets (multi-label) binary cross-entropy
    averaged over classes per sample. reduction: mean or sum over the batch."""
    if targets.is_floating_point():
        per_sample = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none").mean(dim=1)
        return per_sample.mean() if reduction == "mean" else per_sample.sum()
    return F.cross_entropy(logits, targets, reduction=reduction)


def ogm_scores(unimodal_logits: Mapping[str, Tensor], targets: Tensor) -> Tensor:
    """s_u = sum over the batch of softmax(logits_u)[y]; one entry per modality, in mapping order.
    Multi-label (multi-hot targets): the mean sigmoid probability of each sample's true labels."""
    if targets.is_floating_point():
        per_sample = [(torch.sigmoid(lg.float()) * targets).sum(1) / targets.sum(1).clamp_min(1)
                      for lg in unimodal_logits.values()]
        return torch.stack([p.sum() for p in per_sample])
    return torch.stack([
        torch.softmax(logits.float(), dim=1).gather(1, targets.view(-1, 1)).sum()
        for logits in unimodal_logits.values()
    ])


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Per-class average precision (AudioSet's mAP is its mean) of (N, C) scores against 0/1 targets;
    NaN for a class without positives."""
    order = scores.argsort(dim=0, descending=True)
    hits = targets.gather(0, order).double()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64, device=hits.device).unsqueeze(1)
    positives = hits.sum(0)
    return torch.where(positives > 0, (precision * hits).sum(0) / positives.clamp_min(1), torch.nan)


def discrepancy_ratios(scores: Tensor) -> Tensor:
    """rho_u = s_u / mean_{w != u} s_w (for two modalities exactly s_u / s_other, as OGM's and PMR's rho)."""
    k = scores.numel()
    if k < 2:
        raise ValueError("a discrepancy ratio needs at least two modalities")
    others_mean = (scores.sum() - scores) / (k - 1)
    return scores / others_mean.clamp_min(torch.finfo(scores.dtype).tiny)


def ogm_coefficients_from_scores(scores: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Discrepancy ratios rho and coefficients k from summed scores (tensor in, tensors out, no sync).

    rho_u = s_u / mean_{w != u} s_w (for two modalities exactly s_u / s_other, as the paper);
    k_u = 1 - tanh(alpha * rho_u) when rho_u > 1, else 1: only the dominant modality slows down.
    """
    rho = discrepancy_ratios(scores)
    coeff = torch.where(rho > 1, 1 - torch.tanh(alpha * rho), torch.ones_like(rho))
    return rho, coeff


def ogm_coefficients(unimodal_logits: Mapping[str, Tensor], targets: Tensor, alpha: float) -> dict[str, float]:
    """OGM modulation coefficient per modality for one batch (Peng et al., CVPR 2022)."""
    _, coeff = ogm_coefficients_from_scores(ogm_scores(unimodal_logits, targets), alpha)
    return dict(zip(unimodal_logits.keys(), coeff.tolist()))


def ogm_rho(unimodal_logits: Mapping[str, Tensor], targets: Tensor) -> dict[str, float]:
    """Discrepancy ratio rho per modality for one batch."""
    rho, _ = ogm_coefficients_from_scores(ogm_scores(unimodal_logits, targets), alpha=0.0)
    return dict(zip(unimodal_logits.keys(), rho.tolist()))


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor (no host sync): no element of `tensors` is inf or NaN. After unscaling, that is
    GradScaler's test for letting the optimizer step run (found_inf)."""
    return torch.stack([t.isfinite().all() for t in tensors]).all()


def gradient_stds(grads: Sequence[Tensor]) -> list[Tensor]:
    """Per-tensor standard deviation (0 for one-element tensors), kept on device: no host sync."""
    return [g.std() if g.numel() > 1 else g.new_zeros(()) for g in grads]


_NOISE_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="blendtune-noise")


def fill_normal_(flat: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> None:
    """N(0, 1) into `flat`; with k generators, chunk i comes from generator i (same values for any
    thread count, so ranks agree)."""
    if generator is None or isinstance(generator, torch.Generator):
        flat.normal_(generator=generator)
        return
    chunks = flat.chunk(len(generator))
    list(_NOISE_THREADS.map(lambda pair: pair[0].normal_(generator=pair[1]), zip(chunks, generator)))


def modulate_gradients_(grads: Sequence[Tensor], coeff: Tensor | float, noise_scale: float = 0.0,
                        generator: torch.Generator | Sequence[torch.Generator] | None = None,
                        workspace: Tensor | None = None) -> None:
    """In place: g <- coeff * g + eps, eps ~ N(0, (noise_scale * std(g_unmodulated))^2) per tensor.

    With noise_scale == 0 this is plain OGM; otherwise OGM-GE. The noise is drawn from `generator`, so
    ranks that seed it identically add identical noise. Several CPU generators fill as many equal
    chunks of the noise in parallel threads (torch draws normals single-threaded; tens of millions per
    step). `workspace` (as many elements as the gradients, their device and dtype) receives the noise
    instead of a fresh allocation per step.
    """
    grads = list(grads)
    if not grads:
        return
    stds = gradient_stds(grads) if noise_scale > 0 else None
    torch._foreach_mul_(grads, coeff)
    if stds is None:
        return
    total = sum(g.numel() for g in grads)
    flat = workspace if workspace is not None else torch.empty(total, device=grads[0].device, dtype=grads[0].dtype)
    fill_normal_(flat, generator)
    noise = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]
    torch._foreach_mul_(noise, [s * noise_scale for s in stds])
    torch._foreach_add_(grads, noise)


# ---- MMPareto (Wei & Hu, ICML 2024) --------------------------------------------------------------
def pareto_weight(grad_fused: Tensor, grad_unimodal: Tensor) -> tuple[Tensor, Tensor]:
    """(cos, w) for one encoder's flattened gradients of the fused loss g_m and its uni-modal loss g_u:
    w is the weight on g_m (1 - w on g_u). No conflict (cos > 0): w = 1/2. Conflict (cos <= 0): the
    min-norm point of the segment [g_m, g_u], w = (|g_u|^2 - g_m.g_u) / |g_m - g_u|^2 (MGDA's 2-task
    solution; the authors' MinNormSolver._min_norm_2d). Tensors in and out: no host sync."""
    a, b = grad_fused.float(), grad_unimodal.float()
    aa, bb, ab = a.dot(a), b.dot(b), a.dot(b)
    tiny = torch.finfo(torch.float32).tiny
    cos = ab / (aa * bb).sqrt().clamp_min(tiny)
    min_norm = (bb - ab) / (aa + bb - 2 * ab).clamp_min(tiny)
    # The solver's clamps (min_norm_solvers.py 17-24) matter where one gradient is exactly 0 (cos = 0):
    # g_u = 0 gives w = 0.001, g_m = 0 gives w = 0.999, so the other gradient is kept, not zeroed.
    min_norm = torch.where(ab >= aa, torch.full_like(ab, 0.999), torch.where(ab >= bb, torch.full_like(ab, 0.001), min_norm))
    return cos, torch.where(cos > 0, torch.full_like(cos, 0.5), min_norm.clamp(0.0, 1.0))


def mmpareto_gradients(grads_fused: Sequence[Tensor], grads_unimodal: Sequence[Tensor],
                       multiplier: float = 1.5) -> tuple[list[Tensor], Tensor, Tensor]:
    """One encoder's MMPareto gradient, per parameter tensor p, from its fused-loss and uni-modal-loss
    gradients (the authors' MMPareto.py lines 149-207):

        (cos, w) = pareto_weight(concat g_m, concat g_u)          # one weight per encoder
        h_p      = 2 (w g_m,p + (1 - w) g_u,p)
        grad_p   = multiplier * max(1, |g_m,p + g_u,p| / |h_p|) * h_p   # never shorter than the plain sum

    Returns (gradients, cos, w). Homogeneous of degree 1, so it may run on loss-scaled gradients."""
    gm, gu = list(grads_fused), list(grads_unimodal)
    cos, w = pareto_weight(torch.cat([g.reshape(-1) for g in gm]), torch.cat([g.reshape(-1) for g in gu]))
    h = torch._foreach_add(torch._foreach_mul(gm, 2 * w), torch._foreach_mul(gu, 2 * (1 - w)))
    plain_norms = torch._foreach_norm(torch._foreach_add(gm, gu))
    tiny = torch.finfo(torch.float32).tiny
    # |h_p| = 0 with a non-zero plain sum: the authors' code divides by 0 (NaN); h_p = 0 stays 0 here.
    scales = [multiplier * (n.float() / hn.float().clamp_min(tiny)).clamp_min(1.0)
              for n, hn in zip(plain_norms, torch._foreach_norm(h))]
    torch._foreach_mul_(h, [s.to(t.dtype) for s, t in zip(scales, h)])
    return h, cos, w


# ---- PMR (Fan et al., CVPR 2023) -----------------------------------------------------------------
def class_quotas(counts: Sequence[int], size: int) -> list[int]:
    """How many samples of each class a subset of `size` samples takes (PMR's prototype subset): as
    equal as the classes allow, and at least one of every class with a sample when size >= the number
    of such classes. A class smaller than its share gives all it has and the others share the rest; the
    last few samples go to the classes listed first. At most sum(counts) in all."""
    quotas = [0] * len(counts)
    left = min(size, sum(counts))
    while left > 0:
        open_classes = [k for k, c in enumerate(counts) if quotas[k] < c]
        share = max(1, left // len(open_classes))
        for k in open_classes:
            take = min(share, counts[k] - quotas[k], left)
            quotas[k] += take
            left -= take
    return quotas


def class_means(feature_sums: Tensor, counts: Tensor, previous: Tensor | None = None) -> Tensor:
    """Prototypes (K, D) from per-class feature sums (K, D) and counts (K,). A class with no sample keeps
    its previous prototype (the authors' code divides by 0), or the mean over all samples at first. (PMR's
    stratified subset holds every class of the training set: only a class the training set lacks is empty.)"""
    means = feature_sums / counts.clamp_min(1).unsqueeze(1)
    empty = counts == 0
    if empty.any():
        fallback = previous if previous is not None else (feature_sums.sum(0) / counts.sum().clamp_min(1)).expand_as(means)
        means = torch.where(empty.unsqueeze(1), fallback, means)
    return means


def prototype_logits(features: Tensor, prototypes: Tensor) -> Tensor:
    """-|z - c_k| (Euclidean, not squared: the authors' EU_dist) for every sample and class, in fp32."""
    return -torch.cdist(features.float(), prototypes.float())


def mean_entropy(logits: Tensor) -> Tensor:
    """Mean over the batch of the entropy of softmax(logits), in fp32."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(1).mean()


def pmr_coefficients(scores: Tensor, rule: str = "paper") -> Tensor:
    """Per-modality prototype-loss coefficients (without alpha) from the summed true-class prototype
    probabilities s_u: rho_u = s_u / mean_{w != u} s_w (two modalities: the paper's rho = s_0 / s_1).
    paper (Eq. 11): clip(1 / rho_u - 1, 0, 1) for the modality behind (rho_u < 1), 0 otherwise.
    code (the authors' main_Prototype_grad.py): 1 for the modality behind, 0 otherwise (0 at a tie)."""
    rho = discrepancy_ratios(scores)
    behind = rho < 1
    if rule == "code":
        return behind.to(scores.dtype)
    return torch.where(behind, (1 / rho.clamp_min(torch.finfo(rho.dtype).tiny) - 1).clamp(0.0, 1.0),
                       torch.zeros_like(rho))


# ---- MLA (Zhang, Yoon, Bansal, Yao, CVPR 2024) ---------------------------------------------------
def entropy_fusion_weights(logits: Sequence[Tensor]) -> Tensor:
    """(B, k) per-sample weights w_m = exp(H_max - H_m) / sum_j exp(H_max - H_j) = softmax_m(-H_m), from
    each modality's prediction entropy H_m (MLA's test-time uncertainty fusion), in fp32."""
    entropies = []
    for lg in logits:
        log_p = torch.log_softmax(lg.float(), dim=1)
        entropies.append(-(log_p.exp() * log_p).sum(1))
    return torch.softmax(-torch.stack(entropies, dim=1), dim=1)


def owm_projector_update(projector: Tensor, mean_feature: Tensor, alpha: float) -> Tensor:
    """One orthogonal-weight-modification step (MLA's gradient modification, after OWM):
    k = P r^T, P <- P - k k^T / (alpha + r k), then P / |P|_F (the authors' utils.py lines 34-40, with the
    scalar denominator r k that OWM uses; the released code's torch.mm(k, r) is an outer product)."""
    r = mean_feature.float().reshape(1, -1)
    k = projector @ r.T
    updated = projector - (k @ k.T) / (alpha + (r @ k).squeeze())
    return updated / torch.linalg.matrix_norm(updated).clamp_min(torch.finfo(torch.float32).tiny)


# ---- UME / UMT (Du, Teng, Li, Liu, Yuan, Wang, Yuan, Zhao, ICML 2023) ------------------------------
ENSEMBLE_RULES = ("logits", "probs")


def unimodal_ensemble_logits(logits: Sequence[Tensor], combine: str = "logits") -> Tensor:
    """UME's prediction from k uni-modal models' logits, as logits: `logits` the mean of the logits
    (argmax = that of their sum); `probs` log of the mean of the softmax probabilities (fp32), whose
    cross-entropy is -log mean_m p_m[y]."""
    if combine == "logits":
        return sum(logits) / len(logits)
    if combine == "probs":
        mean = torch.stack([torch.softmax(lg.float(), dim=1) for lg in logits]).mean(0)
        return mean.clamp_min(torch.finfo(torch.float32).tiny).log()
    raise ValueError(f"combine: expected one of {', '.join(ENSEMBLE_RULES)}, got {combine!r}")


def feature_distillation_losses(student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> Tensor:
    """UMT's distillation terms, one per modality (mapping order): the mean squared error between the
    student encoder's features and the frozen uni-modal teacher's, averaged over batch and feature
    dimensions, in fp32; the teacher side carries no gradient."""
    return torch.stack([F.mse_loss(student[m].float(), teacher[m].detach().float()) for m in student])


def ume_or_umt(ensemble_score: float, fused_score: float) -> str:
    """The paper's guide for choosing between them: if the uni-modal ensemble scores at least as well as
    the multi-modal late-fusion model trained jointly, uni-modal features dominate and UME is chosen; if
    the fused model wins, paired (cross-modal) features matter and UMT is chosen. Scores: higher is
    better, on held-out data."""
    return "ume" if ensemble_score >= fused_score else "umt"


# ---- AGM (Li et al., ICCV 2023; lihong2303/AGM_ICCV2023) ----------------------------------------
def shapley_weight(size: int, k: int) -> float:
    """|S|! (k - |S| - 1)! / k!: the weight of a coalition S (size |S|, without m) in modality m's Shapley value."""
    return math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)


def shapley_outputs(values: Mapping[int, Tensor], k: int) -> list[Tensor]:
    """AGM's mono-modal outputs from the outputs v(S) of every non-empty coalition S of k modalities (S a
    bitmask, bit m set: modality m present, the others zeroed): o_m = phi_m + v(empty)/k, i.e.

        o_m = w_0 v({m}) + sum_{S non-empty, m not in S} w_|S| (v(S + m) - v(S)),   w_s = s! (k-s-1)! / k!

    so that sum_m o_m = v(all) and v(empty) is never needed (the authors' Modality_Audio/Visual:
    model/CREMAD_net.py 7-17 for k = 2, model/URFunny_net.py 6-31 for k = 3)."""
    outputs = []
    for m in range(k):
        bit = 1 << m
        o = shapley_weight(0, k) * values[bit]
        for s in range(1, 1 << k):
            if not s & bit:
                o = o + shapley_weight(bin(s).count("1"), k) * (values[s | bit] - values[s])
        outputs.append(o)
    return outputs


def agm_score_sums(outputs: Sequence[Tensor], targets: Tensor, floor: float = 1e-8) -> Tensor:
    """Per modality, the batch SUM of -log max(softmax(o_m)[y], floor), in float64 (divide by the global
    batch size after an all-reduce: the authors' batch mean, run/CREMAD_main.py 130-143). Multi-label
    (multi-hot targets): the summed per-sample binary cross-entropy."""
    if targets.is_floating_point():
        return torch.stack([classification_loss(o.float(), targets, reduction="sum") for o in outputs]).double()
    log_floor = math.log(floor)
    return torch.stack([-o.float().log_softmax(1).gather(1, targets.view(-1, 1)).clamp_min(log_floor).sum()
                        for o in outputs]).double()


def agm_ratios(scores: Tensor) -> Tensor:
    """r_m = exp(k/(k-1) (mean_j s_j - s_m)); two modalities: exp(s_other - s_m) (run/CREMAD_main.py 145-149,
    run/URFunny_main.py 117-126). r_m > 1: modality m's loss is below the others'."""
    k = scores.numel()
    if k < 2:
        raise ValueError("AGM's ratios need at least two modalities")
    return torch.exp((scores.mean() - scores) * (k / (k - 1)))


def agm_coefficients(scores: Tensor, running_scores: Tensor, alpha: float, gap_cap: float | None = None) -> Tensor:
    """c_m = exp(alpha * min(r_m(running) - r_m(batch), gap_cap)) (run/CREMAD_main.py 151-152; no cap in
    AVE/AVMNIST/MOSEI_main.py): a modality ahead of where its running mean puts it (r_m(batch) larger)
    gets c_m < 1, one behind gets c_m > 1."""
    gap = agm_ratios(running_scores) - agm_ratios(scores)
    if gap_cap is not None:
        gap = gap.clamp_max(gap_cap)
    return torch.exp(alpha * gap)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


def scale_gradient(x: Tensor, scale: Tensor) -> Tensor:
    """x in the forward; the gradient reaching x times `scale` (a 0-dim tensor) in the backward (AGM's full
    backward hooks on Modality_out, model/CREMAD_net.py 42-51)."""
    return _ScaleGradient.apply(x, scale)


def clip_if_any_exceeds_(grads: Sequence[Tensor], watched: Sequence[Tensor], threshold: float) -> Tensor:
    """When an entry of `watched` leaves [-threshold, threshold], clip the total norm of `grads` to
    `threshold` as torch's clip_grad_norm_ does (factor min(1, threshold / (norm + 1e-6))); decided on the
    device, no host sync (AGM's step, run/CREMAD_main.py 233-243). Returns the factor applied."""
    peak = torch.stack([g.detach().abs().amax() for g in watched]).amax()
    norm = torch.nn.utils.get_total_norm(grads)
    factor = torch.where(peak > threshold, (threshold / (norm + 1e-6)).clamp(max=1.0), torch.ones_like(norm))
    torch._foreach_mul_(list(grads), factor)
    return factor
