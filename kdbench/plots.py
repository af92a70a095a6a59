"""Plots of a results folder: the accuracy-vs-geometry front on configuration means, and slices of
each objective against each searched hyperparameter. Matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from . import stats
from .metrics import DEFAULT_OBJECTIVES, METRICS
from .results import Folder

__all__ = ["plot_front", "plot_slices"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(path)
    fig.clf()
    _pyplot().close(fig)


def plot_front(df: pd.DataFrame, fr, folders: list[Folder], path: str | Path) -> None:
    """Two panels, validation (where the front is decided) and the reported split: each configuration's
    mean with 95% intervals on both axes, its seeds faint behind, its marker as opaque as its P(on front)
    (a floor of 0.25 keeps every configuration visible); confirmed configurations as squares; the front, its
    knee, the teacher's top-1."""
    plt = _pyplot()
    o1, o2 = fr.objectives
    panels = (fr.on,) if fr.on == fr.split else (fr.on, fr.split)  # no validation split: one panel
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.4), dpi=120, squeeze=False)
    axes = axes[0]
    methods = sorted(fr.points["method"].dropna().astype(str).unique()) if len(fr.points) else []
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")  # 20 presets exist: never run out of colours
    colours = {m: tuple(cmap(i % cmap.N)[:3]) for i, m in enumerate(methods)}
    claims = stats.claim_rows(df) if len(df) else df
    front_ids = set(fr.rows["config_id"]) if len(fr.rows) else set()
    for ax, split in zip(axes, panels):
        x, y = f"{split}_{o1}", f"{split}_{o2}"
        for m in methods:
            pts = fr.points[fr.points["method"] == m]
            seeds = claims[claims["config_id"].isin(pts["config_id"])] if len(claims) else claims
            if x in seeds.columns and y in seeds.columns:
                ax.scatter(seeds[x], seeds[y], s=10, color=colours[m], alpha=0.2, linewidth=0)
            for confirmed, marker in ((False, "o"), (True, "s")):
                g = pts[(pts["stage"] == "confirm") == confirmed]
                if g.empty:
                    continue
                xerr = np.abs(g[[f"{x}_ci_low", f"{x}_ci_high"]].to_numpy(float).T - g[f"{x}_mean"].to_numpy(float))
                yerr = np.abs(g[[f"{y}_ci_low", f"{y}_ci_high"]].to_numpy(float).T - g[f"{y}_mean"].to_numpy(float))
                ax.errorbar(g[f"{x}_mean"], g[f"{y}_mean"], xerr=np.nan_to_num(xerr), yerr=np.nan_to_num(yerr),
                            fmt="none", ecolor=colours[m], alpha=0.6, linewidth=1)
                on = g["config_id"].isin(front_ids).to_numpy()
                p = g["p_on_front"].to_numpy(float) if "p_on_front" in g.columns else np.ones(len(g))
                alpha = 0.25 + 0.75 * np.nan_to_num(p, nan=1.0)
                ax.scatter(g[f"{x}_mean"], g[f"{y}_mean"], s=np.where(on, 60, 28), marker=marker,
                           color=[(*colours[m], a) for a in alpha],
                           edgecolor=np.where(on, "black", "white"), linewidth=np.where(on, 1.2, 0.5), zorder=3,
                           label=f"{m}{', confirmed' if confirmed else ''} ({len(g)})" if split == fr.on else None)
        if len(fr.rows):
            if split == fr.on:
                line = fr.rows.sort_values(f"{x}_mean")
                ax.step(line[f"{x}_mean"], line[f"{y}_mean"], where="post", color="black", linewidth=1, label="front")
            if fr.knee is not None:
                ax.scatter([fr.knee[f"{x}_mean"]], [fr.knee[f"{y}_mean"]], marker="*", s=260, color="gold",
                           edgecolor="black", zorder=5, label="knee" if split == fr.on else None)
        t = [(f.study.get("teacher") or {}).get(x) for f in folders]
        for v in [v for v in t if v is not None][:1]:
            ax.axvline(v, color="grey", linestyle="--", linewidth=1)
            ax.text(v, 0.5, "teacher", rotation=90, fontsize=8, color="grey", ha="right", va="center",
                    transform=ax.get_xaxis_transform())
        ax.set_xlabel(f"{split} {o1}" + (f" ({METRICS[o1].unit})" if o1 in METRICS and METRICS[o1].unit else ""))
        ax.set_ylabel(f"{split} {o2}")
        ax.set_title((f"{'validation' if split == 'val' else split}: the front is drawn here" if split == fr.on
                      else f"{split}: the same configurations"),
                     fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Accuracy vs geometry kept, configuration means with 95% intervals ({stats.INTERVALS[fr.interval]}); "
                 f"opacity = P(on front) — {', '.join(f.name for f in folders)}",
                 fontsize=10)
    fig.legend(fontsize=7, loc="center right", frameon=False)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    _save(fig, path)


def plot_slices(df: pd.DataFrame, folder: Folder, path: str | Path) -> bool:
    """Each objective (validation) against each searched hyperparameter; early-stopped trials faint.
    Returns False (and writes nothing) for a folder without a search space."""
    study = folder.study.get("study") or {}
    space = [p for p in study.get("space") or () if p["name"] != "method" and p["name"] in df.columns]
    search = df[df["stage"] == "search"] if "stage" in df.columns else df
    if not space or search.empty:
        return False
    plt = _pyplot()
    objectives = study.get("objectives") or DEFAULT_OBJECTIVES
    fig, axes = plt.subplots(len(objectives), len(space), figsize=(3.4 * len(space), 2.8 * len(objectives)),
                             dpi=110, squeeze=False)
    full, low = search[search["fidelity"] == "full"], search[(search["fidelity"] == "low") & (search["status"] != "failed")]
    for i, o in enumerate(objectives):
        for j, p in enumerate(space):
            ax = axes[i][j]
            if f"val_{o}" in search.columns:
                ax.scatter(low[p["name"]], low[f"val_{o}"], s=12, alpha=0.25, color="tab:blue", label="stopped early")
                ax.scatter(full[p["name"]], full[f"val_{o}"], s=22, color="tab:blue", edgecolor="black",
                           linewidth=0.4, label="full fidelity")
            if p["type"] == "loguniform":
                from matplotlib.ticker import NullFormatter

                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
            if p["low"] is not None:  # the searched range, so that a corner left unexplored shows
                pad = (1 / 1.1, 1.1) if p["type"] == "loguniform" else (1, 1)
                ax.set_xlim(p["low"] * pad[0], p["high"] * pad[1])
            ax.set_xlabel(p["name"], fontsize=8)
            ax.set_ylabel(f"val {o}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{folder.name}: objectives against searched hyperparameters (one seed per trial)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True
