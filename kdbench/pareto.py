"""Pareto fronts of two maximised objectives: the non-dominated mask, the 2-D hypervolume, the knee."""

from __future__ import annotations

import numpy as np

__all__ = ["pareto_mask", "pareto_ranks", "hypervolume_2d", "knee_index"]


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``points`` ``(..., n, k)``, every objective maximised
    (leading dimensions: independent point sets, e.g. bootstrap resamples).

    Row ``i`` is dominated when some row is ``>=`` on every objective and ``>`` on at least one.
    Duplicates do not dominate each other: all copies of a non-dominated point are kept.
    """
    p = np.asarray(points, dtype=float)
    if p.size == 0:
        return np.zeros(p.shape[:-1], dtype=bool)
    ge = (p[..., :, None, :] >= p[..., None, :, :]).all(-1)  # ge[..., j, i]: row j >= row i everywhere
    gt = (p[..., :, None, :] > p[..., None, :, :]).any(-1)
    return ~(ge & gt).any(-2)


def pareto_ranks(points: np.ndarray) -> np.ndarray:
    """Non-dominated sorting: 0 for the front, 1 for the front of the rest, and so on (one dominance matrix, then
    each front peeled off by counting the dominators left, as NSGA-II's fast sort does)."""
    p = np.asarray(points, dtype=float)
    dominates = ((p[:, None, :] >= p[None, :, :]).all(-1) & (p[:, None, :] > p[None, :, :]).any(-1)).astype(int)
    dominators = dominates.sum(0)  # dominators[i]: rows dominating row i
    rank = np.full(len(p), -1)
    level = 0
    while (rank < 0).any():
        front = np.flatnonzero((rank < 0) & (dominators == 0))
        rank[front] = level
        dominators -= dominates[front].sum(0)
        level += 1
    return rank


def hypervolume_2d(points: np.ndarray, reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` ``(n, 2)`` and bounded below by ``reference`` (both maximised).

    Points not strictly better than the reference on both objectives add nothing.
    """
    p = np.asarray(points, dtype=float).reshape(-1, 2)
    rx, ry = reference
    p = p[(p[:, 0] > rx) & (p[:, 1] > ry)]
    if len(p) == 0:
        return 0.0
    p = p[pareto_mask(p)]
    p = p[np.lexsort((p[:, 1], -p[:, 0]))]  # x descending; along a front y then ascends
    area, y_prev = 0.0, ry
    for x, y in p:
        if y > y_prev:
            area += (x - rx) * (y - y_prev)
            y_prev = y
    return float(area)


def knee_index(front: np.ndarray) -> int:
    """Index (into ``front``) of the knee: the point nearest the utopia corner after scaling each
    objective to [0, 1] over the front. With one point, that point.
    """
    f = np.asarray(front, dtype=float).reshape(-1, 2)
    if len(f) == 0:
        raise ValueError("an empty front has no knee")
    lo, hi = f.min(0), f.max(0)
    scaled = (f - lo) / np.where(hi > lo, hi - lo, 1.0)
    return int(np.argmin(((1.0 - scaled) ** 2).sum(1)))
