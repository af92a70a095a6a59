"""Results folders -> leaderboard, accuracy-vs-geometry Pareto front, plots and exports.

Everything here reads what ``kdbench tune`` wrote (through :mod:`kdbench.results`) and never
writes back into a results folder except the plot a user asks for.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table

from . import stats
from .pareto import hypervolume_2d
from .importance import importances
from .metrics import DEFAULT_OBJECTIVES, columns
from .results import Folder, ResultsError, read_folder, search_of

__all__ = ["load_folders", "trials_frame", "leaderboard", "front", "Front", "to_markdown", "to_json",
           "leaderboard_table", "front_table", "save_summary", "importances", "objectives_of"]

# Every metric a group gets mean, std and an interval for: both splits (the front is chosen on val).
ALL_METRICS = (*columns(), "best_test_top1", "params", "train_seconds",
               "peak_memory_mib")


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
    if "config_id" in df.columns:
        df["config_id"] = df["config_id"].astype(str)
    return df


def objectives_of(folders: list[Folder]) -> tuple[str, str]:
    """The first folder's search objectives (top-1 and geom_corr for grids and single runs)."""
    for f in folders:
        o = search_of(f.study).get("objectives")
        if o:
            return tuple(o)
    return DEFAULT_OBJECTIVES


def _col(split: str, m: str) -> str:
    return m if m in ("best_test_top1", "params", "train_seconds", "peak_memory_mib") else f"{split}_{m}"


def leaderboard(df: pd.DataFrame, folders: list[Folder], by: tuple[str, ...] = ("config",),
                split: str = "test", interval: str = "t") -> pd.DataFrame:
    """One row per (study, group): ``by = ("config",)`` groups by configuration (seeds of one
    configuration together), any other columns group by their values (e.g. ``method``).

    Per metric: mean, std, 95% interval (``interval``: see :func:`kdbench.stats.mean_ci`) over the runs the group's claim rests on (see
    :func:`kdbench.stats.claim_rows`); ``n_low`` and ``n_failed`` count early-stopped and failed runs,
    never ranked. P(improvement) over ``baseline`` and ``kd``; ``delta_top1``/``delta_geom_corr``: the
    difference of means to the baseline. Rank: groups with two or more seeds first (they carry an
    interval), then by top-1. The study's teacher is an unranked reference row; a study's reported
    values (e.g. the paper's Table 1) appear as ``reported_top1``.
    """
    keys = ("config_id",) if tuple(by) == ("config",) else tuple(by)
    for col in keys:
        if col not in df.columns:
            raise ResultsError(f"--by {col}: no such column; allowed: config, {', '.join(sorted(map(str, df.columns)))}")
    lb = stats.summarise(df, ALL_METRICS, keys, split, interval=interval)
    if lb.empty:
        return lb
    if keys == ("config_id",):  # a configuration only stopped early or failed has nothing to claim
        lb = lb[lb["n"] > 0].reset_index(drop=True)
    top1, corr = f"{split}_top1_mean", f"{split}_geom_corr_mean"
    lb["delta_top1"], lb["delta_geom_corr"], lb["reported_top1"] = math.nan, math.nan, math.nan
    teacher_rows = []
    for f in folders:
        mine = lb["study"] == f.name
        settled = (f.study.get("confirm") or {}).get("settled") if keys == ("config_id",) else None
        if settled:  # confirm --until-settled: why each configuration got the seeds it has
            lb.loc[mine, "stop"] = lb.loc[mine, "config_id"].map(lambda c: (settled.get(c) or {}).get("stop"))
        base = lb[mine & (lb["method"] == "baseline") & (lb["n"] > 0)].sort_values("n_seeds", ascending=False)
        if len(base):
            lb.loc[mine, "delta_top1"] = lb.loc[mine, top1] - float(base[top1].iloc[0])
            lb.loc[mine, "delta_geom_corr"] = lb.loc[mine, corr] - float(base[corr].iloc[0])
        ref = f.study.get("reference") or {}
        lb.loc[mine, "reported_top1"] = lb.loc[mine, "method"].map(lambda m: ref.get(m, math.nan))
        measured = set(lb.loc[mine, "method"])
        teacher_rows += [{"study": f.name, "method": f"{m} (published)", "n": 0, "n_seeds": 0, "n_low": 0, "n_failed": 0,
                          "rank": math.nan, "reported_top1": v} for m, v in ref.items()
                         if m not in measured and m != "teacher"]  # what the study's source reports, unmeasured here
        t = f.study.get("teacher")
        if t:
            how = ", checkpoint" if t.get("checkpoint") else ""
            teacher_rows.append({"study": f.name, "method": f"teacher ({t.get('arch')}{how})", "n": 1, "n_seeds": 1,
                                 "n_low": 0, "n_failed": 0, "rank": math.nan,
                                 "best_test_top1_mean": t.get("best_test_top1"), top1: t.get(f"{split}_top1"),
                                 f"{split}_knn_top1_mean": t.get(f"{split}_knn_top1"), "params_mean": t.get("params"),
                                 "train_seconds_mean": t.get("train_seconds"), "reported_top1": ref.get("teacher", math.nan)})
    lb["_multi"] = lb["n_seeds"] >= 2
    lb = lb.sort_values(["_multi", top1], ascending=False, na_position="last").drop(columns="_multi")
    lb = lb.reset_index(drop=True)
    ranked = lb["n"] > 0
    lb["rank"] = math.nan
    lb.loc[ranked, "rank"] = np.arange(1, ranked.sum() + 1)
    if teacher_rows:
        lb = pd.concat([lb, pd.DataFrame(teacher_rows)], ignore_index=True)
    lb.attrs["searched"] = searched_of(folders)
    return lb


