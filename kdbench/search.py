"""``kdbench tune``: Ray Tune runs the trials, Optuna proposes them, ASHA stops the poor ones early.

The only module that imports Ray. Flow: validated Study -> teacher (cache hit or trained once, in
the driver) -> a Tuner whose trials each run ``distill()`` and report once per epoch -> a driver
callback that keeps ``trials.csv``/``epochs.csv`` up to date (atomically) as each trial ends.

Resume is kdbench's own: finished trials are read back from ``trials.csv``; the Optuna study is
reloaded from ``optuna.db`` (for searches) or the finished grid points are skipped (for grids), and
only the remaining trials run. Ray's experiment state lives in a temporary folder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

for _k, _v in {"RAY_AIR_NEW_OUTPUT": "0", "RAY_USAGE_STATS_ENABLED": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
               "RAY_DEDUP_LOGS": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "3600",
               "RAY_CHDIR_TO_TRIAL_DIR": "0",
               # A failed trial's last report carries its reason and no metrics; ASHA skips such a result.
               "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}.items():
    os.environ.setdefault(_k, _v)

import optuna  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from . import results  # noqa: E402
from .data import load_data  # noqa: E402
from .confirm import plan_confirm  # noqa: E402
from .study import Confirm, Study, StudyError, resolve_trial, study_from_dict, trial_config_id  # noqa: E402
from .train import TrainConfig, distill, get_teacher, load_teacher, resolve_device, trial_values  # noqa: E402

__all__ = ["run_study", "run_confirm", "SearchState"]

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


def _sampler(study: Study):
    if study.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=study.seed, population_size=max(4, min(50, study.samples // 4)))
    if study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=study.seed)
    return optuna.samplers.TPESampler(seed=study.seed)


def _trainable(config: dict, study: Study, teacher: dict, data, threads: int):
    """One trial, in a Ray worker on any machine of the cluster: the data set and the teacher come
    through Ray's object store (put there once by the driver); distill; report every epoch."""
    torch.set_num_threads(max(1, threads))
    method, recipe, seed = resolve_trial(study, config.get("trial", config))  # grids nest their point
    device = resolve_device("auto")
    data = data.to(device)
    teacher = load_teacher(teacher, data)
    # Where and how it ran: what `kdbench rerun` needs to reproduce it, and proof of a cluster's spread.
    where = {"node": ray.get_runtime_context().get_node_id()[:12], "host": socket.gethostname(),
             "threads": torch.get_num_threads(), "device": str(device)}
    last_epoch = 0

    def report(row: dict):
        nonlocal last_epoch
        last_epoch = row["epoch"]
        tune.report({**row, **where})

    try:
        distill(TrainConfig(study.student, method, recipe, seed), data, teacher, report)
    except Exception as e:  # NaN loss, OOM, a bug: the trial is failed, with its reason; the search goes on
        tune.report({"epoch": last_epoch, "failure": f"{type(e).__name__}: {e}", **where})


@dataclass
class SearchState:
    """What the live view shows; updated by the driver callback."""

    total: int
    started: float = field(default_factory=time.time)
    running: int = 0
    counts: dict = field(default_factory=lambda: {"completed": 0, "stopped": 0, "failed": 0})
    best: dict = field(default_factory=dict)  # objective -> (value, trial_id)
    last: str = ""


