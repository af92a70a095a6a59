"""The recorded tables: the study that records one, packing its results folder, loading it for a replay."""

from __future__ import annotations

import dataclasses
import gzip
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kdbench.results import read_folder
from kdbench.study import Study, find_study, load_study, read_toml

__all__ = ["TABLES", "HERE", "record_study", "pack", "Table", "load_table", "replay_study"]

HERE = Path(__file__).parent / "tables"
# name -> the bundled study whose space, recipe and default search the table serves, Sobol points (a power of
# two), seeds, and the budget strategies are compared at: the trial-epochs of the study's search before the replay
# (24 full 30-epoch trials on digits, 16 full 10-epoch ones on synthetic) -- fixed, so that a default whose
# ``samples`` is raised to spend it with early stopping is scored at the same budget. synthetic: 32
# configurations (a run is ~70 s of one core against digits' ~3 s) keep it within ~60 minutes on 2 cores.
TABLES = {"digits": dict(study="digits", configs=256, seeds=(0, 1, 2), budget=24 * 30),
          "synthetic": dict(study="synthetic-search", configs=32, seeds=(0, 1, 2), budget=16 * 10)}


def replay_study(name: str) -> Study:
    """The search a table serves: its bundled study, with the method fixed to the study's own (a table records one
    method: its categorical ``method`` axis, where the study has one, is left out) and no confirmation."""
    study = load_study(find_study(TABLES[name]["study"]))
    space = tuple(p for p in study.space if p.name != "method" and (not p.when or study.method in p.when))
    return dataclasses.replace(study, search=dataclasses.replace(study.search, space=space), confirm=None)


def _toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def record_study(name: str) -> str:
    """The grid study that records table ``name``: its bundled study's data, models and recipe; the space's axes
    sampled at a scrambled Sobol sequence (scipy, seed 0; log axes in log) x the seeds; validation every epoch."""
    from scipy.stats import qmc

    spec, study = TABLES[name], replay_study(name)
    raw = read_toml(find_study(spec["study"]))
    unit = qmc.Sobol(d=len(study.space), scramble=True, seed=0).random_base2(int(math.log2(spec["configs"])))
    points = []
    for u in unit:
        point = {}
        for p, x in zip(study.space, u):
            if p.type == "loguniform":
                point[p.name] = float(f"{math.exp(math.log(p.low) + x * (math.log(p.high) - math.log(p.low))):.6g}")
            else:
                point[p.name] = float(f"{p.low + x * (p.high - p.low):.6g}")
        points.append(point)
    lines = [f"# Records benchmarks/replay/tables/{name}.csv.gz (see benchmarks/replay/README.md): written by",
             f"# `python -m benchmarks.replay study {name}`; {len(points)} configurations x {len(spec['seeds'])} seeds.",
             f'name = "table-{name}"',
             f'description = "Replay table: {study.search.space and ", ".join(p.name for p in study.space)} at '
             f'{len(points)} Sobol points, {len(spec["seeds"])} seeds, every epoch measured"']
    for key in ("dataset", "teacher", "student", "method", "seed"):
        if key in raw:
            lines.append(f"{key} = {_toml(raw[key])}")
    for table in ("data", "recipe", "methods"):
        if table in raw:
            lines.append(f"\n[{table}]")
            lines += [f"{k} = {_toml(v)}" for k, v in raw[table].items() if not isinstance(v, dict)]
    lines += ["\n[evaluation]", 'val = "every_epoch"', 'test = "end"',
              "\n[results]", 'keep_students = "none"', "\n[checkpoint]", "every = 0",
              "\n[grid]", f"seeds = {_toml(list(spec['seeds']))}", "concurrency = 2", "points = ["]
    lines += [f"  {_toml(p)}," for p in points] + ["]"]
    return "\n".join(lines) + "\n"


