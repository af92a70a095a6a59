"""``tune`` and ``confirm``: load data and teacher once, run Tuner.fit, resume what an interruption left."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
import ray
from ray import tune

from .. import checkpoints, results
from ..confirm import pending, plan_confirm
from ..flags import RESUMABLE, differences
from ..study import Confirm, Study, StudyError, study_from_dict
from ..teacher import study_data
from ..terms import check_method
from ..trackers import check_clients
from ..train import resolve_device
from ..trial import resolve_trial
from .schedulers import make_scheduler
from .searcher import grid_configs, make_searcher
from .resources import DRIVER_CPUS, check_gpus, gpus_of, trials_at_once
from .trainable import trainable
from .writer import ResultsWriter, SearchState, _read_done


def _no_callback_telemetry():
    """Tune.fit counts the callbacks it is given for Ray's usage telemetry (which kdbench turns off,
    RAY_USAGE_STATS_ENABLED=0) by importing every tracker integration Ray ships: with MLflow and W&B installed
    that is 1.3 s of imports in each `kdbench tune`. Nothing is recorded either way; skip the count."""
    from ray.air._internal import usage

    if hasattr(usage, "tag_callbacks") and os.environ.get("RAY_USAGE_STATS_ENABLED") == "0":
        usage.tag_callbacks = lambda callbacks: False


_no_callback_telemetry()

def init_ray(address: str | None, verbose: bool):
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
        # Ray starts one idle worker process per CPU for the first driver; Tune never uses them (a trial's actor
        # needs a worker with its own environment, OMP_NUM_THREADS included): on 2 cores a small search started
        # 4 worker processes for 2 trial actors. Without them it starts ~2 s sooner (a user's setting wins).
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)
    return True


def _load(study: Study, data_root: str | None, download: bool, on_teacher, on_teacher_ready):
    """Data set and teacher, once, in the driver (teacher from the cache or trained here)."""
    device = resolve_device("auto")
    data, teacher, hit = study_data(study, data_root, download, device, on_teacher)
    names = {m for m, _, _ in study.grid.points} if study.is_grid else {study.method} | {
        c for p in study.space if p.name == "method" for c in p.choices}
    for name in sorted(names):  # a method these models cannot run: one line now, not a failed trial in an hour
        check_method(study.methods[name], study.student, teacher, data)
    on_teacher_ready(teacher.meta, hit)
    return device, data.to("cpu"), teacher, hit  # the trials get the data through Ray's object store


@dataclass
class _Run:
    """What every Tuner.fit of one results folder shares."""

    study: Study
    out: Path
    teacher: dict  # Teacher.blob(): what the trials receive through the object store
    data: object
    rows: list  # trials.csv so far (all stages)
    epochs: list  # epochs.csv so far
    storage: str  # this folder's checkpoint root (see kdbench.checkpoints)
    resume_from: dict  # (config_id, seed) -> the latest checkpoint of an unfinished trial
    gpus_per_trial: float | None
    verbose: bool
    on_update: Callable
    timings: dict = dataclasses.field(default_factory=dict)  # where the wall time went (see _fit)

    def curves(self, metrics: list[str]) -> dict:
        """Validation curves ({epoch: (value per metric)}) of the trials earlier runs recorded (finished
        ones from epochs.csv, interrupted ones from their checkpoints), for ASHA's rungs."""
        finished = {str(r["trial_id"]) for r in self.rows if r.get("stage") != "confirm"}
        rows = [(str(e["trial_id"]), e) for e in self.epochs if str(e["trial_id"]) in finished]
        rows += [(f"{cid}-{seed}", h) for (cid, seed), c in self.resume_from.items() for h in c.get("history", [])]
        out: dict = {}
        for key, e in rows:
            values = tuple(e.get(m, math.nan) for m in metrics)
            if all(v == v for v in values):  # every metric measured that epoch
                out.setdefault(key, {})[int(e["epoch"])] = tuple(float(v) for v in values)
        return out


