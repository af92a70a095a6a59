"""Class-centroid geometry: centroids, their cosine-similarity matrix, and the metrics on it.

The geometry of a feature space is summarised by the ``C x C`` matrix ``S`` of cosine similarities
between class centroids (DESIGN §4). ``geometry_corr`` and ``geom_err`` compare a student's ``S``
with the teacher's; ``linear_cka`` compares per-sample features; ``knn_top1`` measures retrieval.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .parallel import all_sum, world

__all__ = ["class_centroids", "similarity_matrix", "geometry_corr", "geom_err", "linear_cka",
           "knn_top1", "CentroidMemory", "class_sums"]


def class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Per-class feature sums ``(C, d)`` and counts ``(C,)``, without a host sync."""
    sums = features.new_zeros(num_classes, features.shape[1]).index_add(0, labels, features)
    counts = features.new_zeros(num_classes).index_add(0, labels, features.new_ones(labels.shape[0]))
    return sums, counts


def class_centroids(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean feature of each class, ``(C, d)``; a class with no sample gets a zero row."""
    sums, counts = class_sums(features, labels, num_classes)
    return sums / counts.clamp(min=1).unsqueeze(1)


def similarity_matrix(centroids: torch.Tensor) -> torch.Tensor:
    """Cosine similarities between the rows of ``centroids`` ``(C, d)`` -> ``(C, C)``.

    A zero row has similarity 0 with everything (including itself).
    """
    z = F.normalize(centroids, dim=1, eps=1e-12)
    return z @ z.T


def _upper(s: torch.Tensor) -> torch.Tensor:
    i, j = torch.triu_indices(s.shape[0], s.shape[1], offset=1, device=s.device)
    return s[i, j]


def geometry_corr(s_student: torch.Tensor, s_teacher: torch.Tensor) -> float:
    """Pearson correlation of the strict upper triangles of two similarity matrices (1 = same).

    Clamped to [-1, 1]: identical inputs can round to 1 + 2e-16 on some CPUs. A constant matrix (a student
    whose features collapsed, e.g. to zero) keeps no geometry: 0, not NaN, so a search can still rank it.
    """
    a, b = _upper(s_student).double(), _upper(s_teacher).double()
    a, b = a - a.mean(), b - b.mean()
    return float(((a @ b) / (a.norm() * b.norm()).clamp(min=1e-300)).clamp(-1.0, 1.0))


def geom_err(s_student: torch.Tensor, s_teacher: torch.Tensor) -> float:
    """Relative Frobenius error ``||S_s - S_t||_F / ||S_t||_F``."""
    s, t = s_student.double(), s_teacher.double()
    return float((s - t).norm() / t.norm().clamp(min=1e-300))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) of two feature sets ``(n, d1)``, ``(n, d2)`` on the same samples.

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc``, ``Yc``.
    """
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    num = (y.T @ x).norm() ** 2
    return float((num / ((x.T @ x).norm() * (y.T @ y).norm()).clamp(min=1e-300)).clamp(0.0, 1.0))  # rounding


def knn_top1(ref_features: torch.Tensor, ref_labels: torch.Tensor, query_features: torch.Tensor,
             query_labels: torch.Tensor, num_classes: int, k: int = 10, chunk: int = 1024) -> float:
    """Top-1 (%) of a k-nearest-neighbour vote (cosine similarity, one vote per neighbour).

    Ties are broken towards the lower class index. Queries run in chunks to bound memory.
    """
    ref = F.normalize(ref_features.float(), dim=1)
    k = min(k, ref.shape[0])
    correct = query_labels.new_zeros(())
    for q0 in range(0, query_features.shape[0], chunk):
        q = F.normalize(query_features[q0:q0 + chunk].float(), dim=1)
        nn_idx = (q @ ref.T).topk(k, dim=1).indices  # (q, k)
        votes = F.one_hot(ref_labels[nn_idx], num_classes).sum(1)  # (q, C)
        correct = correct + (votes.argmax(1) == query_labels[q0:q0 + chunk]).sum()
    return float(correct) * 100.0 / max(query_features.shape[0], 1)


class CentroidMemory(torch.nn.Module):
    """EMA bank of per-class student centroids used by the geometry loss (DESIGN §4).

    For each class ``c`` present in the batch with batch mean ``b_c``, the differentiable centroid is
    ``mu_c = m * M_c + (1 - m) * b_c`` with ``M_c`` detached; absent classes use ``M_c``. After the
    step, ``M_c <- m * M_c + (1 - m) * b_c.detach()``. A slot never filled is initialised by its
    first batch mean. All of it is tensor ops: no host sync per step. Data-parallel, ``b_c`` is the global
    batch's (every worker holds the same bank, the one a single process would).

    Args:
        num_classes: C.
        dim: feature width d of the student.
        momentum: m in [0, 1); 0 means per-batch centroids.
    """

    def __init__(self, num_classes: int, dim: int, momentum: float):
        super().__init__()
        self.momentum = float(momentum)
        self.register_buffer("bank", torch.zeros(num_classes, dim))
        self.register_buffer("filled", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def fill(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Initialise every slot from a full pass (e.g. the initial student over the train split)."""
        sums, counts = class_sums(features.float(), labels, self.bank.shape[0])
        self.bank.copy_(sums / counts.clamp(min=1).unsqueeze(1))
        self.filled.copy_(counts > 0)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Differentiable centroids ``(C, d)`` for this batch; updates the bank in place."""
        sums, counts = class_sums(features.float(), labels, self.bank.shape[0])
        if world().size > 1:  # data-parallel: the global batch's sums and counts, in one all-reduce
            total = all_sum(torch.cat([sums, counts[:, None]], 1))
            sums, counts = total[:, :-1], total[:, -1].detach()
        present = (counts > 0).unsqueeze(1)  # (C, 1)
        batch_mean = sums / counts.clamp(min=1).unsqueeze(1)  # (C, d)
        m = self.momentum
        filled = self.filled.clone().unsqueeze(1)  # (C, 1); a copy, as the bank is updated below
        blended = torch.where(filled, m * self.bank + (1 - m) * batch_mean, batch_mean)
        mu = torch.where(present, blended, self.bank)
        with torch.no_grad():
            self.bank.copy_(mu.detach())
            self.filled |= present.squeeze(1)
        return mu