def pack(folder: Path, name: str) -> Path:
    """Table ``name`` from the results folder its study wrote: one row per (configuration, seed, epoch) with the
    configuration's values, the epoch's seconds and validation metrics, and on the last epoch the test values."""
    f = read_folder(folder)
    study = load_study(HERE / f"{name}.toml")
    points = [dict(values) for _, _, values in study.grid.points]
    axes = list(points[0])
    unique = np.array([[p[a] for a in axes] for p in points[: len(points) // len(TABLES[name]["seeds"])]])
    trials = f.trials[f.trials["status"] == "completed"]
    missing = len(points) - len(trials)
    if missing:
        print(f"error: {folder}: {missing} of {len(points)} trials did not complete; `kdbench tune "
              f"{HERE / (name + '.toml')} --out {folder} --resume` runs them", file=sys.stderr)
        raise SystemExit(2)
    found = trials[axes].to_numpy(float)
    config = np.abs(np.log(found[:, None, :]) - np.log(unique[None, :, :] + 1e-12)).sum(-1).argmin(1) \
        if (unique > 0).all() else np.abs(found[:, None, :] - unique[None]).sum(-1).argmin(1)
    trials = trials.assign(config=config)
    val = [c for c in f.epochs.columns if c.startswith("val_") and f.epochs[c].notna().all()]
    rows = f.epochs[["trial_id", "epoch", "epoch_seconds", *val]].merge(
        trials[["trial_id", "config", "seed", *axes, *[c for c in trials.columns if c.startswith("test_")]]],
        on="trial_id")
    last = rows["epoch"] == study.max_epochs
    for c in [c for c in rows.columns if c.startswith("test_")]:
        rows[c] = rows[c].where(last)
    rows = rows.drop(columns="trial_id").sort_values(["config", "seed", "epoch"])
    out = HERE / f"{name}.csv.gz"
    with gzip.open(out, "wt", compresslevel=9) as g:
        rows[["config", "seed", "epoch", *axes, "epoch_seconds", *val, *[c for c in rows if c.startswith("test_")]]] \
            .to_csv(g, index=False, float_format="%.6g")
    return out


@dataclass(frozen=True)
class Table:
    """A table as arrays: ``values`` (configurations x axes), ``val`` (configurations x seeds x epochs x
    metrics, the validation metrics named in ``metrics``), ``seconds`` (configurations x seeds x epochs),
    ``test`` (configurations x seeds x metrics)."""

    name: str
    axes: tuple[str, ...]
    values: np.ndarray
    seeds: tuple[int, ...]
    metrics: tuple[str, ...]
    val: np.ndarray
    seconds: np.ndarray
    test: np.ndarray

    @property
    def epochs(self) -> int:
        return self.val.shape[2]

    def unit(self, study: Study, values: np.ndarray) -> np.ndarray:
        """``values`` (n x axes) in the space's normalised coordinates: [0, 1] per axis, log axes in log."""
        params = {p.name: p for p in study.space}
        out = np.empty_like(values, dtype=float)
        for j, a in enumerate(self.axes):
            p, x = params[a], values[:, j].astype(float)
            if p.type == "loguniform":
                out[:, j] = (np.log(x) - math.log(p.low)) / (math.log(p.high) - math.log(p.low))
            else:
                out[:, j] = (x - p.low) / (p.high - p.low)
        return out

    def nearest(self, study: Study, config: dict) -> int:
        """The recorded configuration nearest ``config`` in normalised coordinates (Euclidean; ties: the first)."""
        x = self.unit(study, np.array([[config[a] for a in self.axes]], dtype=float))
        d = ((self.unit(study, self.values) - x) ** 2).sum(1)
        return int(np.argmin(d))


def load_table(name: str, path: Path | None = None) -> Table:
    rows = pd.read_csv(path or HERE / f"{name}.csv.gz").sort_values(["config", "seed", "epoch"])
    axes = tuple(c for c in rows.columns[3:] if c != "epoch_seconds" and not c.startswith(("val_", "test_")))
    metrics = tuple(c[4:] for c in rows.columns if c.startswith("val_"))
    configs, seeds, epochs = rows["config"].nunique(), tuple(sorted(rows["seed"].unique())), rows["epoch"].max()
    shape = (configs, len(seeds), epochs)
    if len(rows) != math.prod(shape):
        raise ValueError(f"{path or name}: {len(rows)} rows; a full table has {math.prod(shape)}")
    val = rows[[f"val_{m}" for m in metrics]].to_numpy(float).reshape(*shape, len(metrics))
    last = rows[rows["epoch"] == epochs]
    return Table(name, axes, rows.groupby("config")[list(axes)].first().to_numpy(float), seeds, metrics, val,
                 rows["epoch_seconds"].to_numpy(float).reshape(shape),
                 last[[f"test_{m}" for m in metrics]].to_numpy(float).reshape(configs, len(seeds), len(metrics)))
