"""Every picture kdbench draws of a results folder: the accuracy-vs-geometry front on configuration means
(``pareto.png``), each objective against each searched hyperparameter (``slices.png``), the shown configurations'
seed-mean centroid-similarity matrices beside the teacher's (``geometry.png``) and their loss and metric curves over
the epochs (``curves.png``, the paper's Figure 1 generalised); and what they show, as numbers (the class pairs moved
most, the payoff of the geometry). Matplotlib is imported only when a picture is drawn."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from . import stats
from .matrices import Matrices, cluster_order, moved_pairs, read_matrices
from .metrics import DEFAULT_OBJECTIVES, FINAL, METRICS
from .results import Folder, read_folder, search_of

__all__ = ["plot_front", "plot_slices", "shown_configurations", "geometry_of", "moved", "plot_geometry", "plot_curves",
           "curve_data", "save_plots", "geometry_summary"]


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
    search = search_of(folder.study)
    space = [p for p in search.get("space") or () if p["name"] != "method" and p["name"] in df.columns]
    search = df[df["stage"] == "search"] if "stage" in df.columns else df
    if not space or search.empty:
        return False
    plt = _pyplot()
    objectives = search.get("objectives") or DEFAULT_OBJECTIVES
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


MAX_SHOWN = 5  # configurations a picture shows side by side (readable at 100 classes)


def shown_configurations(df: pd.DataFrame, front_ids=(), k: int = MAX_SHOWN) -> list[tuple[str, str, list[str]]]:
    """``(config_id, label, trial_ids)`` of the configurations the pictures show: the baseline's (most seeds), the
    geometry method's best (by test top-1; where a folder has it beside others), then the front's (by test top-1),
    at most ``k``; else the best by test top-1. Only the runs a claim rests on."""
    claims = stats.claim_rows(df)
    if claims.empty:
        return []
    groups = claims.groupby("config_id", sort=False)
    mean = groups["test_top1"].mean() if "test_top1" in claims.columns else groups.size().astype(float)
    order = list(mean.sort_values(ascending=False).index)
    method = lambda c: str(groups.get_group(c)["method"].iloc[0])
    base = [c for c in sorted(order, key=lambda c: -len(groups.get_group(c))) if method(c) == "baseline"][:1]
    base += [c for c in order if method(c) == "geometry"][:1]
    chosen = base + [c for c in order if c in set(front_ids) and c not in base]
    chosen += [c for c in order if c not in chosen]
    out = []
    for c in chosen[:k]:
        g = groups.get_group(c)
        out.append((str(c), f"{g['method'].iloc[0]} · {str(c)[:6]} · {len(g)} seed{'s' * (len(g) != 1)}",
                    [str(t) for t in g["trial_id"]]))
    return out


def geometry_of(m: Matrices, shown, split: str = "test") -> list[tuple[str, np.ndarray, np.ndarray, int]]:
    """Per shown configuration with kept matrices: (label, seed-mean matrix, its std, runs)."""
    out = []
    for _, label, trials in shown:
        got = m.mean(trials, split)
        if got is not None:
            out.append((label, *got))
    return out


def _split_of(m: Matrices) -> str:
    return "test" if "test" in m.teacher else "val"


def moved(folder: Folder, shown, k: int = 3) -> list[dict]:
    """Per shown configuration, the ``k`` class pairs whose similarity moved most from the teacher's:
    ``{"config", "pairs": [...]}`` (see :func:`kdbench.matrices.moved_pairs`); empty without kept matrices."""
    m = read_matrices(folder.path)
    if not m:
        return []
    split = _split_of(m)
    return [{"config": label, "split": split, "runs": n, "pairs": moved_pairs(m.teacher[split], mean, std, m.classes, k)}
            for label, mean, std, n in geometry_of(m, shown, split)]


def plot_geometry(folder: Folder, shown, path: str | Path) -> bool:
    """The teacher's matrix, then per shown configuration its seed-mean matrix (top) and the difference from the
    teacher's (below); the classes in one order (a clustering of the teacher's matrix), one colour scale for the
    matrices and one for the differences, class names on the axes where they fit. False: nothing kept."""
    m = read_matrices(folder.path)
    split = _split_of(m) if m else "test"
    students = geometry_of(m, shown, split) if m else []
    if not students:
        return False
    plt = _pyplot()
    teacher = m.teacher[split]
    n = teacher.shape[0]
    order = cluster_order(teacher)
    names = [m.classes[i] for i in order] if len(m.classes) == n else [str(i) for i in order]
    off = ~np.eye(n, dtype=bool)
    low = min(float(teacher[off].min()), *(float(s[off].min()) for _, s, _, _ in students)) if n > 1 else -1.0
    diffs = [s - teacher for _, s, _, _ in students]
    span = max(float(np.abs(d[off]).max()) if n > 1 else 0.0 for d in diffs) or 1e-6
    side = 2.6 + 0.055 * n
    fig, axes = plt.subplots(2, 1 + len(students), figsize=(side * (1 + len(students)) + 1.2, 2 * side + 0.6), dpi=100,
                             squeeze=False, layout="constrained")
    font = max(3.0, min(8.0, 360.0 / n))

    def show(ax, a, title, x=True, y=True, **kw):
        """One matrix; its class names only where no neighbour in the same row (y) or column (x) shows them: the
        classes are in one order everywhere (and a CIFAR-100 figure measured 2,200 tick labels in 8.7 s)."""
        im = ax.imshow(a[np.ix_(order, order)], interpolation="nearest", **kw)
        ax.set_title(title, fontsize=9)
        ticks = np.arange(n) if n <= 120 else np.arange(0, n, max(1, n // 40))
        ax.set_xticks(ticks if x else [], [names[i] for i in ticks] if x else [], rotation=90, fontsize=font)
        ax.set_yticks(ticks if y else [], [names[i] for i in ticks] if y else [], fontsize=font)
        return im

    im = show(axes[0][0], teacher, f"teacher ({split})", cmap="viridis", vmin=low, vmax=1.0)
    axes[1][0].axis("off")
    axes[1][0].text(0.5, 0.5, "top: each configuration's student matrix,\nthe mean over its seeds\n\nbelow: that mean "
                              "minus the teacher's\n(red: closer than the teacher has them,\nblue: further apart)",
                    ha="center", va="center", fontsize=8, transform=axes[1][0].transAxes)
    for j, ((label, s, _, _runs), d) in enumerate(zip(students, diffs), start=1):
        show(axes[0][j], s, label, x=False, y=False, cmap="viridis", vmin=low, vmax=1.0)
        dm = show(axes[1][j], d, "minus the teacher's", y=j == 1, cmap="RdBu_r", vmin=-span, vmax=span)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.02, pad=0.01, label="cosine similarity of class centroids")
    fig.colorbar(dm, ax=list(axes[1][1:]), fraction=0.02, pad=0.01, label="student - teacher")
    fig.suptitle(f"{folder.name}: class-centroid similarity ({split} split)\nclasses ordered by a clustering of the "
                 f"teacher's matrix", fontsize=10)
    _save(fig, path)
    return True


def curve_data(folder: Folder, shown) -> dict[str, list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]]:
    """What ``curves.png`` draws: per panel (``train_loss``, each ``loss_<term>`` the shown configurations train
    with, top-1 and geom_corr on the split evaluated at more epochs — val on a tie —, and a final measure a search
    evaluated every epoch), per shown configuration: (label, epochs, mean over its seeds, min, max), only the
    epochs that were evaluated."""
    ep = folder.epochs
    if ep is None or ep.empty or not shown:
        return {}
    ep = ep.assign(trial_id=ep["trial_id"].astype(str))
    evaluated = lambda s: ep[f"{s}_top1"].notna().sum() if f"{s}_top1" in ep.columns else -1
    split = "val" if evaluated("val") >= evaluated("test") else "test"
    measured = [f"{split}_{m}" for m in FINAL]  # a search objective's
    panels = ["train_loss", *sorted(c for c in ep.columns if c.startswith("loss_")), f"{split}_top1", f"{split}_geom_corr",
              *(c for c in measured if c in ep.columns and ep[c].notna().groupby(ep["trial_id"]).sum().max() > 1)]
    out = {}
    for c in (c for c in panels if c in ep.columns and ep[c].notna().any()):
        lines = []
        for _, label, trials in shown:
            by = ep[ep["trial_id"].isin(trials)].dropna(subset=[c]).groupby("epoch")[c]
            if len(by):
                lines.append((label, by.mean().index.to_numpy(), by.mean().to_numpy(), by.min().to_numpy(),
                              by.max().to_numpy()))
        if lines:
            out[c] = lines
    return out


def plot_curves(folder: Folder, shown, path: str | Path) -> bool:
    """:func:`curve_data` drawn, one panel per quantity: the mean over seeds, their min-max band where a
    configuration has more than one. False: no history."""
    data = curve_data(folder, shown)
    if not data:
        return False
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    cols = min(4, len(data))
    rows = -(-len(data) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), dpi=110, squeeze=False)
    colours = plt.get_cmap("tab10")
    labels = [label for _, label, _ in shown]
    for i, (c, lines) in enumerate(data.items()):
        ax = axes[i // cols][i % cols]
        for label, x, mean, lo, hi in lines:
            colour = colours(labels.index(label) % 10)
            ax.plot(x, mean, color=colour, linewidth=1.3, label=label, marker="o" if len(x) < 3 else None)
            if (hi > lo).any():
                ax.fill_between(x, lo, hi, color=colour, alpha=0.2, linewidth=0)
        ax.set_title(c.replace("loss_", "loss term: "), fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for i in range(len(data), rows * cols):
        axes[i // cols][i % cols].axis("off")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=min(4, len(names)), frameon=False)
    fig.suptitle(f"{folder.name}: training curves, mean over seeds (band: min-max)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    _save(fig, path)
    return True


def save_plots(path: str | Path, front_ids=()) -> list[str]:
    """``geometry.png`` and ``curves.png`` of the folder at ``path`` (each atomically); the names written."""
    folder = read_folder(path)
    from .report import trials_frame

    shown = shown_configurations(trials_frame([folder]), front_ids)
    written = []
    for name, draw in (("geometry.png", plot_geometry), ("curves.png", plot_curves)):
        tmp = folder.path / f".{name}.tmp.png"
        if draw(folder, shown, tmp):
            tmp.replace(folder.path / name)
            written.append(name)
    return written


def geometry_summary(folders: list[Folder], df: pd.DataFrame, front_ids=()) -> dict:
    """What ``compare`` adds about the geometry, per folder: the most-moved class pairs of its shown configurations
    and, where it has enough runs, whether geom_corr goes with the downstream measures (kdbench.downstream.payoff)."""
    from .downstream import payoff

    moved_by, payoff_by = {}, {}
    for f in folders:
        mine = df[df["study"] == f.name] if "study" in df.columns else df
        shown = shown_configurations(mine, front_ids)
        if shown:
            moved_by[f.name] = moved(f, shown)
        split = "test" if "test_geom_corr" in mine.columns and mine["test_geom_corr"].notna().any() else "val"
        p = payoff(stats.claim_rows(mine), split=split) if len(mine) else []
        if p:
            payoff_by[f.name] = p
    return {"moved_pairs": {k: v for k, v in moved_by.items() if v}, "payoff": payoff_by}
