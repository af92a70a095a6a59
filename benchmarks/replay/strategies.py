"""The strategies a replay compares, and running many replays of them over both cores."""

from __future__ import annotations

import dataclasses
import functools
import math
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from kdbench.study import Study

from .score import anytime, truth
from .simulate import replay
from .tables import load_table, replay_study

__all__ = ["Strategy", "strategies", "sweep", "sampler_of", "pool", "run_many"]


@dataclass(frozen=True)
class Strategy:
    """A sampler (a ``[search] sampler`` name, or ``tpe-noliar``: TPE without the constant liar) and early stopping
    (``asha``: none, top1 or pareto; ``grace`` and ``eta``: the rungs, None for the study's own)."""

    name: str
    sampler: str
    asha: str
    grace: int | None = None
    eta: int | None = None

    def study(self, study: Study, seed: int) -> Study:
        s = dataclasses.replace(study, seed=seed, search=dataclasses.replace(
            study.search, sampler="tpe" if self.sampler == "tpe-noliar" else self.sampler))
        asha = dataclasses.replace(s.asha, enabled=self.asha != "none", rank=s.asha.rank if self.asha == "none" else self.asha,
                                   grace_period=self.grace or s.asha.grace_period,
                                   reduction_factor=self.eta or s.asha.reduction_factor)
        return dataclasses.replace(s, asha=asha)

    def key(self, study: Study) -> tuple:
        s = self.study(study, 0)
        return self.sampler, s.asha.enabled, s.asha.rank if s.asha.enabled else None, \
            (s.asha.grace_period, s.asha.reduction_factor) if s.asha.enabled else None


def default_of(study: Study) -> Strategy:
    return Strategy("default", study.search.sampler, study.asha.rank if study.asha.enabled else "none")


def strategies(study: Study) -> list[Strategy]:
    """The bundled default (``default``), random search with and without ASHA, TPE with and without the constant
    liar x {no early stopping, top-1 ASHA, two-objective ASHA}, NSGA-II, QMC (alone and with two-objective
    ASHA), and the Gaussian process (alone: it models completed trials only, so under ASHA it stays random
    longer). A strategy equal to the default is left out (the default stands for it)."""
    out = [default_of(study)]
    for sampler, ashas in (("random", ("none", "top1", "pareto")), ("tpe", ("none", "top1", "pareto")),
                           ("tpe-noliar", ("none", "top1", "pareto")), ("nsga2", ("none", "pareto")),
                           ("qmc", ("none", "pareto")), ("gp", ("none",))):
        for asha in ashas:
            s = Strategy(sampler if asha == "none" else f"{sampler}+{asha}", sampler, asha)
            if s.key(study) != out[0].key(study):
                out.append(s)
    return out


def sweep(study: Study, sampler: str) -> list[Strategy]:
    """Two-objective ASHA's rungs for ``sampler``: grace period {3, 6, 10} x reduction factor {2, 3, 4}; a grace
    period of the run's whole length or more is left out (no rung: the sampler without early stopping, which
    :func:`strategies` replays)."""
    graces = [g for g in (3, 6, 10) if g < study.max_epochs]
    return [Strategy(f"{sampler}+pareto g{g} η{e}", sampler, "pareto", g, e) for g in graces for e in (2, 3, 4)]


def sampler_of(strategy: Strategy, study: Study):
    from kdbench.search.searcher import make_sampler

    if strategy.sampler == "tpe-noliar":
        import optuna

        return optuna.samplers.TPESampler(seed=study.seed, constant_liar=False)
    return make_sampler(study)


@functools.cache
def _loaded(table: str, path: str | None):
    from pathlib import Path

    return load_table(table, Path(path) if path else None), replay_study(table)


def one(job: tuple) -> tuple:
    """One replay: (table, path, strategy, seed, workers, budget[, trials]) -> (trial-epochs, seconds,
    hypervolume) arrays after each full-fidelity trial, and the trial-epochs spent when each trial (stopped or
    full) ended. ``budget`` None: until ``trials`` have ended."""
    table_name, path, strategy, seed, workers, budget, *trials = job
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    table, study = _loaded(table_name, path)
    s = strategy.study(study, seed)
    ran = replay(table, s, sampler_of(strategy, s), seed=seed, workers=workers,
                 budget=math.inf if budget is None else budget, trials=trials[0] if trials else math.inf)
    return (*anytime(ran, truth(table, study.objectives)), np.array([r.spent for r in ran], float))


def _one_thread() -> None:
    """A pool worker computes on one thread: the Gaussian process's torch and the BLAS would otherwise start a
    thread per core in every worker (2 workers x 2 threads on 2 cores: a GP replay took 2.3x as long)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)


def pool(processes: int | None = None) -> ProcessPoolExecutor:
    """Worker processes for :func:`run_many` (default: one per core), each on one thread. One pool serves a whole
    run: a worker's start (importing Ray, Optuna and torch) costs ~3 s. Spawned, not forked: a child forked from a
    process connected to Ray inherits its connection, and the searcher's first call on it (Ray's usage tag, as
    OptunaSearch starts) never returns (seen: the suite hung when this test ran after Ray's in one xdist worker)."""
    return ProcessPoolExecutor(processes or os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_one_thread)


def run_many(jobs: list[tuple], workers: ProcessPoolExecutor | None = None) -> list[tuple]:
    """:func:`one` over ``jobs`` on ``workers`` (a :func:`pool`; default: a new one), in order."""
    if workers is None:
        with pool() as workers:
            return run_many(jobs, workers)
    # The Gaussian process's replays first: the longest jobs first keeps both workers busy to the end, and a GP
    # replay in a worker that has run hundreds of others took up to 2.5x as long (measured, cause not found).
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][2].sampler != "gp")
    done = dict(zip(order, workers.map(one, [jobs[i] for i in order], chunksize=1)))
    return [done[i] for i in range(len(jobs))]


def curves(results: list[tuple], grid: np.ndarray, until: float | None = None, axis: int = 0) -> np.ndarray:
    """Replays' step functions read at ``grid`` (axis 0: trial-epochs, 1: simulated seconds): replays x grid; NaN
    past ``until`` (where the replays stopped)."""
    from .score import at

    c = np.array([at(r[axis], r[2], grid) for r in results])
    return c if until is None else np.where(grid[None, :] <= until, c, np.nan)
