"""Distillation loss terms: one pure function of tensors each, averaged over the batch.

The training loop owns everything a term needs besides tensors (the teacher forward under
``torch.inference_mode()``, the centroid memory, trainable projections) and sums
``weight * term`` over the method's non-zero weights. ``LOSSES`` names every term.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .geometry import similarity_matrix

__all__ = ["kd", "feature", "geometry", "rkd", "sp", "cc", "dkd", "at", "pkt", "nst", "vid", "dist", "standardize",
           "pair_stages", "match_size", "crd_nce", "ofd", "ofd_margin", "hcl", "reverse_grad", "ctkd_lambda", "LOSSES"]


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Logit standardisation, Sun et al., CVPR 2024: ``(z - mean z) / (1e-7 + std z)`` over the classes, std with
    Bessel's correction (as the authors' code). The softmax of the result no longer depends on the logits' shift
    or scale, so the student matches the teacher's relations between logits, not their magnitude."""
    return (logits - logits.mean(dim=1, keepdim=True)) / (1e-7 + logits.std(dim=1, keepdim=True))


def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
       standardize_logits: bool = False) -> torch.Tensor:
    """Logit distillation, Hinton et al. 2015: ``KL(softmax(t/T) || softmax(s/T)) * T^2``.

    KL summed over classes and averaged over the batch ("batchmean"); the ``T^2`` keeps the
    gradient scale independent of ``T``. ``standardize_logits``: both sides through :func:`standardize` first.
    """
    wide = lambda z: z if z.dtype == torch.float64 else z.float()  # fp32 at least (bf16 autocast), fp64 kept
    student_logits, teacher_logits = wide(student_logits), wide(teacher_logits)
    if standardize_logits:
        student_logits, teacher_logits = standardize(student_logits), standardize(teacher_logits)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)  # the teacher is a constant
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature ** 2


