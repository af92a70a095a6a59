"""What a kept geometry is for, measured: retrieval (mAP@R, R@1) and clustering (NMI, ARI of k-means).

Retrieval follows Musgrave, Belongie & Lim, "A Metric Learning Reality Check" (ECCV 2020): each query's
neighbours are ranked by cosine similarity in a reference set (here: test queries, the training split as the
reference); ``R`` is the number of reference samples of the query's class, and

    AP@R(q) = (1 / R) * sum_{i <= R} P(i) * rel(i),   P(i) = precision among the first i neighbours,

mAP@R its mean over the queries, R@1 the share of queries whose nearest neighbour has their class. Queries run
in chunks on the features' device: no (N x N) matrix on the host.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["retrieval", "clustering", "spearman", "within_bands", "payoff", "DOWNSTREAM"]


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

    from threadpoolctl import threadpool_limits

    x = F.normalize(features.float(), dim=1).cpu().numpy().astype(np.float64)
    y = labels.cpu().numpy()
    k = min(num_classes, len(x))
    with threadpool_limits(torch.get_num_threads()):  # a trial's threads, as its training has (not every core)
        found = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)
    return {"nmi": float(normalized_mutual_info_score(y, found)), "ari": float(adjusted_rand_score(y, found))}


# --- does keeping the geometry pay off? ---------------------------------------------------------------------------

DOWNSTREAM = ("map_at_r", "r_at_1", "nmi", "ari", "knn_top1")
MIN_RUNS = 12  # fewer runs than this: no answer is printed
BAND = 1.0  # width of the top-1 bands (points) inside which accuracy cannot explain a correlation


def _rank_corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row of ``x`` with the same row of ``y`` (R, n), NaN entries left out (average ranks
    for ties); NaN for a row with fewer than 3 pairs or a constant side."""
    from scipy.stats import rankdata

    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = np.where(keep, x, np.nan), np.where(keep, y, np.nan)
    rx, ry = rankdata(x, axis=1, nan_policy="omit"), rankdata(y, axis=1, nan_policy="omit")
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a row with no pair left: NaN, as meant
        dx, dy = rx - np.nanmean(rx, 1, keepdims=True), ry - np.nanmean(ry, 1, keepdims=True)
        r = np.nansum(dx * dy, 1) / np.sqrt(np.nansum(dx * dx, 1) * np.nansum(dy * dy, 1))
    return np.where(keep.sum(1) >= 3, r, np.nan)


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant or n < 3."""
    return float(_rank_corr(np.asarray(x, float)[None], np.asarray(y, float)[None])[0])


def _in_bands(x: np.ndarray, y: np.ndarray, band: np.ndarray, least: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the run-weighted mean of rho inside each band (bands with >= ``least`` runs and a defined rho),
    and the runs it rests on."""
    total, weight = np.zeros(len(x)), np.zeros(len(x))
    for b in np.unique(band[~np.isnan(band)]):
        inside = band == b
        r = _rank_corr(np.where(inside, x, np.nan), np.where(inside, y, np.nan))
        ok = (inside.sum(1) >= least) & ~np.isnan(r)
        total, weight = total + np.where(ok, r * inside.sum(1), 0), weight + np.where(ok, inside.sum(1), 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / weight, np.nan), weight


def within_bands(x, y, top1, width: float = BAND, least: int = 4) -> tuple[float, int]:
    """The run-weighted mean of Spearman's rho inside fixed-width bands of top-1 (``floor(top1 / width)``), over
    the bands with at least ``least`` runs and a defined rho; (rho, runs it rests on). NaN where no band has."""
    band = np.floor(np.asarray(top1, float) / width)[None]
    r, w = _in_bands(np.asarray(x, float)[None], np.asarray(y, float)[None], band, least)
    return float(r[0]), int(w[0])


def payoff(runs, measures=DOWNSTREAM, split: str = "test", resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Across the runs (a DataFrame of finished, full-fidelity rows), the rank correlation between ``geom_corr``
    and each downstream measure, overall and within top-1 bands, each with a 95 % percentile bootstrap interval
    (the runs resampled with replacement; ``seed`` fixed). One dict per measure the runs carry."""
    g, t = f"{split}_geom_corr", f"{split}_top1"
    out = []
    rng = np.random.default_rng(seed)
    for m in measures:
        col = f"{split}_{m}"
        if col not in runs.columns or g not in runs.columns:
            continue
        d = runs[[g, col, t]].dropna().to_numpy(float)
        if len(d) < MIN_RUNS:
            continue
        idx = rng.integers(0, len(d), size=(resamples, len(d)))
        x, y, band = d[:, 0][idx], d[:, 1][idx], np.floor(d[:, 2] / BAND)[idx]
        rho, in_band = spearman(d[:, 0], d[:, 1]), within_bands(d[:, 0], d[:, 1], d[:, 2])
        boot = [_rank_corr(x, y), _in_bands(x, y, band, 4)[0]]
        ci = [[float(v) for v in np.nanpercentile(b, [2.5, 97.5])] if np.isfinite(b).any() else [math.nan] * 2
              for b in boot]
        out.append({"measure": m, "runs": len(d), "rho": rho, "rho_ci": ci[0], "rho_in_band": in_band[0],
                    "rho_in_band_ci": ci[1], "band_runs": in_band[1], "band_width": BAND, "split": split})
    return out
