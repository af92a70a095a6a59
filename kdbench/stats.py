"""Claims over seeds: configuration means with 95% intervals, probability of improvement, the front
on means, its stability after a confirmation, and which configurations to confirm.

A *configuration* is everything that defines a run except its seed (``config_id``, see
:func:`kdbench.results.config_id`). Following rliable (Agarwal et al., NeurIPS 2021, "Deep RL at
the edge of the statistical precipice"), few-run results are reported as a mean with a percentile
bootstrap interval over seeds, and "better than" as a probability of improvement.

Which seeds a configuration's numbers rest on: its confirmation seeds when it has any (the search
seed picked it, so that seed's value is biased upwards — the winner's curse), else every finished
full-fidelity seed it has.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .pareto import knee_index, pareto_mask, pareto_ranks

__all__ = ["mean_ci", "p_improvement", "claim_rows", "summarise", "front_on_means", "front_stability",
           "confirm_candidates", "oriented", "N_RESAMPLES"]

N_RESAMPLES = 10_000
MINIMISED = {"geom_err"}


def mean_ci(values, confidence: float = 0.95, n_resamples: int = N_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (NaNs dropped; fewer than 2: no interval).

    ``scipy.stats.bootstrap`` with a fixed generator, so the same numbers give the same interval.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return math.nan, math.nan
    if np.all(v == v[0]):  # no spread: the bootstrap distribution is one point
        return float(v[0]), float(v[0])
    from scipy import stats as sps  # here: scipy.stats costs 0.4 s to import, and `tune` needs it only at the end

    ci = sps.bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                       rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


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
    """Objectives turned so that every column is maximised (``geom_err`` is minimised)."""
    p = np.asarray(points, dtype=float).copy()
    for i, o in enumerate(objectives):
        if o in MINIMISED:
            p[:, i] = -p[:, i]
    return p


def _varying(rows: pd.DataFrame, known: set) -> list[str]:
    """Hyperparameter columns that differ between configurations (what tells them apart)."""
    out = []
    for c in rows.columns:
        if c in known or c.startswith(("val_", "test_", "best_", "last_", "loss_", "train_")):
            continue
        if rows[c].dropna().nunique() > 1:
            out.append(c)
    return out


_BOOKKEEPING = {"study", "config_id", "trial_id", "stage", "status", "fidelity", "seed", "epochs", "point",
                "failure", "seconds", "params", "images_per_second", "method", "node", "host", "threads", "device", "resumed_from"}


def summarise(df: pd.DataFrame, metrics, keys=("config_id",), split: str = "test", compare_with=("baseline", "kd"),
              improve=("top1", "geom_corr")) -> pd.DataFrame:
    """One row per (study, group), ``keys`` naming the groups (a configuration by default).

    Each row: the group's label (for configurations: the method and the hyperparameters that vary),
    ``n`` (runs its numbers rest on, see :func:`claim_rows`), ``n_seeds``, ``seeds``, ``stage``,
    ``n_low`` and ``n_failed`` (counted, never used), and per metric ``_mean``, ``_std`` (ddof 1),
    ``_ci_low``, ``_ci_high`` (95% percentile bootstrap; none for one run). ``p_improve_<m>_vs_<preset>``:
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
            lo, hi = mean_ci(v)
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