def searched_of(folders: list[Folder]) -> list[str]:
    """The hyperparameters the folders' searches vary (grids: their value axes)."""
    names = []
    for f in folders:
        names += [p["name"] for p in search_of(f.study).get("space") or () if p["name"] != "method"]
        names += [k for _, _, values in ((f.study.get("study") or {}).get("grid") or {}).get("points") or () for k, _ in values]
    return list(dict.fromkeys(names))


@dataclass
class Front:
    """The non-dominated configurations on their *validation* means of the two objectives.

    Membership is decided on validation (the split that chooses); every other number of a
    configuration (test means, intervals) is reported beside it.
    """

    rows: pd.DataFrame  # configurations on the front, by validation top-1 descending
    points: pd.DataFrame  # every configuration with validation means
    hypervolume: float  # of the validation means, above reference_point
    reference_point: tuple[float, float]
    reference_source: str
    knee: dict | None
    stability: dict | None  # stats.front_stability after a confirmation
    objectives: tuple[str, str]
    split: str  # the split reported beside (test by default)
    multi_seed_front: list  # config_ids on the front among configurations with 2+ seeds: what can be claimed
    interval: str = "t"  # how the intervals were computed (stats.INTERVALS)
    unsettled: list = ()  # stats.unsettled: front members and rivals the seeds cannot separate yet
    on: str = "val"  # the split membership is decided on: val, or test where a folder has no validation split


def front(df: pd.DataFrame, objectives: tuple[str, str] = DEFAULT_OBJECTIVES, split: str = "test",
          reference: tuple[float, float] | None = None, searched: list[str] = (), interval: str = "t") -> Front:
    """Pareto front over configuration means (never single seeds), membership on validation means;
    every configuration's ``p_on_front`` (see :func:`kdbench.stats.p_on_front`).

    The hypervolume's reference point is ``reference`` if given, else the validation means of the
    ``baseline`` configuration with the most seeds, else (0, -1) (oriented: a minimised objective
    is negated).
    """
    table = stats.summarise(df, ALL_METRICS, ("config_id",), split, interval=interval) if len(df) else pd.DataFrame()
    # Membership on validation; a folder without a validation split (val_fraction = 0, a fixed grid: nothing is
    # chosen) draws its front on test means, and says so.
    on = "val" if len(table) and table.filter(like="val_top1_mean").notna().any().any() else "test"
    cols = [f"{on}_{o}_mean" for o in objectives]
    if not table.empty and all(c in table.columns for c in cols):
        table = table[(table["n"] > 0)].dropna(subset=cols).reset_index(drop=True)
    else:
        table = pd.DataFrame()
    source = "given"
    if reference is None:
        base = table[table["method"] == "baseline"].sort_values("n_seeds", ascending=False) if len(table) else table
        if len(base):
            reference = tuple(stats.oriented(base[cols].to_numpy(float)[:1], objectives)[0])
            source = f"baseline mean ({on})"
        else:
            reference, source = (0.0, -1.0), "(0, -1)"
    if table.empty:
        return Front(table, table, 0.0, reference, source, None, None, tuple(objectives), split, [], interval, (), on)
    table["p_on_front"] = stats.p_on_front(df, table, objectives, on)
    table.attrs["searched"] = list(searched)
    mask, knee = stats.front_on_means(table, objectives, on)
    rows = table[mask].sort_values(cols, ascending=False)
    rows.attrs["searched"] = list(searched)
    multi = table[table["n_seeds"] >= 2].reset_index(drop=True)
    confirmed = multi.loc[stats.front_on_means(multi, objectives, on)[0], "config_id"].tolist() if len(multi) else []
    hv = hypervolume_2d(stats.oriented(table[cols].to_numpy(float), objectives), reference)
    return Front(rows, table, hv, reference, source, table.loc[knee].to_dict() if knee is not None else None,
                 stats.front_stability(df, table, objectives), tuple(objectives), split, confirmed, interval,
                 stats.unsettled(table, objectives, on), on)