def run_study(study: Study, out: Path, *, resume: bool = False, address: str | None = None,
              data_root: str | None = None, download: bool = False, gpus_per_trial: float | None = None,
              storage: str | None = None, verbose: bool = False,
              on_update: Callable[[SearchState], None] = lambda s: None,
              on_teacher: Callable[[dict], None] | None = None, on_teacher_ready=lambda meta, hit: None) -> dict:
    """Run (or resume) ``study``, writing its results folder ``out``; return a summary.

    A study with ``[confirm]`` runs its confirmation right after the search (see :func:`run_confirm`).

    Args:
        study: validated study (``samples`` and ``concurrency`` already resolved).
        out: results folder: created (fresh run) or continued (``resume``).
        resume: continue a previous run in ``out``: finished trials are neither lost nor rerun, and
            interrupted ones continue from their last checkpoint.
        address: Ray cluster address (``auto``, ``ray://...``); a fresh local instance when None.
        data_root: folder of the CIFAR archives (overrides the study's).
        download: fetch CIFAR into ``data_root`` when missing (where the internet is reachable).
        gpus_per_trial: GPUs per trial (fractions share one); None: the study's, else automatic.
        storage: where trials keep their checkpoints (a path, or a URI such as ``s3://...``); default
            ``out/ray``; a resume uses the folder's unless given.
        verbose: let Ray and Optuna log.
        on_update: called with the live SearchState whenever a trial starts or ends.
        on_teacher: per-epoch report while the teacher trains (only on a cache miss).
        on_teacher_ready: called with the teacher's metadata and whether it came from the cache.
    """
    out = Path(out).resolve()
    previous = {}
    if resume:
        if not (out / "study.json").exists():
            raise StudyError(f"--resume {out}: no study.json there; nothing to resume")
        previous = results.read_study(out)
        if previous.get("name") != study.name:  # another study's trials would be mixed into this table
            raise StudyError(f"--resume {out}: holds study {previous.get('name')!r}, not {study.name!r}; allowed: "
                             f"the same study file")
        changed = differences(previous.get("study") or {}, study)
        if changed:
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise StudyError(f"--resume {out}: the study differs from the one this folder ran: {changed[0]}{more}; "
                             f"allowed: the same study (a resume may change {', '.join(RESUMABLE[3:])})")
        _check_unlocked(out)
        # a resume logs where the folder logged, and where it is asked to besides
        study = dataclasses.replace(study, trackers=tuple(dict.fromkeys((*previous["study"].get("trackers", ()),
                                                                         *study.trackers))))
    elif out.exists() and any(out.iterdir()):
        raise StudyError(f"--out {out}: folder exists and is not empty; pass --resume to continue it, or another --out")
    check_clients(study.trackers, f"{study.path or 'the study'}: logging.trackers")
    root, recorded = _storage(study, out, storage or previous.get("storage"))
    timings, t0 = {}, time.time()
    rows, epochs = _read_done(out) if resume else ([], [])
    remaining = study.trial_count() - sum(r.get("stage") != "confirm" for r in rows)
    # Ray first, then the data and the teacher, then the folder: a cluster that cannot be reached, or cannot
    # give the trials their GPUs, is one line before any teacher is trained and leaves nothing half-written.
    started_ray = init_ray(address, verbose) if remaining > 0 or study.confirm else False
    timings["ray_start"], t0 = time.time() - t0, time.time()
    try:
        if ray.is_initialized():
            check_gpus(study, gpus_per_trial)
        device, data, teacher, hit = _load(study, data_root, download, on_teacher, on_teacher_ready)
        timings["teacher"] = time.time() - t0
        out.mkdir(parents=True, exist_ok=True)
        with results.FolderLock(out, "tune"):
            f = _Run(study, out, teacher.blob(), data, rows, epochs, root, _unfinished(root, rows) if resume else {},
                        gpus_per_trial, verbose, on_update, timings)
            summary = _run(f, resume, teacher, hit, device, recorded)
            summary["timings"] = timings
            complete = summary["trials"] >= study.trial_count()
            if study.confirm is not None and complete:
                summary["confirm"] = _confirm(f, study.confirm)
            if complete:  # every trial finished: no checkpoint is needed any more
                checkpoints.remove(root)
                _prune_students(out, study)
        return summary
    finally:
        t0 = time.time()
        if started_ray:
            ray.shutdown()
        timings["ray_stop"] = time.time() - t0


