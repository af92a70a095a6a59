"""The results-folder format, one owner: atomic writes while a run goes, reading back for reports.

A folder holds ``study.json`` (resolved study, environment, times), ``trials.csv`` (one row per
trial), ``epochs.csv`` (per-epoch history of every trial) and, for searches, ``optuna.db``.
A single ``kdbench train --out`` run writes ``result.json`` and ``epochs.csv``. Every table is
replaced atomically (temporary file + ``os.replace``): a crash never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import pandas as pd

from .metrics import columns as metric_columns

__all__ = ["write_json", "write_text", "write_csv", "environment", "ResultsError", "read_folder", "Folder",
           "read_table", "TRIAL_COLUMNS", "STAGES", "find_latest", "config_id", "run_context", "FolderLock", "read_study",
           "migrate_study", "search_of", "student_file", "write_student", "write_train_run", "final_metrics", "jsonable",
           "STUDENTS", "KEEP_STUDENTS", "most_at_once", "SCHEMA", "migrate"]

# Every trials.csv column has its owner here. ``config_id`` names a configuration (everything but the seed, see
# :func:`config_id`); ``stage`` says which step produced the row; ``node`` (Ray node id; a multi-worker trial's: every
# worker's, in rank order), ``host``, ``threads`` and ``device`` say where and how it ran (``kdbench rerun`` reads
# them); ``resumed_from``: the epochs finished in the checkpoint an interrupted trial continued from (0: none, or one
# inside the first epoch); ``gpu_ids``: the GPUs Ray assigned the trial (comma-separated, empty: none); ``started_at``,
# ``ended_at``: when it ran (Unix seconds, the worker's clock); ``autocast``: the precision the training step ran in
# (bf16 | fp32, the recipe's ``precision`` resolved on its device); ``peak_memory_mib``: its device's peak memory (CUDA:
# max allocated; CPU: the worker process's peak RSS, which spans the earlier trials a reused worker ran); ``workers``:
# its data-parallel workers (Ray Train; 1: one process), ``backend`` theirs (gloo | nccl), ``worker_batch``: each one's
# share of the global batch.
STAGES = ("search", "grid", "confirm", "train", "evaluate")
# The results format's version, written into every study.json and result.json. A folder without one is schema 1;
# migrate() brings any folder to this one as it is read, so nothing above it knows older formats. Schema 2: the
# version itself, importances with their epoch, epochs.csv rows exactly the loop's rows. Schema 3: study.json's
# study nested as its TOML is ([search], [grid], [asha], [resources], [checkpoint], [evaluation]).
SCHEMA = 3
TRIAL_COLUMNS = ("trial_id", "config_id", "stage", "status", "fidelity", "method", "seed", "epochs",
                 *metric_columns(),
                 "best_test_top1", "last_test_top1", "params", "train_seconds", "images_per_second",
                 "seconds", "node", "host", "threads", "device", "resumed_from", "gpu_ids", "started_at", "ended_at",
                 "peak_memory_mib", "autocast", "compile_seconds", "workers", "backend", "worker_batch",
                 "failure")


def most_at_once(rows) -> int:
    """The largest number of runs whose ``[started_at, ended_at]`` spans overlap (rows: dicts of trials.csv):
    how a run packed its trials on its resources."""
    events = sorted([(r["started_at"], 1) for r in rows] + [(r["ended_at"], -1) for r in rows])
    now = most = 0
    for _, step in events:  # an end sorts before a start at the same instant (-1 < 1)
        now += step
        most = max(most, now)
    return most


class ResultsError(ValueError):
    """A results folder that cannot be read."""


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (NaN/inf become null)."""
    write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csv(path: str | Path, rows: list[dict] | pd.DataFrame, columns: tuple[str, ...] = ()) -> None:
    """Write a table atomically; ``columns`` come first, in that order, then any others."""
    path = Path(path)
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    first = [c for c in columns if c in df.columns]
    df = df[first + [c for c in df.columns if c not in first]]
    tmp = _tmp(path)
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


# Trained students: ``student.pt`` of a single run, ``students/<trial_id>.pt`` of a search, grid or confirmation.
STUDENTS = "students"
KEEP_STUDENTS = ("full", "front", "none")  # every full-fidelity run's student, the front's only, or none


