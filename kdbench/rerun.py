"""``kdbench rerun``: train one recorded trial again, exactly as it ran, and compare the numbers.

A trial row records its configuration, seed, thread count and device; with the same machine kind,
library versions and thread count, a rerun reproduces the trial's metrics bit for bit (the loop's
only randomness is seeded: model init, data order, augmentation).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .metrics import columns
from .results import ResultsError, read_folder
from .study import StudyError, study_from_dict
from .trial import resolve_trial, row_config, trial_config_id
from .teacher import study_data
from .train import TrainConfig, distill, resolve_device

__all__ = ["rerun_trial", "COMPARED"]

COMPARED = (*columns(), "best_test_top1")


class _Stop(Exception):
    """Raised from the report hook at the epoch where ASHA stopped the recorded trial."""


def rerun_trial(path: str | Path, trial_id: str, threads: int | None = None, device: str | None = None,
                data_root: str | None = None, report=None) -> dict:
    """Re-run trial ``trial_id`` of results folder ``path`` with its recorded configuration and seed.

    Args:
        threads: torch threads (default: the trial's recorded count, else 1).
        device: ``cpu`` / ``cuda`` (default: the recorded device when present here, else auto).
        report: per-epoch hook, as for :func:`kdbench.train.distill`.

    Returns:
        ``{"trial": the recorded row, "recorded": {metric: value}, "rerun": {metric: value},
        "threads": int, "device": str, "epochs": int}``; a trial stopped early is re-run up to the
        epoch it reached (its learning-rate schedule is the full run's, as in the search).
    """
    folder = read_folder(path)
    if folder.study.get("kind") not in ("search", "grid"):
        raise ResultsError(f"{path}: not a `kdbench tune` folder (no trials.csv to rerun from)")
    t = folder.trials
    match = t[t["trial_id"].astype(str) == str(trial_id)] if len(t) else t
    if match.empty:
        shown = ", ".join(t["trial_id"].astype(str).head(5)) if len(t) else "none yet"
        raise ResultsError(f"{Path(path) / 'trials.csv'}: no trial {trial_id!r}; allowed: a trial_id of that "
                           f"table ({shown}{', ...' if len(t) > 5 else ''})")
    row = {k: v for k, v in match.iloc[0].to_dict().items() if not (isinstance(v, float) and math.isnan(v))}
    if threads is not None and threads < 1:
        raise StudyError(f"--threads {threads}: allowed: >= 1")
    if row.get("status") == "failed":
        raise ResultsError(f"{path}: trial {trial_id} failed ({row.get('failure', 'no reason recorded')}); "
                           f"allowed: a completed or stopped trial")
    if int(row.get("workers", 1)) > 1:  # one process computes what N workers did only with sync_bn, and not bit for bit
        raise ResultsError(f"{path}: trial {trial_id} ran on {int(row['workers'])} data-parallel workers; allowed: a "
                           f"trial of one process (rerun a multi-worker one with kdbench tune --workers-per-trial)")
    study = study_from_dict(folder.study["study"])
    method, recipe, seed = resolve_trial(study, row_config(row))
    if "config_id" in row and trial_config_id(study, method, recipe) != row["config_id"]:
        raise ResultsError(f"{path}: trial {trial_id} does not match the study in study.json; allowed: a folder "
                           f"written by one study")
    threads = threads or int(row.get("threads", 1))
    recorded = str(row.get("device", ""))
    usable = recorded.startswith("cpu") or (recorded.startswith("cuda") and torch.cuda.is_available())
    dev = resolve_device(device or (recorded if usable else "auto"))
    epochs = int(row["epochs"])

    data, teacher, _ = study_data(study, data_root, device=dev)
    last = {}

    def hook(e):  # a kdbench.records.Epoch
        last.update(e.row)
        if report is not None:
            report(e)
        if e.row["epoch"] >= epochs and epochs < recipe.epochs:
            raise _Stop

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        distill(TrainConfig.of_trial(study, method, recipe, seed), data, teacher, hook)
    except _Stop:  # the epoch where ASHA stopped the recorded trial
        assert last["epoch"] == epochs
    finally:
        torch.set_num_threads(before)
    keys = [k for k in COMPARED if k in row and k in last]
    return {"trial": row, "recorded": {k: float(row[k]) for k in keys}, "rerun": {k: float(last[k]) for k in keys},
            "threads": threads, "device": str(dev), "epochs": epochs}
