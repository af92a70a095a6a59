"""The driver's side of a run: the live state and the callback that keeps the results folder current."""

from __future__ import annotations

import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ray import tune

from .. import checkpoints, matrices, results
from ..metrics import DEFAULT_OBJECTIVES, better
from ..records import TrialRow
from ..trackers import Run, discard, open_trackers
from ..study import Study
from ..trial import resolve_trial, trial_config_id
from ..settings import trial_values
from .trainable import MATRICES, ROW, train_run


@dataclass
class SearchState:
    """What the live view shows; updated by the driver callback."""

    total: int
    started: float = field(default_factory=time.time)
    running: int = 0
    counts: dict = field(default_factory=lambda: {"completed": 0, "stopped": 0, "failed": 0})
    best: dict = field(default_factory=dict)  # objective -> (value, trial_id)
    last: str = ""
    first_start: float | None = None  # when this fit's first trial started (time.time())
    ends: list = field(default_factory=list)  # when each of its trials ended
    finished: list = field(default_factory=list)  # per finished trial: id, status, epochs, its val objectives
    active: dict = field(default_factory=dict)  # running trial id -> values, epoch, val objectives, started, node
    max_epochs: int = 0  # a trial's full fidelity
    objectives: tuple = DEFAULT_OBJECTIVES
    epochs_done: int = 0  # trial-epochs this fit has run (for the ETA)

    def eta(self) -> tuple[int, float | None]:
        """Trial-epochs left at most (ASHA may stop trials early), and the seconds they take at this fit's rate."""
        waiting = self.total - sum(self.counts.values()) - len(self.active)
        left = max(0, waiting) * self.max_epochs + sum(max(0, self.max_epochs - a["epoch"]) for a in list(self.active.values()))
        rate = self.epochs_done / (time.time() - self.first_start) if self.first_start and self.epochs_done else None
        return left, left / rate if rate else None


_NOT_SHOWN = {"stage", "point", "config_id", "seed"}


def _shown(study: Study, config: dict) -> dict:
    """What the live view shows of a trial's configuration: the searched values (a grid's or confirmation's fixed
    ones, method and seed)."""
    if config.get("stage", "search") == "search" and study.space:
        return {p.name: config[p.name] for p in study.space if p.name in config}
    return {k: v for k, v in config.items() if k not in _NOT_SHOWN} | {"seed": config.get("seed")}


def _trial_row(study: Study, trial, r: dict, status: str, seconds: float, failure: str = "") -> TrialRow:
    """``r``: the trial's last report with a row (or its failure)."""
    config = trial.config.get("trial", trial.config)
    method, recipe, seed = resolve_trial(study, config)
    return TrialRow(trial_id=trial.trial_id, config_id=trial_config_id(study, method, recipe),
                    stage=config.get("stage", "grid" if study.is_grid else "search"), status=status, seed=seed,
                    epochs=r.get("epoch", 0), values=trial_values(method, recipe),
                    measured={k: r[k] for k in results.TRIAL_COLUMNS if k in r and k != "failure"}, seconds=seconds,
                    failure=r.get("failure", "") or failure, point=trial.config.get("trial", {}).get("point"))


def _reason(trial) -> str:
    """Why Ray gave a trial up: the last error's type and first line (e.g. its worker process died)."""
    error = None
    # The exception itself, where Ray could pickle it: from the trial's local folder, where Ray writes it before
    # this callback (its copy in the storage may not be synced yet), else from the storage.
    local = getattr(trial, "pickled_error_file", None)
    readers = ([lambda: pickle.loads(Path(local).read_bytes())] if local and Path(local).is_file() else [])
    for read in readers + [trial.get_pickled_error]:
        try:
            error = read()
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
            continue
        if error is not None:
            break
    if error is None:
        local = getattr(trial, "error_file", None)
        text = Path(local).read_text() if local and Path(local).is_file() else ""
        text = text or str(trial.get_error() or "")  # "Failure # N (occurred at T)\n<the error>", once per failure
        lines = [line.strip() for line in text.rsplit("Failure # ", 1)[-1].splitlines()[1:] if line.strip()]
        return lines[0][:200] if lines else "the trial raised an error"
    detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


