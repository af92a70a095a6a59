"""Results folders -> leaderboard, accuracy-vs-geometry Pareto front, plots and exports.

Everything here reads what ``kdbench tune`` wrote (through :mod:`kdbench.results`) and never
writes back into a results folder except the plot a user asks for.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table

from .pareto import hypervolume_2d, knee_index, pareto_mask
from .results import Folder, ResultsError, read_folder

__all__ = ["load_folders", "trials_frame", "leaderboard", "front", "Front", "plot_front", "to_markdown",
           "to_json", "leaderboard_table", "front_table", "save_summary"]

LEADER_METRICS = ("best_test_top1", "top1", "geom_corr", "geom_err", "cka", "knn_top1", "params", "train_seconds")


def load_folders(paths: list[str | Path], skip=lambda msg: None, warn=lambda msg: None) -> list[Folder]:
    """Read every folder; an unreadable one is named through ``skip`` and left out."""
    out = []
    for p in paths:
        try:
            out.append(read_folder(p))
        except ResultsError as e:
            skip(str(e))
    datasets = {f.study.get("study", {}).get("dataset") for f in out} - {None}
    if len(datasets) > 1:
        warn(f"comparing studies on different data sets ({', '.join(sorted(datasets))}): numbers are not comparable")
    return out


def trials_frame(folders: list[Folder]) -> pd.DataFrame:
    """All trials of all folders, with a ``study`` column."""
    frames = [f.trials.assign(study=f.name) for f in folders if len(f.trials)]
    if not frames:
        return pd.DataFrame(columns=["study", "trial_id", "status", "fidelity", "method"])
    df = pd.concat(frames, ignore_index=True)
    df["trial_id"] = df["trial_id"].astype(str)
    return df


def _full(df: pd.DataFrame) -> pd.DataFrame:
    """Full-fidelity finished trials: the only ones ranked or put on a front."""
    return df[(df["fidelity"] == "full") & (df["status"] == "completed")]


def _metric(split: str, m: str) -> str:
    return m if m in ("best_test_top1", "params", "train_seconds") else f"{split}_{m}"


def leaderboard(df: pd.DataFrame, folders: list[Folder], by: tuple[str, ...] = ("method",),
                split: str = "test") -> pd.DataFrame:
    """One row per (study, group): n, mean and std of the metrics over the group's full trials.

    Low-fidelity and failed trials are counted (``n_low``, ``n_failed``) but never ranked. With a
    ``baseline`` group in the same study, ``delta_top1`` and ``delta_geom_corr`` compare against it.
    A study's teacher is added as an unranked reference row; a study's reported values (e.g. the
    paper's Table 1) appear as ``reported_top1``.
    """
    for col in by:
        if col not in df.columns:
            raise ResultsError(f"--by {col}: no such column; allowed: {', '.join(sorted(map(str, df.columns)))}")
    rows = []
    for keys, g in df.groupby(["study", *by], sort=False, dropna=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        full = _full(g)
        row = dict(zip(["study", *by], keys))
        row |= {"n": len(full), "n_low": int((g["fidelity"] == "low").sum() - (g["status"] == "failed").sum()),
                "n_failed": int((g["status"] == "failed").sum())}
        for m in LEADER_METRICS:
            col = _metric(split, m)
            vals = full[col].astype(float) if col in full.columns else pd.Series(dtype=float)
            row[f"{m}_mean"] = vals.mean() if len(vals) else math.nan
            row[f"{m}_std"] = vals.std(ddof=1) if len(vals) > 1 else math.nan  # one trial: no spread to show
        rows.append(row)
    lb = pd.DataFrame(rows)
    if lb.empty:
        return lb
    lb["delta_top1"], lb["delta_geom_corr"], lb["reported_top1"] = math.nan, math.nan, math.nan
    teacher_rows = []
    for f in folders:
        mine = lb["study"] == f.name
        if "method" in by:
            base = lb[mine & (lb["method"] == "baseline")]
            if len(base) == 1:
                lb.loc[mine, "delta_top1"] = lb.loc[mine, "top1_mean"] - float(base["top1_mean"].iloc[0])
                lb.loc[mine, "delta_geom_corr"] = lb.loc[mine, "geom_corr_mean"] - float(base["geom_corr_mean"].iloc[0])
            ref = f.study.get("reference") or {}
            lb.loc[mine, "reported_top1"] = lb.loc[mine, "method"].map(lambda m: ref.get(m, math.nan))
        t = f.study.get("teacher")
        if t:
            teacher_rows.append({"study": f.name, **{c: math.nan for c in by}, "method": f"teacher ({t.get('arch')})",
                                 "n": 1, "n_low": 0, "n_failed": 0, "rank": math.nan,
                                 "best_test_top1_mean": t.get("best_test_top1"), "top1_mean": t.get(f"{split}_top1"),
                                 "knn_top1_mean": t.get(f"{split}_knn_top1"), "params_mean": t.get("params"),
                                 "train_seconds_mean": t.get("train_seconds"),
                                 "reported_top1": (f.study.get("reference") or {}).get("teacher", math.nan)})
    lb = lb.sort_values("top1_mean", ascending=False, na_position="last").reset_index(drop=True)
    ranked = lb["n"] > 0
    lb["rank"] = math.nan
    lb.loc[ranked, "rank"] = np.arange(1, ranked.sum() + 1)
    if teacher_rows:
        lb = pd.concat([lb, pd.DataFrame(teacher_rows)], ignore_index=True)
    return lb


@dataclass
class Front:
    """The non-dominated full-fidelity trials on (top-1, geom_corr) of one split."""

    rows: pd.DataFrame  # front trials, sorted by top-1 descending
    points: pd.DataFrame  # every full-fidelity trial considered
    hypervolume: float
    reference_point: tuple[float, float]
    reference_source: str
    knee: dict | None
    best: dict  # objective -> trial row
    split: str


def front(df: pd.DataFrame, split: str = "test", reference: tuple[float, float] | None = None) -> Front:
    """Pareto front of ``(<split>_top1, <split>_geom_corr)`` over full-fidelity trials.

    The hypervolume's reference point is ``reference`` if given, else the mean of the ``baseline``
    trials (the no-distillation student), else (0, -1).
    """
    x, y = f"{split}_top1", f"{split}_geom_corr"
    full = _full(df)
    if x in full.columns and y in full.columns:
        full = full.dropna(subset=[x, y])
    else:
        full = full.iloc[0:0]
    source = "given"
    if reference is None:
        base = full[full["method"] == "baseline"] if "method" in full.columns else full.iloc[0:0]
        if len(base):
            reference, source = (float(base[x].mean()), float(base[y].mean())), "baseline mean"
        else:
            reference, source = (0.0, -1.0), "(0, -1)"
    if full.empty:
        return Front(full, full, 0.0, reference, source, None, {}, split)
    pts = full[[x, y]].to_numpy(float)
    rows = full[pareto_mask(pts)].sort_values([x, y], ascending=False)
    knee = rows.iloc[knee_index(rows[[x, y]].to_numpy(float))].to_dict()
    best = {x: full.loc[full[x].idxmax()].to_dict(), y: full.loc[full[y].idxmax()].to_dict()}
    return Front(rows, full, hypervolume_2d(pts, reference), reference, source, knee, best, split)


# ---------------------------------------------------------------------------------------------
# Rendering: rich tables, markdown, JSON, a plot

def _pm(mean, std, fmt="{:.2f}") -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    s = fmt.format(mean)
    return s if std is None or (isinstance(std, float) and math.isnan(std)) else f"{s} ± {fmt.format(std)}"


def _params(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k"


def _signed(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.2f}"


LEADER_COLUMNS = [  # (header, how to format a leaderboard row)
    ("#", lambda r: "" if pd.isna(r.get("rank")) else str(int(r["rank"]))),
    ("n", lambda r: f"{int(r['n'])}" + (f" (+{int(r['n_low'])} low)" if r.get("n_low") else "")
     + (f" (+{int(r['n_failed'])} failed)" if r.get("n_failed") else "")),
    ("top-1 %", lambda r: _pm(r.get("top1_mean"), r.get("top1_std"))),
    ("best-epoch top-1 %", lambda r: _pm(r.get("best_test_top1_mean"), r.get("best_test_top1_std"))),
    ("Δ top-1", lambda r: _signed(r.get("delta_top1"))),
    ("reported top-1 %", lambda r: _pm(r.get("reported_top1"), None)),
    ("geom_corr", lambda r: _pm(r.get("geom_corr_mean"), r.get("geom_corr_std"), "{:.3f}")),
    ("Δ geom_corr", lambda r: "—" if pd.isna(r.get("delta_geom_corr", math.nan)) else f"{r['delta_geom_corr']:+.3f}"),
    ("geom_err", lambda r: _pm(r.get("geom_err_mean"), r.get("geom_err_std"), "{:.3f}")),
    ("CKA", lambda r: _pm(r.get("cka_mean"), r.get("cka_std"), "{:.3f}")),
    ("kNN top-1 %", lambda r: _pm(r.get("knn_top1_mean"), r.get("knn_top1_std"))),
    ("params", lambda r: _params(r.get("params_mean"))),
    ("train s", lambda r: _pm(r.get("train_seconds_mean"), r.get("train_seconds_std"), "{:.1f}")),
]


def _leader_cells(lb: pd.DataFrame, by: tuple[str, ...]):
    records = lb.to_dict("records")
    cols = [c for c in LEADER_COLUMNS if any(c[1](r) not in ("—", "") for r in records)]  # drop empty columns
    multi = lb["study"].nunique() > 1
    head = (["study"] if multi else []) + list(by) + [h for h, _ in cols]
    body = []
    for r in records:
        keys = ([r["study"]] if multi else []) + [("" if pd.isna(r.get(b)) else _fmt_key(r.get(b))) for b in by]
        if str(r.get("method", "")).startswith("teacher"):
            keys[-len(by)] = r["method"]
        body.append(keys + [f(r) for _, f in cols])
    return head, body


def _fmt_key(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def leaderboard_table(lb: pd.DataFrame, by: tuple[str, ...], split: str, title: str) -> Table:
    head, body = _leader_cells(lb, by)
    t = Table(title=title, caption=f"mean ± std over full-fidelity trials; top-1 and geometry on the {split} "
                                   f"split, last epoch; Δ vs the no-distillation baseline")
    for h in head:
        t.add_column(h, justify="left" if h in ("study", *by) else "right")
    for row in body:
        t.add_row(*row, style="dim" if any(str(c).startswith("teacher") for c in row) else None)
    return t


def _front_records(fr: Front, extra: tuple[str, ...] = ()) -> list[dict]:
    keep = ["study", "trial_id", "method", "seed", *extra]
    metrics = [c for c in fr.rows.columns if c.startswith(("val_", "test_")) or c == "best_test_top1"]
    hp = [c for c in ("ce", "kd", "temperature", "feature", "geometry", "momentum", "lr") if c in fr.rows.columns]
    cols = [c for c in keep + metrics + hp if c in fr.rows.columns]
    return fr.rows[cols].to_dict("records")


def front_table(fr: Front, title: str) -> Table:
    t = Table(title=title, caption=f"hypervolume {fr.hypervolume:.3f} above reference ({fr.reference_point[0]:.2f}, "
                                   f"{fr.reference_point[1]:.3f}) [{fr.reference_source}]; ★ = knee")
    hp = [c for c in ("geometry", "temperature", "momentum") if c in fr.rows.columns]
    for h in ["", "trial", "method", "val top-1 %", "val geom_corr", "test top-1 %", "test geom_corr", "CKA", "kNN %", *hp]:
        t.add_column(h, justify="right" if h not in ("trial", "method") else "left")
    for r in fr.rows.to_dict("records"):
        star = "★" if fr.knee is not None and r["trial_id"] == fr.knee["trial_id"] and r["study"] == fr.knee["study"] else ""
        t.add_row(star, str(r["trial_id"]), str(r.get("method", "")), f"{r.get('val_top1', math.nan):.2f}",
                  f"{r.get('val_geom_corr', math.nan):.3f}", f"{r.get('test_top1', math.nan):.2f}",
                  f"{r.get('test_geom_corr', math.nan):.3f}", f"{r.get(f'{fr.split}_cka', math.nan):.3f}",
                  f"{r.get(f'{fr.split}_knn_top1', math.nan):.2f}", *[_fmt_key(r.get(h)) for h in hp])
    return t


def to_markdown(lb: pd.DataFrame, by: tuple[str, ...]) -> str:
    head, body = _leader_cells(lb, by)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.generic,)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def to_json(lb: pd.DataFrame, fr: Front) -> str:
    doc = {"leaderboard": lb.to_dict("records"), "front": _front_records(fr), "hypervolume": fr.hypervolume,
           "reference_point": list(fr.reference_point), "reference_source": fr.reference_source,
           "knee": fr.knee, "best": fr.best, "split": fr.split}
    return json.dumps(_jsonable(doc), indent=2)


def plot_front(df: pd.DataFrame, fr: Front, folders: list[Folder], path: str | Path) -> None:
    """Every trial coloured by method (low fidelity faded), the front as a step line, knee, teacher, baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = f"{fr.split}_top1", f"{fr.split}_geom_corr"
    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=130)
    methods = sorted(df["method"].dropna().astype(str).unique()) if "method" in df.columns else []
    colours = dict(zip(methods, plt.get_cmap("tab10").colors))
    finished = df[(df["status"] != "failed")] if "status" in df.columns else df
    for m in methods:
        g = finished[finished["method"] == m]
        if x not in g.columns or y not in g.columns:
            continue
        hi, lo = _full(g), g[g["fidelity"] == "low"]
        ax.scatter(hi[x], hi[y], s=30, color=colours[m], label=f"{m} ({len(hi)})", edgecolor="white", linewidth=0.5)
        if len(lo):
            ax.scatter(lo[x], lo[y], s=18, color=colours[m], alpha=0.25,
                       label=f"{m}, stopped early ({len(lo)})")
    if len(fr.rows):
        pts = fr.rows.sort_values(x)
        ax.step(pts[x], pts[y], where="post", color="black", linewidth=1.2, label="Pareto front")
        ax.scatter([fr.knee[x]], [fr.knee[y]], marker="*", s=260, color="gold", edgecolor="black", zorder=5,
                   label="knee")
        base = fr.points[fr.points["method"] == "baseline"] if "method" in fr.points.columns else fr.points.iloc[0:0]
        if len(base):
            ax.scatter([base[x].mean()], [base[y].mean()], marker="X", s=120, color="grey", edgecolor="black",
                       zorder=5, label="baseline mean")
    teacher_top1 = [(f.study.get("teacher") or {}).get(f"{fr.split}_top1") for f in folders]
    teacher_top1 = [v for v in teacher_top1 if v is not None]
    if len(fr.points) >= 2:  # frame the full-fidelity trials; far-off early-stopped points would squash them
        xs, ys = fr.points[x], fr.points[y]
        px, py = max((xs.max() - xs.min()) * 0.15, 0.5), max((ys.max() - ys.min()) * 0.15, 0.01)
        ax.set_xlim(xs.min() - px, max([xs.max(), *teacher_top1]) + px)
        ax.set_ylim(ys.min() - py, min(1.0, ys.max() + py) + 0.005)
        hidden = ((finished[x] < xs.min() - px) | (finished[y] < ys.min() - py)).sum()
        if hidden:
            ax.text(0.01, 0.01, f"{hidden} early-stopped trial(s) below/left of this view", transform=ax.transAxes,
                    fontsize=7, color="grey")
    for v in teacher_top1[:1]:
        ax.axvline(v, color="grey", linestyle="--", linewidth=1)
        ax.text(v, 0.5, "teacher", rotation=90, fontsize=8, color="grey", ha="right", va="center",
                transform=ax.get_xaxis_transform())
    ax.set_xlabel(f"{fr.split} top-1 accuracy (%)")
    ax.set_ylabel(f"{fr.split} geom_corr (Pearson r of centroid similarities vs teacher)")
    ax.set_title(f"Accuracy vs geometry kept — {', '.join(f.name for f in folders)}", fontsize=10)
    ax.grid(alpha=0.3)
    if len(methods) > 3:  # many methods: the legend beside the axes, not over the points
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        fig.set_size_inches(9.0, 5.2)
    else:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(path)
    plt.close(fig)


def save_summary(folder: Folder, lb: pd.DataFrame, fr: Front, df: pd.DataFrame, by: tuple[str, ...]) -> None:
    """Write ``leaderboard.md``, ``front.csv`` and ``pareto.png`` into a results folder (atomically)."""
    from .results import write_csv, write_text

    write_text(folder.path / "leaderboard.md", to_markdown(lb, by))
    write_csv(folder.path / "front.csv", fr.rows)
    tmp = folder.path / ".pareto.tmp.png"
    plot_front(df, fr, [folder], tmp)
    tmp.replace(folder.path / "pareto.png")
