"""What a replayed search reported, scored on the table's seed means.

A search reports the front of its full-fidelity trials on their observed validation values (one seed each,
as ``kdbench tune`` does). Each reported trial is then scored by its configuration's **mean test values over
the recorded seeds**, and the hypervolume of those means is divided by that of the table's whole front on
means (what a perfect search could report). The reference point is fixed per table: each objective's worst
configuration mean less a tenth of the means' range (so that the front's extreme points count too).
"""

from __future__ import annotations

import numpy as np

from kdbench.metrics import sign
from kdbench.pareto import hypervolume_2d, pareto_mask

from .simulate import Ran
from .tables import Table

__all__ = ["Truth", "truth", "anytime", "at", "reach", "bootstrap"]


class Truth:
    """The table's configurations on ``objectives`` (seed means of the test values, signed so that larger is
    better), the reference point and the perfect hypervolume."""

    def __init__(self, table: Table, objectives):
        j = [table.metrics.index(o) for o in objectives]
        self.signs = np.array([sign(o) for o in objectives])
        self.means = table.test[:, :, j].mean(1) * self.signs
        lo, hi = self.means.min(0), self.means.max(0)
        self.reference = tuple(lo - 0.1 * (hi - lo))
        self.perfect = hypervolume_2d(self.means, self.reference)

    def ceilings(self, table: Table, objectives) -> dict:
        """What reporting fronts of observed validation values can reach at best, with every configuration run:
        once (per recorded seed: the front on that seed's values), and on its mean over all the seeds."""
        j = [table.metrics.index(o) for o in objectives]
        last = table.val[:, :, -1, :][:, :, j] * self.signs
        once = [self.score(np.flatnonzero(pareto_mask(last[:, s]))) for s in range(last.shape[1])]
        return {"every_configuration_one_seed": once,
                "every_configuration_seed_means": self.score(np.flatnonzero(pareto_mask(last.mean(1))))}

    def score(self, configs) -> float:
        """Normalised hypervolume of the configurations ``configs`` (indices) on their means."""
        return hypervolume_2d(self.means[list(configs)], self.reference) / self.perfect if len(configs) else 0.0


def truth(table: Table, objectives) -> Truth:
    return Truth(table, objectives)


def anytime(ran: list[Ran], t: Truth) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reported front's normalised hypervolume after each full-fidelity trial: (trial-epochs spent, simulated
    seconds, hypervolume), one entry per full trial in the order they ended."""
    spent, clock, hv, seen = [], [], [], []
    for r in ran:
        if not r.full:
            continue
        seen.append(r)
        observed = np.array([x.values for x in seen]) * t.signs
        front = {x.config for x, keep in zip(seen, pareto_mask(observed)) if keep}
        spent.append(r.spent), clock.append(r.end), hv.append(t.score(front))
    return np.array(spent, float), np.array(clock, float), np.array(hv, float)


def at(xs: np.ndarray, hv: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The step function (xs, hv) -- 0 before the first step -- read at ``grid``."""
    i = np.searchsorted(xs, grid, side="right") - 1
    return np.where(i >= 0, hv[np.clip(i, 0, None)] if len(hv) else 0.0, 0.0)


def reach(curves: np.ndarray, grid: np.ndarray, target: float) -> float:
    """The first grid budget at which the median over replays (rows of ``curves``) reaches ``target``; inf if
    it never does."""
    med = np.median(curves, axis=0)
    hit = np.flatnonzero(med >= target - 1e-12)
    return float(grid[hit[0]]) if len(hit) else float("inf")


def bootstrap(fn, *samples: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of ``fn(*resampled)``, each sample's rows resampled with replacement."""
    rng = np.random.default_rng(seed)
    values = [fn(*[s[rng.integers(len(s), size=len(s))] for s in samples]) for _ in range(n)]
    lo, hi = np.quantile(values, [0.025, 0.975], method="inverted_cdf")  # no interpolation: inf (never) is a value
    return float(lo), float(hi)