class FidelityAwareOptuna(OptunaSearch):
    """OptunaSearch that tells Optuna a trial stopped before ``max_epochs`` as PRUNED, a failed one as FAIL.

    Ray hands a trial stopped by ASHA to the searcher as complete with its truncated result; a
    low-fidelity point must not steer the sampler or enter Optuna's Pareto set.
    """

    def __init__(self, *args, max_epochs: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs

    def on_trial_complete(self, trial_id, result=None, error=False):
        if result is not None and result.get("failure"):
            return super().on_trial_complete(trial_id, None, error=True)
        if result is not None and result.get("epoch", 0) < self.max_epochs:
            result = None  # -> PRUNED
        return super().on_trial_complete(trial_id, result, error)


def _make_searcher(study: Study, out: Path, max_epochs: int) -> FidelityAwareOptuna:
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'optuna.db'}")
    # Trials left RUNNING by an interrupted run will never report: mark them failed before resuming.
    if study.name in optuna.get_all_study_names(storage):
        study_id = storage.get_study_id_from_name(study.name)
        for t in storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    metrics = [f"val_{o}" for o in study.objectives]
    modes = ["min" if o == "geom_err" else "max" for o in study.objectives]
    # metric/mode go to the searcher only: a TuneConfig metric would silently collapse it to one objective.
    return FidelityAwareOptuna(space=_Space(study), metric=metrics, mode=modes, sampler=_sampler(study),
                               study_name=study.name, storage=storage, max_epochs=max_epochs)


def _trial_row(study: Study, trial, status: str, seconds: float) -> dict:
    r = trial.last_result or {}
    config = trial.config.get("trial", trial.config)
    method, recipe, seed = resolve_trial(study, config)
    hp = trial_values(method, recipe)
    row = {"trial_id": trial.trial_id, "config_id": trial_config_id(study, method, recipe),
           "stage": config.get("stage", "grid" if study.is_grid else "search"), "status": status,
           "fidelity": "full" if status == "completed" else "low",
           "seed": seed, "epochs": r.get("epoch", 0), **hp}
    if "point" in trial.config.get("trial", {}):
        row["point"] = trial.config["trial"]["point"]
    for k in results.TRIAL_COLUMNS:
        if k not in row and k in r:
            row[k] = r[k]
    row["seconds"] = seconds
    row["failure"] = r.get("failure", "")
    return row


class ResultsWriter(tune.Callback):
    """Driver side: one epochs.csv row per report; one trials.csv row per finished trial, written at once."""

    def __init__(self, study: Study, out: Path, state: SearchState, rows: list, epochs: list, on_update):
        self.study, self.out, self.state, self.rows, self.epochs = study, out, state, rows, epochs
        self.on_update, self.starts = on_update, {}

    def __getstate__(self):  # Ray pickles its run config; the live view's hook holds locks and stays here
        return {**self.__dict__, "on_update": None}

    def _update(self):
        if self.on_update is not None:
            self.on_update(self.state)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.starts[trial.trial_id] = time.time()
        self.state.running += 1
        self._update()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "failure" in result:
            return
        keep = ("loss_", "train_", "val_", "test_", "best_", "lr", "epoch_seconds")
        self.epochs.append({"trial_id": trial.trial_id, "epoch": result["epoch"],
                            **{k: v for k, v in result.items() if k.startswith(keep)}})

    def _finish(self, trial, status: str):
        r, state = trial.last_result or {}, self.state
        if status != "failed" and r.get("failure"):
            status = "failed"
        elif status != "failed":
            status = "completed" if r.get("epoch", 0) >= self.study.max_epochs else "stopped"
        row = _trial_row(self.study, trial, status, time.time() - self.starts.get(trial.trial_id, time.time()))
        if status == "failed" and not row["failure"]:
            row["failure"] = "the trial raised an error (see Ray's log with --verbose)"
        self.rows.append(row)
        # History first, so a trials row never lacks it; only finished trials (an interrupted one reruns).
        finished = {r["trial_id"] for r in self.rows}
        results.write_csv(self.out / "epochs.csv", [e for e in self.epochs if e["trial_id"] in finished])
        results.write_csv(self.out / "trials.csv", self.rows, results.TRIAL_COLUMNS)
        state.running = max(0, state.running - 1)
        state.counts[status] += 1
        if row["fidelity"] == "full":
            for o in self.study.objectives:
                v = row.get(f"val_{o}")
                better = (lambda a, b: a < b) if o == "geom_err" else (lambda a, b: a > b)
                if v is not None and (o not in state.best or better(v, state.best[o][0])):
                    state.best[o] = (v, trial.trial_id)
        state.last = f"{trial.trial_id}: {status}"
        self._update()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, "completed")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "failed")