# ---------------------------------------------------------------------------------------------
# Rendering: rich tables, markdown, JSON, plots

def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _pm(mean, std, fmt="{:.2f}") -> str:
    if _nan(mean):
        return "—"
    s = fmt.format(mean)
    return s if _nan(std) else f"{s} ± {fmt.format(std)}"


def _ci(r: dict, m: str, fmt="{:.2f}", std: bool = True) -> str:
    """``mean ± std [low, high]`` (``std=False``: ``mean [low, high]``); one seed: ``mean (1 seed)``, no interval."""
    mean = r.get(f"{m}_mean")
    if _nan(mean):
        return "—"
    if r.get("n_seeds", 0) == 1 and not str(r.get("method", "")).startswith("teacher"):
        return f"{fmt.format(mean)} (1 seed)"
    s = _pm(mean, r.get(f"{m}_std") if std else None, fmt)
    lo, hi = r.get(f"{m}_ci_low"), r.get(f"{m}_ci_high")
    return s if _nan(lo) else f"{s} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _params(v) -> str:
    if _nan(v):
        return "—"
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k"


def _signed(v, fmt="{:+.2f}") -> str:
    return "—" if _nan(v) else fmt.format(v)


def _prob(v) -> str:
    return "—" if _nan(v) else f"{v:.2f}"


def _seeds(r: dict) -> str:
    s = f"{int(r['n_seeds'])}" + (" ✓" if r.get("stage") == "confirm" else "") \
        + (f" {r['stop']}" if isinstance(r.get("stop"), str) else "")
    return s + (f" (+{int(r['n_low'])} low)" if r.get("n_low") else "") \
        + (f" (+{int(r['n_failed'])} failed)" if r.get("n_failed") else "")


def _leader_columns(split: str, wide: bool = True, interval: str = "t"):
    """(header, formatter) of the leaderboard; a column empty in every row is dropped. ``wide`` (markdown):
    stds beside the intervals, and the columns a console has no room for."""
    t = split
    cols = [
        ("#", lambda r: "" if _nan(r.get("rank")) else str(int(r["rank"]))),
        ("seeds", _seeds),
        (f"top-1 % [95% {_short(interval)}]", lambda r: _ci(r, f"{t}_top1", std=wide)),
        (f"geom_corr [95% {_short(interval)}]", lambda r: _ci(r, f"{t}_geom_corr", "{:.3f}", std=wide)),
        ("P(>base) top-1 / geom", lambda r: "—" if _nan(r.get("p_improve_top1_vs_baseline")) else
         f"{_prob(r.get('p_improve_top1_vs_baseline'))} / {_prob(r.get('p_improve_geom_corr_vs_baseline'))}"),
        ("reported top-1 %", lambda r: _pm(r.get("reported_top1"), None)),
    ]
    if wide:
        cols[4:4] = [("best-epoch top-1 %", lambda r: _pm(r.get("best_test_top1_mean"), r.get("best_test_top1_std"))),
                     ("Δ top-1", lambda r: _signed(r.get("delta_top1")))]
        cols += [("P(>kd) top-1 / geom", lambda r: "—" if _nan(r.get("p_improve_top1_vs_kd")) else
                  f"{_prob(r.get('p_improve_top1_vs_kd'))} / {_prob(r.get('p_improve_geom_corr_vs_kd'))}"),
                 ("CKA", lambda r: _pm(r.get(f"{t}_cka_mean"), r.get(f"{t}_cka_std"), "{:.3f}")),
                 ("kNN top-1 %", lambda r: _pm(r.get(f"{t}_knn_top1_mean"), r.get(f"{t}_knn_top1_std"))),
                 ("params", lambda r: _params(r.get("params_mean"))),
                 ("train s", lambda r: _pm(r.get("train_seconds_mean"), r.get("train_seconds_std"), "{:.1f}")),
                 ("peak MiB", lambda r: _pm(r.get("peak_memory_mib_mean"), None, "{:.0f}"))]
    return cols