class ResultsWriter(tune.Callback):
    """Driver side: one epochs.csv row per report; one trials.csv row per finished trial, written at once."""

    def __init__(self, study: Study, out: Path, state: SearchState, rows: list, epochs: list, on_update,
                 resume_from: dict, class_names: tuple = (), storage: str = ""):
        self.study, self.out, self.state, self.rows, self.epochs = study, out, state, rows, epochs
        self.on_update, self.starts, self.resume_from, self.running = on_update, {}, resume_from, set()
        self.last = {}  # trial_id -> its last report with a row or a failure (a mid-epoch checkpoint's report has neither)
        self.trackers = open_trackers(study.trackers, out, study.name, lambda line: print(line, file=sys.stderr))
        if rows or resume_from:  # a resumed folder: the runs of trials killed before their first checkpoint go
            discard(self.trackers, {str(r["trial_id"]) for r in rows} |
                    {str(c[k]) for c in resume_from.values() for k in ("trial_id", "lineage") if c.get(k)})
        self.tracked = {}  # trial_id -> its Run for the trackers
        self.class_names, self.storage = class_names, storage  # storage: the folder's checkpoint root

    def __getstate__(self):  # Ray pickles its run config; the live view's hook holds locks and stays here
        return {**self.__dict__, "on_update": None, "trackers": []}

    def _tracked(self, trial) -> Run:
        """The trial as the trackers see it: a trial resumed from an earlier run's checkpoint continues its runs."""
        if trial.trial_id not in self.tracked:
            config = trial.config.get("trial", trial.config)
            method, recipe, seed = resolve_trial(self.study, config)
            cid = trial_config_id(self.study, method, recipe)
            earlier = self.resume_from.get((cid, seed)) or {}
            self.tracked[trial.trial_id] = Run(
                trial.trial_id, trial_values(method, recipe),
                {"config_id": cid, "seed": seed, "stage": config.get("stage", "grid" if self.study.is_grid else "search"),
                 "method": method.name}, checkpoints.lineage(earlier, trial.trial_id), earlier.get("trial_id", ""),
                tuple(_shown(self.study, config)))
        return self.tracked[trial.trial_id]

    def _update(self):
        if self.on_update is not None:
            self.on_update(self.state)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.starts.setdefault(trial.trial_id, time.time())
        self.state.first_start = self.state.first_start or time.time()
        self.running.add(trial.trial_id)
        self.state.running = len(self.running)
        config = trial.config.get("trial", trial.config)
        self.state.active.setdefault(trial.trial_id, {"values": _shown(self.study, config), "epoch": 0, "val": {},
                                                      "started": self.starts[trial.trial_id], "node": ""})
        self._update()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "failure" in result or ROW in result:
            self.last[trial.trial_id] = result
        if "failure" in result or ROW not in result:  # a mid-epoch checkpoint has no row
            return
        history = [{k: result[k] for k in result[ROW]}]
        if result.get("resumed_from") and result["epoch"] == result["resumed_from"] + 1:  # the epochs an earlier run made
            config = trial.config.get("trial", trial.config)
            method, recipe, seed = resolve_trial(self.study, config)
            earlier = self.resume_from.get((trial_config_id(self.study, method, recipe), seed), {})
            history = [h for h in earlier.get("history", []) if h["epoch"] <= result["resumed_from"]] + history
        for r in history:
            self.epochs.append({"trial_id": trial.trial_id, **r})
            for t in self.trackers:
                t.epoch(self._tracked(trial), r)
        a = self.state.active.get(trial.trial_id)
        if a is not None:
            self.state.epochs_done += 1
            a |= {"epoch": result["epoch"], "node": result.get("node_ip", a["node"]),
                  "val": {o: result[f"val_{o}"] for o in self.study.objectives if f"val_{o}" in result} or a["val"]}
            self._update()

    def _finish(self, trial, status: str):
        r, state = self.last.pop(trial.trial_id, None) or trial.last_result or {}, self.state
        state.ends.append(time.time())
        if status != "failed" and r.get("failure"):
            status = "failed"
        elif status != "failed":
            status = "completed" if r.get("epoch", 0) >= self.study.max_epochs else "stopped"
        died = status == "failed" and not r.get("failure")  # Ray gave it up: its worker died, retries spent
        why = f"{_reason(trial)} (after {self.study.checkpoint.max_failures} retries)" if died else ""
        tr = _trial_row(self.study, trial, r, status, time.time() - self.starts.get(trial.trial_id, time.time()), why)
        row = tr.as_row()
        # The trackers' runs end before the row is written: a kill in between reruns the trial, whose runs continue
        # (ended after the row, a kill in between would leave them open for good). A tracker's failure is a warning.
        for t in self.trackers:
            t.end(self._tracked(trial), results.final_metrics(row), status)
        self.tracked.pop(trial.trial_id, None)
        self.rows.append(row)
        # History first, so a trials row never lacks it; only finished trials (an interrupted one reruns).
        # A retried trial reports again the epochs after its checkpoint: the last report of an epoch wins.
        finished = {r["trial_id"] for r in self.rows}
        history = {(e["trial_id"], e["epoch"]): e for e in self.epochs if e["trial_id"] in finished}
        results.write_csv(self.out / "epochs.csv", list(history.values()))
        results.write_csv(self.out / "trials.csv", self.rows, results.TRIAL_COLUMNS)
        if status == "completed" and r.get(MATRICES):  # the class geometry, beside the row (see kdbench.matrices)
            mats = {k: np.asarray(v, dtype=np.float32) for k, v in r[MATRICES].items()}  # (lists from Ray Train)
            matrices.write_run(self.out, trial.trial_id, mats)
            if not (self.out / matrices.MATRICES / "teacher.npz").exists():
                matrices.write_teacher(self.out / matrices.MATRICES / "teacher.npz", mats, self.class_names)
        # A multi-worker trial's checkpoints are Ray Train's: Tune hears only their paths (``checkpoint_path``).
        ckpt = trial.checkpoint or (tune.Checkpoint(r["checkpoint_path"]) if r.get("checkpoint_path") else None)
        if status == "completed" and self.study.keep_students != "none" and ckpt is not None:
            student = checkpoints.read_student(ckpt)
            if student is not None:  # its final metrics are the row's
                student["metrics"] = results.final_metrics(row)
                results.write_student(self.out / results.STUDENTS / f"{trial.trial_id}.pt", student)
        # A finished trial needs no checkpoint: neither its own nor the one it resumed from.
        if trial.checkpoint is not None:
            checkpoints.remove(trial.checkpoint)
        earlier = self.resume_from.pop((row["config_id"], int(row["seed"])), None)
        if earlier:
            checkpoints.remove(earlier["uri"])
        if self.study.resources.workers_per_trial > 1 and self.storage:  # its Ray Train run's folder, checkpoints and all
            checkpoints.remove(f"{self.storage}/{train_run(row['config_id'], int(row['seed']))}")
        self.running.discard(trial.trial_id)
        state.active.pop(trial.trial_id, None)
        state.running = len(self.running)
        state.counts[status] += 1
        if row["fidelity"] == "full":
            for o in self.study.objectives:
                v = row.get(f"val_{o}")
                if v is not None and (o not in state.best or better(o, v, state.best[o][0])):
                    state.best[o] = (v, trial.trial_id)
        state.last = f"{trial.trial_id}: {status}"
        state.finished.append({"trial_id": trial.trial_id, "status": status, "epochs": row.get("epochs", 0),
                               **{f"val_{o}": row.get(f"val_{o}") for o in self.study.objectives}})
        self._update()

    def on_experiment_end(self, trials, **info):
        for t in self.trackers:
            t.close()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, "completed")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "failed")


def _read_done(out: Path) -> tuple[list, list]:
    """Rows of a previous, interrupted run of this folder."""
    def rows(name):
        p = out / name
        return results.read_table(p).to_dict("records") if p.exists() and p.stat().st_size else []
    return rows("trials.csv"), rows("epochs.csv")
