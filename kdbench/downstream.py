"""What a kept geometry is for, measured: retrieval (mAP@R, R@1) and clustering (NMI, ARI of k-means).

Retrieval follows Musgrave, Belongie & Lim, "A Metric Learning Reality Check" (ECCV 2020): each query's
neighbours are ranked by cosine similarity in a reference set (here: test queries, the training split as the
reference); ``R`` is the number of reference samples of the query's class, and

    AP@R(q) = (1 / R) * sum_{i <= R} P(i) * rel(i),   P(i) = precision among the first i neighbours,

mAP@R its mean over the queries, R@1 the share of queries whose nearest neighbour has their class. Queries run
in chunks on the features' device: no (N x N) matrix on the host. Clustering is k-means on the same device,
scored by NMI and ARI (checked against scikit-learn's own functions in the tests).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import FINAL

__all__ = ["retrieval", "clustering", "kmeans", "nmi", "ari", "spearman", "within_bands", "payoff", "DOWNSTREAM"]


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


def kmeans(x: torch.Tensor, k: int, seed: int = 0, n_init: int = 4, max_iter: int = 300, tol: float = 1e-4) -> torch.Tensor:
    """Cluster labels (N,) of Lloyd's k-means on ``x``'s device, as scikit-learn's ``KMeans`` runs it: greedy
    k-means++ seeding (Arthur & Vassilvitskii, 2007; 2 + ln k candidates drawn per centre, the one that lowers the
    potential most kept), Lloyd's iterations until the centres move less than ``tol`` times the features' mean
    variance, the best of ``n_init`` seedings by inertia. Every draw comes from a CPU generator seeded with
    ``seed``: the same labels on any run. A cluster left empty keeps its centre."""
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    n, sq = x.shape[0], (x * x).sum(1)
    d2_to = lambda c: (sq[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]).clamp_(min=0)  # (N, len(c))
    candidates, stop = 2 + int(math.log(k)), tol * float(x.var(0, unbiased=False).mean())
    best, best_inertia = None, math.inf
    for _ in range(n_init):
        chosen = [int(torch.randint(n, (1,), generator=g))]
        d2 = d2_to(x[chosen])[:, 0]
        for _ in range(1, k):
            p = d2.cpu()
            drawn = torch.multinomial(p if float(p.sum()) > 0 else torch.ones(n, dtype=p.dtype), candidates,
                                      replacement=True, generator=g)
            potential = torch.minimum(d2[:, None], d2_to(x[drawn.to(x.device)]))  # (N, candidates)
            j = int(potential.sum(0).argmin())
            chosen.append(int(drawn[j]))
            d2 = potential[:, j]
        c = x[chosen]
        for _ in range(max_iter):
            assign = d2_to(c).argmin(1)
            counts = torch.bincount(assign, minlength=k)
            sums = torch.zeros_like(c).index_add_(0, assign, x)
            new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
            shift, c = float(((new - c) ** 2).sum()), new
            if shift <= stop:
                break
        dist = d2_to(c)
        assign = dist.argmin(1)
        inertia = float(dist.gather(1, assign[:, None]).sum())
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best


def _contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)
    return table


def nmi(labels, found) -> float:
    """Normalised mutual information, arithmetic-mean normalisation: I(a; b) / ((H(a) + H(b)) / 2), natural logs;
    1 where both labelings have a single class."""
    t = _contingency(np.asarray(labels), np.asarray(found))
    n = t.sum()
    pa, pb, pab = t.sum(1) / n, t.sum(0) / n, t / n
    h = lambda p: float(-(p[p > 0] * np.log(p[p > 0])).sum())
    ha, hb = h(pa), h(pb)
    if ha == 0 and hb == 0:
        return 1.0
    nz = pab > 0
    mi = float((pab[nz] * np.log(pab[nz] / np.outer(pa, pb)[nz])).sum())
    return mi / ((ha + hb) / 2) if ha + hb > 0 else 0.0


def ari(labels, found) -> float:
    """Adjusted Rand index (Hubert & Arabie, 1985) from the pair counts of the contingency table."""
    t = _contingency(np.asarray(labels), np.asarray(found))
    pairs = lambda v: float((v * (v - 1) / 2).sum())
    index, rows, cols, total = pairs(t), pairs(t.sum(1)), pairs(t.sum(0)), pairs(np.array([t.sum()]))
    expected = rows * cols / total if total else 0.0
    top = (rows + cols) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)



def clustering(features: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0, n_init: int = 4) -> dict:
    """``{"nmi": ..., "ari": ...}`` of k-means (:func:`kmeans`) with ``num_classes`` clusters on the L2-normalised
    features against the labels."""
    x = F.normalize(features.float(), dim=1)
    found = kmeans(x, min(num_classes, x.shape[0]), seed, n_init).cpu().numpy()
    y = labels.cpu().numpy()
    return {"nmi": nmi(y, found), "ari": ari(y, found)}


# --- does keeping the geometry pay off? ---------------------------------------------------------------------------

DOWNSTREAM = (*FINAL[1:], FINAL[0])  # the measures a kept geometry is for, kNN last
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