def final_metrics(row: dict) -> dict:
    """A run's final metrics (val, test, best- and last-epoch top-1, cost), as numbers, from a result row."""
    return {k: float(v) for k, v in row.items() if (k.startswith(("val_", "test_", "best_", "last_")) or k in (
        "params", "train_seconds", "images_per_second")) and isinstance(v, (int, float)) and not isinstance(v, bool)}


def student_file(state_dict: dict, arch: str, num_classes: int, config_id: str, epoch: int, metrics: dict) -> dict:
    """What a student file holds: RepDistiller's and mdistiller's loaders read its ``model`` entry as they are."""
    return {"model": state_dict, "arch": arch, "num_classes": int(num_classes), "config_id": config_id,
            "epoch": int(epoch), "metrics": final_metrics(metrics)}


def write_student(path: str | Path, blob: dict) -> None:
    """Write a student file atomically (readable with ``torch.load(..., weights_only=True)``)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    torch.save(blob, tmp)
    os.replace(tmp, path)


def write_train_run(out: Path, run, cfg, data, dataset: str, options: dict, teacher: dict, device: str,
                    threads: int) -> list[str]:
    """``kdbench train --out``: the run's ``epochs.csv``, its student (``student.pt``), ``result.json`` (its
    configuration and ``config_id``, the teacher, the environment, the final metrics) and its centroid-similarity
    matrices; the names written. ``run``: a :class:`kdbench.records.Run`; ``dataset``: its canonical name (as a study
    names it, so that the ``config_id`` is tune's); ``teacher``: the teacher's metadata."""
    import dataclasses

    from .matrices import write_teacher
    from .settings import trial_values
    from .state import to_cpu

    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "epochs.csv", run.history)
    context = run_context({"dataset": dataset, "split_seed": teacher["split_seed"],
                           "teacher": teacher["arch"], "teacher_recipe": teacher["recipe"], "teacher_seed": teacher["seed"],
                           "student": cfg.student, "recipe": {"epochs": cfg.recipe.epochs}, "data_options": options,
                           "teacher_checkpoint": teacher.get("checkpoint")})
    cid = config_id(context, trial_values(cfg.method, cfg.recipe))
    write_student(out / "student.pt", student_file(to_cpu(run.model.state_dict()), cfg.student, data.num_classes, cid,
                                                   cfg.recipe.epochs, run.metrics))
    write_json(out / "result.json", {
        "schema": SCHEMA, "config_id": cid,
        "config": {"dataset": dataset, "data_options": options, "student": cfg.student, "teacher": teacher["arch"],
                   "method": dataclasses.asdict(cfg.method), "recipe": dataclasses.asdict(cfg.recipe), "seed": cfg.seed},
        "teacher": {k: v for k, v in teacher.items() if k != "path"},
        "environment": environment(device) | {"threads": threads}, "metrics": {**run.metrics, "autocast": run.precision}})
    write_teacher(out / "matrices.npz", run.matrices, data.class_names, student=True)
    return ["result.json", "epochs.csv", "student.pt", "matrices.npz"]


def jsonable(obj):
    """``obj`` as JSON holds it: NaN/inf as None, tuples as lists, numpy and torch scalars as numbers."""
    return _clean(obj)


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _clean(obj.item())
    return obj


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict:
    """Versions, device and git commit: what a reader needs to trust and reproduce a number."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("kdbench", "torch", "torchvision", "ray", "optuna", "numpy", "pandas"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    env = {"python": platform.python_version(), "platform": platform.platform(), "versions": versions,
           "device": device, "git_commit": _git_commit(), "cpu_count": os.cpu_count(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.startswith("cuda"):
        import torch

        env["gpu"] = torch.cuda.get_device_name(0)
    return env


# ---------------------------------------------------------------------------------------------
# Configuration identity

# Fields of a study (study.json's "study") that define every run of it, besides the trial's own values.
_CONTEXT = ("dataset", "split_seed", "teacher", "teacher_recipe", "teacher_seed", "student")


def run_context(study: dict) -> dict:
    """What every run of a study shares (data set, split, teacher and how it was made, student, epochs)."""
    ctx = {k: study.get(k) for k in _CONTEXT}
    ctx["epochs"] = (study.get("recipe") or {}).get("epochs")
    for k in ("data_options", "teacher_checkpoint"):  # only when set: the ids of earlier folders stay as they were
        if study.get(k):
            ctx[k] = study[k]
    if study.get("teacher_checkpoint"):  # a teacher read from a file: no recipe, no seed
        ctx["teacher_recipe"] = ctx["teacher_seed"] = None
    return ctx


def config_id(context: dict, values: dict) -> str:
    """A stable short name for a configuration: a hash of everything that defines a run except its seed.

    Args:
        context: :func:`run_context` of the study (or the same keys for a single ``kdbench train`` run).
        values: every term weight and hyperparameter of the method and every recipe field (the method's
            *name*, the seed and the epoch count run so far are not part of it: two presets with the same
            weights are the same configuration).
    """
    drop = {"name", "method", "seed", "epochs"}
    spec = {"context": context, "values": {k: _canonical(v) for k, v in sorted(values.items()) if k not in drop}}
    return hashlib.sha256(json.dumps(_clean(spec), sort_keys=True).encode()).hexdigest()[:10]


def _canonical(v):
    """1 and 1.0 (TOML int, Optuna float, CSV round trip) name the same value."""
    v = v.item() if hasattr(v, "item") else v
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


# ---------------------------------------------------------------------------------------------
# One writer at a time


class FolderLock:
    """``.kdbench.lock`` (holding the pid) while ``tune`` or ``confirm`` writes a folder.

    A second writer is refused with one line; a lock whose process is gone (kill -9) is taken over.
    """

    def __init__(self, path: Path, what: str):
        self.file, self.what = Path(path) / ".kdbench.lock", what

    def holder(self) -> int | None:
        """The live process that holds the lock, if any."""
        try:
            pid = int(self.file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if pid == os.getpid():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def __enter__(self):
        pid = self.holder()
        if pid is not None:
            raise ResultsError(f"{self.file.parent}: still running ({self.what} or another run holds it, pid {pid}); "
                               f"allowed: a folder no run is writing")
        write_text(self.file, f"{os.getpid()} {self.what}\n")
        return self

    def __exit__(self, *exc):
        self.file.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Reading back


class Folder:
    """One readable results folder: its study description, trials and per-epoch history."""

    def __init__(self, path: Path, study: dict, trials: pd.DataFrame, epochs: pd.DataFrame | None):
        self.path, self.study, self.trials, self.epochs = path, study, trials, epochs

    @property
    def name(self) -> str:
        return self.study.get("name") or self.path.name


# Identifiers stay text: a hex id such as trial_id "12345678" or a node "0123456789ab" is not a number.
ID_COLUMNS = ("trial_id", "config_id", "node", "host")


def read_table(path: str | Path) -> pd.DataFrame:
    """A results table (trials.csv, epochs.csv) with its id columns as text (empty file: empty frame)."""
    path = Path(path)
    try:
        return pd.read_csv(path, dtype={c: str for c in ID_COLUMNS})
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise ResultsError(f"{path}: unreadable table ({str(e).splitlines()[0]})") from None


def read_study(path: str | Path, name: str = "study.json") -> dict:
    """A results folder's ``study.json`` (readable before its first trial has finished), or ``name``."""
    f = Path(path) / name
    try:
        study = json.loads(f.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path}: not a kdbench results folder (no {name})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{f}: corrupt JSON ({e})") from None
    if not isinstance(study, dict):
        raise ResultsError(f"{f}: expected a JSON object")
    return study


def read_folder(path: str | Path) -> Folder:
    """Read a results folder written by ``kdbench tune`` (or ``kdbench train --out``)."""
    path = Path(path)
    if not path.is_dir():
        raise ResultsError(f"{path}: no such results folder")
    meta_file = path / "study.json" if (path / "study.json").exists() else path / "result.json"
    if not meta_file.exists():
        raise ResultsError(f"{path}: not a kdbench results folder (no study.json or result.json)")
    study = read_study(path, meta_file.name)
    if meta_file.name == "result.json":  # a single train run: one trial row
        trials = pd.DataFrame([{**study.get("metrics", {}), "trial_id": "train", "config_id": study.get("config_id", "train"),
                                "stage": "train", "status": "completed",
                                "fidelity": "full", "method": study.get("config", {}).get("method", {}).get("name"),
                                "seed": study.get("config", {}).get("seed")}])
        study = {"name": path.name, **study}
    else:
        if not (path / "trials.csv").exists():
            raise ResultsError(f"{path}: trials.csv is missing")
        trials = read_table(path / "trials.csv")
        missing = [c for c in ("trial_id", "status", "fidelity") if len(trials) and c not in trials.columns]
        if missing:
            raise ResultsError(f"{path / 'trials.csv'}: missing columns {', '.join(missing)}")
    study, trials = migrate(study, trials)
    epochs = read_table(path / "epochs.csv") if (path / "epochs.csv").exists() else None
    if epochs is not None and "trial_id" not in epochs.columns:  # a single train run's history
        epochs.insert(0, "trial_id", "train")
    return Folder(path, study, trials, epochs)


def migrate_study(d: dict) -> dict:
    """A study record (study.json's ``study``) as this schema has it: the flat record of schemas 1 and 2 nested as
    the study's TOML is. A nested one is returned as it is (a copy)."""
    d = dict(d)
    if "sampler" not in d:
        return d
    flat = {k: d.pop(k) for k in ("sampler", "samples", "concurrency", "objectives", "space", "grid", "asha",
                                  "grace_period", "reduction_factor", "asha_rank", "cpus_per_trial", "gpus_per_trial",
                                  "checkpoint_every", "checkpoint_minutes", "max_failures", "eval_val", "eval_test")
            if k in d}
    grid = flat["sampler"] == "grid"
    d["search"] = None if grid else {k: flat[k] for k in ("sampler", "samples", "concurrency", "objectives", "space")}
    d["grid"] = {"points": flat["grid"], "concurrency": flat["concurrency"]} if grid else None
    d["asha"] = {"enabled": flat["asha"], "grace_period": flat["grace_period"],
                 "reduction_factor": flat["reduction_factor"], "rank": flat.get("asha_rank", "top1")}
    d["resources"] = {"cpus_per_trial": flat["cpus_per_trial"], "gpus_per_trial": flat["gpus_per_trial"]}
    d["checkpoint"] = {"every": flat.get("checkpoint_every", 1), "minutes": flat.get("checkpoint_minutes", 0.0),
                       "max_failures": flat.get("max_failures", 1)}
    d["evaluation"] = {"val": flat.get("eval_val", "every_epoch"), "test": flat.get("eval_test", "end")}
    return d


def search_of(meta: dict) -> dict:
    """A folder's ``[search]`` table as study.json records it ({} for a grid, a single run or an evaluate folder)."""
    return (meta.get("study") or {}).get("search") or {}


def migrate(study: dict, trials: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """A folder's study.json (or result.json) and trials as the current :data:`SCHEMA` has them: the one place that
    knows earlier formats. Schema 1 and before: rows written before ``config_id`` and ``stage`` existed get both,
    derived from what they hold (the same ids the code that wrote them would have given)."""
    study = {**study, "schema": study.get("schema", 1)}
    if isinstance(study.get("study"), dict) and study.get("kind") in ("search", "grid"):
        study["study"] = migrate_study(study["study"])
    if not isinstance(study["schema"], int) or isinstance(study["schema"], bool) or study["schema"] > SCHEMA:
        raise ResultsError(f"{study.get('name', 'the folder')}: results schema {study['schema']}, newer than this "
                           f"kdbench reads ({SCHEMA}); allowed: a folder of this version or earlier (upgrade kdbench)")
    if trials.empty or {"stage", "config_id"} <= set(trials.columns):
        return {**study, "schema": SCHEMA}, trials
    trials = trials.copy()
    if "stage" not in trials.columns:
        trials["stage"] = "grid" if study.get("kind") == "grid" else "search"
    if "config_id" not in trials.columns:
        ctx = run_context(study.get("study") or {})
        known = set(TRIAL_COLUMNS) | {"point", "study"}
        hp = [c for c in trials.columns if c not in known]
        trials["config_id"] = [config_id(ctx, {k: v for k, v in r.items() if not _missing(v)})
                               for r in trials[hp].to_dict("records")]
    return {**study, "schema": SCHEMA}, trials


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def find_latest(root: str | Path = "results") -> Path | None:
    """The most recently modified results folder under ``root``."""
    root = Path(root)
    if not root.is_dir():
        return None
    folders = [p for p in root.iterdir() if p.is_dir() and ((p / "study.json").exists() or (p / "result.json").exists())]
    return max(folders, key=lambda p: p.stat().st_mtime, default=None)
