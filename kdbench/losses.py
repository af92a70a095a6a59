"""Distillation loss terms: one pure function of tensors each, averaged over the batch.

The training loop owns everything a term needs besides tensors (the teacher forward under
``torch.inference_mode()``, the centroid memory, trainable projections) and sums
``weight * term`` over the method's non-zero weights. ``LOSSES`` names every term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import similarity_matrix

__all__ = ["kd", "feature", "geometry", "LOSSES"]


def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logit distillation, Hinton et al. 2015: ``KL(softmax(t/T) || softmax(s/T)) * T^2``.

    KL summed over classes and averaged over the batch ("batchmean"); the ``T^2`` keeps the
    gradient scale independent of ``T``.
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature ** 2


def feature(student_projected: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets hint (Romero et al., ICLR 2015) on penultimate features: mean squared error.

    ``student_projected`` is the student's features through the loop's trainable ``d_s -> d_t``
    projection.
    """
    return F.mse_loss(student_projected.float(), teacher_features.float())


def geometry(student_centroids: torch.Tensor, teacher_centroids: torch.Tensor) -> torch.Tensor:
    """Geometry-preserving distillation (the seed paper): match class-centroid similarity matrices.

    Mean over all ``i != j`` of ``(S_s[i, j] - S_t[i, j])^2`` with ``S`` the cosine-similarity matrix
    of the class centroids (``(C, d_s)`` and ``(C, d_t)``; the widths may differ). Invariant to a
    positive rescaling of any centroid; 0 when the two geometries agree.
    """
    s = similarity_matrix(student_centroids.float())
    t = similarity_matrix(teacher_centroids.float())
    c = s.shape[0]
    off = ~torch.eye(c, dtype=torch.bool, device=s.device)
    return ((s - t) ** 2)[off].mean()


LOSSES = {"kd": kd, "feature": feature, "geometry": geometry}
