"""What a kept geometry is for, measured: retrieval (mAP@R, R@1) and clustering (NMI, ARI of k-means).

Retrieval follows Musgrave, Belongie & Lim, "A Metric Learning Reality Check" (ECCV 2020): each query's
neighbours are ranked by cosine similarity in a reference set (here: test queries, the training split as the
reference); ``R`` is the number of reference samples of the query's class, and

    AP@R(q) = (1 / R) * sum_{i <= R} P(i) * rel(i),   P(i) = precision among the first i neighbours,

mAP@R its mean over the queries, R@1 the share of queries whose nearest neighbour has their class. Queries run
in chunks on the features' device: no (N x N) matrix on the host.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["retrieval", "clustering"]


def retrieval(query_features: torch.Tensor, query_labels: torch.Tensor, ref_features: torch.Tensor,
              ref_labels: torch.Tensor, chunk: int = 512) -> dict:
    """``{"map_at_r": ..., "r_at_1": ...}`` (both in [0, 1]) of the queries against the reference set."""
    ref = F.normalize(ref_features.float(), dim=1)
    counts = torch.bincount(ref_labels, minlength=int(max(ref_labels.max(), query_labels.max())) + 1)
    r_max = int(counts[query_labels].max()) if len(query_labels) else 0
    ap_sum = query_features.new_zeros((), dtype=torch.float64)
    hits1 = query_features.new_zeros((), dtype=torch.float64)
    ranks = torch.arange(1, max(r_max, 1) + 1, device=ref.device, dtype=torch.float64)  # (R_max,)
    for q0 in range(0, query_features.shape[0], chunk):
        q = F.normalize(query_features[q0:q0 + chunk].float(), dim=1)
        y = query_labels[q0:q0 + chunk]
        top = (q @ ref.T).topk(max(r_max, 1), dim=1).indices  # (b, R_max), nearest first
        rel = (ref_labels[top] == y[:, None]).double()  # (b, R_max)
        r = counts[y].double()  # (b,): each query's R
        within = ranks[None, :] <= r[:, None]  # only the first R of each query count
        precision = rel.cumsum(1) / ranks[None, :]
        ap_sum = ap_sum + ((precision * rel * within).sum(1) / r.clamp(min=1)).sum()
        hits1 = hits1 + rel[:, 0].sum()
    n = max(query_features.shape[0], 1)
    return {"map_at_r": float(ap_sum) / n, "r_at_1": float(hits1) / n}


def clustering(features: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0, n_init: int = 4) -> dict:
    """``{"nmi": ..., "ari": ...}`` of k-means with ``num_classes`` clusters on the L2-normalised features
    (scikit-learn, a fixed seed, ``n_init`` initialisations) against the labels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    x = F.normalize(features.float(), dim=1).cpu().numpy().astype(np.float64)
    y = labels.cpu().numpy()
    k = min(num_classes, len(x))
    found = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)
    return {"nmi": float(normalized_mutual_info_score(y, found)), "ari": float(adjusted_rand_score(y, found))}
