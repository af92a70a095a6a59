"""What a search's trials take from the Ray cluster: GPUs per trial (automatic where none are given), how many
trials run at once where each is a multi-worker Ray Train run, and the one-line refusals of what cannot be placed."""

from __future__ import annotations

import math

import ray

from ..study import Study, StudyError
from ..values import gpus_allowed

__all__ = ["DRIVER_CPUS", "gpus_of", "automatic_gpus", "trials_at_once", "check_gpus", "gpu_shortfall"]

def gpus_of(study: Study, given: float | None) -> float:
    """GPUs per trial (per worker of a multi-worker trial): ``--gpus-per-trial``, else the study's, else
    :func:`automatic_gpus` for the cluster's GPUs."""
    gpus = given if given is not None else study.resources.gpus_per_trial
    if gpus is None:
        gpus = automatic_gpus(study.concurrency, ray.cluster_resources().get("GPU", 0), study.resources.workers_per_trial)
    return gpus


def automatic_gpus(concurrency: int, cluster_gpus: float, workers: int = 1) -> float:
    """No GPU where the cluster has none; one a worker for multi-worker trials (NCCL refuses two ranks of one
    communicator on one GPU); else the concurrent trials spread over the cluster's GPUs, packed only where there are
    more trials than GPUs: 1/k with k = ceil(concurrency / GPUs), at most 8 a GPU. Ray puts a fraction on the first
    GPU with room for it (4 trials at 0.25 on a 4-GPU node all run on GPU 0), so 1/concurrency would leave every
    other GPU idle. (Measured on an H200 at the paper's batch: 4 packed trials train 3.8x one trial's images/s.)"""
    if cluster_gpus <= 0:
        return 0.0
    if workers > 1 or cluster_gpus >= concurrency:
        return 1.0
    return 1.0 / min(math.ceil(concurrency / cluster_gpus), 8)


# A multi-worker trial's driver (kdbench.search.trainable): it waits on its Train run; the workers hold the rest.
DRIVER_CPUS = 0.1


def trials_at_once(study: Study, gpus: float) -> int:
    """The study's concurrency, capped where its trials are Ray Train runs by how many fit on the cluster at once:
    a Train run starts only when every worker's resources are free, so a driver beyond that would wait."""
    n, cpus = study.resources.workers_per_trial, study.resources.cpus_per_trial
    if n == 1:
        return study.concurrency
    total = ray.cluster_resources()
    fit = int((total.get("CPU", 0) + 1e-9) // (n * cpus + DRIVER_CPUS))
    if gpus > 0:
        fit = min(fit, int((total.get("GPU", 0) + 1e-9) // (n * gpus)))
    return max(1, min(study.concurrency, fit))


def check_gpus(study: Study, given: float | None, flag: str = "--gpus-per-trial") -> None:
    """A trial asking for more GPUs than any node of the cluster has (or, data-parallel, more workers' CPUs and GPUs
    than the whole cluster has) would wait forever: one line now instead."""
    gpus = gpus_of(study, given)
    n, cpus, total = study.resources.workers_per_trial, study.resources.cpus_per_trial, ray.cluster_resources()
    if gpus_allowed(gpus, n):  # the flag's value against the study's workers (the study's own was checked as it loaded)
        raise StudyError(f"{flag} {gpus:g}: allowed: {gpus_allowed(gpus, n)}")
    if n > 1 and (n * cpus + DRIVER_CPUS > total.get("CPU", 0) + 1e-9 or n * gpus > total.get("GPU", 0) + 1e-9):
        raise StudyError(f"workers_per_trial = {n}: {n} workers × ({cpus:g} CPU{f', {gpus:g} GPU' if gpus else ''}) "
                         f"and the driver's {DRIVER_CPUS:g} CPU do not fit on the Ray cluster ({total.get('CPU', 0):g} "
                         f"CPUs, {total.get('GPU', 0):g} GPUs); allowed: fewer workers or resources per worker")
    if gpus <= 0:
        return
    per_node = [n["Resources"].get("GPU", 0) for n in ray.nodes() if n.get("Alive")]
    why = gpu_shortfall(gpus, per_node, ray.cluster_resources().get("CPU", 0))
    if why:
        raise StudyError(f"{flag} {gpus:g}: {why}")


def gpu_shortfall(gpus: float, per_node: list[float], cpus: float) -> str | None:
    """Why trials of ``gpus`` GPUs each cannot be placed on nodes with ``per_node`` GPUs (None: they can)."""
    if max(per_node, default=0) >= gpus:
        return None
    what = "has no GPU" if not any(per_node) else f"has at most {max(per_node):g} GPUs on a node"
    return (f"the Ray cluster {what} ({len(per_node)} nodes, {cpus:g} CPUs); allowed: 0 here (the trials run on "
            f"CPUs), or a cluster whose nodes have GPUs")