def _storage(study: Study, out: Path, storage: str | None) -> tuple[str, str | None]:
    """This folder's checkpoint root, and what study.json records (None: the default, inside the folder)."""
    uri, default = checkpoints.resolve_storage(storage, out)
    return checkpoints.experiment_root(uri, default, out, study.name), None if default else uri


def _unfinished(root: str, rows: list) -> dict:
    """The latest checkpoints of trials that have not finished (a finished one's may survive a kill)."""
    found = checkpoints.find(root)
    for r in rows:
        ck = found.pop((str(r.get("config_id")), int(r["seed"])), None)
        if ck:
            checkpoints.remove(ck["uri"])
    return found


def _check_unlocked(out: Path):
    pid = results.FolderLock(out, "").holder()
    if pid is not None:
        raise StudyError(f"{out}: still running (pid {pid} is writing it); allowed: a folder no run is writing")


def _reference_images(data, study) -> int:
    """How many training images kNN and retrieval compare with (``[evaluation] reference_per_class``)."""
    from ..data import reference_rows

    rows = reference_rows(data.labels("train"), study.evaluation.reference_per_class)
    return data.size("train") if rows is None else len(rows)


def _run(f: _Run, resume: bool, teacher, hit, device, storage: str | None) -> dict:
    study, out, rows = f.study, f.out, f.rows
    meta = {"schema": results.SCHEMA, "name": study.name, "kind": "grid" if study.is_grid else "search", "study": study.to_dict(),
            "teacher": {k: v for k, v in teacher.meta.items() if k != "path"} | {"cache_hit": hit},
            "data": {"name": f.data.name, "classes": f.data.num_classes, "shape": list(f.data.shape),
                     **{s: f.data.size(s) for s in ("train", "val", "test")}, "skipped_images": f.data.skipped,
                     "streamed": f.data.streamed, "reference_images": _reference_images(f.data, study)},
            "environment": results.environment(str(device)), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "ended": None, "samples": study.trial_count(), "reference": dict(study.reference), "storage": storage}
    if resume:
        previous = results.read_study(out)
        meta["started"] = previous.get("started", meta["started"])
        meta["resumed"] = previous.get("resumed", 0) + 1
        if "confirm" in previous:
            meta["confirm"] = previous["confirm"]
    results.write_json(out / "study.json", meta)

    state = SearchState(total=study.trial_count(), max_epochs=study.max_epochs, objectives=study.objectives)
    for r in rows:
        if r.get("stage") != "confirm":
            state.counts[r["status"]] = state.counts.get(r["status"], 0) + 1
    remaining = study.trial_count() - sum(r.get("stage") != "confirm" for r in rows)
    if remaining > 0:
        todo = [c for c in grid_configs(study) if c["point"] not in _done_points(rows)] if study.is_grid else None
        _fit(f, state, remaining, todo, stage="search")
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
                storage: str | None = None, verbose: bool = False, trackers: tuple = (),
                on_update: Callable[[SearchState], None] = lambda s: None,
                on_teacher: Callable[[dict], None] | None = None, on_teacher_ready=lambda meta, hit: None,
                on_plan=lambda picked, todo: None) -> dict:
    """Retrain a finished search's candidates and the presets on fresh seeds; append them to ``out``.

    Resumable and idempotent: the (configuration, seed) pairs already in ``trials.csv`` with
    ``stage = confirm`` are not run again, and an interrupted one continues from its last checkpoint.
    Same Ray Tune path as the search, without early stopping.
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
    if concurrency is not None:
        study = dataclasses.replace(study, search=dataclasses.replace(study.search, concurrency=concurrency))
    if cpus_per_trial is not None:
        study = dataclasses.replace(study, resources=dataclasses.replace(study.resources, cpus_per_trial=cpus_per_trial))
    if trackers:  # logged where the search logged, and where this confirmation is asked to (recorded for the next)
        study = dataclasses.replace(study, trackers=tuple(dict.fromkeys((*study.trackers, *trackers))))
    check_clients(study.trackers, f"{out / 'study.json'}: logging.trackers")
    folder = results.read_folder(out)
    plan, picked = plan_confirm(study, folder.trials, confirm, str(out))
    todo, _, _ = pending(study, folder.trials, confirm, meta.get("confirm") or {}, str(out))
    on_plan(picked, todo)
    if not todo:  # nothing left: neither Ray nor the teacher is needed
        return {"out": str(out), "added": 0, "planned": len(plan), "candidates": picked, "seconds": 0.0,
                "rounds": len((meta.get("confirm") or {}).get("rounds") or [plan])}
    root, _ = _storage(study, out, storage or meta.get("storage"))
    started_ray = init_ray(address, verbose)  # as in run_study: the cluster checked before the teacher is read
    try:
        check_gpus(study, gpus_per_trial)
        _, data, teacher, _ = _load(study, data_root, False, on_teacher, on_teacher_ready)
        with results.FolderLock(out, "confirm"):
            rows, epochs = _read_done(out)
            f = _Run(study, out, teacher.blob(), data, rows, epochs, root, _unfinished(root, rows), gpus_per_trial,
                        verbose, on_update)
            summary = _confirm(f, confirm)
            checkpoints.remove(root)  # every planned run has finished
            _prune_students(out, study)
            return summary
    finally:
        if started_ray:
            ray.shutdown()


def _prune_students(out: Path, study: Study) -> None:
    """``keep_students = "front"``: remove the student files of runs whose configuration is off the front (on
    validation means, every finished full-fidelity configuration of the folder)."""
    folder = out / results.STUDENTS
    if study.keep_students != "front" or not folder.is_dir():
        return
    from .. import stats

    trials = results.read_folder(out).trials.assign(study=study.name)
    table = stats.summarise(trials, [f"val_{o}" for o in study.objectives])
    table = table[table["n"] > 0].reset_index(drop=True)
    on = set(table.loc[stats.front_on_means(table, study.objectives)[0], "config_id"])
    keep = set(trials.loc[trials["config_id"].isin(on), "trial_id"].astype(str))
    for f in folder.glob("*.pt"):
        if f.stem not in keep:
            f.unlink()


def _confirm(f: _Run, confirm: Confirm) -> dict:
    started, out = time.time(), f.out
    meta = results.read_study(out)
    meta["study"]["trackers"] = list(f.study.trackers)  # a confirmation's --log is where the next one logs too
    previous = meta.get("confirm") or {}
    trials = results.read_folder(out).trials
    plan, picked = plan_confirm(f.study, trials, confirm, str(out))
    options = {"seeds": sorted({p["seed"] for p in plan}), "top": confirm.top, "with": list(confirm.with_),
               "until_settled": confirm.until_settled, "max_seeds": confirm.max_seeds}
    # The recorded rounds are this confirmation's only when it was asked the same way (an interrupted one resumes);
    # other options plan anew, and the racing verdicts already recorded stay.
    same = all(previous.get(k) == v for k, v in options.items())
    meta["confirm"] = {**options, "candidates": [{k: v for k, v in p.items() if k != "values"} for p in picked],
                       "rounds": (same and previous.get("rounds")) or [{"pairs": [[p["config_id"], p["seed"]] for p in plan]}],
                       "started": previous.get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z")), "ended": None,
                       **({"settled": previous["settled"]} if "settled" in previous else {})}
    results.write_json(out / "study.json", meta)
    added = 0
    while True:
        todo, _, decision = pending(f.study, trials, confirm, meta["confirm"], str(out))
        if decision is not None:  # a round has ended: what it settled, and the next one (recorded before it runs)
            meta["confirm"]["rounds"][-1]["front"] = decision["front"]
            meta["confirm"]["settled"] = {c: {"seeds": n, "stop": decision["reasons"][c]} for c, n in decision["seeds"].items()}
            if todo:
                meta["confirm"]["rounds"].append({"pairs": [[r["config_id"], r["seed"]] for r in todo]})
            results.write_json(out / "study.json", meta)
        if not todo:
            break
        # Longest first: runs with a teacher forward (about twice a baseline's cost) before those without, so
        # that the run left alone at the end, with a core idle beside it, is a short one.
        todo.sort(key=lambda p: not resolve_trial(f.study, p)[0].needs_teacher_forward)
        _fit(f, SearchState(total=len(todo), max_epochs=f.study.max_epochs, objectives=f.study.objectives), len(todo),
             todo, asha=False, stage="confirm")
        added += len(todo)
        trials = results.read_folder(out).trials
    meta["confirm"]["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results.write_json(out / "study.json", meta)
    return {"out": str(out), "added": added, "planned": len(plan), "candidates": picked,
            "seconds": time.time() - started, "rounds": len(meta["confirm"]["rounds"])}


_FITS = itertools.count()  # a fit's experiment name is unique even for two fits within one second


def _fit(f: _Run, state: SearchState, remaining: int, todo: list | None, asha: bool | None = None,
         stage: str = "search"):
    """One Tuner.fit: ``todo`` (a grid or a confirmation: fixed trials) or ``remaining`` trials of the searcher.

    Records in ``f.timings[stage]`` where its wall time went: ``seconds`` in all, ``to_first_trial`` (Tune's
    set-up and the first worker's start), ``tail`` (the last trial running alone after the one before it
    ended) and ``after_last_trial`` (from the last trial's end to fit's return).
    """
    started = time.time()
    study = f.study
    if not f.verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        for name in ("ray", "ray.tune", "ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # Ray's copy of its own experiment state into the storage races with its renaming of a temporary file
        # (seen once in `make demo`: a traceback, then the run went on; Ray saves again at its next sync).
        # kdbench resumes from trials.csv and its own checkpoints, never from that state: not the user's error.
        logging.getLogger("ray.tune.execution.experiment_state").setLevel(logging.CRITICAL)
    gpus = gpus_of(study, f.gpus_per_trial)
    data_parallel = study.resources.workers_per_trial > 1  # each trial a Ray Train run: its driver holds a little
    worker = tune.with_resources(
        tune.with_parameters(trainable, study=study, teacher=f.teacher, data=f.data,
                             threads=int(study.resources.cpus_per_trial), resume_from=f.resume_from, gpus=gpus,
                             storage=f.storage),
        {"cpu": DRIVER_CPUS, "gpu": 0} if data_parallel else {"cpu": study.resources.cpus_per_trial, "gpu": gpus})
    if todo is not None:
        searcher, param_space, num_samples = None, {"trial": tune.grid_search(todo)}, 1
    else:
        finished = {(str(r["config_id"]), int(r["seed"])) for r in f.rows if r.get("stage") != "confirm"}
        searcher, param_space, num_samples = make_searcher(study, f.out, finished), {}, remaining
    scheduler = make_scheduler(study, f.curves, asha)
    tuner = tune.Tuner(
        worker, param_space=param_space,
        # reuse_actors: a finished trial's worker process (torch imported, data in memory) runs the next one
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=trials_at_once(study, gpus), reuse_actors=not data_parallel),
        run_config=tune.RunConfig(name=f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(_FITS)}", storage_path=f.storage,
                                  verbose=1 if f.verbose else 0,
                                  callbacks=[ResultsWriter(study, f.out, state, f.rows, f.epochs, f.on_update,
                                                           f.resume_from, f.data.class_names, f.storage)],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=study.checkpoint.max_failures)))
    tuner.fit()
    ended, ends = time.time(), sorted(state.ends)
    f.timings[stage] = {"seconds": ended - started, "to_first_trial": (state.first_start or ended) - started,
                        "tail": ends[-1] - ends[-2] if len(ends) > 1 else 0.0,
                        "after_last_trial": ended - ends[-1] if ends else 0.0}