def _read_done(out: Path) -> tuple[list, list]:
    """Rows of a previous, interrupted run of this folder."""
    def rows(name):
        p = out / name
        return results._read_csv(p).to_dict("records") if p.exists() and p.stat().st_size else []
    return rows("trials.csv"), rows("epochs.csv")


def _init_ray(address: str | None, verbose: bool):
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=verbose,
                  logging_level=logging.INFO if verbose else logging.ERROR, configure_logging=True)
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise StudyError(f"--address {address}: cannot connect to a Ray cluster ({str(e).splitlines()[0]})") from None
    else:  # never attach to a leftover local cluster by accident
        ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)
    return True


def _load(study: Study, data_root: str | None, download: bool, on_teacher, on_teacher_ready):
    """Data set and teacher, once, in the driver (teacher from the cache or trained here)."""
    root = str(Path(data_root or study.data_root).expanduser().resolve())
    device = resolve_device("auto")
    data = load_data(study.dataset, root, study.split_seed, download=download, device=device)
    teacher, hit = get_teacher(data, study.teacher, study.teacher_recipe, study.teacher_seed, study.split_seed,
                               report=on_teacher)
    on_teacher_ready(teacher.meta, hit)
    return device, data.to("cpu"), teacher, hit  # the trials get the data through Ray's object store


def run_study(study: Study, out: Path, *, resume: bool = False, address: str | None = None,
              data_root: str | None = None, download: bool = False, gpus_per_trial: float | None = None,
              verbose: bool = False,
              on_update: Callable[[SearchState], None] = lambda s: None,
              on_teacher: Callable[[dict], None] | None = None, on_teacher_ready=lambda meta, hit: None) -> dict:
    """Run (or resume) ``study``, writing its results folder ``out``; return a summary.

    A study with ``[confirm]`` runs its confirmation right after the search (see :func:`run_confirm`).

    Args:
        study: validated study (``samples`` and ``concurrency`` already resolved).
        out: results folder: created (fresh run) or continued (``resume``).
        resume: continue a previous run in ``out`` (finished trials are neither lost nor rerun).
        address: Ray cluster address (``auto``, ``ray://...``); a fresh local instance when None.
        data_root: folder of the CIFAR archives (overrides the study's).
        download: fetch CIFAR into ``data_root`` when missing (where the internet is reachable).
        gpus_per_trial: GPUs per trial (fractions share one); None: the study's, else automatic.
        verbose: let Ray and Optuna log.
        on_update: called with the live SearchState whenever a trial starts or ends.
        on_teacher: per-epoch report while the teacher trains (only on a cache miss).
        on_teacher_ready: called with the teacher's metadata and whether it came from the cache.
    """
    out = Path(out).resolve()
    if resume:
        if not (out / "study.json").exists():
            raise StudyError(f"--resume {out}: no study.json there; nothing to resume")
        before = results.read_study(out).get("name")
        if before != study.name:  # another study's trials would be mixed into this table
            raise StudyError(f"--resume {out}: holds study {before!r}, not {study.name!r}; allowed: the same study file")
        _check_unlocked(out)
    elif out.exists() and any(out.iterdir()):
        raise StudyError(f"--out {out}: folder exists and is not empty; pass --resume to continue it, or another --out")
    device, data, teacher, hit = _load(study, data_root, download, on_teacher, on_teacher_ready)
    rows, epochs = _read_done(out) if resume else ([], [])
    remaining = study.trial_count() - sum(r.get("stage") != "confirm" for r in rows)
    # Ray before the folder: a cluster that cannot be reached leaves nothing half-written behind.
    started_ray = _init_ray(address, verbose) if remaining > 0 or study.confirm else False
    try:
        out.mkdir(parents=True, exist_ok=True)
        with results.FolderLock(out, "tune"):
            summary = _run(study, out, resume, teacher, hit, device, data, rows, epochs, remaining, gpus_per_trial,
                           verbose, on_update)
            if study.confirm is not None and summary["trials"] >= study.trial_count():
                summary["confirm"] = _confirm(study, out, study.confirm, teacher, data, gpus_per_trial, verbose,
                                              on_update)
        return summary
    finally:
        if started_ray:
            ray.shutdown()