def _short(interval: str) -> str:
    """The interval's name in a column header."""
    return {"t": "t-CI", "bootstrap": "bootstrap CI"}[interval]


def _label_columns(lb: pd.DataFrame, by: tuple[str, ...], wide: bool = True) -> list[str]:
    """Columns that name a row. Configurations: id, method and the hyperparameters that vary (on a
    console only the searched ones, ``lb.attrs["searched"]``: the method names the presets)."""
    if tuple(by) != ("config",):
        return [*by] if "method" in by else [*by, "method"]
    hp = [c for c in lb.columns if c not in stats._BOOKKEEPING and not c.startswith(("val_", "test_", "best_", "params_",
          "train_", "p_improve_", "delta_", "reported_", "n_", "rank", "last_", "loss_", "peak_memory_")) and c not in
          ("n", "seeds")]
    searched = lb.attrs.get("searched")
    if not wide and searched:
        hp = [c for c in hp if c in searched]
    return ["config_id", "method", *hp]


def _leader_cells(lb: pd.DataFrame, by: tuple[str, ...], split: str = "test", wide: bool = True, interval: str = "t"):
    records = lb.to_dict("records")
    cols = [c for c in _leader_columns(split, wide, interval) if any(c[1](r) not in ("—", "") for r in records)]
    labels = _label_columns(lb, by, wide)
    multi = lb["study"].nunique() > 1
    rank, cols = cols[:1], cols[1:]
    head = [h for h, _ in rank] + (["study"] if multi else []) + [("config" if c == "config_id" else c) for c in labels] \
        + [h for h, _ in cols]
    body = []
    for r in records:
        keys = ([r["study"]] if multi else []) + [("" if _nan(r.get(b)) else _fmt_key(r.get(b))) for b in labels]
        body.append([f(r) for _, f in rank] + keys + [f(r) for _, f in cols])
    return head, body


