"""The results-folder format, one owner: atomic writes while a run goes, reading back for reports.

A folder holds ``study.json`` (resolved study, environment, times), ``trials.csv`` (one row per
trial), ``epochs.csv`` (per-epoch history of every trial) and, for searches, ``optuna.db``.
A single ``kdbench train --out`` run writes ``result.json`` and ``epochs.csv``. Every table is
replaced atomically (temporary file + ``os.replace``): a crash never leaves a half-written one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import pandas as pd

__all__ = ["write_json", "write_text", "write_csv", "environment", "ResultsError", "read_folder", "Folder",
           "TRIAL_COLUMNS", "METRICS", "find_latest"]

# Final metrics of DESIGN §5, one column per split, in a stable order.
METRICS = ("top1", "geom_corr", "geom_err", "cka", "knn_top1")
TRIAL_COLUMNS = ("trial_id", "status", "fidelity", "method", "seed", "epochs",
                 *(f"{s}_{m}" for s in ("val", "test") for m in METRICS),
                 "best_test_top1", "last_test_top1", "params", "train_seconds", "images_per_second",
                 "seconds", "failure")


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
# Reading back


class Folder:
    """One readable results folder: its study description, trials and per-epoch history."""

    def __init__(self, path: Path, study: dict, trials: pd.DataFrame, epochs: pd.DataFrame | None):
        self.path, self.study, self.trials, self.epochs = path, study, trials, epochs

    @property
    def name(self) -> str:
        return self.study.get("name") or self.path.name


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise ResultsError(f"{path}: unreadable table ({str(e).splitlines()[0]})") from None


def read_folder(path: str | Path) -> Folder:
    """Read a results folder written by ``kdbench tune`` (or ``kdbench train --out``)."""
    path = Path(path)
    if not path.is_dir():
        raise ResultsError(f"{path}: no such results folder")
    meta_file = path / "study.json" if (path / "study.json").exists() else path / "result.json"
    if not meta_file.exists():
        raise ResultsError(f"{path}: not a kdbench results folder (no study.json or result.json)")
    try:
        study = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{meta_file}: corrupt JSON ({e})") from None
    if not isinstance(study, dict):
        raise ResultsError(f"{meta_file}: expected a JSON object")
    if meta_file.name == "result.json":  # a single train run: one trial row
        trials = pd.DataFrame([{**study.get("metrics", {}), "trial_id": "train", "status": "completed",
                                "fidelity": "full", "method": study.get("config", {}).get("method", {}).get("name"),
                                "seed": study.get("config", {}).get("seed")}])
        study = {"name": path.name, **study}
    else:
        if not (path / "trials.csv").exists():
            raise ResultsError(f"{path}: trials.csv is missing")
        trials = _read_csv(path / "trials.csv")
        missing = [c for c in ("trial_id", "status", "fidelity") if len(trials) and c not in trials.columns]
        if missing:
            raise ResultsError(f"{path / 'trials.csv'}: missing columns {', '.join(missing)}")
    epochs = _read_csv(path / "epochs.csv") if (path / "epochs.csv").exists() else None
    return Folder(path, study, trials, epochs)


def find_latest(root: str | Path = "results") -> Path | None:
    """The most recently modified results folder under ``root``."""
    root = Path(root)
    if not root.is_dir():
        return None
    folders = [p for p in root.iterdir() if p.is_dir() and ((p / "study.json").exists() or (p / "result.json").exists())]
    return max(folders, key=lambda p: p.stat().st_mtime, default=None)
