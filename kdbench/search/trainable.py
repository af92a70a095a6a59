"""What runs in a Ray worker: one trial, from its config to its reports (the driver's side is :mod:`.writer`)."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
from pathlib import Path

import ray
import torch
from ray import tune

from .. import checkpoints, parallel, results
from ..records import Epoch, TrainState
from ..study import Study
from ..teacher import load_teacher
from ..train import TrainConfig, distill, resolve_device
from ..trial import resolve_trial, trial_config_id

__all__ = ["trainable", "run_trial", "ROW", "MATRICES"]

# What a trial reports to Tune once an epoch is flat (schedulers and the searcher read its top-level metrics):
# the epoch's row, the names of the row's columns under ROW (that row is epochs.csv's), where and how it ran, and
# at its last epoch the run's numbers and its centroid-similarity matrices under MATRICES.
ROW, MATRICES = "row", "matrices"


def trainable(config: dict, study: Study, teacher: dict, data, threads: int, resume_from: dict, gpus: float = 0.0,
              storage: str = ""):
    """One trial, in a Ray worker on any machine of the cluster: the data set and the teacher come
    through Ray's object store (put there once by the driver); distill; report every epoch, with a
    checkpoint every ``study.checkpoint.every`` epochs, and at the first step's end once
    ``study.checkpoint.minutes`` have passed since the last one (mid-epoch too: a report with a checkpoint and no
    row, which the schedulers, the searcher and the writer pass over).

    With ``workers_per_trial`` > 1 this is the trial's driver: a Ray Train ``TorchTrainer`` runs the same
    :func:`run_trial` on that many workers (DDP; see :mod:`kdbench.parallel`), each with the study's CPUs and
    GPUs, and forwards rank 0's reports to Tune; Train restarts its workers from the last checkpoint when one dies
    (``max_failures``), and a failure it gives up on is the trial's, with its reason. ``gpus``: each worker's;
    ``storage``: where Train keeps the workers' checkpoints (the search's storage: a resume finds them there)."""
    trial_id = tune.get_context().get_trial_id()
    if study.resources.workers_per_trial == 1:
        return run_trial(config, study, teacher, data, threads, resume_from, _TuneSession(), trial_id)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    method, recipe, seed = resolve_trial(study, config.get("trial", config))
    res = study.resources
    trainer = TorchTrainer(
        _worker, train_loop_config={"config": config, "study": study, "teacher": ray.put(teacher), "data": ray.put(data),
                                    "threads": threads, "resume_from": resume_from, "trial_id": trial_id},
        scaling_config=ScalingConfig(num_workers=res.workers_per_trial, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": res.cpus_per_trial, **({"GPU": gpus} if gpus else {})}),
        run_config=RunConfig(name=train_run(trial_config_id(study, method, recipe), seed), storage_path=storage,
                             failure_config=FailureConfig(max_failures=study.checkpoint.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),  # the latest only, as Tune keeps
                             callbacks=[TuneReportCallback()]))
    try:
        trainer.fit()
    except TrainingFailedError as e:  # Train gave up: the trial fails with the first line of why
        why = next((line.strip() for line in str(e).splitlines() if "Error" in line), str(e).splitlines()[0])
        tune.report({"epoch": 0, "failure": f"TrainingFailedError: {why[:200]}", "ended_at": time.time()})


def train_run(config_id: str, seed: int) -> str:
    """The folder of a multi-worker trial's Ray Train run in the storage (its checkpoints): one per configuration and
    seed, so that a resumed trial's Train run finds the interrupted one's."""
    return f"train-{config_id}-{seed}"


def _worker(cfg: dict):
    """A Ray Train worker of a multi-worker trial: the same trial, on its share of each batch."""
    run_trial(cfg["config"], cfg["study"], ray.get(cfg["teacher"]), ray.get(cfg["data"]), cfg["threads"],
              cfg["resume_from"], _TrainSession(), cfg["trial_id"])


class _TuneSession:
    """A one-process trial's line to Tune."""

    rank = 0

    @staticmethod
    def checkpoint():
        return tune.get_checkpoint()

    @staticmethod
    def report(result: dict, folder: str | None = None):
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)


