"""A search replayed on a recorded table: the code the Ray search runs, on a simulated clock.

The searcher is kdbench's own (:func:`kdbench.search.searcher.searcher_of`: Optuna's sampler behind Ray's
``OptunaSearch``, a trial stopped early told as pruned), the early stopping is kdbench's own
(:func:`kdbench.search.schedulers.make_scheduler`), and both are called as Ray Tune's controller calls them:
``on_trial_add`` when a trial starts, ``on_trial_result`` per epoch, and on a STOP (or the last epoch)
``on_trial_complete`` with that result, to the scheduler and then the searcher. ``workers`` trials run at once;
a free worker asks for the next one at once. A proposed configuration runs as the nearest recorded one, with a
seed drawn from the recorded seeds: its epochs take the recorded seconds and report the recorded values.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from kdbench.search.schedulers import make_scheduler
from kdbench.search.searcher import searcher_of
from kdbench.study import Study

from .tables import Table

__all__ = ["Ran", "replay"]


@dataclass(frozen=True)
class Ran:
    """One replayed trial: the recorded configuration and seed it ran as, when it started and ended (simulated
    seconds), its epochs, the trial-epochs spent by all trials when it ended, and its last validation values."""

    config: int
    seed: int
    start: float
    end: float
    epochs: int
    spent: int
    values: tuple[float, ...]

    @property
    def full(self) -> bool:
        """Ran every epoch (its ``values`` are then the last epoch's objectives; None for a stopped trial)."""
        return self.values is not None


def replay(table: Table, study: Study, sampler, *, seed: int, workers: int = 4, budget: float = math.inf,
           trials: float = math.inf, trace: list | None = None) -> list[Ran]:
    """Replay ``study``'s search (its objectives, space, ASHA) with ``sampler`` until ``budget`` trial-epochs have
    been spent, or ``trials`` trials have ended (as ``kdbench tune`` runs its ``samples``): every trial in the order
    it ended (one still running when the budget ran out is left out). ``seed`` draws the recorded seed each trial
    runs with. ``trace``: appended (trial id, result, decision) per report."""
    rng = np.random.default_rng(seed)
    searcher = searcher_of(study, sampler)
    searcher.set_search_properties(None, None, {})
    scheduler = make_scheduler(study)
    metric_index = {f"val_{m}": j for j, m in enumerate(table.metrics)}
    objectives = [metric_index[f"val_{o}"] for o in study.objectives]
    events, ran, spent, started = [], [], 0, 0
    running = {}

    def start(now: float):
        nonlocal started
        trial = Trial("replay", stub=True, trial_id=f"r{started:05d}")
        started += 1
        config = searcher.suggest(trial.trial_id)
        c, s = table.nearest(study, config), int(rng.integers(len(table.seeds)))
        if scheduler is not None:
            scheduler.on_trial_add(None, trial)
        running[trial.trial_id] = (trial, c, s, float(now))
        heapq.heappush(events, (now + table.seconds[c, s, 0], started, trial.trial_id, 1))

    for _ in range(int(min(workers, trials))):
        start(0.0)
    while events and spent < budget:
        now, order, trial_id, epoch = heapq.heappop(events)
        trial, c, s, began = running[trial_id]
        spent += 1
        result = {"epoch": epoch, **{k: float(table.val[c, s, epoch - 1, j]) for k, j in metric_index.items()}}
        decision = TrialScheduler.CONTINUE
        if scheduler is not None:
            decision = scheduler.on_trial_result(None, trial, result)
        if epoch >= table.epochs:
            decision = TrialScheduler.STOP  # the trainable returns: Tune completes the trial with its last result
        if trace is not None:
            trace.append((trial_id, result, decision))
        if decision == TrialScheduler.STOP:
            if scheduler is not None:
                scheduler.on_trial_complete(None, trial, result)
            searcher.on_trial_complete(trial_id, result)
            values = tuple(float(table.val[c, s, epoch - 1, j]) for j in objectives) if epoch >= table.epochs else None
            ran.append(Ran(c, s, began, float(now), epoch, spent, values))
            del running[trial_id]
            if spent < budget and started < trials:
                start(now)
        else:
            searcher.on_trial_result(trial_id, result)
            heapq.heappush(events, (now + table.seconds[c, s, epoch], order, trial_id, epoch + 1))
    return ran
