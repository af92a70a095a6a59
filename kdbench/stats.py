"""Claims over seeds: configuration means with 95% intervals, probability of improvement, the front
on means (and each configuration's probability of being on it), its stability after a confirmation,
and which configurations to confirm.

A *configuration* is everything that defines a run except its seed (``config_id``, see
:func:`kdbench.results.config_id`). A configuration's mean gets a Student-t interval by default
(mean ± t_{0.975, n-1} · s / √n, clipped to the metric's range): at 3 seeds it covers the true mean
~95% of the time (tests/test_stats.py measures it on normal, skewed and discrete draws), where
rliable's percentile bootstrap — meant for aggregates over many tasks and runs — covers ~76% (it has
only 10 distinct resamples of 3 values and no term for the unknown spread). The bootstrap stays
available (``interval="bootstrap"``), labelled as such. "Better than" is a probability of improvement
(rliable, Agarwal et al., NeurIPS 2021).

Which seeds a configuration's numbers rest on: its confirmation seeds when it has any (the search
seed picked it, so that seed's value is biased upwards — the winner's curse), else every finished
full-fidelity seed it has.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .metrics import DEFAULT_OBJECTIVES, bounds_of, sign
from .pareto import knee_index, pareto_mask, pareto_ranks

__all__ = ["mean_ci", "INTERVALS", "interval_label", "seeds_for_half_width", "p_improvement",
           "claim_rows", "summarise", "front_on_means", "p_on_front", "front_stability", "confirm_candidates",
           "oriented", "N_RESAMPLES"]

N_RESAMPLES = 10_000
# How a configuration's mean over seeds gets its 95% interval: the name --interval takes, and what tables say.
INTERVALS = {"t": "Student-t interval of the mean", "bootstrap": "percentile bootstrap of the mean"}


def interval_label(method: str = "t", confidence: float = 0.95) -> str:
    """What a caption or a json says of an interval, e.g. ``95% Student-t interval of the mean over seeds (...)``."""
    extra = f"{N_RESAMPLES} resamples, fixed seed" if method == "bootstrap" else "clipped to the metric's range"
    return f"{confidence:.0%} {INTERVALS[method]} over seeds ({extra})"


def mean_ci(values, confidence: float = 0.95, method: str = "t", bounds: tuple[float, float] | None = None,
            n_resamples: int = N_RESAMPLES, seed: int = 0):
    """The ``confidence`` interval of the mean of ``values``: the default interval of every table.

    Args:
        values: one configuration's values over seeds (NaNs dropped; fewer than 2: no interval, NaN, NaN).
            A 2-D array ``(k, n)`` of finite values gives ``k`` intervals at once (arrays of lows and highs).
        method: ``"t"`` (Student-t: mean ± t_{(1+c)/2, n-1} · s/√n) or ``"bootstrap"`` (percentile bootstrap,
            ``scipy.stats.bootstrap`` with a fixed generator, so the same numbers give the same interval).
        bounds: the metric's range (see :func:`kdbench.metrics.bounds_of`); the interval is clipped to it.

    Values without spread give the point itself (no interval can be drawn from them).
    """
    if method not in INTERVALS:
        raise ValueError(f"interval {method!r}: allowed: {', '.join(INTERVALS)}")
    from scipy import stats as sps  # here: scipy.stats costs 0.4 s to import, and `tune` needs it only at the end

    v = np.asarray(values, dtype=float)
    lo_b, hi_b = bounds if bounds is not None else (-math.inf, math.inf)
    if v.ndim == 2:  # k draws of n values each: vectorised (the coverage test's path)
        if method != "t":
            raise ValueError("mean_ci: 2-D values need method 't'")
        n = v.shape[1]
        half = sps.t.ppf((1 + confidence) / 2, n - 1) * v.std(axis=1, ddof=1) / math.sqrt(n)
        m = v.mean(axis=1)
        return np.clip(m - half, lo_b, hi_b), np.clip(m + half, lo_b, hi_b)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return math.nan, math.nan
    if np.all(v == v[0]):  # no spread: the point itself
        return float(v[0]), float(v[0])
    if method == "t":
        half = float(sps.t.ppf((1 + confidence) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
        lo, hi = float(v.mean()) - half, float(v.mean()) + half
    else:
        ci = sps.bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                           rng=np.random.default_rng(seed)).confidence_interval
        lo, hi = float(ci.low), float(ci.high)
    return max(lo, lo_b), min(hi, hi_b)


def seeds_for_half_width(std: float, half_width: float, confidence: float = 0.95, max_seeds: int = 1000) -> int | None:
    """The fewest seeds whose Student-t interval would have ``half_width`` at the observed spread ``std``
    (None: more than ``max_seeds``, or no spread to go on)."""
    if not (std > 0 and half_width > 0):
        return None
    from scipy import stats as sps

    for n in range(2, max_seeds + 1):
        if sps.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n) <= half_width:
            return n
    return None


def p_improvement(x, y) -> float:
    """P(X > Y) for one run of each, ties counted half: Mann-Whitney U of ``x`` / (n_x * n_y), as rliable."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if len(x) == 0 or len(y) == 0:
        return math.nan
    from scipy import stats as sps

    return float(sps.mannwhitneyu(x, y, alternative="two-sided").statistic / (len(x) * len(y)))