def _check_unlocked(out: Path):
    pid = results.FolderLock(out, "").holder()
    if pid is not None:
        raise StudyError(f"{out}: still running (pid {pid} is writing it); allowed: a folder no run is writing")


def _run(study, out, resume, teacher, hit, device, data, rows, epochs, remaining, gpus_per_trial, verbose,
         on_update) -> dict:
    meta = {"name": study.name, "kind": "grid" if study.is_grid else "search", "study": study.to_dict(),
            "teacher": {k: v for k, v in teacher.meta.items() if k != "path"} | {"cache_hit": hit},
            "environment": results.environment(str(device)), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "ended": None, "samples": study.trial_count(), "reference": dict(study.reference)}
    if resume:
        previous = results.read_study(out)
        meta["started"] = previous.get("started", meta["started"])
        meta["resumed"] = previous.get("resumed", 0) + 1
        if "confirm" in previous:
            meta["confirm"] = previous["confirm"]
    results.write_json(out / "study.json", meta)

    state = SearchState(total=study.trial_count())
    for r in rows:
        if r.get("stage") != "confirm":
            state.counts[r["status"]] = state.counts.get(r["status"], 0) + 1
    if remaining > 0:
        todo = [c for c in _trial_configs_grid(study) if c["point"] not in _done_points(rows)] if study.is_grid else None
        _fit(study, out, teacher.blob(), data, rows, epochs, state, remaining, todo, gpus_per_trial, verbose, on_update)
    meta["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results.write_json(out / "study.json", meta)
    return {"out": str(out), "trials": sum(r.get("stage") != "confirm" for r in rows), "counts": dict(state.counts),
            "best": dict(state.best), "seconds": time.time() - state.started}


def _done_points(rows) -> set:
    return {int(r["point"]) for r in rows if "point" in r and r["point"] == r["point"]}


# ---------------------------------------------------------------------------------------------
# Confirmation: the search's best configurations and the presets, on fresh seeds


def run_confirm(out: Path, confirm: Confirm, *, concurrency: int | None = None, cpus_per_trial: float | None = None,
                gpus_per_trial: float | None = None, address: str | None = None, data_root: str | None = None,
                verbose: bool = False, on_update: Callable[[SearchState], None] = lambda s: None,
                on_teacher: Callable[[dict], None] | None = None, on_teacher_ready=lambda meta, hit: None,
                on_plan=lambda picked, todo: None) -> dict:
    """Retrain a finished search's candidates and the presets on fresh seeds; append them to ``out``.

    Resumable and idempotent: the (configuration, seed) pairs already in ``trials.csv`` with
    ``stage = confirm`` are not run again. Same Ray Tune path as the search, without early stopping.
    """
    out = Path(out).resolve()
    meta = results.read_study(out)
    if meta.get("kind") != "search":
        raise StudyError(f"{out}: holds a {meta.get('kind', 'single')} run, not a search; a grid needs no "
                         f"confirmation (its seeds are already there); allowed: the folder of a search")
    _check_unlocked(out)
    if not meta.get("ended"):
        raise StudyError(f"{out}: the search has not finished (no end time in study.json); finish it first with "
                         f"kdbench tune STUDY --out {out} --resume")
    study = study_from_dict(meta["study"])
    study = dataclasses.replace(study, **{k: v for k, v in (("concurrency", concurrency),
                                                             ("cpus_per_trial", cpus_per_trial)) if v is not None})
    folder = results.read_folder(out)
    plan, picked = plan_confirm(study, folder.trials, confirm, str(out))
    done = _confirmed_pairs(folder.trials)
    on_plan(picked, [p for p in plan if (p["config_id"], p["seed"]) not in done])
    if all((p["config_id"], p["seed"]) in done for p in plan):
        return {"out": str(out), "added": 0, "planned": len(plan), "candidates": picked, "seconds": 0.0}
    _, data, teacher, _ = _load(study, data_root, False, on_teacher, on_teacher_ready)
    started_ray = _init_ray(address, verbose)
    try:
        with results.FolderLock(out, "confirm"):
            return _confirm(study, out, confirm, teacher, data, gpus_per_trial, verbose, on_update)
    finally:
        if started_ray:
            ray.shutdown()


def _confirmed_pairs(trials) -> set:
    if len(trials) == 0 or "stage" not in trials.columns:
        return set()
    c = trials[trials["stage"] == "confirm"]
    return set(zip(c["config_id"].astype(str), c["seed"].astype(int)))


def _confirm(study, out, confirm, teacher, data, gpus_per_trial, verbose, on_update) -> dict:
    started = time.time()
    plan, picked = plan_confirm(study, results.read_folder(out).trials, confirm, str(out))
    rows, epochs = _read_done(out)
    done = {(str(r["config_id"]), int(r["seed"])) for r in rows if r.get("stage") == "confirm"}
    todo = [p for p in plan if (p["config_id"], p["seed"]) not in done]
    meta = results.read_study(out)
    meta["confirm"] = {"seeds": sorted({p["seed"] for p in plan}), "top": confirm.top, "with": list(confirm.with_),
                       "candidates": [{k: v for k, v in p.items() if k != "values"} for p in picked],
                       "started": meta.get("confirm", {}).get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
                       "ended": None}
    results.write_json(out / "study.json", meta)
    state = SearchState(total=len(plan))
    state.counts["completed"] = len(done & {(p["config_id"], p["seed"]) for p in plan})
    if todo:
        _fit(study, out, teacher.blob(), data, rows, epochs, state, len(todo), todo, gpus_per_trial, verbose,
             on_update, asha=False)
    meta["confirm"]["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results.write_json(out / "study.json", meta)
    return {"out": str(out), "added": len(todo), "planned": len(plan), "candidates": picked,
            "seconds": time.time() - started}


def _fit(study, out, teacher, data, rows, epochs, state, remaining, todo, gpus_per_trial, verbose, on_update,
         asha: bool | None = None):
    """One Tuner.fit: ``todo`` (a grid or a confirmation: fixed trials) or ``remaining`` trials of the searcher."""
    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        for name in ("ray", "ray.tune", "ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.ERROR)
    gpus = gpus_per_trial if gpus_per_trial is not None else study.gpus_per_trial
    if gpus is None:  # automatic: share each GPU among the concurrent trials
        gpus = min(1.0, 1.0 / study.concurrency) if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, study=study, teacher=teacher, data=data,
                             threads=int(study.cpus_per_trial)),
        {"cpu": study.cpus_per_trial, "gpu": gpus})
    if todo is not None:
        searcher, param_space, num_samples = None, {"trial": tune.grid_search(todo)}, 1
    else:
        searcher, param_space, num_samples = _make_searcher(study, out, study.max_epochs), {}, remaining
    scheduler = None
    if study.asha if asha is None else asha:
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="epoch", metric="val_top1", mode="max", max_t=study.max_epochs,
            grace_period=study.grace_period, reduction_factor=study.reduction_factor)
    scratch = Path(tempfile.mkdtemp(prefix="kdbench-ray-"))
    try:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            # reuse_actors: a finished trial's worker process (torch imported, data in memory) runs the next one
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                        max_concurrent_trials=study.concurrency, reuse_actors=True),
            run_config=tune.RunConfig(name="ray", storage_path=str(scratch), verbose=1 if verbose else 0,
                                      callbacks=[ResultsWriter(study, out, state, rows, epochs, on_update)],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      failure_config=tune.FailureConfig(max_failures=0)))
        tuner.fit()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