def _fmt_key(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def leaderboard_table(lb: pd.DataFrame, by: tuple[str, ...], split: str, title: str, interval: str = "t") -> Table:
    head, body = _leader_cells(lb, by, split, wide=False, interval=interval)
    t = Table(title=title, caption=f"mean ± std [{stats.interval_label(interval)}], {split} split, last epoch; "
                                   f"✓ = confirmed on fresh seeds (the search seed is then left out: it chose the "
                                   f"configuration); P(>base) = P(a run beats a baseline run); configurations with "
                                   f"2+ seeds rank first")
    values = dict(_leader_columns(split, interval=interval))
    for h in head:
        t.add_column(h, justify="right" if h in values else "left", no_wrap=h in values or h == "config",
                     overflow="ellipsis", min_width=8 if h == "method" else None)
    for row, r in zip(body, lb.to_dict("records")):
        t.add_row(*row, style="dim" if str(r.get("method", "")).startswith("teacher") else None)
    return t


def _front_records(fr: Front) -> list[dict]:
    return [{k: v for k, v in r.items()} for r in fr.rows.to_dict("records")]


def _stability_text(fr: Front) -> str:
    s = fr.stability
    if s is None:
        return "front stability: not confirmed yet (kdbench confirm DIR)"
    return f"front stability {s['kept']} of {s['of']} (search-front configurations still non-dominated on confirmed means)"


_ON = {"val": "validation means", "test": "test means (no validation split: a description of a fixed grid, not a "
                                         "choice)"}


def front_table(fr: Front, title: str) -> Table:
    single = [r["config_id"] for r in fr.rows.to_dict("records") if r["n_seeds"] == 1]
    t = Table(title=title, caption=f"membership on {_ON[fr.on]}; hypervolume {fr.hypervolume:.3f} above "
                                   f"({fr.reference_point[0]:.2f}, {fr.reference_point[1]:.3f}), {fr.reference_source}; "
                                   f"★ = knee; P(front) = share of bootstrap resamples of the seeds in which the "
                                   f"configuration is on the front; intervals: {stats.interval_label(fr.interval)}; "
                                   f"{_stability_text(fr)}"
                                   + (f"; {len(single)} single-seed: not a claim yet (confirm more with kdbench confirm "
                                      f"DIR --top N)" if single else "")
                                   + (f"; among configurations with 2+ seeds the front is {', '.join(fr.multi_seed_front)}"
                                      if single and fr.multi_seed_front else ""))
    hp = [c for c in _label_columns(fr.rows, ("config",), wide=False) if c not in ("config_id", "method")]
    o1, o2 = fr.objectives
    s = fr.split
    ci = _short(fr.interval)
    for h in ["", "config", "method", *hp, "seeds", f"{fr.on} {o1}", f"{fr.on} {o2}", "P(front)", f"{s} top-1 % [95% {ci}]",
              f"{s} geom_corr [95% {ci}]"]:
        t.add_column(h, justify="left" if h in ("config", "method") else "right",
                     no_wrap=h.startswith((s, "config", fr.on, "seeds", "P(")), overflow="ellipsis")
    knee = fr.knee["config_id"] if fr.knee else None
    for r in fr.rows.to_dict("records"):
        t.add_row("★" if r["config_id"] == knee else "", r["config_id"], str(r.get("method", "")),
                  *[_fmt_key(r.get(h)) for h in hp], _seeds(r),
                  f"{r[f'{fr.on}_{o1}_mean']:.4g}", f"{r[f'{fr.on}_{o2}_mean']:.4g}", _prob(r.get("p_on_front")),
                  _ci(r, f"{s}_top1", std=False),
                  _ci(r, f"{s}_geom_corr", "{:.3f}", std=False))
    return t


def unsettled_lines(fr: Front) -> list[str]:
    """One line per front member and rival the seeds cannot separate yet, with the seeds that would."""
    out = []
    for u in fr.unsettled:
        more = (f"~{u['seeds_needed']} seeds each would separate them on val {u['objective']} (gap {u['gap']:.3g})"
                if u["seeds_needed"] else "no number of seeds would separate them at this spread")
        out.append(f"not separated: {u['member']} (front) and {u['rival']}: their val intervals overlap on both "
                   f"objectives; {more}")
    return out


def to_markdown(lb: pd.DataFrame, by: tuple[str, ...], split: str = "test", interval: str = "t") -> str:
    head, body = _leader_cells(lb, by, split, interval=interval)
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


def to_json(lb: pd.DataFrame, fr: Front, imp: pd.DataFrame | None = None, geometry: dict | None = None) -> str:
    doc = {"leaderboard": lb.to_dict("records"), "configurations": fr.points.to_dict("records"),
           "front": _front_records(fr), "front_on": _ON[fr.on].split(" (")[0], "objectives": list(fr.objectives),
           "hypervolume": fr.hypervolume, "reference_point": list(fr.reference_point),
           "reference_source": fr.reference_source, "knee": fr.knee, "front_stability": fr.stability,
           "single_seed_on_front": [r["config_id"] for r in fr.rows.to_dict("records") if r["n_seeds"] == 1],
           "front_of_multi_seed_configurations": fr.multi_seed_front,
           "importances": None if imp is None else imp.to_dict("records"), "split": fr.split,
           "interval_method": fr.interval, "interval": stats.interval_label(fr.interval),
           "unsettled": list(fr.unsettled), **(geometry or {})}
    return json.dumps(_jsonable(doc), indent=2)


def save_summary(folder: Folder, lb: pd.DataFrame, fr: Front, df: pd.DataFrame, by: tuple[str, ...],
                 imp: pd.DataFrame | None = None) -> list[str]:
    """Write ``leaderboard.md`` (with the interval named under it), ``front.csv``, ``pareto.png`` and, for searches,
    ``slices.png`` and ``importances.csv`` into a results folder (each atomically); return the names written."""
    from .plots import plot_front, plot_slices
    from .results import write_csv, write_text

    write_text(folder.path / "leaderboard.md", to_markdown(lb, by, interval=fr.interval)
               + f"\nIntervals: {stats.interval_label(fr.interval)}.\n")
    write_csv(folder.path / "front.csv", fr.rows)
    written = ["leaderboard.md", "front.csv", "pareto.png"]
    for name, draw in (("pareto.png", lambda p: plot_front(df, fr, [folder], p) or True),
                       ("slices.png", lambda p: plot_slices(df, folder, p))):
        tmp = folder.path / f".{name}.tmp.png"
        if draw(tmp):
            tmp.replace(folder.path / name)
            written += [name] if name not in written else []
    if imp is not None:
        write_csv(folder.path / "importances.csv", imp)
        written.append("importances.csv")
    return written