def claim_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows each configuration's numbers rest on: finished, full fidelity; confirmation seeds only
    for a configuration that has them."""
    full = df[(df["fidelity"] == "full") & (df["status"] == "completed")]
    if "stage" not in full.columns or full.empty:
        return full
    keys = ["study", "config_id"] if "study" in full.columns else ["config_id"]
    confirmed = full[full["stage"] == "confirm"].set_index(keys).index.unique()
    has = full.set_index(keys).index.isin(confirmed)
    return full[~has | (full["stage"] == "confirm").to_numpy()]


def oriented(points: np.ndarray, objectives) -> np.ndarray:
    """Objectives turned so that every column is maximised (a minimised metric's sign flipped)."""
    return np.asarray(points, dtype=float) * np.array([sign(o) for o in objectives])


def _varying(rows: pd.DataFrame, known: set) -> list[str]:
    """Hyperparameter columns that differ between configurations (what tells them apart)."""
    out = []
    for c in rows.columns:
        if c in known or c.startswith(("val_", "test_", "best_", "last_", "loss_", "train_")):
            continue
        if rows[c].dropna().nunique() > 1:
            out.append(c)
    return out


_BOOKKEEPING = {"study", "config_id", "trial_id", "stage", "stop", "file", "p_on_front", "status", "fidelity", "seed", "epochs", "point",
                "failure", "seconds", "params", "images_per_second", "method", "node", "host", "threads", "device", "resumed_from",
                "gpu_ids", "started_at", "ended_at", "peak_memory_mib", "autocast", "compile_seconds"}


def summarise(df: pd.DataFrame, metrics, keys=("config_id",), split: str = "test", compare_with=("baseline", "kd"),
              improve=DEFAULT_OBJECTIVES, interval: str = "t") -> pd.DataFrame:
    """One row per (study, group), ``keys`` naming the groups (a configuration by default).

    Each row: the group's label (for configurations: the method and the hyperparameters that vary),
    ``n`` (runs its numbers rest on, see :func:`claim_rows`), ``n_seeds``, ``seeds``, ``stage``,
    ``n_low`` and ``n_failed`` (counted, never used), and per metric ``_mean``, ``_std`` (ddof 1),
    ``_ci_low``, ``_ci_high`` (the 95% ``interval`` of :func:`mean_ci`, clipped to the metric's range; none
    for one run). ``p_improve_<m>_vs_<preset>``:
    P(improvement) on ``<split>_<m>`` over the group of each preset in ``compare_with`` (the one with
    the most seeds in the same study), when groups are configurations or methods.
    """
    keys = list(keys)
    if df.empty:
        return pd.DataFrame()
    claims = claim_rows(df)
    hp = _varying(claims, _BOOKKEEPING) if keys == ["config_id"] else []
    out, members = [], {}
    for gkey, g in df.groupby(["study", *keys], sort=False, dropna=False):
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        c = claims.loc[claims.index.intersection(g.index)]
        first = (c if len(c) else g).iloc[0]
        r = dict(zip(["study", *keys], gkey))
        if "method" not in keys:
            r["method"] = first.get("method")
        r |= {h: first.get(h) for h in hp}
        low = int((g["fidelity"] == "low").sum() - (g["status"] == "failed").sum())
        r |= {"n": len(c), "n_seeds": int(c["seed"].nunique()) if len(c) else 0,
              "seeds": " ".join(str(int(x)) for x in sorted(c["seed"].unique())) if len(c) else "",
              "stage": "confirm" if len(c) and (c["stage"] == "confirm").any() else str(first.get("stage", "")),
              "n_low": low, "n_failed": int((g["status"] == "failed").sum())}
        for m in metrics:
            v = c[m].astype(float).to_numpy() if m in c.columns else np.array([])
            v = v[np.isfinite(v)]
            lo, hi = mean_ci(v, method=interval, bounds=bounds_of(m))
            r |= {f"{m}_mean": float(v.mean()) if len(v) else math.nan,
                  f"{m}_std": float(v.std(ddof=1)) if len(v) > 1 else math.nan, f"{m}_ci_low": lo, f"{m}_ci_high": hi}
        members[len(out)] = c
        out.append(r)
    table = pd.DataFrame(out)
    if keys != ["config_id"] and "method" not in keys:
        return table
    for ref in compare_with:
        cols = [f"p_improve_{m}_vs_{ref}" for m in improve]
        table[cols] = math.nan
        for _, mine in table.groupby("study"):
            cands = mine[(mine["method"] == ref) & (mine["n"] > 0)].sort_values("n_seeds", ascending=False, kind="stable")
            if cands.empty:
                continue
            ref_rows = members[cands.index[0]]
            for i in mine.index:
                if i == cands.index[0] or table.loc[i, "n"] == 0:
                    continue
                for m, col in zip(improve, cols):
                    if f"{split}_{m}" in ref_rows.columns:
                        table.loc[i, col] = p_improvement(members[i][f"{split}_{m}"], ref_rows[f"{split}_{m}"])
        if table[cols].isna().all().all():
            table = table.drop(columns=cols)
    return table


def front_on_means(table: pd.DataFrame, objectives, split: str = "val") -> tuple[np.ndarray, int | None]:
    """Non-dominated mask of the configurations on their ``split`` means of ``objectives``, and the
    knee's index (into ``table``)."""
    cols = [f"{split}_{o}_mean" for o in objectives]
    if table.empty or any(c not in table.columns for c in cols):
        return np.zeros(len(table), dtype=bool), None
    pts = table[cols].to_numpy(float)
    ok = np.isfinite(pts).all(1)
    mask = np.zeros(len(table), dtype=bool)
    mask[np.flatnonzero(ok)] = pareto_mask(oriented(pts[ok], objectives))
    if not mask.any():
        return mask, None
    idx = np.flatnonzero(mask)
    return mask, int(idx[knee_index(oriented(pts[idx], objectives))])


def _claim_values(df: pd.DataFrame, table: pd.DataFrame, cols: list[str]) -> list[np.ndarray]:
    """Per row of ``table`` (a :func:`summarise` of configurations), the ``(n, len(cols))`` values its claim rests on."""
    claims = claim_rows(df).dropna(subset=[c for c in cols if c in df.columns])
    keys = ["study", "config_id"] if "study" in claims.columns and "study" in table.columns else ["config_id"]
    groups = {k if isinstance(k, tuple) else (k,): g[cols].to_numpy(float) for k, g in claims.groupby(keys, sort=False)}
    return [groups.get(tuple(r[k] for k in keys), np.empty((0, len(cols)))) for r in table.to_dict("records")]


def p_on_front(df: pd.DataFrame, table: pd.DataFrame, objectives, split: str = "val", n_resamples: int = 2000,
               seed: int = 0) -> np.ndarray:
    """P(on front) of each configuration of ``table``: the share of bootstrap resamples — each configuration's
    seeds resampled with replacement, independently — in which its ``split`` means are non-dominated.

    1 for a configuration that stays on the front however its seeds fall; a one-seed configuration keeps
    its one value in every resample (nothing to resample: its P(on front) says only how its rivals vary).
    """
    cols = [f"{split}_{o}" for o in objectives]
    values = _claim_values(df, table, cols)
    if not len(values) or any(len(v) == 0 for v in values):
        return np.full(len(values), math.nan)
    rng = np.random.default_rng(seed)
    means = np.stack([v[rng.integers(0, len(v), (n_resamples, len(v)))].mean(1) for v in values], axis=1)  # (R, k, 2)
    return pareto_mask(oriented(means.reshape(-1, len(cols)), objectives).reshape(means.shape)).mean(0)


def unsettled(table: pd.DataFrame, objectives, split: str = "val") -> list[dict]:
    """Pairs the seeds cannot yet separate: a front member (on ``split`` means) and a configuration it
    dominates on those means whose intervals overlap the member's on every objective (so the seeds do not
    show that it is dominated). Each pair with the seeds (each) a Student-t interval would need to tell them
    apart on the objective that needs fewest, at the pair's larger observed spread."""
    mask, _ = front_on_means(table, objectives, split)
    rows = table.to_dict("records")
    pts = oriented(table[[f"{split}_{o}_mean" for o in objectives]].to_numpy(float), objectives) if len(table) else None
    out = []
    for i in np.flatnonzero(mask):
        a = rows[i]
        for j, b in enumerate(rows):
            if mask[j] or b.get("n_seeds", 0) < 2 or a.get("n_seeds", 0) < 2 or not (pts[i] >= pts[j]).all():
                continue
            if all(max(a[f"{split}_{o}_ci_low"], b[f"{split}_{o}_ci_low"]) <= min(a[f"{split}_{o}_ci_high"], b[f"{split}_{o}_ci_high"])
                   for o in objectives):
                need = {o: seeds_for_half_width(max(a[f"{split}_{o}_std"], b[f"{split}_{o}_std"]),
                                                abs(a[f"{split}_{o}_mean"] - b[f"{split}_{o}_mean"]) / 2) for o in objectives}
                known = {o: n for o, n in need.items() if n is not None}
                best = min(known, key=known.get) if known else None
                out.append({"member": a["config_id"], "rival": b["config_id"], "objective": best,
                            "gap": abs(a[f"{split}_{best}_mean"] - b[f"{split}_{best}_mean"]) if best else math.nan,
                            "seeds_needed": known.get(best)})
    return out


def _single_seed_front(df: pd.DataFrame, objectives) -> pd.DataFrame:
    """The search's own front: its full-fidelity trials on their one (search) seed, on validation."""
    cols = [f"val_{o}" for o in objectives]
    s = df[(df["stage"] == "search") & (df["fidelity"] == "full") & (df["status"] == "completed")]
    s = s.dropna(subset=[c for c in cols if c in s.columns])
    if s.empty or any(c not in s.columns for c in cols):
        return s
    return s[pareto_mask(oriented(s[cols].to_numpy(float), objectives))]


def front_stability(df: pd.DataFrame, table: pd.DataFrame, objectives) -> dict | None:
    """How much of a search's single-seed validation front survives its confirmation.

    ``kept`` of ``of``: the search-front configurations that were confirmed (``of``) and are still
    non-dominated among all confirmed configurations on their confirmed validation means (``kept``).
    None before a confirmation.
    """
    if "stage" not in df.columns or not (df["stage"] == "confirm").any():
        return None
    front_ids = set(_single_seed_front(df, objectives)["config_id"])
    confirmed = table[table["stage"] == "confirm"].reset_index(drop=True)
    mask, _ = front_on_means(confirmed, objectives)
    of = confirmed[confirmed["config_id"].isin(front_ids)]
    kept = confirmed[mask & confirmed["config_id"].isin(front_ids).to_numpy()]
    return {"kept": int(len(kept)), "of": int(len(of)), "search_front": sorted(front_ids),
            "kept_ids": sorted(kept["config_id"])}


def confirm_candidates(df: pd.DataFrame, objectives, top: int) -> pd.DataFrame:
    """The search trials worth more seeds, best first, one per configuration, at most ``top``.

    Order: non-dominated rank on the validation objectives (the front first), then, within a rank,
    the distance to the front's knee after scaling each objective to [0, 1] over the trials (the knee
    itself first).
    """
    cols = [f"val_{o}" for o in objectives]
    s = df[(df["stage"] == "search") & (df["fidelity"] == "full") & (df["status"] == "completed")]
    s = s.dropna(subset=[c for c in cols if c in s.columns])
    if s.empty:
        return s
    pts = oriented(s[cols].to_numpy(float), objectives)
    rank = pareto_ranks(pts)
    lo, hi = pts.min(0), pts.max(0)
    scaled = (pts - lo) / np.where(hi > lo, hi - lo, 1.0)
    front = np.flatnonzero(rank == 0)
    knee = scaled[front[knee_index(pts[front])]]
    s = s.assign(_rank=rank, _dist=np.sqrt(((scaled - knee) ** 2).sum(1)))
    s = s.sort_values(["_rank", "_dist", "trial_id"]).drop_duplicates("config_id")
    return s.head(top).drop(columns=["_rank", "_dist"])