class _TrainSession:
    """A Ray Train worker's: every worker reports (Train's barrier), rank 0's metrics and checkpoints go to Tune."""

    def __init__(self):
        from ray import train

        self.train, self.rank = train, train.get_context().get_world_rank()

    def checkpoint(self):
        return self.train.get_checkpoint()

    def report(self, result: dict, folder: str | None = None):
        if MATRICES in result:  # Train's controller writes what it carries as JSON
            result = {**result, MATRICES: {k: v.tolist() for k, v in result[MATRICES].items()}}
        self.train.report(result if self.rank == 0 else {},
                          checkpoint=self.train.Checkpoint.from_directory(folder) if folder else None)


def run_trial(config: dict, study: Study, teacher: dict, data, threads: int, resume_from: dict, session, trial_id: str = ""):
    """One trial's training, in a Tune trial's worker or in each Ray Train worker of one (``session``: where its
    reports and checkpoints go; ``trial_id``: Tune's, which its checkpoints record with the trial it continues)."""
    started_at = time.time()
    torch.set_num_threads(max(1, threads))
    method, recipe, seed = resolve_trial(study, config.get("trial", config))  # grids nest their point
    cid = trial_config_id(study, method, recipe)
    device = resolve_device("auto")
    data = data.to(device)
    teacher = load_teacher(teacher, data)
    # Ray's retry of this trial after its worker died, else the checkpoint an interrupted run left.
    ckpt = session.checkpoint()
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
    dp, node = parallel.world(), ray.get_runtime_context().get_node_id()[:12]
    if dp.size > 1:  # every worker's node, in rank order (one collective, at the start)
        nodes = [None] * dp.size
        torch.distributed.all_gather_object(nodes, node)
        node = ",".join(nodes)
    where = {"node": node, "host": socket.gethostname(),
             "threads": torch.get_num_threads(), "device": str(device), "resumed_from": state.epoch if state else 0,
             "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()), "started_at": started_at,
             "workers": dp.size, "backend": torch.distributed.get_backend() if dp.size > 1 else "",
             "worker_batch": recipe.batch_size // dp.size}
    last_epoch, last_saved = 0, time.monotonic()
    lineage = checkpoints.lineage(resume_from.get((cid, seed)) or {}, trial_id)

    def due(epoch: int, within: bool) -> bool:
        every, minutes = study.checkpoint.every, study.checkpoint.minutes
        return bool(minutes and time.monotonic() - last_saved >= 60 * minutes) or bool(not within and every and epoch % every == 0)

    def save(state: TrainState, result: dict):
        nonlocal last_saved
        last_saved = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="kdbench-ckpt-") as d:
            checkpoints.save(Path(d), state.state_dict(), {"config_id": cid, "seed": seed, "epoch": state.epoch,
                                                           "batch": state.batch, "pid": os.getpid(),
                                                           "history": state.history, "trial_id": trial_id,
                                                           "lineage": lineage})
            session.report(result, d)

    def report(e: Epoch):
        nonlocal last_epoch
        if not e.row:  # a mid-epoch state: its checkpoint, with no row (ROW absent) for anyone to read
            if e.state is None:  # another worker's turn of it (Train's reports are a barrier): no checkpoint
                return session.report({})
            return save(e.state, {"epoch": e.state.epoch, "batch": e.state.batch, **where, "ended_at": time.time()})
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
                return session.report(result, d)
        if e.state is None:
            return session.report(result)
        save(e.state, result)

    try:
        distill(TrainConfig.of_trial(study, method, recipe, seed), data, teacher, report, resume=state,
                state_when=due if session.rank == 0 else None,
                final_weights=study.keep_students != "none" and session.rank == 0)
    except Exception as e:  # NaN loss, OOM, a bug: the trial is failed, with its reason; the search goes on
        if isinstance(session, _TrainSession):  # the others wait in a collective: Train stops them, tells the driver
            raise
        session.report({"epoch": last_epoch, "failure": f"{type(e).__name__}: {e}", **where, "ended_at": time.time()})
