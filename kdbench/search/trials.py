"""What runs in a Ray worker (the trainable) and what proposes and stops trials (Optuna, ASHA)."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
from pathlib import Path

import optuna
import ray
import torch
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from .. import checkpoints, results
from ..metrics import FINAL, mode
from ..study import Study
from ..trial import resolve_trial, trial_config_id
from ..teacher import load_teacher
from ..records import Epoch, TrainState
from .writer import MATRICES, ROW
from ..train import TrainConfig, distill, resolve_device

def _trial_configs_grid(study: Study) -> list[dict]:
    return [{"point": i, "method": m, "seed": s, "stage": "grid", **dict(values)}
            for i, (m, s, values) in enumerate(study.grid)]


class _Space:
    """Optuna define-by-run space: the method (if searched) first, then the parameters that apply to it.

    A class, not a closure: Ray pickles the searcher with its experiment state.
    """

    def __init__(self, study: Study):
        self.study = study

    def __call__(self, trial):
        study, method = self.study, self.study.method
        for p in study.space:
            if p.name == "method":
                method = trial.suggest_categorical("method", list(p.choices))
        for p in study.space:
            if p.name == "method" or (p.when and method not in p.when):
                continue
            if p.type == "categorical":
                trial.suggest_categorical(p.name, list(p.choices))
            elif p.type == "int":
                trial.suggest_int(p.name, int(p.low), int(p.high))
            else:
                trial.suggest_float(p.name, p.low, p.high, log=p.type == "loguniform")
        return {"method": method, "seed": study.seed}


def _sampler(study: Study, earlier: int = 0):
    """The study's sampler. ``earlier``: trials a previous run of the folder already made; a resumed run's
    sampler is seeded past them, or its random start-up proposals would repeat the first run's."""
    seed = study.seed + earlier
    if study.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, study.samples // 4)))
    if study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _trainable(config: dict, study: Study, teacher: dict, data, threads: int, resume_from: dict):
    """One trial, in a Ray worker on any machine of the cluster: the data set and the teacher come
    through Ray's object store (put there once by the driver); distill; report every epoch, with a
    checkpoint every ``study.checkpoint_every`` epochs, and at the first epoch's end once
    ``study.checkpoint_minutes`` have passed since the last one."""
    started_at = time.time()
    torch.set_num_threads(max(1, threads))
    method, recipe, seed = resolve_trial(study, config.get("trial", config))  # grids nest their point
    cid = trial_config_id(study, method, recipe)
    device = resolve_device("auto")
    data = data.to(device)
    teacher = load_teacher(teacher, data)
    # Ray's retry of this trial after its worker died, else the checkpoint an interrupted run left.
    ckpt = tune.get_checkpoint()
    if ckpt is None and (cid, seed) in resume_from:
        ckpt = tune.Checkpoint(resume_from[(cid, seed)]["uri"])
    state = None
    if ckpt is not None:
        try:
            with ckpt.as_directory() as d:
                state = TrainState.from_state_dict(checkpoints.load(Path(d)))
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
            # unreadable (cut short, removed, corrupt): start over rather than fail the trial
            print(f"kdbench: checkpoint {ckpt.path} unreadable ({type(e).__name__}: {e}); the trial starts over")
    # Where and how it ran: what `kdbench rerun` needs to reproduce it, and proof of a cluster's spread.
    where = {"node": ray.get_runtime_context().get_node_id()[:12], "host": socket.gethostname(),
             "threads": torch.get_num_threads(), "device": str(device), "resumed_from": state.epoch if state else 0,
             "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()), "started_at": started_at}
    last_epoch, last_saved = 0, time.monotonic()

    def due(epoch: int) -> bool:
        every, minutes = study.checkpoint_every, study.checkpoint_minutes
        return bool(every and epoch % every == 0) or bool(minutes and time.monotonic() - last_saved >= 60 * minutes)

    def report(e: Epoch):
        nonlocal last_epoch, last_saved
        last_epoch = e.row["epoch"]
        # ROW names the epoch's row among what Tune carries (the writer's epochs.csv row); the run's numbers, where
        # and how it ran go with it to the trials.csv row.
        result = {**e.row, ROW: list(e.row), **where, "ended_at": time.time()}
        if e.final is not None:
            result |= {**e.final.run, "autocast": e.final.precision, MATRICES: e.final.matrices}
        if e.final is not None and e.final.weights is not None:  # the trained student, through the storage to the driver
            with tempfile.TemporaryDirectory(prefix="kdbench-student-") as d:
                checkpoints.save_student(Path(d), results.student_file(e.final.weights, study.student, data.num_classes,
                                                                       cid, last_epoch, {}))
                return tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))
        if e.state is None:
            return tune.report(result)
        last_saved = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="kdbench-ckpt-") as d:
            checkpoints.save(Path(d), e.state.state_dict(), {"config_id": cid, "seed": seed, "epoch": last_epoch,
                                                             "pid": os.getpid(), "history": e.state.history})
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))

    try:
        distill(TrainConfig(study.student, method, recipe, seed, eval_val=study.eval_val, eval_test=study.eval_test,
                            final_every_epoch=bool(set(study.objectives) & set(FINAL))),
                data, teacher, report, resume=state, state_when=due, final_weights=study.keep_students != "none")
    except Exception as e:  # NaN loss, OOM, a bug: the trial is failed, with its reason; the search goes on
        tune.report({"epoch": last_epoch, "failure": f"{type(e).__name__}: {e}", **where, "ended_at": time.time()})