def feature(student_projected: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets hint (Romero et al., ICLR 2015) on penultimate features: mean squared error.

    ``student_projected`` is the student's features through the loop's trainable ``d_s -> d_t``
    projection.
    """
    return F.mse_loss(student_projected.float(), teacher_features.detach().float())  # the teacher is a constant


def geometry(student_centroids: torch.Tensor, teacher_centroids: torch.Tensor) -> torch.Tensor:
    """Geometry-preserving distillation (the seed paper): match class-centroid similarity matrices.

    Mean over all ``i != j`` of ``(S_s[i, j] - S_t[i, j])^2`` with ``S`` the cosine-similarity matrix
    of the class centroids (``(C, d_s)`` and ``(C, d_t)``; the widths may differ). Invariant to a
    positive rescaling of any centroid; 0 when the two geometries agree.
    """
    s = similarity_matrix(student_centroids.float())
    t = similarity_matrix(teacher_centroids.detach().float())  # the teacher is a constant
    c = s.shape[0]
    diagonal = torch.eye(c, dtype=torch.bool, device=s.device)  # masked, not indexed: a mask index is a host sync
    return ((s - t) ** 2).masked_fill(diagonal, 0.0).sum() / (c * (c - 1))


def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(B, B)``; exact zeros (diagonal, repeated samples) with finite gradients."""
    sq = (e[:, None, :] - e[None, :, :]).pow(2).sum(-1)
    return torch.where(sq > 0, sq.clamp(min=1e-12).sqrt(), torch.zeros_like(sq))


def _mean_normalised(d: torch.Tensor) -> torch.Tensor:
    """Divide by the mean of the non-zero entries (a batch of identical samples stays all zero)."""
    nonzero = d > 0
    mean = d.sum() / nonzero.sum().clamp(min=1)
    return d / mean.clamp(min=1e-12)


def _angles(e: torch.Tensor) -> torch.Tensor:
    """``a[j, i, k]`` = cosine between ``e_i - e_j`` and ``e_k - e_j``; zero differences stay zero."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # (B, B, d): diff[j, i] ~ e_i - e_j
    return torch.bmm(diff, diff.transpose(1, 2))  # (B, B, B)


def rkd(student_features: torch.Tensor, teacher_features: torch.Tensor, distance_weight: float = 25.0,
        angle_weight: float = 50.0) -> torch.Tensor:
    """Relational KD, Park et al., CVPR 2019: match pairwise distances and triplet angles.

    Distance term: pairwise Euclidean distances, each side divided by the mean of its non-zero
    distances, smooth-L1 (beta = 1) averaged over all B x B entries. Angle term: for every triplet
    (i, j, k) the cosine between the L2-normalised ``e_i - e_j`` and ``e_k - e_j``, smooth-L1 averaged
    over all B x B x B entries. Returns ``distance_weight * L_d + angle_weight * L_a``.
    """
    s, t = student_features.float(), teacher_features.float().detach()
    loss_d = F.smooth_l1_loss(_mean_normalised(_pairwise_distances(s)), _mean_normalised(_pairwise_distances(t)),
                              beta=1.0)
    loss_a = F.smooth_l1_loss(_angles(s), _angles(t), beta=1.0)
    return distance_weight * loss_d + angle_weight * loss_a


def sp(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD, Tung & Mori, ICCV 2019: match the batch's row-normalised Gram matrices.

    ``G = F F^T`` per side (``F`` the batch of flattened features), each row L2-normalised;
    loss ``||G_s - G_t||_F^2 / B^2``.
    """
    b = student_features.shape[0]
    gs = F.normalize(student_features.float().reshape(b, -1) @ student_features.float().reshape(b, -1).T, dim=1)
    t = teacher_features.float().detach().reshape(b, -1)
    gt = F.normalize(t @ t.T, dim=1)
    return (gs - gt).pow(2).sum() / (b * b)


def _taylor_rbf(e: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """``K_ij = sum_{p=0..order} exp(-2 gamma) (2 gamma)^p / p! (f_i . f_j)^p`` on L2-normalised rows."""
    z = F.normalize(e, dim=1)
    sim = z @ z.T
    k = torch.zeros_like(sim)
    for p in range(order + 1):
        k = k + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim.pow(p)
    return k


def cc(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor, gamma: float = 0.4,
       order: int = 2) -> torch.Tensor:
    """Correlation congruence, Peng et al., ICCV 2019: match the batch's sample-correlation matrices.

    Embeddings are L2-normalised and correlated with the p-th order Taylor expansion of the Gaussian
    RBF kernel, ``K_ij = sum_p exp(-2 gamma) (2 gamma)^p / p! (f_i . f_j)^p``; loss
    ``||K_s - K_t||_F^2 / B^2``. This follows the paper's equations: public implementations disagree
    (RepDistiller's ``Correlation`` uses batch-shifted differences of embeddings, not this kernel).
    ``K`` is B x B whatever the widths; the loop still gives the student a trainable projection to
    the teacher's width, as the paper's embedding does.
    """
    b = student_embedding.shape[0]
    ks = _taylor_rbf(student_embedding.float(), gamma, order)
    kt = _taylor_rbf(teacher_embedding.float().detach(), gamma, order)
    return (ks - kt).pow(2).sum() / (b * b)


def dkd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0,
        beta: float = 8.0, temperature: float = 4.0, standardize_logits: bool = False) -> torch.Tensor:
    """Decoupled KD, Zhao et al., CVPR 2022: ``alpha * TCKD + beta * NCKD``.

    TCKD: KL between the teacher's and the student's binary (target, rest) distributions at
    temperature T. NCKD: KL between the distributions over the non-target classes (the target logit
    masked out). Each KL summed over classes, times T^2, averaged over the batch. Computed in log
    space, so confident predictions stay finite. The warm-up ramp belongs to the training loop.
    ``standardize_logits``: both sides through :func:`standardize` first (DKD + LS).
    """
    if standardize_logits:
        student_logits, teacher_logits = standardize(student_logits.float()), standardize(teacher_logits.float())
    T = temperature
    s, t = student_logits.float() / T, teacher_logits.float().detach() / T
    gt = F.one_hot(target, s.shape[1]).bool()
    log_ps, log_pt = F.log_softmax(s, dim=1), F.log_softmax(t, dim=1)

    def binary(log_p):  # (B, 2): log p(target), log p(rest)
        tgt = log_p.masked_fill(~gt, -1e4).logsumexp(1)
        rest = log_p.masked_fill(gt, -1e4).logsumexp(1)
        return torch.stack([tgt, rest], dim=1)

    tckd = F.kl_div(binary(log_ps), binary(log_pt), reduction="batchmean", log_target=True) * T * T
    nckd = F.kl_div(F.log_softmax(s.masked_fill(gt, -1e4), dim=1), F.log_softmax(t.masked_fill(gt, -1e4), dim=1),
                    reduction="batchmean", log_target=True) * T * T
    return alpha * tckd + beta * nckd


# ---------------------------------------------------------------------------------------------
# Stage feature maps

def pair_stages(maps_s: list[torch.Tensor], maps_t: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Which student stage meets which teacher stage, for every method that reads stage maps.

    The stages after the stem (``maps[1:]``), paired from the deepest: with ``k`` = the smaller count, the last
    ``k`` of each side, in order. For every pair of RepDistiller's benchmark both sides have as many stages, and
    this is their pairing (and mdistiller's): stage i with stage i.
    """
    s, t = maps_s[1:], maps_t[1:]
    k = min(len(s), len(t))
    return list(zip(s[len(s) - k:], t[len(t) - k:]))


def match_size(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The larger of two maps average-pooled to the smaller's spatial size (``(B, C, H, W)`` each)."""
    hs, ht = f_s.shape[2], f_t.shape[2]
    if hs > ht:
        f_s = F.adaptive_avg_pool2d(f_s, (ht, f_t.shape[3]))
    elif ht > hs:
        f_t = F.adaptive_avg_pool2d(f_t, (hs, f_s.shape[3]))
    return f_s, f_t


def _attention(f: torch.Tensor, p: float) -> torch.Tensor:
    """``(B, C, H, W)`` -> the L2-normalised spatial attention map ``mean_c |f|^p``, flattened ``(B, H*W)``."""
    return F.normalize(f.pow(p).mean(1).flatten(1), dim=1)


def at(maps_s: list[torch.Tensor], maps_t: list[torch.Tensor], p: float = 2.0) -> torch.Tensor:
    """Attention transfer, Zagoruyko & Komodakis, ICLR 2017: match the stages' normalised attention maps.

    Per stage pair (:func:`pair_stages`, the larger map pooled to the smaller): mean over batch and positions
    of ``(a_s - a_t)^2``, ``a = normalize(mean_c f^p)``; summed over the pairs. Channel counts may differ.
    """
    total = 0.0
    for f_s, f_t in pair_stages(maps_s, maps_t):
        f_s, f_t = match_size(f_s.float(), f_t.float().detach())
        total = total + (_attention(f_s, p) - _attention(f_t, p)).pow(2).mean()
    return total


def pkt(student_features: torch.Tensor, teacher_features: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer, Passalis & Tefas, ECCV 2018, on the pooled features.

    Cosine similarities within the batch, mapped to [0, 1] and normalised per row into conditional
    probabilities; ``mean_ij P_t log((P_t + eps) / (P_s + eps))`` (a KL averaged over all B x B entries).
    """
    def probabilities(f):
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        sim = (f @ f.T + 1.0) / 2.0
        return sim / sim.sum(dim=1, keepdim=True)

    ps, pt = probabilities(student_features.float()), probabilities(teacher_features.float().detach())
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


def _poly_mmd(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Squared MMD between the channels' normalised activation patterns, kernel ``k(x, y) = (x . y)^2``."""
    b = f_s.shape[0]
    s = F.normalize(f_s.reshape(b, f_s.shape[1], -1), dim=2)  # (B, C_s, HW)
    t = F.normalize(f_t.reshape(b, f_t.shape[1], -1), dim=2)  # (B, C_t, HW)
    k = lambda x, y: (x @ y.transpose(1, 2)).pow(2).mean()
    return k(t, t) + k(s, s) - 2 * k(s, t)


def nst(maps_s: list[torch.Tensor], maps_t: list[torch.Tensor]) -> torch.Tensor:
    """Neuron selectivity transfer, Huang & Wang, 2017: polynomial-kernel (d = 2, c = 0) MMD between the
    distributions of the student's and the teacher's channels (each channel's spatial pattern, L2-normalised),
    per stage pair (:func:`pair_stages`, pooled to the smaller size), summed. Channel counts may differ."""
    total = 0.0
    for f_s, f_t in pair_stages(maps_s, maps_t):
        f_s, f_t = match_size(f_s.float(), f_t.float().detach())
        total = total + _poly_mmd(f_s, f_t)
    return total


def vid(pred_mean: torch.Tensor, log_scale: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Variational information distillation, Ahn et al., CVPR 2019: the negative log-likelihood of the teacher's
    map under a Gaussian with the student's regressed mean and a learned per-channel variance.

    ``pred_mean``, ``target``: ``(B, C_t, H, W)``; ``log_scale``: ``(C_t,)``, variance ``softplus(log_scale) + eps``.
    Returns ``mean(0.5 * ((mu - t)^2 / var + log var))`` (the constant ``0.5 log 2 pi`` left out).
    """
    var = (F.softplus(log_scale.float()) + eps).view(1, -1, 1, 1)
    return (0.5 * ((pred_mean.float() - target.float().detach()) ** 2 / var + torch.log(var))).mean()


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
         tau: float = 1.0, standardize_logits: bool = False) -> torch.Tensor:
    """DIST, Huang et al., NeurIPS 2022: match relations of the softened predictions, not their values.

    ``y = softmax(z / tau)``; inter-class: ``1 - mean_i pearson(y_s[i, :], y_t[i, :])`` (each sample's class
    ranking); intra-class: the same over the columns (each class's ranking of the samples). Returns
    ``tau^2 (beta * inter + gamma * intra)``. Invariant to adding a constant to a sample's logits.
    """
    if standardize_logits:
        student_logits, teacher_logits = standardize(student_logits.float()), standardize(teacher_logits.float())
    ys = F.softmax(student_logits.float() / tau, dim=1)
    yt = F.softmax(teacher_logits.float().detach() / tau, dim=1)
    inter = 1 - _pearson_rows(ys, yt).mean()
    intra = 1 - _pearson_rows(ys.T, yt.T).mean()
    return tau ** 2 * (beta * inter + gamma * intra)


def crd_nce(scores: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss (Tian et al., ICLR 2020) of normalised scores ``(B, K + 1)``, the positive in column 0.

    With noise probability ``P_n = 1 / n_data``: ``-(sum_i log(P_i0 / (P_i0 + K P_n)) + sum_ik log(K P_n / (P_ik +
    K P_n))) / B`` — a binary classification of the positive against ``K`` noise samples.
    """
    k, pn = scores.shape[1] - 1, 1.0 / n_data
    pos, neg = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(pos / (pos + k * pn + eps))
    log_d0 = torch.log((k * pn) / (neg + k * pn + eps))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def ofd_margin(gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """OFD's per-channel margin (Heo et al., ICCV 2019, eq. 4): the mean of a pre-ReLU response below zero,
    ``E[x | x < 0]`` for ``x ~ N(beta, |gamma|^2)`` — the statistics of the BN before the ReLU —:
    ``beta - s * phi(beta / s) / Phi(-beta / s)`` with ``s = |gamma|``; ``-3 s`` where ``Phi(-beta / s) <= 0.001``
    (almost no negative response), as the authors' code does."""
    s, m = gamma.abs().double(), beta.double()
    tail = torch.special.ndtr(-m / s)
    inside = m - s * torch.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / tail.clamp_min(1e-300)
    return torch.where(tail > 0.001, inside, -3 * s).float()


def ofd(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """OFD's partial L2 distance (Heo et al., ICCV 2019) between the student's transformed pre-ReLU map
    ``source`` and the teacher's ``target`` ``(B, C, H, W)``, ``margin`` per channel ``(C,)``.

    Where the teacher's response is positive, ``(s - t)^2``; where it is negative (the ReLU would discard it),
    only a student response above it counts: ``(s - t)^2`` if ``t > margin`` and ``s > t``, ``(s - margin)^2`` if
    ``t <= margin`` and ``s > margin``. Summed over channels and positions, averaged over the batch.
    """
    m = margin.view(1, -1, 1, 1).to(source)
    t = target.detach()
    loss = ((source - m) ** 2 * ((source > m) & (t <= m)) + (source - t) ** 2 * ((source > t) & (t > m) & (t <= 0))
            + (source - t) ** 2 * (t > 0))
    return loss.mean(0).sum()


def hcl(fs: list[torch.Tensor], ft: list[torch.Tensor]) -> torch.Tensor:
    """ReviewKD's hierarchical context loss (Chen et al., CVPR 2021), summed over the pairs of maps
    ``(B, C, H, W)``: per pair, the MSE of the maps and of their 4x4, 2x2 and 1x1 average pools (the pools
    smaller than the map), weighted 1, 1/2, 1/4, 1/8 and divided by the weights' sum."""
    total = 0.0
    for s, t in zip(fs, ft):
        t = t.detach()
        loss, weight, weights = F.mse_loss(s, t), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= s.shape[2]:
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size))
            weights += weight
        total = total + loss / weights
    return total


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def reverse_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The gradient reversal layer (Ganin & Lempitsky, ICML 2015): ``x`` forward, ``-scale`` times the gradient
    backward. CTKD's temperature goes through it: the student minimises the KD loss, the temperature maximises it."""
    return _Reverse.apply(x, scale)


def ctkd_lambda(epoch: int, epochs: int, loops: float) -> float:
    """CTKD's curriculum (Li et al., AAAI 2023): the reversal's scale at ``epoch`` (1-based) rises on a cosine
    from 0 to 1 over the first ``loops`` share of the ``epochs`` and stays 1: ``(1 - cos(pi * min(e / L, 1))) / 2``
    with ``L = loops * epochs`` (the authors' CosineDecay from 0 to -1 over 10 epochs, its sign in the reversal)."""
    return (1 - math.cos(math.pi * min(epoch / max(loops * epochs, 1e-12), 1.0))) / 2


LOSSES = {"kd": kd, "feature": feature, "geometry": geometry, "rkd": rkd, "sp": sp, "cc": cc, "dkd": dkd, "at": at,
          "pkt": pkt, "nst": nst, "vid": vid, "dist": dist, "crd": crd_nce,
          "ofd": ofd, "reviewkd": hcl, "ctkd": kd}
