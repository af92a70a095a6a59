"""ASHA's two rules: :class:`ResumableASHA` (rungs rank by validation top-1) and multi-objective ASHA
(:class:`ParetoASHA`): successive halving whose rungs rank trials by non-dominated sorting.

Schmucker et al., 2021, "Multi-objective multi-fidelity hyperparameter optimization with application
to fairness" (Syne Tune's MOASHA). Same rungs, grace period and reduction factor as ASHA; at a rung a
trial continues when it is in the top ``ceil(n / reduction_factor)`` of the ``n`` trials recorded
there (itself included), ordered by

1. non-dominated rank on the study's objectives (the rung's front first), then
2. within a rank, NSGA-II crowding distance, largest first (a rank's extreme points have an infinite
   distance, so the ends of the front are kept), then
3. arrival order (earlier first), so that the order is total and reproducible.

Plain ASHA ranks by validation top-1 alone and so stops exactly the trials that trade a little
accuracy for more geometry; this one keeps a rung's whole front alive as long as it fits in the top
fraction.
"""

from __future__ import annotations

import math

import numpy as np
from ray import tune
from ray.tune.schedulers import TrialScheduler
from ray.tune.schedulers.async_hyperband import AsyncHyperBandScheduler

from ..metrics import mode
from ..pareto import pareto_ranks
from ..study import Study

__all__ = ["ParetoASHA", "ResumableASHA", "make_scheduler", "rung_order", "in_top", "crowding_distance"]


def crowding_distance(points: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of each row of ``points`` ``(n, k)``: the sum over objectives of the
    normalised gap between its two neighbours; the extremes of each objective get infinity."""
    p = np.asarray(points, dtype=float)
    n = len(p)
    dist = np.zeros(n)
    if n <= 2:
        return np.full(n, math.inf)
    for j in range(p.shape[1]):
        order = np.argsort(p[:, j], kind="stable")
        lo, hi = p[order[0], j], p[order[-1], j]
        dist[order[0]] = dist[order[-1]] = math.inf
        if hi > lo:
            dist[order[1:-1]] += (p[order[2:], j] - p[order[:-2], j]) / (hi - lo)
    return dist


def rung_order(points: np.ndarray) -> list[int]:
    """Indices of ``points`` (rows in arrival order, every column maximised), best first: by
    non-dominated rank, then crowding distance within the rank (largest first), then arrival."""
    p = np.asarray(points, dtype=float).reshape(len(points), -1)
    rank = pareto_ranks(p)
    crowd = np.zeros(len(p))
    for r in np.unique(rank):
        members = np.flatnonzero(rank == r)
        crowd[members] = crowding_distance(p[members])
    return sorted(range(len(p)), key=lambda i: (rank[i], -crowd[i], i))


def in_top(points: np.ndarray, i: int, keep: int) -> bool:
    """Whether row ``i`` is among the first ``keep`` of :func:`rung_order` (the same answer), with crowding
    distances computed only for the rank the cut falls in: what a rung asks of each report."""
    p = np.asarray(points, dtype=float).reshape(len(points), -1)
    rank = pareto_ranks(p)
    members = np.flatnonzero(rank == rank[i])
    better = int((rank < rank[i]).sum())
    if better + len(members) <= keep or better >= keep:
        return better < keep
    crowd = crowding_distance(p[members])
    order = sorted(range(len(members)), key=lambda j: (-crowd[j], members[j]))
    return better + order.index(int(np.searchsorted(members, i))) < keep


class ParetoASHA(AsyncHyperBandScheduler):
    """ASHA for two (or more) objectives: ``metrics`` and ``modes`` name them; rungs compare trials by
    :func:`rung_order`. ``curves``: per earlier trial, ``{epoch: (value, ...)}`` already recorded (a
    resumed run's rungs start with them)."""

    def __init__(self, *, time_attr: str, metrics: list[str], modes: list[str], max_t: int, grace_period: int,
                 reduction_factor: int, curves: dict | None = None):
        super().__init__(time_attr=time_attr, metric=metrics[0], mode=modes[0], max_t=max_t,
                         grace_period=grace_period, reduction_factor=reduction_factor)
        self.metrics, self.signs = list(metrics), [1.0 if m == "max" else -1.0 for m in modes]
        self.rungs = [(int(m), {}) for m, _ in self._brackets[0]._rungs]  # (milestone, {trial: vector}), descending
        for key, curve in (curves or {}).items():
            for milestone, recorded in self.rungs:
                if milestone in curve:
                    recorded[f"earlier:{key}"] = self._vector(dict(zip(self.metrics, curve[milestone])))

    def _vector(self, result: dict) -> tuple:
        return tuple(s * float(result[m]) for m, s in zip(self.metrics, self.signs))

    def decide(self, trial_id: str, epoch: int, vector: tuple) -> str:
        """CONTINUE or STOP for a trial reporting ``vector`` (maximised) at ``epoch``; records it."""
        for milestone, recorded in self.rungs:
            if epoch < milestone or trial_id in recorded:
                continue
            recorded[trial_id] = vector
            keys = list(recorded)
            keep = math.ceil(len(keys) / self._reduction_factor)
            kept = in_top(np.array([recorded[k] for k in keys]), keys.index(trial_id), keep)
            return TrialScheduler.CONTINUE if kept else TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._time_attr not in result or any(m not in result for m in self.metrics):
            return TrialScheduler.CONTINUE
        if result[self._time_attr] >= self._max_t:
            return TrialScheduler.STOP
        return self.decide(trial.trial_id, int(result[self._time_attr]), self._vector(result))

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._trial_info.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._trial_info.pop(trial.trial_id, None)


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


def make_scheduler(study: Study, curves=lambda metrics: {}, asha: bool | None = None):
    """The study's early stopping (None without ASHA): :class:`ParetoASHA` on its objectives' validation values
    (``rank = "pareto"``) or :class:`ResumableASHA` on val top-1. ``curves(metrics)``: what an earlier run
    recorded, ``{trial: {epoch: (value per metric)}}``. ``asha``: overrides ``[asha] enabled``. The Ray search
    and the replay (benchmarks/replay) both build theirs here."""
    if not (study.asha.enabled if asha is None else asha):
        return None
    rungs = dict(time_attr="epoch", max_t=study.max_epochs, grace_period=study.asha.grace_period,
                 reduction_factor=study.asha.reduction_factor)
    if study.asha.rank == "pareto":
        metrics = [f"val_{o}" for o in study.objectives]
        return ParetoASHA(metrics=metrics, modes=[mode(o) for o in study.objectives], curves=curves(metrics), **rungs)
    earlier = {k: {e: v[0] for e, v in c.items()} for k, c in curves(["val_top1"]).items()}
    return ResumableASHA(metric="val_top1", mode="max", curves=earlier, **rungs)