class ResumableASHA(tune.schedulers.ASHAScheduler):
    """ASHA whose rungs start with the validation curves of trials an earlier run of the folder recorded,
    so that a resumed search stops (and keeps) trials as the uninterrupted one would have."""

    def __init__(self, *args, curves: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        for key, curve in (curves or {}).items():  # key -> {epoch: val_top1}
            for bracket in self._brackets:
                for milestone, recorded in bracket._rungs:
                    if int(milestone) in curve:
                        recorded[f"earlier:{key}"] = curve[int(milestone)]


class FidelityAwareOptuna(OptunaSearch):
    """OptunaSearch that tells Optuna a trial stopped before ``max_epochs`` as PRUNED, a failed one as FAIL.

    Ray hands a trial stopped by ASHA to the searcher as complete with its truncated result; a
    low-fidelity point must not steer the sampler or enter Optuna's Pareto set.
    """

    def __init__(self, *args, max_epochs: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs

    def _setup_study(self, mode):
        super()._setup_study(mode)
        if isinstance(self._metric, list) and self._ot_study is not None:  # optuna-dashboard shows these names
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names(list(self._metric))

    def on_trial_complete(self, trial_id, result=None, error=False):
        if result is not None and result.get("failure"):
            return super().on_trial_complete(trial_id, None, error=True)
        if result is not None and result.get("epoch", 0) < self.max_epochs:
            result = None  # -> PRUNED
        return super().on_trial_complete(trial_id, result, error)


def _make_searcher(study: Study, out: Path, max_epochs: int, finished: set = frozenset()) -> FidelityAwareOptuna:
    """The searcher, on the folder's optuna.db. ``finished``: the (config_id, seed) of trials.csv's rows."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'optuna.db'}")
    earlier = 0
    # Trials an interrupted run left RUNNING (or enqueued and never started) will never report: mark them
    # failed, and ask for the same parameters first, so that they run again (from their checkpoints)
    # instead of new proposals -- unless trials.csv already holds them (a kill can land between kdbench
    # writing a trial's row and Optuna recording it).
    if study.name in optuna.get_all_study_names(storage):
        study_id = storage.get_study_id_from_name(study.name)
        pending = storage.get_all_trials(study_id, deepcopy=False,
                                         states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))
        again, asked = optuna.load_study(study_name=study.name, storage=storage), []
        earlier = len(storage.get_all_trials(study_id, deepcopy=False))
        for t in pending:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
            if not t.params:  # killed between Optuna's ask and its suggestions: nothing to repeat
                continue
            config = {"method": t.params.get("method", study.method), **t.params}
            method, recipe, seed = resolve_trial(study, config)
            if (trial_config_id(study, method, recipe), seed) not in finished and t.params not in asked:
                asked.append(t.params)
                again.enqueue_trial(t.params)
    metrics = [f"val_{o}" for o in study.objectives]
    modes = [mode(o) for o in study.objectives]
    # metric/mode go to the searcher only: a TuneConfig metric would silently collapse it to one objective.
    return FidelityAwareOptuna(space=_Space(study), metric=metrics, mode=modes, sampler=_sampler(study, earlier),
                               study_name=study.name, storage=storage, max_epochs=max_epochs)
